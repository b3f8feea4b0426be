"""ZeRO memory: what each rank holds under DDP and ZeRO-1/2/3, measured from the live engine, beside the formulas.

    .venv/bin/python benchmarks/zero_memory.py            # resnet10t (4.9M parameters), 2 ranks, DDP + ZeRO-1/2/3
    .venv/bin/python benchmarks/zero_memory.py --quick    # ZeRO-3 only, fewer steps: checks that it runs
    .venv/bin/python benchmarks/zero_memory.py --paper-only   # only the extrapolation tables (no launch)

Each configuration launches the real recipe (``accelerate launch --config_file
accelerate_configs/<config>.yaml recipes/image_classification.py --dataset
synthetic --synthetic-shape 3 32 --model resnet10t ...``, a few steps) and reads
``held_elements_per_rank`` from its summary.json (parameters, fp32 master copy,
optimizer state, from ``shared.engine.held_elements``). Gradients are not in
that summary (they are freed after each step), so this script re-runs the
recipe in a probe (``--probe``) that records, on every rank, the largest set
of gradient storage alive during a training step: ``p.grad`` and the ZeRO
optimizer's gradient partitions and reduce buckets, each storage counted once.

``--bucket N`` adds ZeRO-2/3 runs whose JSON sets ``reduce_bucket_size`` (and
``allgather_bucket_size``) to N elements: DeepSpeed's default, 5e8 elements,
allocates 2 GB (fp32) per bucket on every rank whatever the model's size, and
ZeRO-2/3 only partition gradients at peak when the bucket is smaller than the
model.

Then the formulas (ZeRO paper, Rajbhandari et al. 2020, bytes per parameter)
are extrapolated to a larger model and world size (``--paper-model``,
``--paper-world``): the table a user reads to choose a stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIGS = {"ddp": "cpu_ddp.yaml", "zero1": "zero1.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}

# Parameter counts of well-known vision models (timm, ImageNet-1k heads) for the paper extrapolation.
PAPER_MODELS = {
    "resnet50": 25.6e6, "vit_base_patch16_224": 86.6e6, "vit_large_patch16_224": 304.3e6,
    "vit_huge_patch14_224": 632.0e6, "vit_giant_patch14_224": 1012.6e6,
}

# Bytes per parameter: (parameters, gradients, fp32 master copy, optimizer state).
# "fp32-sgd": this repository's default (fp32 weights, SGD momentum). DeepSpeed keeps a separate fp32
# master partition even in fp32, so ZeRO adds 4 bytes that plain DDP does not hold.
# "mixed-adam": the ZeRO paper's case: fp16/bf16 weights and gradients, fp32 master + Adam m and v (K = 12).
PRECISIONS = {
    "fp32-sgd": {"params": 4, "grads": 4, "master": 4, "optim": 4, "ddp_master": 0},
    "mixed-adam": {"params": 2, "grads": 2, "master": 4, "optim": 8, "ddp_master": 4},
}


def formula_elements(psi: float, world: int, stage: int) -> dict:
    """Elements per rank: parameters, gradients, master copy, optimizer state (SGD momentum: 1 per parameter)."""
    part = psi / world
    return {"params": part if stage >= 3 else psi, "grads": part if stage >= 2 else psi,
            "master": 0 if stage == 0 else part, "optimizer_state": part if stage >= 1 else psi}


def formula_bytes(psi: float, world: int, stage: int, precision: str) -> dict:
    """Bytes per rank for the model states (activations and buffers not included)."""
    b = PRECISIONS[precision]
    part = psi / world
    params = b["params"] * (part if stage >= 3 else psi)
    grads = b["grads"] * (part if stage >= 2 else psi)
    if stage == 0:  # DDP: the master copy (mixed precision) and the optimizer state are whole on every rank
        master, optim = b["ddp_master"] * psi, b["optim"] * psi
    else:
        master, optim = b["master"] * part, b["optim"] * part
    return {"params": params, "grads": grads, "master": master, "optimizer_state": optim,
            "total": params + grads + master + optim}


# --------------------------------------------------------------------------- probe (runs inside the launched ranks)


def _tensors(obj, name: str, out: list, depth: int = 0) -> None:
    import torch

    if torch.is_tensor(obj):
        if obj.dim() > 0:
            out.append((name, obj))
        return
    if depth > 3 or obj is None:
        return
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, name, out, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, name, out, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("deepspeed"):
        for v in vars(obj).values():
            _tensors(v, name, out, depth + 1)


def gradient_storage(model) -> dict:
    """Gradient elements this rank holds now: p.grad and the ZeRO optimizer's gradient buffers, storages counted once."""
    module = getattr(model, "module", model)
    buckets, partitions = [], []
    zero = getattr(model, "optimizer", None)  # a DeepSpeed engine's ZeRO optimizer
    if zero is not None and hasattr(zero, "__dict__"):
        for attr, value in vars(zero).items():
            low = attr.lower()
            if "ipg" in low or "bucket" in low:
                _tensors(value, attr.split("__")[-1], buckets)
            elif "grad" in low and "norm" not in low:
                _tensors(value, attr.split("__")[-1], partitions)
    # buckets first: a p.grad that is a view into a reduce bucket is counted as the bucket
    found = buckets + partitions + [("p.grad", p.grad) for p in module.parameters() if p.grad is not None]
    seen, by_name, total, nbytes, in_buckets = set(), {}, 0, 0, 0
    for i, (name, t) in enumerate(found):
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        elements = storage.nbytes() // t.element_size()
        by_name[name] = by_name.get(name, 0) + elements
        total += elements
        nbytes += storage.nbytes()
        in_buckets += elements if i < len(buckets) else 0
    return {"elements": total, "bytes": nbytes, "bucket_elements": in_buckets, "by_holder": by_name}


def probe(recipe_argv: list[str]) -> None:
    """Run the recipe with hooks that record the peak gradient storage of steps 2-3 on this rank."""
    import accelerate

    recipe = common.load_recipe()
    from shared.config import parse_config

    cfg = parse_config(recipe.Config, recipe_argv)
    peak = {"elements": -1}
    calls = {"backward": 0}
    original_prepare = accelerate.Accelerator.prepare

    def record(model) -> None:
        if 2 <= calls["backward"] <= 3:
            now = gradient_storage(model)
            if now["elements"] > peak["elements"]:
                peak.clear()
                peak.update(now)

    def prepare(self, *args, **kwargs):
        out = original_prepare(self, *args, **kwargs)
        model = out[0] if isinstance(out, tuple) else out
        module = getattr(model, "module", model)
        first = next(m for m in module.modules() if any(True for _ in m.parameters(recurse=False)))

        def forward_hook(mod, inputs):  # a new step starts
            if mod.training:
                calls["backward"] += 1

        def backward_hook(mod, grad_output):  # the last module of the backward pass: all other grads exist
            record(model)

        first.register_forward_pre_hook(forward_hook)
        first.register_full_backward_pre_hook(backward_hook)
        for p in module.parameters():  # every gradient that lands (DDP, ZeRO-1 keep them until the step)
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda _p: record(model))
        if hasattr(model, "allreduce_gradients"):  # DeepSpeed: backward done, reduction not yet
            original = model.allreduce_gradients

            def allreduce_gradients(*a, **k):
                record(model)
                return original(*a, **k)

            model.allreduce_gradients = allreduce_gradients
        if len(out) > 1 and hasattr(out[1], "step"):  # the optimizer step (DDP: grads complete here)
            optimizer, step = out[1], out[1].step

            def step_and_record(*a, **k):
                record(model)
                return step(*a, **k)

            optimizer.step = step_and_record
        return out

    accelerate.Accelerator.prepare = prepare
    recipe.main(cfg)
    rank = int(os.environ.get("RANK", "0"))
    (Path(cfg.output_dir) / f"grad_probe_rank{rank}.json").write_text(json.dumps(peak))


# --------------------------------------------------------------------------- driver


def bucket_config(base: str, bucket: int, scratch: Path) -> Path:
    """A copy of accelerate_configs/<base> whose DeepSpeed JSON sets the reduce/allgather bucket sizes."""
    import yaml

    cfg = yaml.safe_load((common.CONFIGS / base).read_text())
    ds_path = common.ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]
    ds = json.loads(ds_path.read_text())
    ds["zero_optimization"].update(reduce_bucket_size=int(bucket), allgather_bucket_size=int(bucket))
    scratch.mkdir(parents=True, exist_ok=True)
    new_json = scratch / f"{Path(base).stem}_bucket{bucket:g}.json"
    new_json.write_text(json.dumps(ds, indent=2))
    cfg["deepspeed_config"]["deepspeed_config_file"] = str(new_json)
    new_yaml = scratch / f"{Path(base).stem}_bucket{bucket:g}.yaml"
    new_yaml.write_text(yaml.safe_dump(cfg))
    return new_yaml


def measure(name: str, config_path: Path, args) -> dict:
    run_dir = common.SCRATCH / "zero_memory" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe_args = ["--dataset", "synthetic", "--synthetic-shape", "3", "32", "--model", args.model,
                   "--synthetic-train-size", str(args.steps * args.batch_size * 2), "--synthetic-test-size", "64",
                   "--batch-size", str(args.batch_size), "--epochs", "1", "--tracker", "none",
                   "--output-dir", str(run_dir)]
    run = common.launch(str(config_path), [*recipe_args], script=Path(__file__).resolve(),
                        env={"ZERO_MEMORY_PROBE": "1"})
    common.check_launch(run)
    summary = json.loads((run_dir / "summary.json").read_text())
    held = summary["held_elements_per_rank"]
    grads = [json.loads((run_dir / f"grad_probe_rank{r}.json").read_text()) for r in range(len(held))]
    return {"config": common.short_command(run["cmd"]).split("--config_file ")[1].split()[0],
            "zero_stage": summary["zero_stage"], "world_size": summary["world_size"],
            "held_elements_per_rank": held, "gradients_per_rank": grads, "launch_seconds": run["seconds"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="ddp,zero1,zero2,zero3", help="comma-separated from: " + ", ".join(CONFIGS))
    p.add_argument("--bucket", type=float, default=[], action="append",
                   help="also run ZeRO-2 and ZeRO-3 with reduce/allgather bucket size N elements (repeatable)")
    p.add_argument("--model", default="resnet10t", help="timm model (a few million parameters)")
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    p.add_argument("--paper-model", default="vit_large_patch16_224", help="model for the extrapolation: " + ", ".join(PAPER_MODELS))
    p.add_argument("--paper-world", type=int, default=64, help="GPUs for the extrapolation")
    p.add_argument("--paper-only", action="store_true", help="skip the measurement; print the formulas only")
    p.add_argument("--quick", action="store_true", help="ZeRO-3 only, 3 steps: checks that it runs")
    p.add_argument("--out", default=str(common.RESULTS / "zero_memory.json"), help="JSON result")
    p.add_argument("--plot", default=str(common.DOCS / "zero_memory.png"), help="PNG plot ('none' for no plot)")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.steps, args.bucket = "zero3", 3, []
    return args


def gib(x: float) -> float:
    return x / 2**30


def main(argv=None) -> dict:
    args = parse_args(argv)
    measured = {}
    if not args.paper_only:
        for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
            print(f"launching {name} ...", flush=True)
            measured[name] = measure(name, common.CONFIGS / CONFIGS[name], args)
        for bucket in args.bucket:
            for base in ("zero2", "zero3"):
                name = f"{base}+bucket{bucket:g}"
                print(f"launching {name} ...", flush=True)
                path = bucket_config(CONFIGS[base], int(bucket), common.SCRATCH / "zero_memory" / "configs")
                measured[name] = measure(name, path, args)
                measured[name]["config"] = f"{CONFIGS[base]} with reduce/allgather_bucket_size {bucket:g}"

    rows, table_measured = [], []
    for name, m in measured.items():
        stage, world = m["zero_stage"], m["world_size"]
        r0 = m["held_elements_per_rank"][0]
        psi = max(h["params"] for h in m["held_elements_per_rank"]) if stage < 3 else sum(
            h["params"] for h in m["held_elements_per_rank"])
        f = formula_elements(psi, world, stage)
        g0 = m["gradients_per_rank"][0]
        master = r0["master_params"] if stage > 0 else 0  # DDP's "master" is the parameters themselves
        row = {"run": name, "stage": stage, "world": world, "psi": psi,
               "params": r0["params"], "params_formula": f["params"],
               "grads": g0["elements"] - g0["bucket_elements"], "grads_formula": f["grads"],
               "reduce_buckets": g0["bucket_elements"], "grad_holders": g0["by_holder"],
               "master": master, "master_formula": f["master"],
               "optimizer_state": r0["optimizer_state"], "optimizer_state_formula": f["optimizer_state"],
               "ranks_equal": all(h == m["held_elements_per_rank"][0] for h in m["held_elements_per_rank"])}
        row["total"] = row["params"] + row["grads"] + row["master"] + row["optimizer_state"]
        row["total_formula"] = sum(f.values())
        table_measured.append(row)
        rows.append([name, stage, row["params"], f["params"], row["grads"], f["grads"], row["master"], f["master"],
                     row["optimizer_state"], f["optimizer_state"], row["total"], row["total_formula"],
                     row["reduce_buckets"]])
    if rows:
        print(f"\nMeasured elements held per rank (rank 0; {args.model}, {measured[next(iter(measured))]['world_size']} ranks, "
              "fp32, SGD momentum) vs formula:")
        print(common.table(rows, ["run", "stage", "params", "(formula)", "grads*", "(formula)", "fp32 master",
                                  "(formula)", "optim state", "(formula)", "total", "(formula)", "+ buckets**"]))
        print("*  grads: largest gradient storage alive during a step (p.grad and ZeRO gradient partitions)\n"
              "** DeepSpeed's reduce buckets (ipg), allocated at every backward: reduce_bucket_size elements each, "
              "whatever the model's size")

    psi = PAPER_MODELS.get(args.paper_model) or float(args.paper_model)
    paper = []
    prow = []
    for precision in PRECISIONS:
        for stage in range(4):
            for world in sorted({8, args.paper_world}):
                b = formula_bytes(psi, world, stage, precision)
                paper.append({"model": args.paper_model, "params": psi, "world": world, "stage": stage,
                              "precision": precision, **b})
                prow.append([precision, f"ZeRO-{stage}" if stage else "DDP", world, gib(b["params"]), gib(b["grads"]),
                             gib(b["master"]), gib(b["optimizer_state"]), gib(b["total"])])
    print(f"\nOn paper: {args.paper_model} ({psi / 1e6:.0f}M parameters), GiB of model states per GPU "
          "(activations, buffers and DeepSpeed's reduce buckets not included):")
    print(common.table(prow, ["precision", "stage", "GPUs", "params", "grads", "fp32 master", "optim state", "total"]))
    comm = {"ddp": 2.0, "zero1": 2.0, "zero2": 2.0, "zero3": 3.0}
    print("Communication per step, in parameter-sized volumes per rank: DDP 2 (all-reduce = reduce-scatter + "
          "all-gather), ZeRO-1 2, ZeRO-2 2, ZeRO-3 3 (parameters all-gathered in forward and again in backward); "
          "see benchmarks/scaling.py.")

    result = {"setup": {"model": args.model, "batch_size": args.batch_size, "steps": args.steps,
                        "buckets": args.bucket, "paper_model": args.paper_model, "paper_world": args.paper_world},
              "measured": measured, "table": table_measured, "paper": paper, "bytes_per_param": PRECISIONS,
              "comm_volume_in_params": comm}
    out = common.write_result(args.out, result)
    print(f"wrote {out}")
    if args.plot != "none" and table_measured:
        make_plot(result, Path(args.plot))
        print(f"wrote {args.plot}")
    return result


def make_plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.6, 1]})
    rows = result["table"]
    parts = [("params", "parameters"), ("grads", "gradients outside buckets (peak)"), ("master", "fp32 master"),
             ("optimizer_state", "optimizer state")]
    width = 0.8 / len(parts)
    for i, (key, label) in enumerate(parts):
        xs = [x + (i - 1.5) * width for x in range(len(rows))]
        ax1.bar(xs, [r[key] / 1e6 for r in rows], width=width, label=label, color=f"C{i}")
        ax1.scatter(xs, [r[key + "_formula"] / 1e6 for r in rows], marker="_", s=120, color="k", zorder=3,
                    label="formula" if i == 0 else None)
    top = max(max(r[k] for k, _ in parts) for r in rows) / 1e6
    for x, r in enumerate(rows):
        if r["reduce_buckets"]:
            ax1.text(x, top * 1.04, f"+{r['reduce_buckets'] / 1e6:,.0f}M\nbuckets", ha="center",
                     va="bottom", fontsize=6.5, color="C4")
    ax1.set_ylim(0, top * 1.3)
    ax1.set_xticks(range(len(rows)), [r["run"].replace("+bucket", "\nbucket ") for r in rows], fontsize=7)
    ax1.set_ylabel("million elements held by rank 0")
    ax1.set_title(f"measured: {result['setup']['model']}, {rows[0]['world']} ranks, fp32 SGD momentum", fontsize=9)
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=5, frameon=False)
    paper = [p for p in result["paper"] if p["world"] == result["setup"]["paper_world"]]
    for i, precision in enumerate(PRECISIONS):
        sel = [p for p in paper if p["precision"] == precision]
        ax2.bar([x + 0.4 * i for x in range(4)], [gib(p["total"]) for p in sel], width=0.4, label=precision)
        for x, p in enumerate(sel):
            ax2.text(x + 0.4 * i, gib(p["total"]), f"{gib(p['total']):.2f}", ha="center", va="bottom", fontsize=7)
    ax2.set_xticks([x + 0.2 for x in range(4)], ["DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3"])
    ax2.set_ylabel("GiB of model states per GPU")
    ax2.set_title(f"on paper: {result['setup']['paper_model']}, {result['setup']['paper_world']} GPUs", fontsize=9)
    ax2.legend(fontsize=8)
    common.save_figure(fig, path, result)


if __name__ == "__main__":
    if os.environ.get("ZERO_MEMORY_PROBE") == "1":
        probe(sys.argv[1:])
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    else:
        main()
