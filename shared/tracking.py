"""Weights & Biases through Accelerate's tracker, offline when there are no credentials.

The W&B run id lives in ``<run_dir>/wandb_run_id`` so that a resumed or
requeued job logs into the same run. The API key is never read into the
config, printed or saved: only its presence is checked.
"""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path

from accelerate import Accelerator

RUN_ID_FILE = "wandb_run_id"


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """WANDB_MODE if the user set it, else online with credentials and offline without."""
    return os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")


def run_id(run_dir: str | Path) -> str:
    """The run id stored in the run directory, created on first use (main process only)."""
    path = Path(run_dir) / RUN_ID_FILE
    if not path.is_file():
        path.write_text(uuid.uuid4().hex[:12] + "\n")
    return path.read_text().strip()


def start_tracking(accelerator: Accelerator, cfg, run_dir: Path, config: dict) -> None:
    """Start the W&B run (resuming the stored id) unless ``cfg.tracker == 'none'``."""
    if cfg.tracker == "none":
        return
    mode = wandb_mode()
    rid = run_id(run_dir) if accelerator.is_main_process else None
    if mode == "offline":
        why = "WANDB_MODE=offline" if os.environ.get("WANDB_MODE") else "no WANDB_API_KEY or ~/.netrc entry"
        accelerator.print(f"W&B: offline ({why}); upload later with `wandb sync {run_dir}/wandb/offline-run-*`")
    init = {"id": rid, "resume": "allow", "dir": str(run_dir), "mode": mode, "name": cfg.run_name or run_dir.name}
    accelerator.init_trackers(cfg.project, config=config, init_kwargs={"wandb": init})
