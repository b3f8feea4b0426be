"""Unit tests of shared/checkpoint.py: which checkpoint a resume picks, atomic saves, export -> reload."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from shared import checkpoint  # noqa: E402
from shared.checkpoint import PROGRESS, list_checkpoints, resolve_resume  # noqa: E402
from shared.engine import Progress  # noqa: E402


def make_ckpt(run_dir: Path, name: str, step: int | None = None, complete: bool = True) -> Path:
    """A checkpoint folder; complete ones carry progress.json."""
    path = run_dir / "checkpoints" / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x")
    if complete:
        (path / PROGRESS).write_text(json.dumps(Progress(global_step=step or 0).state_dict()))
    return path


# --------------------------------------------------------------------------- resolve_resume


def test_resume_auto_picks_newest_complete_checkpoint(tmp_path):
    make_ckpt(tmp_path, "step_00000010", 10)
    newest = make_ckpt(tmp_path, "step_00000020", 20)
    make_ckpt(tmp_path, "step_00000030", complete=False)  # crashed before progress.json
    make_ckpt(tmp_path, ".tmp_step_00000040", 40)  # half-written (not yet renamed into place)
    assert resolve_resume("auto", tmp_path) == newest
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoints" / "step_00000010", newest]


def test_resume_auto_orders_steps_numerically(tmp_path):
    make_ckpt(tmp_path, "step_99999999", 99999999)
    newest = make_ckpt(tmp_path, "step_100000000", 100000000)  # more digits than the zero padding
    assert resolve_resume("auto", tmp_path) == newest


def test_resume_auto_without_checkpoints_is_a_fresh_start(tmp_path):
    assert resolve_resume("auto", tmp_path) is None  # no checkpoints/ folder at all
    make_ckpt(tmp_path, ".tmp_step_00000005", 5)
    make_ckpt(tmp_path, "step_00000006", complete=False)
    assert resolve_resume("auto", tmp_path) is None


@pytest.mark.parametrize("spec", [None, "", "none"])
def test_resume_none(tmp_path, spec):
    make_ckpt(tmp_path, "step_00000010", 10)
    assert resolve_resume(spec, tmp_path) is None


def test_resume_explicit_path(tmp_path):
    path = make_ckpt(tmp_path, "step_00000010", 10)
    assert resolve_resume(str(path), tmp_path / "elsewhere") == path


def test_resume_explicit_path_without_progress_errors(tmp_path):
    path = make_ckpt(tmp_path, "step_00000010", complete=False)
    with pytest.raises(FileNotFoundError) as info:
        resolve_resume(str(path), tmp_path)
    assert str(info.value) == f"--resume {path}: not a complete checkpoint (no progress.json in it)"
    with pytest.raises(FileNotFoundError) as info:
        resolve_resume(str(tmp_path / "typo"), tmp_path)
    assert str(info.value) == f"--resume {tmp_path / 'typo'}: not a complete checkpoint (no progress.json in it)"


# --------------------------------------------------------------------------- save / load / export with Accelerate


@pytest.fixture
def accelerator(monkeypatch):
    for key in list(os.environ):
        if key.startswith("ACCELERATE_") or key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(key)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def small_model(seed: int):
    from shared.models import create_model

    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=10, in_chans=1)


def train_step(model, optimizer):
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_round_trip_and_rotation(accelerator, tmp_path):
    model = small_model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    paths = []
    for step in (1, 2, 3):
        train_step(model, optimizer)
        progress = Progress(epoch=0, batch=step, global_step=step, samples=4 * step)
        paths.append(checkpoint.save_checkpoint(accelerator, tmp_path, progress, keep=2))
    assert [p.name for p in paths] == ["step_00000001", "step_00000002", "step_00000003"]
    assert list_checkpoints(tmp_path) == paths[1:]  # only the newest 2 are kept
    assert not any(p.name.startswith(".tmp_") for p in (tmp_path / "checkpoints").iterdir())
    assert json.loads((paths[-1] / PROGRESS).read_text()) == {"epoch": 0, "batch": 3, "global_step": 3, "samples": 12}
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}

    train_step(model, optimizer)  # move away from the saved state
    assert not state_equal(saved_weights, model.state_dict())
    progress = Progress()
    checkpoint.load_checkpoint(accelerator, resolve_resume("auto", tmp_path), progress)
    assert state_equal(saved_weights, model.state_dict())
    assert progress == Progress(epoch=0, batch=3, global_step=3, samples=12)
    # the same step saved again replaces the folder instead of failing
    again = checkpoint.save_checkpoint(accelerator, tmp_path, progress, keep=2)
    assert again == paths[-1] and list_checkpoints(tmp_path) == paths[1:]


def test_rotation_never_deletes_the_checkpoint_just_written(accelerator, tmp_path):
    make_ckpt(tmp_path, "step_00000500", 500)  # left by an earlier run in the same output_dir
    model = small_model(0)
    accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    path = checkpoint.save_checkpoint(accelerator, tmp_path, Progress(global_step=10), keep=1)
    assert (path / PROGRESS).is_file()
    assert resolve_resume("auto", tmp_path) == path


def test_keep_zero_keeps_everything(accelerator, tmp_path):
    model = small_model(0)
    accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(accelerator, tmp_path, Progress(global_step=step), keep=0)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002", "step_00000003"]


def test_export_reloads_into_a_fresh_model(accelerator, tmp_path):
    import timm

    model = small_model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    train_step(model, optimizer)
    out = tmp_path / "model.safetensors"
    checkpoint.export_model(accelerator, model, out, None)
    assert out.is_file() and not out.with_suffix(".tmp").exists()
    expected = accelerator.unwrap_model(model).state_dict()

    fresh = small_model(1)
    checkpoint.load_model_weights(fresh, out)
    assert state_equal(expected, fresh.state_dict())
    via_timm = timm.create_model("small_cnn", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))
    assert state_equal(expected, via_timm.state_dict())
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(accelerator.unwrap_model(model).eval()(x), via_timm.eval()(x))


def test_export_is_plain_fp32_safetensors(accelerator, tmp_path):
    from safetensors import safe_open

    model = accelerator.prepare(small_model(0).to(torch.bfloat16))
    out = tmp_path / "model.safetensors"
    checkpoint.export_model(accelerator, model, out, None)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.float32 in dtypes and torch.bfloat16 not in dtypes
