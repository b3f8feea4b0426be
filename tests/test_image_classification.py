"""Integration tests: the image-classification recipe launched for real, 2 CPU processes.

Each distributed config that can run on a CPU is launched through
``accelerate launch`` and judged on outcomes: loss falls, every sample is
seen once per epoch, ZeRO partitions, resume is bit-identical, export
reloads, bad configs are refused with the promised message.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from launch import CONFIGS, QUICK, ROOT, free_port, launch

# 1003 training samples in global batches of 100 (2 ranks x 50): 10 full steps and an
# uneven last one of 3 samples (2 + 1); 501 test samples: the ranks' eval shards differ.
ARGS = [*QUICK, "--train-subset", "1003", "--test-subset", "501", "--epochs", "2", "--clip-grad", "0.5"]
STEPS_PER_EPOCH = 11


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k].double() - b[k].double()).abs().max().item()}"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted 2-epoch runs, launched once each and shared by the tests below."""
    cache = {}

    def get(config: str, *extra: str, launch_args=()) -> Path:
        key = (config, extra, tuple(launch_args))
        if key not in cache:
            out = tmp_path_factory.mktemp(config.replace(".yaml", ""))
            launch(config, out, *ARGS, *extra, launch_args=launch_args)
            cache[key] = out
        return cache[key]

    return get


# --------------------------------------------------------------------------- DDP on CPU


def test_ddp_trains_every_sample_once_and_reports(runs):
    out = runs("cpu_ddp.yaml", "--trace-samples", "true")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed_type"] == "MULTI_CPU"
    assert summary["mixed_precision"] == "no" and summary["zero_stage"] == 0
    assert summary["epochs"] == 2 and summary["global_step"] == 2 * STEPS_PER_EPOCH
    assert 0.6 < summary["test_acc"] <= summary["test_acc5"] <= 1.0
    assert summary["test_samples"] == 501  # no eval padding counted
    assert summary["images_per_sec"] > 0 and summary["wall_seconds"] > 0
    epochs = metrics(out)
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"] and epochs[1]["test_loss"] < epochs[0]["test_loss"]

    seen = {0: Counter(), 1: Counter()}
    ranks = {}
    for rank in (0, 1):
        lines = (out / "trace" / f"rank{rank}.txt").read_text().splitlines()
        ranks[rank] = set()
        for line in lines:
            epoch, _step, *idx = map(int, line.split())
            seen[epoch].update(idx)
            ranks[rank].update(idx)
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == list(range(1003)) and set(seen[epoch].values()) == {1}
    assert ranks[0] and ranks[1] and ranks[0] != ranks[1]  # two real ranks, not two copies of rank 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train_subset"] == 1003 and saved["clip_grad"] == 0.5 and saved["model"] == "small_cnn"


def test_export_reloads_with_the_same_accuracy(runs):
    """model.safetensors loads into a fresh timm model that scores what the run reported."""
    from accelerate import Accelerator

    from shared.data import build_data
    from shared.doctor import load_recipe_config
    from shared.engine import evaluate
    from shared.models import create_model

    out = runs("cpu_ddp.yaml", "--trace-samples", "true")
    cfg = load_recipe_config("image_classification", str(out / "config.yaml"))
    accelerator = Accelerator(cpu=True)
    data = build_data(cfg, 0, 1, accelerator.device)
    model = create_model("small_cnn", 10, 1, checkpoint=str(out / "model.safetensors"))
    result = evaluate(model, data.test, accelerator, 10)
    summary = json.loads((out / "summary.json").read_text())
    assert result["test_samples"] == 501
    assert result["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-9)
    assert result["test_acc5"] == pytest.approx(summary["test_acc5"], abs=1e-9)


def test_single_process_config(tmp_path):
    run = launch("single_gpu.yaml", tmp_path, *QUICK)
    assert run.summary["world_size"] == 1 and run.summary["test_acc"] > 0.4


@pytest.mark.parametrize("config", ["cpu_ddp.yaml", "zero2.yaml", "zero3.yaml"])
def test_stop_and_resume_is_bit_identical(runs, tmp_path, config):
    """A run stopped mid-epoch (as by preemption) and resumed ends with the same weights."""
    reference = runs(config)
    stopped = launch(config, tmp_path, *ARGS, "--stop-after-steps", "14", "--trace-samples", "true")
    assert "stopping on --stop-after-steps 14" in stopped.output
    progress = json.loads((tmp_path / "checkpoints" / "step_00000014" / "progress.json").read_text())
    assert progress == {"epoch": 1, "batch": 3, "global_step": 14, "samples": 300}
    marker = json.loads((tmp_path / "stopped.json").read_text())
    assert marker["global_step"] == 14 and marker["checkpoint"].endswith("step_00000014")
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "summary.json").exists()

    resumed = launch(config, tmp_path, *ARGS, "--trace-samples", "true")
    assert "resumed from" in resumed.output and "step 14" in resumed.output
    assert_identical(weights(reference), weights(tmp_path))
    assert not (tmp_path / "stopped.json").exists()
    # nothing trained twice or skipped across the stop
    seen = Counter()
    for rank in (0, 1):
        for line in (tmp_path / "trace" / f"rank{rank}.txt").read_text().splitlines():
            epoch, _, *idx = map(int, line.split())
            seen.update((epoch, i) for i in idx)
    assert set(seen.values()) == {1} and len(seen) == 2 * 1003


# --------------------------------------------------------------------------- DeepSpeed ZeRO


def test_zero_stages_train_like_ddp(runs):
    """Same data, same clipping (filled into DeepSpeed's "auto"), same result as DDP."""
    ddp = weights(runs("cpu_ddp.yaml"))
    for config in ("zero1.yaml", "zero2.yaml", "zero3.yaml"):
        assert max_diff(ddp, weights(runs(config))) < 1e-4, config


def test_offload_keeps_the_recipe_optimizer(runs):
    """CPU offload with SGD: DeepSpeed must not swap in its own Adam (results equal ZeRO-2's)."""
    zero2 = weights(runs("zero2.yaml"))
    for config in ("zero2_offload.yaml", "zero3_offload.yaml"):
        out = runs(config)
        assert json.loads((out / "summary.json").read_text())["zero_stage"] == int(config[4])
        assert max_diff(zero2, weights(out)) < 1e-4, config


@pytest.mark.parametrize("config,stage", [("cpu_ddp.yaml", 0), ("zero1.yaml", 1), ("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_zero_partitions_state(runs, config, stage):
    """Per-rank element counts from the live engine: stage 1-2 halve the fp32 master copy and
    optimizer state over 2 ranks, stage 3 the parameters too."""
    summary = json.loads((runs(config) / "summary.json").read_text())
    total = 421_738  # small_cnn parameters
    half = total / 2
    assert summary["zero_stage"] == stage
    for held in summary["held_elements_per_rank"]:
        expect_state = total if stage == 0 else half
        assert held["optimizer_state"] == pytest.approx(expect_state, abs=16)  # momentum buffer = master copy
        assert held["master_params"] == pytest.approx(expect_state, abs=16)
        assert held["params"] == pytest.approx(half if stage == 3 else total, abs=16)


def test_gradient_accumulation_agrees_between_ddp_and_deepspeed(runs):
    """grad_accum_steps reaches DeepSpeed through "auto": same steps, batch and weights."""
    ddp = runs("cpu_ddp.yaml", "--batch-size", "25", "--grad-accum-steps", "2")
    zero = runs("zero2.yaml", "--batch-size", "25", "--grad-accum-steps", "2")
    for out in (ddp, zero):
        summary = json.loads((out / "summary.json").read_text())
        # 1003 samples in optimizer steps of 100: the last 3 (< 2 ranks x 2 micro-batches) are dropped
        assert summary["global_step"] == 2 * 10 and summary["global_batch_size"] == 100
    assert max_diff(weights(ddp), weights(zero)) < 2e-3


# --------------------------------------------------------------------------- precision


def test_bf16_ddp(runs):
    out = runs("bf16.yaml")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16" and summary["test_acc"] > 0.6
    assert 0 < max_diff(weights(runs("cpu_ddp.yaml")), weights(out)) < 0.5  # autocast really changed the math


def test_bf16_zero2_exports_fp32_master_weights(runs):
    out = runs("zero2.yaml", launch_args=["--mixed_precision", "bf16"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16" and summary["zero_stage"] == 2 and summary["test_acc"] > 0.6
    exported = weights(out)
    assert all(t.dtype == torch.float32 for k, t in exported.items() if "num_batches" not in k)
    # fp32 masters are not all representable in bf16
    assert any(not torch.equal(t, t.bfloat16().float()) for k, t in exported.items() if "num_batches" not in k)


# --------------------------------------------------------------------------- multi-node, on localhost


@pytest.mark.parametrize("config,single", [("multinode_ddp.yaml", "cpu_ddp.yaml"), ("multinode_zero2.yaml", "zero2.yaml")])
def test_two_machines_train_like_one(runs, tmp_path, config, single):
    """Two `accelerate launch` (machine_rank 0 and 1, 1 process each) make one 2-rank job."""
    import subprocess
    import sys

    port = str(free_port())
    cmds = [[str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(CONFIGS / config),
             "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
             "--main_process_ip", "127.0.0.1", "--main_process_port", port,
             str(ROOT / "recipes" / "image_classification.py"), "--output-dir", str(tmp_path), *ARGS]
            for rank in (0, 1)]
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    # not bit-identical: one process per machine runs 2 threads instead of 1, which
    # changes float summation order; a wrong split of the data would differ by >0.05
    assert max_diff(weights(runs(single)), weights(tmp_path)) < 5e-3


# --------------------------------------------------------------------------- checkpoints, failures


def test_checkpoint_every_steps_keeps_the_newest(tmp_path):
    launch("cpu_ddp.yaml", tmp_path, *QUICK, "--checkpoint-every-steps", "3", "--keep-checkpoints", "2")
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_00000009", "step_00000010"]  # 10 steps: saves at 3, 6, 9 and the epoch end


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    launch("cpu_ddp.yaml", tmp_path, *QUICK)
    good = tmp_path / "checkpoints" / "step_00000010"
    before = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}
    run = launch("cpu_ddp.yaml", tmp_path, *QUICK, "--epochs", "3", "--lr", "1e30", "--log-every", "2", check=False)
    assert run.returncode != 0
    match = re.search(r"training loss is (nan|inf) at optimizer step (\d+)", run.output)
    assert match and int(match.group(2)) > 10, run.output[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000010"]
    assert {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()} == before


def test_wandb_offline_keeps_its_run_id_across_a_resume(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "WANDB_API_KEY": None, "WANDB_MODE": None}
    (tmp_path / "home").mkdir()
    args = [*QUICK, "--tracker", "wandb", "--epochs", "2"]
    first = launch("cpu_ddp.yaml", tmp_path / "run", *args, "--stop-after-steps", "5", env=env)
    assert "W&B: offline" in first.output and (tmp_path / "run" / "stopped.json").exists()
    launch("cpu_ddp.yaml", tmp_path / "run", *args, env=env)
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    offline = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", p.name) for p in offline)


def test_wandb_key_is_never_written(tmp_path):
    secret = "0123456789abcdef-not-a-real-key-0123456789"
    run = launch("cpu_ddp.yaml", tmp_path, *QUICK, "--tracker", "wandb",
                 env={"WANDB_API_KEY": secret, "WANDB_MODE": "offline", "HOME": str(tmp_path)})
    assert secret not in run.output
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_class_weights_lift_the_rare_classes(tmp_path):
    """On a long-tailed Fashion-MNIST (class 9 keeps 2%), balanced weights raise its recall."""
    args = [*QUICK, "--train-subset", "20000", "--test-subset", "2000", "--batch-size", "100", "--imbalance", "0.02"]
    plain = launch("cpu_ddp.yaml", tmp_path / "plain", *args).summary
    weighted = launch("cpu_ddp.yaml", tmp_path / "weighted", *args, "--class-weights", "balanced").summary
    rare = lambda s: sum(s["test_acc_per_class"][7:]) / 3  # noqa: E731  the three rarest classes
    assert rare(weighted) > rare(plain) + 0.1


def test_mixup_cutmix_label_smoothing_and_augmentation_train(tmp_path):
    run = launch("cpu_ddp.yaml", tmp_path, *ARGS, "--mixup", "0.2", "--cutmix", "1.0", "--label-smoothing", "0.1",
                 "--augment", "crop-flip")  # includes an odd last micro-batch of 1 sample
    epochs = metrics(tmp_path)
    assert epochs[1]["test_loss"] < epochs[0]["test_loss"] and run.summary["test_acc"] > 0.4


def test_imagefolder_data(tmp_path):
    """The ImageNet-style folder layout, read through DataLoader workers and timm transforms."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 24), ("val", 9)):
        for c, colour in enumerate(((255, 0, 0), (0, 0, 255))):
            folder = tmp_path / "data" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                noise = (torch.rand(40, 40, 3, generator=gen) * 60).byte()
                pixels = (torch.tensor(colour, dtype=torch.uint8) // 2 + noise).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    run = launch("cpu_ddp.yaml", tmp_path / "run", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
                 "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--num-workers", "1",
                 "--tracker", "none", "--lr", "0.02")
    assert run.summary["test_samples"] == 18 and run.summary["test_acc"] >= 0.9


# --------------------------------------------------------------------------- refused before training


def test_fp16_on_cpu_is_refused(tmp_path):
    run = launch("fp16.yaml", tmp_path, *QUICK, check=False)
    assert run.returncode != 0
    assert "fp16" in run.output and "no CUDA GPU" in run.output and "bf16" in run.output
    assert not (tmp_path / "checkpoints").exists()


def _deepspeed_variant(tmp_path: Path, **changes) -> str:
    ds = json.loads((CONFIGS / "deepspeed" / "zero2.json").read_text())
    for key, value in changes.items():
        if value is None:
            ds.pop(key)
        elif isinstance(value, dict):
            ds.setdefault(key, {}).update(value)
        else:
            ds[key] = value
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = yaml.safe_load((CONFIGS / "zero2.yaml").read_text())
    cfg["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "ds.json")
    (tmp_path / "accelerate.yaml").write_text(yaml.safe_dump(cfg))
    return str(tmp_path / "accelerate.yaml")


@pytest.mark.parametrize("changes,message", [
    ({"train_batch_size": 64}, "train_batch_size is 64 but micro batch x accumulation x world size = 50 x 1 x 2 = 100"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "DeepSpeed would silently replace it"),
    ({"gradient_clipping": None}, "no gradient_clipping key"),
])
def test_inconsistent_deepspeed_json_is_refused(tmp_path, changes, message):
    config = _deepspeed_variant(tmp_path, **changes)
    run = launch(config, tmp_path / "run", *QUICK, check=False)
    assert run.returncode != 0 and message in run.output, run.output[-3000:]
    assert str(tmp_path / "ds.json") in run.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_option_suggests_the_closest(tmp_path):
    run = launch("cpu_ddp.yaml", tmp_path, "--bach-size", "8", check=False)
    assert run.returncode != 0 and "unknown option '--bach-size'" in run.output and "--batch-size" in run.output


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("config,precision", [("fp16.yaml", "fp16"), ("multi_gpu.yaml", "no"), ("bf16.yaml", "bf16")])
def test_gpu_configs_train(tmp_path, config, precision):
    gpus = str(min(2, torch.cuda.device_count()))
    run = launch(config, tmp_path, *ARGS, launch_args=["--num_processes", gpus])
    assert run.summary["mixed_precision"] == precision and run.summary["world_size"] == int(gpus)
    assert run.summary["test_acc"] > 0.6


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["zero2.yaml", "zero3_offload.yaml"])
def test_gpu_deepspeed_fp16(tmp_path, config):
    gpus = str(min(2, torch.cuda.device_count()))
    run = launch(config, tmp_path, *ARGS, launch_args=["--num_processes", gpus, "--mixed_precision", "fp16"])
    assert run.summary["mixed_precision"] == "fp16" and run.summary["test_acc"] > 0.6


def test_remaining_options_take_effect(tmp_path):
    """Options not exercised above, launched for real and checked where they show."""
    args = [*QUICK, "--epochs", "2", "--num-classes", "12", "--opt", "adamw", "--lr", "0.002", "--sched", "step",
            "--warmup-epochs", "1", "--min-lr", "0.0001", "--momentum", "0.8", "--weight-decay", "0",
            "--drop-rate", "0.1", "--augment", "flip", "--eval-batch-size", "7", "--seed", "3",
            "--project", "p", "--run-name", "r"]
    run = launch("cpu_ddp.yaml", tmp_path / "a", *args, "--resume", "none")
    assert len(run.summary["test_acc_per_class"]) == 12 and run.summary["test_samples"] == 500
    assert run.summary["test_acc"] > 0.5
    epochs = metrics(tmp_path / "a")
    assert epochs[0]["lr"] == pytest.approx(0.002, rel=1e-6)  # end of the 1-epoch warm-up: the peak
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert (saved["opt"], saved["sched"], saved["drop_rate"], saved["run_name"]) == ("adamw", "step", 0.1, "r")

    # --resume PATH continues from that checkpoint; --resume none refuses a folder with checkpoints
    first = tmp_path / "a" / "checkpoints" / "step_00000010"
    again = launch("cpu_ddp.yaml", tmp_path / "b", *args, "--resume", str(first))
    assert f"resumed from {first}" in again.output and again.summary["global_step"] == 20
    assert_identical(weights(tmp_path / "a"), weights(tmp_path / "b"))
    refused = launch("cpu_ddp.yaml", tmp_path / "a", *QUICK, "--resume", "none", check=False)
    assert refused.returncode != 0 and "holds checkpoints of an earlier run" in refused.output
