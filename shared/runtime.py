"""The Accelerator, CPU threads and stop signals: what every recipe sets up first."""

from __future__ import annotations

import os
import signal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs


def using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def create_accelerator(grad_accum_steps: int, tracker: str, run_dir: str) -> Accelerator:
    """One Accelerator whose precision and distribution come from the launch config.

    Without CUDA, plain DDP needs ``cpu=True`` (else each process believes it
    is rank 0 of 1) and DeepSpeed needs the gloo backend (``cpu=True`` would
    drop the DeepSpeed plugin); neither changes anything on a GPU machine.
    """
    kwargs = {}
    if not torch.cuda.is_available():
        if using_deepspeed():
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            kwargs["cpu"] = True
    accelerator = Accelerator(
        gradient_accumulation_steps=grad_accum_steps,
        log_with="wandb" if tracker == "wandb" else None,
        project_dir=run_dir,
        step_scheduler_with_optimizer=False,
        **kwargs,
    )
    if accelerator.device.type == "cpu":
        set_cpu_threads()
    return accelerator


def set_cpu_threads() -> None:
    """Give each local process an equal share of the cores (torchrun sets 1 thread otherwise)."""
    cores = len(os.sched_getaffinity(0))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, cores // local))


def zero_stage(accelerator: Accelerator) -> int:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def fill_deepspeed_auto(accelerator: Accelerator, batch_size: int, clip_grad: float) -> None:
    """Fill the DeepSpeed JSON's ``"auto"`` batch size and clipping from the recipe.

    Accelerate would otherwise need a DataLoader to infer the micro batch and
    would quietly clip gradients at 1.0.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = clip_grad


class StopSignal:
    """SIGUSR1/SIGTERM ask for a clean stop at the next optimizer step, on every rank at once.

    A signal may reach the ranks at slightly different steps; ``requested()``
    all-reduces the flag so that all ranks stop at the same step.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.received: str | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        self.accelerator.set_trigger()

    def requested(self) -> bool:
        return self.accelerator.check_trigger()
