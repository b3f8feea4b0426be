"""Unit tests of shared/engine.py: loss scale, NaN detection, Progress, evaluate() counting, the epoch loop."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from shared.doctor import load_recipe  # noqa: E402
from shared import engine  # noqa: E402
from shared.data import ShardedBatchSampler, TensorLoader  # noqa: E402
from shared.engine import EpochStats, NonFiniteLossError, Progress, check_finite, evaluate, loss_scale  # noqa: E402

CPU = torch.device("cpu")



def reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def make_accelerator(monkeypatch):
    """A fresh single-process CPU Accelerator, independent of launcher variables and of other tests."""
    for key in list(os.environ):
        if key.startswith("ACCELERATE_") or key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(key)
    reset_accelerate()

    def make(**kwargs):
        return Accelerator(cpu=True, **kwargs)

    yield make
    reset_accelerate()


# --------------------------------------------------------------------------- Progress


def test_progress_state_dict_round_trip():
    p = Progress(epoch=2, batch=5, global_step=17, samples=640)
    state = p.state_dict()
    assert state == {"epoch": 2, "batch": 5, "global_step": 17, "samples": 640}
    state["epoch"] = 99  # a copy, not a view
    assert p.epoch == 2
    q = Progress()
    q.load_state_dict(json.loads(json.dumps(p.state_dict())))
    assert q == p


# --------------------------------------------------------------------------- NaN detection


def test_check_finite_accumulates_good_losses():
    stats = EpochStats(pending=[(1, torch.tensor(0.5)), (2, torch.tensor(1.5))])
    check_finite(stats)
    assert stats.pending == [] and stats.batches == 2 and stats.loss_sum == pytest.approx(2.0)
    assert stats.loss == pytest.approx(1.0)
    check_finite(stats)  # nothing pending: no change
    assert stats.batches == 2


@pytest.mark.parametrize("bad, word", [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")])
def test_check_finite_names_first_bad_step(bad, word):
    stats = EpochStats(pending=[(7, torch.tensor(0.3)), (8, torch.tensor(bad)), (9, torch.tensor(float("nan")))])
    with pytest.raises(NonFiniteLossError) as info:
        check_finite(stats)
    assert str(info.value) == (
        f"training loss is {word} at optimizer step 8; stopping without saving a checkpoint (the last good one "
        "is kept). Lower --lr, set --clip-grad, or use bf16 instead of fp16.")
    assert stats.pending == []


# --------------------------------------------------------------------------- loss scale


def test_loss_scale_follows_a_real_grad_scaler(make_accelerator, monkeypatch):
    accelerator = make_accelerator()
    assert loss_scale(accelerator, torch.nn.Linear(2, 2)) is None  # fp32: no scaler, no scale
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    monkeypatch.setattr(accelerator, "scaler", scaler)
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([w], lr=0.1)
    assert loss_scale(accelerator, w) == 65536.0
    for step in range(1, 4):  # gradients overflow: each step is skipped and the scale halves
        scaler.scale((w * 1e38).sum()).backward()
        assert torch.isinf(w.grad).all()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        assert loss_scale(accelerator, w) == 65536.0 / 2 ** step
    assert torch.equal(w.detach(), torch.ones(3))  # no step was taken with inf gradients
    scaler.scale(w.sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert loss_scale(accelerator, w) == 8192.0  # a finite step keeps the scale
    assert torch.allclose(w.detach(), torch.full((3,), 0.9))


def test_loss_scale_of_a_deepspeed_engine():
    engine_like = SimpleNamespace(optimizer=SimpleNamespace(cur_scale=1024))
    assert loss_scale(SimpleNamespace(scaler=None, mixed_precision="fp16"), engine_like) == 1024.0
    assert loss_scale(SimpleNamespace(scaler=None, mixed_precision="bf16"), engine_like) is None
    other = SimpleNamespace(optimizer=SimpleNamespace(loss_scale=0.5))
    assert loss_scale(SimpleNamespace(scaler=None, mixed_precision="fp16"), other) == 0.5


def test_recipe_warns_when_the_loss_scale_collapses():
    recipe = load_recipe("image_classification")
    printed = []
    scaler = torch.amp.GradScaler("cpu", init_scale=0.5)
    accelerator = SimpleNamespace(scaler=scaler, mixed_precision="fp16", print=printed.append)
    recipe.warn_on_loss_scale(accelerator, None, 1.0, step=40)
    assert printed == ["WARNING: fp16 loss scale fell to 0.5 at step 40 (below 1): gradients keep overflowing; "
                       "lower the lr or switch to bf16"]
    printed.clear()
    recipe.warn_on_loss_scale(SimpleNamespace(scaler=torch.amp.GradScaler("cpu"), mixed_precision="fp16",
                                              print=printed.append), None, 1.0, step=40)
    assert printed == []


# --------------------------------------------------------------------------- evaluate


class Flatten(torch.nn.Module):
    """The 'model' whose logits are the image pixels: predictions are fixed by the data."""

    def forward(self, x):
        return x.flatten(1)


def logit_data(n: int, classes: int = 8, seed: int = 0):
    """'Images' whose pixels are logits without ties (a permutation per row), and random labels."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(classes, generator=g) * 10 for _ in range(n)]
    images = torch.stack(rows).to(torch.uint8).view(n, 1, 1, classes)
    labels = torch.randint(0, classes, (n,), generator=g)
    return images, labels


def rank_loaders(images, labels, batch, world):
    # mean 0 and std 1/255: the loader hands the uint8 values through unchanged, as floats
    return [TensorLoader(images, labels, ShardedBatchSampler(len(labels), batch, r, world, train=False), (0.0,),
                         (1 / 255,), CPU) for r in range(world)]


class Chained:
    """Every rank's eval batches in one loader: their sum must count each sample exactly once."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __iter__(self):
        for loader in self.loaders:
            yield from loader


def expected_metrics(images, labels):
    logits = images.flatten(1).float()
    top1 = (logits.argmax(1) == labels).sum().item() / len(labels)
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).sum().item() / len(labels)
    loss = F.cross_entropy(logits, labels).item()
    return top1, top5, loss


@pytest.mark.parametrize("n, batch, world", [(7, 2, 2), (23, 5, 3), (10, 100, 4), (9, 3, 1)])
def test_evaluate_counts_each_sample_once(make_accelerator, n, batch, world):
    accelerator = make_accelerator()
    images, labels = logit_data(n)
    loaders = rank_loaders(images, labels, batch, world)
    padding = sum(int((~b.valid).sum()) for loader in loaders for b in loader)
    assert padding == -(-n // world) * world - n  # the case really has padding where n % world != 0
    metrics = evaluate(Flatten(), Chained(loaders), accelerator, 8)
    top1, top5, loss = expected_metrics(images, labels)
    assert 0 < top1 < top5 < 1  # a case where every metric can go wrong
    assert metrics["test_samples"] == n
    assert metrics["test_acc"] == pytest.approx(top1, abs=1e-12)
    assert metrics["test_acc5"] == pytest.approx(top5, abs=1e-12)
    assert metrics["test_loss"] == pytest.approx(loss, rel=1e-6)
    pred = images.flatten(1).float().argmax(1)
    recall = [((pred == labels) & (labels == c)).sum().item() / max(1, (labels == c).sum().item()) for c in range(8)]
    assert metrics["test_acc_per_class"] == pytest.approx(recall, abs=1e-12)


def test_evaluate_ignores_padding_rows(make_accelerator):
    """Padding rows that would all be right (or all wrong) must not move any metric."""
    accelerator = make_accelerator()
    from shared.data import Batch

    ramp = torch.tensor([5.0, 4, 3, 2, 1, 0])
    pad = torch.tensor([0.0, 1, 2, 3, 4, 9])
    x = torch.stack([ramp, ramp, pad, pad])
    y = torch.tensor([0, 2, 5, 5])  # right, wrong but in the top 5, (padding: right)
    valid = torch.tensor([True, True, False, False])

    class Loader:
        def __iter__(self):
            yield Batch(images=x, labels=y, valid=valid, global_size=2, indices=torch.tensor([0, 1, 1, 1]))

    metrics = evaluate(Flatten(), Loader(), accelerator, 6)
    logits = x[:2]
    assert metrics["test_samples"] == 2 and metrics["test_acc"] == 0.5
    assert metrics["test_acc5"] == 1.0
    assert metrics["test_loss"] == pytest.approx(F.cross_entropy(logits, y[:2]).item(), rel=1e-6)
    # class 0: one valid sample, right; class 2: one, wrong; class 5 only in the padding: no samples
    assert metrics["test_acc_per_class"] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- the epoch loop


class Scheduler:
    def __init__(self):
        self.updates = []

    def step_update(self, num_updates):
        self.updates.append(num_updates)


def tiny_setup(accelerator, n=23, batch=4, accum=1):
    torch.manual_seed(0)
    images, labels = logit_data(n, classes=4, seed=1)
    sampler = ShardedBatchSampler(n, batch, 0, 1, train=True, seed=3, accum=accum)
    loader = TensorLoader(images, labels, sampler, (0.5,), (0.5,), CPU)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, loader, optimizer


def test_train_one_epoch_counts_steps_and_samples(make_accelerator):
    accelerator = make_accelerator()
    model, loader, optimizer = tiny_setup(accelerator)
    progress, scheduler = Progress(), Scheduler()
    yields = list(engine.train_one_epoch(model, loader, optimizer, scheduler, F.cross_entropy, accelerator, progress,
                                         check_every=2))
    assert len(yields) == len(loader) == 6  # 23 samples, batches of 4
    assert progress.state_dict() == {"epoch": 0, "batch": 6, "global_step": 6, "samples": 23}
    assert scheduler.updates == [1, 2, 3, 4, 5, 6]
    stats = yields[-1]
    assert stats.batches == 6 and stats.images == 23 and stats.pending == [] and stats.loss > 0


def test_train_one_epoch_resumes_mid_epoch(make_accelerator):
    accelerator = make_accelerator()
    model, loader, optimizer = tiny_setup(accelerator)
    progress = Progress(batch=4, global_step=4, samples=16)
    steps = list(engine.train_one_epoch(model, loader, optimizer, Scheduler(), F.cross_entropy, accelerator, progress))
    assert len(steps) == 2
    assert progress.state_dict() == {"epoch": 0, "batch": 6, "global_step": 6, "samples": 23}


def test_train_one_epoch_stops_on_nan_naming_the_step(make_accelerator):
    accelerator = make_accelerator()
    model, loader, optimizer = tiny_setup(accelerator)
    calls = []

    def criterion(logits, y):
        calls.append(1)
        loss = F.cross_entropy(logits, y)
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(NonFiniteLossError) as info:
        for _ in engine.train_one_epoch(model, loader, optimizer, Scheduler(), criterion, accelerator, Progress(),
                                        check_every=20):
            pass
    assert str(info.value).startswith("training loss is nan at optimizer step 3; ")


def test_train_one_epoch_with_gradient_accumulation_steps(make_accelerator):
    accelerator = make_accelerator(gradient_accumulation_steps=2)
    model, loader, optimizer = tiny_setup(accelerator, accum=2)
    progress, scheduler = Progress(), Scheduler()
    yields = list(engine.train_one_epoch(model, loader, optimizer, scheduler, F.cross_entropy, accelerator, progress))
    # 23 samples, micro-batches of 4, 2 per step: 8 + 8 + 7 (the last split 4 + 3)
    assert len(loader) == 6 and len(yields) == 3
    assert scheduler.updates == [1, 2, 3]
    assert (progress.batch, progress.global_step) == (6, 3)
    assert yields[-1].images == 23


def test_progress_samples_with_gradient_accumulation(make_accelerator):
    accelerator = make_accelerator(gradient_accumulation_steps=2)
    model, loader, optimizer = tiny_setup(accelerator, accum=2)
    progress = Progress()
    for _ in engine.train_one_epoch(model, loader, optimizer, Scheduler(), F.cross_entropy, accelerator, progress):
        pass
    assert progress.samples == 23
