"""Smoke tests of benchmarks/: every script runs at a tiny size and writes a sane JSON result.

Speed itself is never asserted here (benchmarks measure it); these tests check
that the scripts run, measure what they claim (the recipe loop really trains,
ZeRO really partitions, the formulas are the ZeRO paper's), and keep their
result format, so that the benchmarks cannot rot.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_script(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    out = Path(args[args.index("--out") + 1])  # every test passes a temporary --out
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "BENCH_SCRATCH": str(out.parent / "runs")}
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-5000:]}"
    return proc


def load(path: Path) -> dict:
    result = json.loads(path.read_text())
    assert result["command"].startswith(".venv/bin/") and "benchmarks/" in result["command"]
    machine = result["machine"]
    assert machine["date"] and machine["cores"] >= 1 and machine["torch"] == torch.__version__
    assert len(machine["load_average_1_5_15"]) == 3
    return result


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_overhead_quick(tmp_path):
    out, plot = tmp_path / "overhead.json", tmp_path / "overhead.png"
    proc = run_script("overhead.py", "--quick", "--out", str(out), "--plot", str(plot))
    r = load(out)
    assert "recipe / plain PyTorch" in proc.stdout
    assert r["setup"]["arms"] == ["recipe", "plain"] and r["setup"]["processes"] == 1
    assert len(r["rounds"]) == r["setup"]["rounds"] == 2
    for row in r["rounds"]:
        assert positive(row["recipe"]) and positive(row["plain"])
    ratios = [row["recipe"] / row["plain"] for row in r["rounds"]]
    assert r["ratio"] == pytest.approx(sorted(ratios)[0] + (sorted(ratios)[1] - sorted(ratios)[0]) / 2)
    assert 0.05 < r["ratio"] < 20  # both arms did comparable work (no wall-clock target here)
    assert r["meets_target"] == (r["ratio"] >= 0.95)
    assert plot.stat().st_size > 10_000


def test_time_to_accuracy_quick(tmp_path):
    out, plot = tmp_path / "tta.json", tmp_path / "tta.png"
    run_script("time_to_accuracy.py", "--quick", "--arms", "plain-1proc,recipe-2proc", "--recipe-args",
               "--tracker none", "--out", str(out), "--plot", str(plot))
    r = load(out)
    assert set(r["summary"]) == {"plain-1proc", "recipe-2proc"}
    for name, runs in r["runs"].items():
        (run,) = runs
        epochs = run["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2]
        walls = [e["wall_seconds"] for e in epochs]
        trains = [e["train_seconds"] for e in epochs]
        assert walls == sorted(walls) and trains == sorted(trains) and all(positive(t) for t in trains)
        assert all(t < w for t, w in zip(trains, walls))  # the training loop is part of the wall time
        assert all(0.1 < e["test_acc"] <= 1 for e in epochs)
        assert epochs[-1]["test_acc"] > 0.3  # it learned something in 2 short epochs (chance: 0.1)
        assert positive(run["startup_seconds"]) and run["command"].startswith(".venv/bin/")
        assert 0 < run["seconds_before_main"] < walls[0]  # metrics.jsonl's wall_seconds count from main()
        hit = next((e for e in epochs if e["test_acc"] >= r["setup"]["target"]), None)
        assert run["wall_seconds_to_target"] == (hit["wall_seconds"] if hit else None)
    assert plot.stat().st_size > 10_000


def test_zero_memory_quick_partitions_everything_under_zero3(tmp_path):
    out, plot = tmp_path / "zero.json", tmp_path / "zero.png"
    run_script("zero_memory.py", "--quick", "--out", str(out), "--plot", str(plot))
    r = load(out)
    (row,) = r["table"]
    assert row["run"] == "zero3" and row["stage"] == 3 and row["world"] == 2 and row["ranks_equal"]
    psi = row["psi"]
    assert 3e6 < psi < 1e7  # resnet10t: a few million parameters
    for key in ("params", "grads", "master", "optimizer_state"):
        assert row[key] == pytest.approx(psi / 2, abs=2), key  # each rank holds half of everything
        assert row[key + "_formula"] == pytest.approx(psi / 2)
    assert row["reduce_buckets"] >= 0


def test_zero_memory_paper_formulas(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(BENCH))
    import zero_memory  # in-process: no launch needed for the formulas

    out = tmp_path / "zero.json"
    monkeypatch.setattr(sys, "argv", [str(BENCH / "zero_memory.py")])
    zero_memory.main(["--paper-only", "--paper-model", "vit_large_patch16_224", "--paper-world", "64",
                      "--out", str(out), "--plot", "none"])
    assert "ZeRO-3" in capsys.readouterr().out
    r = load(out)
    psi = 304.3e6
    paper = {(p["precision"], p["stage"], p["world"]): p for p in r["paper"]}
    # ZeRO paper, mixed precision Adam: 16 bytes/param (DDP), 4 + 12/N (ZeRO-1), 2 + 14/N (ZeRO-2), 16/N (ZeRO-3)
    assert paper["mixed-adam", 0, 64]["total"] == pytest.approx(16 * psi)
    assert paper["mixed-adam", 1, 64]["total"] == pytest.approx((4 + 12 / 64) * psi)
    assert paper["mixed-adam", 2, 64]["total"] == pytest.approx((2 + 14 / 64) * psi)
    assert paper["mixed-adam", 3, 64]["total"] == pytest.approx(16 / 64 * psi)
    # this repository's fp32 SGD momentum: DDP 12 bytes/param; ZeRO adds a partitioned fp32 master copy
    assert paper["fp32-sgd", 0, 8]["total"] == pytest.approx(12 * psi)
    assert paper["fp32-sgd", 3, 8]["total"] == pytest.approx(16 / 8 * psi)


def test_scaling_quick(tmp_path):
    out, plot = tmp_path / "scaling.json", tmp_path / "scaling.png"
    run_script("scaling.py", "--quick", "--runs", "ddp-2proc", "--out", str(out), "--plot", str(plot))
    r = load(out)
    s = r["summary"]
    assert list(s) == ["ddp-2proc"] and s["ddp-2proc"]["processes"] == 2
    assert positive(s["ddp-2proc"]["median_images_per_sec"]) and s["ddp-2proc"]["vs_1proc"] is None
    # DDP all-reduce of small_cnn's 421,642 fp32 gradients over 2 ranks: 2 * 1/2 * P * 4 bytes per rank
    assert s["ddp-2proc"]["comm_bytes_per_step_per_rank_fp32"] == pytest.approx(421_642 * 4)
    paper = {(p["world"], p["scheme"]): p for p in r["paper"]}
    assert paper[64, "ZeRO-3"]["bytes_per_step_per_rank"] == pytest.approx(1.5 * paper[64, "DDP"]["bytes_per_step_per_rank"])
    assert paper[8, "ZeRO-1"]["bytes_per_step_per_rank"] == paper[8, "DDP"]["bytes_per_step_per_rank"]
    for p in r["paper"]:
        for link in p["links"].values():
            assert 0 < link["efficiency_no_overlap"] <= link["efficiency_full_overlap"] <= 1
    assert plot.stat().st_size > 10_000


def test_gpu_suite_runs_tiny_on_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: test_gpu_suite_real_size covers it")
    out = tmp_path / "gpu.json"
    run_script("gpu_suite.py", "--quick", "--runs", "cpu-fp32", "--out", str(out))
    r = load(out)
    assert r["all_ok"] and not r["setup"]["cuda"]
    (run,) = r["runs"]
    assert run["model"] == "resnet50" and run["image_size"] == 32 and run["processes"] == 1
    assert run["device_type"] == "cpu" and run["precision"] == "no"
    assert positive(run["images_per_sec_per_gpu"]) and positive(run["peak_memory_bytes"])
    assert run["steps"] == 2 and "accelerate launch" in run["command"]


@pytest.mark.gpu
def test_gpu_suite_real_size(tmp_path):
    out = tmp_path / "gpu.json"
    run_script("gpu_suite.py", "--runs", "1gpu-bf16-cl", "--steps", "20", "--warmup", "5", "--out", str(out),
               timeout=1200)
    r = load(out)
    assert r["all_ok"] and r["setup"]["cuda"]
    (run,) = r["runs"]
    assert run["device_type"] == "cuda" and run["image_size"] == 224 and run["precision"] == "bf16"
    assert run["channels_last"] and positive(run["images_per_sec_per_gpu"])
    assert 1 * 2**30 < run["peak_memory_bytes"] < torch.cuda.get_device_properties(0).total_memory
