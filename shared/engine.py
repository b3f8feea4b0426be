"""train_one_epoch and evaluate, shared by the recipes.

The loop is written for a model and optimizer returned by
``accelerator.prepare``; the same code runs under DDP, AMP and DeepSpeed ZeRO
because distribution only enters through ``accelerator``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf."""


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint so a resume continues exactly."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # micro-batches of this epoch already trained
    global_step: int = 0  # optimizer steps taken
    samples: int = 0  # training samples seen by all ranks in this epoch

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    batches: int = 0
    images: int = 0  # images trained on by this rank in this session
    seconds: float = 0.0
    pending: list = field(default_factory=list)  # (step, loss tensor) not yet checked for NaN

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.batches)


def input_dtype(accelerator: Accelerator) -> torch.dtype:
    """DeepSpeed bf16/fp16 converts the parameters, not the activations: cast inputs to match."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    return torch.float32


def cast_buffers_to_input_dtype(accelerator: Accelerator, model) -> None:
    """DeepSpeed bf16/fp16 converts parameters but not buffers (BatchNorm running stats); match them."""
    dtype = input_dtype(accelerator)
    for buffer in model.buffers():
        if buffer.is_floating_point() and dtype != torch.float32:
            buffer.data = buffer.data.to(dtype)


def loss_scale(accelerator: Accelerator, model) -> float | None:
    """The current fp16 loss scale (AMP GradScaler or DeepSpeed), or None without one."""
    if accelerator.scaler is not None:
        return float(accelerator.scaler.get_scale())
    optimizer = getattr(model, "optimizer", None)  # a DeepSpeed engine
    scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
    return float(scale) if accelerator.mixed_precision == "fp16" and scale is not None else None


def check_finite(stats: EpochStats) -> None:
    """Raise on the first NaN/inf loss among those not yet checked (one host sync per call)."""
    if not stats.pending:
        return
    steps, losses = zip(*stats.pending)
    values = torch.stack(losses).float().cpu()
    stats.pending.clear()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise NonFiniteLossError(
            f"training loss is {values[i].item()} at optimizer step {steps[i]}; stopping without saving a "
            "checkpoint (the last good one is kept). Lower --lr, set --clip-grad, or use bf16 instead of fp16."
        )
    stats.loss_sum += float(values.sum())
    stats.batches += len(values)


def train_one_epoch(
    model, loader, optimizer, scheduler, criterion: Callable, accelerator: Accelerator, progress: Progress,
    *, mixup=None, clip_grad: float = 0.0, check_every: int = 20, stats: EpochStats | None = None,
) -> Iterator[EpochStats]:
    """Train from ``progress.batch`` to the end of the epoch, yielding after every optimizer step.

    The caller decides at each yield whether to checkpoint or stop (it may
    simply ``break``): the loop itself knows nothing of files or signals.
    """
    model.train()
    stats = stats or EpochStats()
    world = accelerator.num_processes
    dtype = input_dtype(accelerator)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    start = time.perf_counter()
    for batch in loader.iter_from(progress.batch):
        x, y = batch.images, batch.labels
        if mixup is not None:
            x, y = mixup(x, y)
        with accelerator.accumulate(model):
            logits = model(x.to(dtype)).float()
            # Each rank's mean loss, weighted so that the average over ranks is the
            # mean over the global batch even when the last batch is split unevenly.
            loss = criterion(logits, y) * (len(x) * world / batch.global_size)
            accelerator.backward(loss)
            if accelerator.sync_gradients and clip_grad > 0 and not deepspeed:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        progress.batch += 1
        progress.samples += batch.global_size
        stats.images += len(x)
        stats.pending.append((progress.global_step + 1, loss.detach()))
        if accelerator.sync_gradients:
            progress.global_step += 1
            scheduler.step_update(num_updates=progress.global_step)
            if len(stats.pending) >= check_every:
                check_finite(stats)
            stats.seconds = time.perf_counter() - start
            yield stats
    check_finite(stats)
    stats.seconds = time.perf_counter() - start


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator) -> dict[str, float]:
    """Top-1/top-5 accuracy and loss over the whole test set, each sample counted once across ranks."""
    model.eval()
    dtype = input_dtype(accelerator)
    totals = torch.zeros(4, device=accelerator.device, dtype=torch.float64)  # correct1, correct5, loss, count
    for batch in loader:
        logits = model(batch.images.to(dtype)).float()
        valid = batch.valid
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == batch.labels[:, None]
        totals[0] += (hit[:, 0] & valid).sum()
        totals[1] += (hit.any(1) & valid).sum()
        totals[2] += (torch.nn.functional.cross_entropy(logits, batch.labels, reduction="none") * valid).sum()
        totals[3] += valid.sum()
    totals = accelerator.reduce(totals, reduction="sum")
    n = max(1.0, float(totals[3]))
    return {"test_acc": float(totals[0]) / n, "test_acc5": float(totals[1]) / n,
            "test_loss": float(totals[2]) / n, "test_samples": int(totals[3])}
