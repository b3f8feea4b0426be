"""Run the real recipes the way users do: ``accelerate launch`` with real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = ROOT / "accelerate_configs"
RECIPES = ROOT / "recipes"
# Small, quick settings used by most integration tests (a few steps on real Fashion-MNIST).
QUICK = ["--train-subset", "1000", "--test-subset", "500", "--batch-size", "50", "--epochs", "1",
         "--tracker", "none", "--log-every", "5"]


@dataclass
class Run:
    returncode: int
    output: str
    out_dir: Path

    @property
    def summary(self) -> dict:
        return json.loads((self.out_dir / "summary.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, out_dir: Path, *args: str, recipe: str = "image_classification", launch_args=(),
           env: dict[str, str | None] | None = None, timeout: int = 600, check: bool = True) -> Run:
    """``accelerate launch --config_file accelerate_configs/<config> recipes/<recipe>.py --output-dir out_dir args``."""
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / config),
           "--main_process_port", str(free_port()), *launch_args,
           str(RECIPES / f"{recipe}.py"), "--output-dir", str(out_dir), *args]
    merged = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env = {k: v for k, v in merged.items() if v is not None}  # None unsets a variable
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    run = Run(proc.returncode, proc.stdout + proc.stderr, Path(out_dir))
    if check and proc.returncode != 0:
        raise AssertionError(f"exit code {proc.returncode} from {' '.join(cmd)}\n{run.output[-6000:]}")
    return run
