"""Crash-safe checkpoints for resume, and the final consolidated export.

A checkpoint is written by ``accelerator.save_state`` into a hidden temporary
folder, completed with ``progress.json`` and then renamed into place, so a
crash during the write leaves the previous checkpoint untouched and a
half-written folder is never picked up by ``--resume auto``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import save_file

PROGRESS = "progress.json"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a complete one has progress.json)."""
    root = checkpoint_dir(run_dir)
    found = [p for p in root.glob("step_*") if (p / PROGRESS).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resolve_resume(spec: str | None, run_dir: str | Path) -> Path | None:
    """``None``/``none``: fresh start; ``auto``: latest complete checkpoint if any; else a path."""
    if not spec or spec == "none":
        return None
    if spec == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / PROGRESS).is_file():
        raise FileNotFoundError(f"--resume {spec}: not a complete checkpoint (no {PROGRESS} in it)")
    return path


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, progress, keep: int) -> Path:
    """Write a checkpoint atomically and keep only the newest ``keep``. All ranks must call it."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{progress.global_step:08d}"
    tmp = root / f".tmp_{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / PROGRESS).write_text(json.dumps(progress.state_dict()))
        if final.exists():  # the same step saved again (e.g. a stop right after an epoch-end save)
            shutil.rmtree(final)
        tmp.rename(final)
        others = [p for p in list_checkpoints(run_dir) if p != final]
        for old in others[: max(0, len(others) - (keep - 1))] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, progress) -> None:
    accelerator.load_state(str(path))
    progress.load_state_dict(json.loads((path / PROGRESS).read_text()))


def export_model(accelerator: Accelerator, model, path: str | Path, last_checkpoint: Path | None) -> None:
    """Write a consolidated fp32 ``model.safetensors`` that loads into a fresh model.

    Under DeepSpeed the fp32 master weights are rebuilt from the last
    checkpoint with DeepSpeed's zero_to_fp32 (works for ZeRO-1/2/3, and under
    bf16 gives the fp32 weights, not the bf16 copies). Otherwise the unwrapped
    module's state dict is saved. Only the main process writes.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = get_fp32_state_dict_from_zero_checkpoint(str(last_checkpoint), tag="pytorch_model")
    else:
        state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        state = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}
        tmp = Path(path).with_suffix(".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.rename(path)
    accelerator.wait_for_everyone()


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load an exported model.safetensors (no pickle involved)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
