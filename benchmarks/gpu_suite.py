"""GPU suite: ResNet-50 at 224x224 on synthetic ImageNet-shaped data, through the recipe's training loop.

    .venv/bin/python benchmarks/gpu_suite.py                # on a GPU machine: the matrix below, real size
    .venv/bin/python benchmarks/gpu_suite.py --compile      # ... also with torch.compile
    .venv/bin/python benchmarks/gpu_suite.py --quick        # here (CPU): ResNet-50 at 32x32, batch 4, 2 steps
    .venv/bin/accelerate launch --config_file accelerate_configs/multi_gpu.yaml --mixed_precision bf16 \\
        benchmarks/gpu_suite.py --worker --channels-last    # one configuration by hand

Each configuration is started with ``accelerate launch`` (so precision and
processes come from the accelerate config, as for the recipes) and runs the
recipe's real loop: ``shared.engine.train_one_epoch`` with the TensorLoader of
``shared.data.build_data`` (synthetic uint8 images held in host memory,
normalised on the device), timm's SGD and cosine schedule, the recipe's
per-step work, ``--warmup`` untimed steps then ``--steps`` timed steps. It
prints images/s per GPU and the peak GPU memory (``torch.cuda.max_memory_allocated``;
on CPU the process's peak RSS instead).

The matrix on a GPU machine: 1 GPU x {fp32, bf16, fp16} (channels first),
1 GPU bf16 channels_last (+ torch.compile with ``--compile``), all GPUs bf16
channels_last (accelerate_configs/multi_gpu.yaml), and the recipe variants
that remove per-step host syncs and host-to-device copies
(``+lazy-stop+device-data``, see benchmarks/overhead.py). Without a GPU it runs
a tiny CPU version of the same matrix so that the script cannot rot. Results:
benchmarks/results/gpu_suite.json (GPU) or gpu_suite_cpu.json (CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def gpu_matrix(n_gpus: int, compile_: bool) -> dict:
    """name -> (accelerate config, launch args, worker args)."""
    m = {
        "1gpu-fp32": ("single_gpu.yaml", ["--mixed_precision", "no"], []),
        "1gpu-fp16": ("single_gpu.yaml", ["--mixed_precision", "fp16"], []),
        "1gpu-bf16": ("single_gpu.yaml", ["--mixed_precision", "bf16"], []),
        "1gpu-bf16-cl": ("single_gpu.yaml", ["--mixed_precision", "bf16"], ["--channels-last"]),
        "1gpu-bf16-cl+lazy-stop+device-data": ("single_gpu.yaml", ["--mixed_precision", "bf16"],
                                               ["--channels-last", "--variant", "recipe+lazy-stop+device-data"]),
    }
    if compile_:
        m["1gpu-bf16-cl-compile"] = ("single_gpu.yaml", ["--mixed_precision", "bf16"], ["--channels-last", "--compile"])
    if n_gpus > 1:
        m[f"{n_gpus}gpu-bf16-cl"] = ("multi_gpu.yaml", ["--num_processes", str(n_gpus), "--mixed_precision", "bf16"],
                                     ["--channels-last"])
        m[f"{n_gpus}gpu-bf16-cl+lazy-stop+device-data"] = (
            "multi_gpu.yaml", ["--num_processes", str(n_gpus), "--mixed_precision", "bf16"],
            ["--channels-last", "--variant", "recipe+lazy-stop+device-data"])
    return m


CPU_MATRIX = {  # the same code paths at a tiny size, on the CPU
    "cpu-fp32": ("single_gpu.yaml", ["--mixed_precision", "no"], []),
    "cpu-bf16-cl": ("single_gpu.yaml", ["--mixed_precision", "bf16"], ["--channels-last"]),
    "cpu-2proc-fp32": ("cpu_ddp.yaml", [], []),
}


# --------------------------------------------------------------------------- worker (inside accelerate launch)


def worker(args) -> dict:
    import torch

    from overhead import VARIANTS, RecipeArm
    from shared.config import parse_config
    from shared.data import build_data
    from shared.runtime import create_accelerator

    recipe = common.load_recipe()
    scratch = tempfile.mkdtemp(prefix="gpu_suite_")
    accelerator = create_accelerator(1, "none", scratch)
    world = accelerator.num_processes
    pool = max(args.pool, 2 * args.batch_size * world)
    cfg = parse_config(recipe.Config, [
        "--tracker", "none", "--output-dir", scratch, "--dataset", "synthetic",
        "--synthetic-shape", "3", str(args.image_size), "--synthetic-train-size", str(pool),
        "--synthetic-test-size", "8", "--num-classes", "1000", "--model", args.model,
        "--batch-size", str(args.batch_size), "--lr", "0.1", "--epochs", "90"])
    data = build_data(cfg, accelerator.process_index, world, accelerator.device)

    def model_hook(model):
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if args.compile:
            model = torch.compile(model)
        return model

    arm = RecipeArm(recipe, cfg, accelerator, data, model_hook=model_hook)
    if args.variant:
        VARIANTS[args.variant][1](arm)
    cuda = accelerator.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    arm.run(args.warmup)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    images = arm.run(args.steps)
    sync()
    seconds = time.perf_counter() - start
    per_gpu = images / seconds
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = torch.tensor([per_gpu, float(peak)], dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(stats[None]).view(-1, 2).cpu()
    result = {
        "model": args.model, "image_size": args.image_size, "batch_size_per_gpu": args.batch_size,
        "processes": world, "device_type": accelerator.device.type,
        "gpu": torch.cuda.get_device_name() if cuda else None, "precision": accelerator.mixed_precision,
        "channels_last": args.channels_last, "compile": args.compile, "variant": args.variant or "recipe",
        "warmup_steps": args.warmup, "steps": args.steps, "seconds": seconds,
        "images_per_sec_per_gpu": float(gathered[:, 0].mean()), "images_per_sec_total": float(gathered[:, 0].sum()),
        "peak_memory_bytes": float(gathered[:, 1].max()),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS (CPU run)",
    }
    if accelerator.is_main_process and args.result_file:
        Path(args.result_file).write_text(json.dumps(result))
    accelerator.print(json.dumps(result))
    return result


# --------------------------------------------------------------------------- driver


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help="run one configuration in this process (under accelerate launch)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256, help="per GPU")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps first (cuDNN autotune, compile)")
    p.add_argument("--pool", type=int, default=1024, help="synthetic images held in memory (per process)")
    p.add_argument("--channels-last", action="store_true", help="worker: model in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="worker: torch.compile the model; driver: add compile runs")
    p.add_argument("--variant", default=None, help="worker: a recipe variant from benchmarks/overhead.py")
    p.add_argument("--runs", default=None, help="driver: comma-separated subset of the matrix to run")
    p.add_argument("--quick", action="store_true",
                   help="tiny size (32x32, batch 4, 2+1 steps): what runs here on CPU so that the suite cannot rot")
    p.add_argument("--result-file", default=None, help="worker: write the JSON result here")
    p.add_argument("--out", default=None, help="driver: JSON result (default benchmarks/results/gpu_suite[_cpu].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.batch_size, args.steps, args.warmup, args.pool = 32, 4, 2, 1, 16
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("no CUDA GPU here: running the tiny CPU version (--quick)")
        args = parse_args([*(argv if argv is not None else sys.argv[1:]), "--quick"])
    matrix = gpu_matrix(torch.cuda.device_count(), args.compile) if cuda else dict(CPU_MATRIX)
    if args.runs:
        wanted = [r.strip() for r in args.runs.split(",")]
        unknown = [r for r in wanted if r not in matrix]
        if unknown:
            raise SystemExit(f"unknown run(s) {unknown}; this machine's matrix: {', '.join(matrix)}")
        matrix = {k: matrix[k] for k in wanted}
    worker_args = ["--worker", "--model", args.model, "--image-size", str(args.image_size), "--batch-size",
                   str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup), "--pool", str(args.pool)]
    runs, rows = [], []
    scratch = common.SCRATCH / "gpu_suite"
    scratch.mkdir(parents=True, exist_ok=True)
    for name, (config, launch_args, extra) in matrix.items():
        result_file = scratch / f"{name}.json"
        result_file.unlink(missing_ok=True)
        print(f"{name} ...", flush=True)
        run = common.launch(config, [*worker_args, *extra, "--result-file", str(result_file)],
                            script=Path(__file__).resolve(), launch_args=launch_args)
        if run["returncode"] != 0 or not result_file.is_file():
            print(f"  FAILED (exit code {run['returncode']}):\n" + "\n".join(run["output"].splitlines()[-15:]))
            runs.append({"name": name, "failed": True, "returncode": run["returncode"],
                         "command": common.short_command(run["cmd"]), "output_tail": run["output"][-3000:]})
            continue
        res = {"name": name, "command": common.short_command(run["cmd"]), **json.loads(result_file.read_text())}
        runs.append(res)
        rows.append([name, res["processes"], res["precision"], res["channels_last"], res["compile"], res["variant"],
                     res["images_per_sec_per_gpu"], res["peak_memory_bytes"] / 2**30])
        print(f"  {res['images_per_sec_per_gpu']:,.1f} img/s per {'GPU' if cuda else 'process'}, "
              f"peak {res['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)
    print()
    print(f"{args.model} at {args.image_size}x{args.image_size}, batch {args.batch_size}/GPU, "
          f"{args.steps} timed steps after {args.warmup} warm-up ({'GPU' if cuda else 'CPU, tiny: checks only'}):")
    print(common.table(rows, ["run", "procs", "precision", "channels_last", "compile", "variant",
                              "img/s per GPU" if cuda else "img/s per proc", "peak GiB"]))
    result = {"setup": {"model": args.model, "image_size": args.image_size, "batch_size_per_gpu": args.batch_size,
                        "steps": args.steps, "warmup": args.warmup, "pool": args.pool, "cuda": cuda,
                        "gpus": torch.cuda.device_count() if cuda else 0},
              "runs": runs, "all_ok": all(not r.get("failed") for r in runs)}
    out = Path(args.out or common.RESULTS / ("gpu_suite.json" if cuda else "gpu_suite_cpu.json"))
    common.write_result(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        worker(parse_args())
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    else:
        sys.exit(0 if main().get("all_ok") else 1)
