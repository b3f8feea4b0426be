"""train_one_epoch and evaluate, shared by the recipes.

The loop is written for a model and optimizer returned by
``accelerator.prepare``; the same code runs under DDP, AMP and DeepSpeed ZeRO
because distribution only enters through ``accelerator``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from timm.data.mixup import mixup_target


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
    trace: TextIO | None = None,
) -> Iterator[EpochStats]:
    """Train from ``progress.batch`` to the end of the epoch, yielding after every optimizer step.

    The caller decides at each yield whether to checkpoint or stop (it may
    simply ``break``): the loop itself knows nothing of files or signals.
    ``trace`` receives a line "epoch step index..." per micro-batch.
    """
    model.train()
    stats = stats or EpochStats()
    share = accelerator.num_processes * accelerator.gradient_accumulation_steps
    dtype = input_dtype(accelerator)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    start = time.perf_counter()
    for batch in loader.iter_from(progress.batch):
        x, y = batch.images, batch.labels
        if trace is not None:
            trace.write(f"{progress.epoch} {progress.global_step} {' '.join(map(str, batch.indices.tolist()))}\n")
        if mixup is not None:
            x, y = apply_mixup(mixup, x, y)
        with accelerator.accumulate(model):
            logits = model(x.to(dtype)).float()
            # Each micro-batch's mean loss, weighted so that averaging over ranks and
            # accumulation steps gives the mean over the optimizer step's samples,
            # also when the last one is split unevenly.
            loss = criterion(logits, y) * (len(x) * share / batch.global_size)
            accelerator.backward(loss)
            if accelerator.sync_gradients and clip_grad > 0 and not deepspeed:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        progress.batch += 1
        stats.images += len(x)
        stats.pending.append((progress.global_step + 1, loss.detach()))
        if accelerator.sync_gradients:
            progress.global_step += 1
            progress.samples += batch.global_size
            scheduler.step_update(num_updates=progress.global_step)
            if len(stats.pending) >= check_every:
                check_finite(stats)
            stats.seconds = time.perf_counter() - start
            yield stats
    check_finite(stats)
    stats.seconds = time.perf_counter() - start


def apply_mixup(mixup, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup, also for an odd batch (the uneven last one): its last sample stays unmixed."""
    if len(x) % 2 == 0:
        return mixup(x, y)
    last = mixup_target(y[-1:], mixup.num_classes, lam=1.0, smoothing=mixup.label_smoothing)
    if len(x) == 1:
        return x, last
    xm, ym = mixup(x[:-1], y[:-1])
    return torch.cat([xm, x[-1:]]), torch.cat([ym, last])


def held_elements(model, optimizer) -> dict[str, int]:
    """Elements this rank holds: parameters (own ZeRO-3 partition), fp32 master copy, optimizer state.

    Counted from the live objects, so ZeRO partitioning is observable: stage 1
    and 2 split the master copy and optimizer state over the ranks, stage 3
    also the parameters.
    """
    params = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    zero = getattr(model, "optimizer", None)  # a DeepSpeed engine's ZeRO optimizer
    if zero is not None:
        flat = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
        master, base = sum(t.numel() for t in flat), zero.optimizer
    else:
        base = getattr(optimizer, "optimizer", optimizer)  # unwrap Accelerate's AcceleratedOptimizer
        master = params
    state = sum(t.numel() for s in base.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    return {"params": params, "master_params": master, "optimizer_state": state}


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, num_classes: int) -> dict:
    """Top-1/top-5 accuracy, loss and per-class recall over the test set, each sample counted once across ranks."""
    model.eval()
    dtype = input_dtype(accelerator)
    totals = torch.zeros(4, device=accelerator.device, dtype=torch.float64)  # correct1, correct5, loss, count
    per_class = torch.zeros(2, num_classes, device=accelerator.device, dtype=torch.float64)  # correct, count
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
        per_class[0].index_add_(0, batch.labels, (hit[:, 0] & valid).double())
        per_class[1].index_add_(0, batch.labels, valid.double())
    totals = accelerator.reduce(totals, reduction="sum")
    per_class = accelerator.reduce(per_class, reduction="sum")
    n = max(1.0, float(totals[3]))
    return {"test_acc": float(totals[0]) / n, "test_acc5": float(totals[1]) / n,
            "test_loss": float(totals[2]) / n, "test_samples": int(totals[3]),
            "test_acc_per_class": (per_class[0] / per_class[1].clamp(min=1)).tolist()}
