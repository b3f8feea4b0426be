"""Scaling: images/s for 1 vs 2 processes here, and the communication per step of DDP and ZeRO-1/2/3 on paper.

    .venv/bin/python benchmarks/scaling.py                 # small_cnn: 1 process, 2 DDP processes, ZeRO-1/2/3 (2 ranks)
    .venv/bin/python benchmarks/scaling.py --quick         # 1 vs 2 processes only, small subset: checks that it runs
    .venv/bin/python benchmarks/scaling.py --paper-only    # only the communication tables (no launch)

Measured part: the real recipe (``accelerate launch`` with
accelerate_configs/single_gpu.yaml, cpu_ddp.yaml, zero1/2/3.yaml) trains one
epoch of ``--train-subset`` Fashion-MNIST samples; its summary.json gives the
training-loop images/s (start-up and evaluation excluded). ``--repeats`` runs
every configuration several times, configurations interleaved, and reports
the median. On this 2-core machine one process uses 2 threads and two
processes 1 thread each, so the same cores do the work: the ratio shows what
distribution costs (an all-reduce per step), not a speed-up.

On paper: bytes each rank sends per optimizer step (ring collectives, N ranks,
P parameters, b bytes per gradient element):

    DDP      all-reduce of the gradients              2 (N-1)/N P b
    ZeRO-1   reduce-scatter grads + all-gather params  2 (N-1)/N P b
    ZeRO-2   same as ZeRO-1                            2 (N-1)/N P b
    ZeRO-3   all-gather params in forward and backward
             + reduce-scatter grads                    3 (N-1)/N P b

and, from a per-GPU compute speed (``--gpu-images-per-sec``, or the GPU suite's
result when one exists) and a link bandwidth, the step time and scaling
efficiency to expect on a GPU cluster, without and with overlap of
communication and compute.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RUNS = {  # name: (accelerate config, processes)
    "1proc": ("single_gpu.yaml", 1),
    "ddp-2proc": ("cpu_ddp.yaml", 2),
    "zero1-2proc": ("zero1.yaml", 2),
    "zero2-2proc": ("zero2.yaml", 2),
    "zero3-2proc": ("zero3.yaml", 2),
}
VOLUME = {"DDP": 2, "ZeRO-1": 2, "ZeRO-2": 2, "ZeRO-3": 3}  # parameter-sized volumes per step, times (N-1)/N
PAPER_MODELS = {"small_cnn": 421_642, "resnet50": 25.6e6, "vit_base_patch16_224": 86.6e6, "vit_large_patch16_224": 304.3e6}
LINKS = {"100 Gb/s IB/Ethernet": 12.5e9, "200 Gb/s HDR IB": 25e9, "400 Gb/s NDR IB": 50e9, "NVLink (in a node)": 200e9}


def comm_bytes(params: float, world: int, scheme: str, bytes_per_elem: int) -> float:
    """Bytes sent by each rank per optimizer step (ring algorithms)."""
    if world <= 1:
        return 0.0
    return VOLUME[scheme] * (world - 1) / world * params * bytes_per_elem


def measure(name: str, args) -> dict:
    config, procs = RUNS[name]
    run_dir = common.SCRATCH / "scaling" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe_args = ["--train-subset", str(args.train_subset), "--test-subset", "512", "--epochs", "1",
                   "--tracker", "none", "--model", args.model, "--batch-size", str(args.batch_size),
                   "--output-dir", str(run_dir), *args.recipe_args.split()]
    run = common.launch(config, recipe_args)
    common.check_launch(run)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"config": config, "processes": procs, "images_per_sec": summary["images_per_sec"],
            "global_step": summary["global_step"], "launch_seconds": run["seconds"],
            "command": common.short_command(run["cmd"])}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=None, help="comma-separated from: " + ", ".join(RUNS) + " (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (interleaved); median reported")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=128, help="per process (the global batch grows with processes)")
    p.add_argument("--train-subset", type=int, default=15360, help="training samples per run (one epoch)")
    p.add_argument("--recipe-args", default="", help="extra recipe options, one string")
    p.add_argument("--paper-model", default="resnet50", help="model for the GPU-cluster table: " + ", ".join(PAPER_MODELS))
    p.add_argument("--gpu-images-per-sec", type=float, default=None,
                   help="per-GPU training speed for the paper model (default: benchmarks/results/gpu_suite.json "
                        "if it holds a GPU measurement, else 2500, an assumed A100 bf16 channels_last ResNet-50 figure)")
    p.add_argument("--gpu-batch", type=int, default=256, help="per-GPU batch for the GPU-cluster table")
    p.add_argument("--grad-bytes", type=int, default=2, help="bytes per communicated element (2: bf16/fp16, 4: fp32)")
    p.add_argument("--paper-only", action="store_true", help="skip the measurement")
    p.add_argument("--quick", action="store_true", help="1proc and ddp-2proc, 1 repeat, 2,560 samples")
    p.add_argument("--out", default=str(common.RESULTS / "scaling.json"), help="JSON result")
    p.add_argument("--plot", default=str(common.DOCS / "scaling.png"), help="PNG plot ('none' for no plot)")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.repeats, args.train_subset = args.runs or "1proc,ddp-2proc", 1, 2560
    args.runs = args.runs or ",".join(RUNS)
    return args


def gpu_speed(args) -> tuple[float, str]:
    if args.gpu_images_per_sec:
        return args.gpu_images_per_sec, "given on the command line"
    suite = common.RESULTS / "gpu_suite.json"
    if suite.is_file():
        data = json.loads(suite.read_text())
        rows = [r for r in data.get("runs", []) if r.get("device_type") == "cuda" and r.get("processes") == 1
                and r.get("model") == args.paper_model]
        if rows:
            best = max(rows, key=lambda r: r["images_per_sec_per_gpu"])
            return best["images_per_sec_per_gpu"], f"measured by gpu_suite.py on {best.get('gpu')} ({best['name']})"
    return 2500.0, "assumed (no GPU measurement in benchmarks/results/gpu_suite.json)"


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    measured = {n: [] for n in names}
    if not args.paper_only:
        for r in range(args.repeats):
            for name in (names if r % 2 == 0 else list(reversed(names))):
                print(f"[{r + 1}/{args.repeats}] {name} ...", flush=True)
                res = measure(name, args)
                res["load_1min_after"] = common.load_average()[0]
                measured[name].append(res)
                print(f"    {res['images_per_sec']:,.0f} img/s", flush=True)
    summary = {}
    base = common.median(m["images_per_sec"] for m in measured.get("1proc", [])) if measured.get("1proc") else None
    rows = []
    params = PAPER_MODELS.get(args.model)
    for name, runs in measured.items():
        if not runs:
            continue
        ips = common.median(r["images_per_sec"] for r in runs)
        procs = runs[0]["processes"]
        scheme = {"1proc": None, "ddp-2proc": "DDP"}.get(name) or name.split("-")[0].replace("zero", "ZeRO-")
        volume = comm_bytes(params, procs, scheme, 4) if (params and scheme) else None
        summary[name] = {"processes": procs, "median_images_per_sec": ips,
                         "vs_1proc": ips / base if base else None, "all_images_per_sec": [r["images_per_sec"] for r in runs],
                         "comm_bytes_per_step_per_rank_fp32": volume}
        rows.append([name, procs, ips, summary[name]["vs_1proc"], volume / 1e6 if volume else 0.0])
    if rows:
        print(f"\nMeasured here ({args.model}, batch {args.batch_size}/process, {args.train_subset} samples, "
              f"median of {args.repeats}):")
        print(common.table(rows, ["run", "procs", "img/s", "vs 1 proc", "MB sent/step/rank"]))

    # ---- on paper: communication volume per step and expected scaling on a GPU cluster
    psi = PAPER_MODELS.get(args.paper_model) or float(args.paper_model)
    speed, speed_source = gpu_speed(args)
    compute = args.gpu_batch / speed
    paper, prow = [], []
    for world in (8, 64, 512):
        for scheme in VOLUME:
            nbytes = comm_bytes(psi, world, scheme, args.grad_bytes)
            row = {"model": args.paper_model, "params": psi, "world": world, "scheme": scheme,
                   "bytes_per_step_per_rank": nbytes, "compute_seconds": compute, "links": {}}
            cells = [world, scheme, nbytes / 1e6]
            for link, bw in LINKS.items():
                t = nbytes / bw
                row["links"][link] = {"comm_seconds": t, "efficiency_no_overlap": compute / (compute + t),
                                      "efficiency_full_overlap": compute / max(compute, t)}
                cells.append(f"{compute / (compute + t):.0%} / {compute / max(compute, t):.0%}")
            paper.append(row)
            prow.append(cells)
    print(f"\nOn paper: {args.paper_model} ({psi / 1e6:.1f}M parameters), {args.grad_bytes}-byte gradients, "
          f"batch {args.gpu_batch}/GPU at {speed:,.0f} img/s/GPU ({speed_source}): compute {compute * 1e3:.0f} ms/step.")
    print("Scaling efficiency per link, without / with full overlap of communication and compute:")
    print(common.table(prow, ["GPUs", "scheme", "MB/step/rank", *LINKS]))
    small = []
    for name, p in PAPER_MODELS.items():
        small.append([name, p / 1e6, *[comm_bytes(p, 64, s, args.grad_bytes) / 1e6 for s in VOLUME]])
    print(f"\nMB each rank sends per step at 64 ranks ({args.grad_bytes}-byte elements):")
    print(common.table(small, ["model", "M params", *VOLUME]))

    result = {"setup": {"model": args.model, "batch_size": args.batch_size, "train_subset": args.train_subset,
                        "repeats": args.repeats, "runs": names, "paper_model": args.paper_model,
                        "gpu_images_per_sec": speed, "gpu_speed_source": speed_source, "gpu_batch": args.gpu_batch,
                        "grad_bytes": args.grad_bytes, "links_bytes_per_sec": LINKS},
              "measured": measured, "summary": summary, "paper": paper,
              "volume_in_params": {k: f"{v} (N-1)/N" for k, v in VOLUME.items()}}
    out = common.write_result(args.out, result)
    print(f"wrote {out}")
    if args.plot != "none":
        make_plot(result, Path(args.plot))
        print(f"wrote {args.plot}")
    return result


def make_plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    summary = result["summary"]
    if summary:
        names = list(summary)
        ax1.bar(names, [summary[n]["median_images_per_sec"] for n in names], color=[f"C{i}" for i in range(len(names))])
        for x, n in enumerate(names):
            for v in summary[n]["all_images_per_sec"]:
                ax1.plot(x, v, "k.", ms=4)
        ax1.set_ylabel("training images / s (median, dots: runs)")
        ax1.set_title(f"measured here: {result['setup']['model']}, 2 cores in all runs", fontsize=9)
        ax1.tick_params(axis="x", labelsize=8)
    else:
        ax1.axis("off")
    setup = result["setup"]
    worlds = [2, 4, 8, 16, 32, 64, 128, 256, 512]
    psi = PAPER_MODELS.get(setup["paper_model"]) or float(setup["paper_model"])
    compute = setup["gpu_batch"] / setup["gpu_images_per_sec"]
    lowest = 1.0
    for i, (link, bw) in enumerate(list(LINKS.items())[:3]):
        for scheme, ls in (("DDP", "-"), ("ZeRO-3", "--")):
            eff = [compute / (compute + comm_bytes(psi, n, scheme, setup["grad_bytes"]) / bw) for n in worlds]
            lowest = min(lowest, *eff)
            ax2.plot(worlds, eff, ls, color=f"C{i}", label=f"{scheme}, {link}")
    ax2.set_xscale("log", base=2)
    ax2.set_ylim(max(0.0, lowest - 0.1), 1.005)
    ax2.set_xlabel("GPUs")
    ax2.set_ylabel("expected scaling efficiency (no overlap)")
    ax2.set_title(f"on paper: {setup['paper_model']}, batch {setup['gpu_batch']}/GPU, "
                  f"{setup['gpu_images_per_sec']:,.0f} img/s/GPU", fontsize=9)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    common.save_figure(fig, path, result)


if __name__ == "__main__":
    main()
