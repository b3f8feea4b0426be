"""Time to accuracy: wall seconds from the launch command to 91% Fashion-MNIST test accuracy.

    .venv/bin/python benchmarks/time_to_accuracy.py            # default job: 4 arms, one after the other
    .venv/bin/python benchmarks/time_to_accuracy.py --quick    # small subset, 2 epochs: checks that it runs

Arms (``--arms``), each started as a user would start it, its output lines
time-stamped as they arrive:

  recipe-1proc  accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/image_classification.py
  recipe-2proc  accelerate launch --config_file accelerate_configs/cpu_ddp.yaml recipes/image_classification.py
                (the README's default job)
  plain-1proc   python benchmarks/plain_loop.py   (hand-written loop, same model/optimizer/schedule/batch/data)
  plain-2proc   accelerate launch --config_file accelerate_configs/cpu_ddp.yaml benchmarks/plain_loop.py
  recipe-1proc-notrack, recipe-2proc-notrack   the recipe arms with --tracker none (W&B, offline here, is
                the recipe's default: these arms show what it costs)

Both print one line per epoch after evaluating; the time of the first line
with test_acc >= --target is the time to accuracy, start-up, data loading,
evaluation and (recipe) checkpoints included. The training-loop seconds alone
come from each run's metrics.jsonl (``train_seconds`` where a record has it,
else this epoch's images / ``images_per_sec``), and the launcher's and imports'
share from its ``wall_seconds`` (seconds since ``main()`` started). ``--repeats`` runs every arm several times, arms interleaved, and
reports the median. Writes benchmarks/results/time_to_accuracy.json and
docs/time_to_accuracy.png (accuracy against wall time).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ARMS = {  # name: (accelerate config or None for plain python, script, is the recipe, extra arguments)
    "recipe-1proc": ("single_gpu.yaml", common.RECIPE, True, []),
    "recipe-2proc": ("cpu_ddp.yaml", common.RECIPE, True, []),
    "plain-1proc": (None, Path(__file__).resolve().parent / "plain_loop.py", False, []),
    "plain-2proc": ("cpu_ddp.yaml", Path(__file__).resolve().parent / "plain_loop.py", False, []),
    # the default job without W&B (offline by default here): what the tracker costs
    "recipe-1proc-notrack": ("single_gpu.yaml", common.RECIPE, True, ["--tracker", "none"]),
    "recipe-2proc-notrack": ("cpu_ddp.yaml", common.RECIPE, True, ["--tracker", "none"]),
}
TRAIN_SAMPLES = re.compile(r"([\d,]+) training samples")


def run_arm(name: str, args, run_dir: Path) -> dict:
    config, script, is_recipe, arm_args = ARMS[name]
    shutil.rmtree(run_dir, ignore_errors=True)
    extra = ["--output-dir", str(run_dir), "--epochs", str(args.epochs)]
    if args.train_subset:
        extra += ["--train-subset", str(args.train_subset)]
    if args.test_subset:
        extra += ["--test-subset", str(args.test_subset)]
    if is_recipe:
        extra += args.recipe_args.split() + arm_args
    run = common.launch(config, extra, script=script)
    common.check_launch(run)
    points = []
    for t, line in run["lines"]:
        m = common.EPOCH_LINE.search(line)
        if m:
            points.append({"epoch": int(m.group(1)), "wall_seconds": t, "test_acc": float(m.group(4)),
                           "train_loss": float(m.group(3))})
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    m = TRAIN_SAMPLES.search(run["output"])
    num_train = int(m.group(1).replace(",", "")) if m else (args.train_subset or 60000)
    train_seconds = 0.0
    for point, record in zip(points, metrics):
        # this epoch's training-loop seconds: plain_loop.py writes them; the recipe's metrics.jsonl has only
        # images_per_sec, so: this epoch's images / images_per_sec
        train_seconds += record.get("train_seconds") or num_train / record["images_per_sec"]
        point["train_seconds"] = train_seconds
        point["images_per_sec"] = record["images_per_sec"]
        if "wall_seconds" in record:  # seconds since main() started: the rest is the launcher and the imports
            point["seconds_before_main"] = point["wall_seconds"] - record["wall_seconds"]
    hit = next((p for p in points if p["test_acc"] >= args.target), None)
    return {"arm": name, "command": common.short_command(run["cmd"]),
            "total_wall_seconds": run["seconds"], "epochs": points,
            "wall_seconds_to_target": hit["wall_seconds"] if hit else None,
            "train_seconds_to_target": hit["train_seconds"] if hit else None,
            "epoch_reaching_target": hit["epoch"] if hit else None,
            "final_test_acc": points[-1]["test_acc"] if points else None,
            "startup_seconds": points[0]["wall_seconds"] - points[0]["train_seconds"] if points else None,
            "seconds_before_main": points[0].get("seconds_before_main") if points else None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="plain-1proc,recipe-1proc,recipe-2proc,plain-2proc",
                   help="comma-separated, from: " + ", ".join(ARMS))
    p.add_argument("--target", type=float, default=0.91, help="test accuracy to reach")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (the default job: 3)")
    p.add_argument("--repeats", type=int, default=1, help="runs per arm (arms interleaved); the median is reported")
    p.add_argument("--train-subset", type=int, default=None, help="train on N samples only (quick checks)")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on N samples only (quick checks)")
    p.add_argument("--recipe-args", default="", help="extra options for the recipe arms, e.g. \"--tracker none\"")
    p.add_argument("--quick", action="store_true",
                   help="1,024 training / 256 test samples, 2 epochs, target 0.5: checks that it runs")
    p.add_argument("--out", default=str(common.RESULTS / "time_to_accuracy.json"), help="JSON result")
    p.add_argument("--plot", default=str(common.DOCS / "time_to_accuracy.png"), help="PNG plot ('none' for no plot)")
    args = p.parse_args(argv)
    if args.quick:
        args.train_subset, args.test_subset, args.epochs, args.target = 1024, 256, 2, 0.5
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    load_before = common.load_average()
    runs = {a: [] for a in arms}
    for r in range(args.repeats):
        for name in (arms if r % 2 == 0 else list(reversed(arms))):
            print(f"[{r + 1}/{args.repeats}] {name} ...", flush=True)
            res = run_arm(name, args, common.SCRATCH / "time_to_accuracy" / name)
            res["load_1min_after"] = common.load_average()[0]
            runs[name].append(res)
            print(f"    {res['command']}\n    " + "  ".join(
                f"ep{p['epoch']}: {p['test_acc']:.4f} @ {p['wall_seconds']:.1f}s" for p in res["epochs"]), flush=True)

    summary = {}
    for name in arms:
        walls = [r["wall_seconds_to_target"] for r in runs[name]]
        trains = [r["train_seconds_to_target"] for r in runs[name]]
        summary[name] = {
            "median_wall_seconds_to_target": common.median(w for w in walls if w is not None) if all(w is not None for w in walls) else None,
            "median_train_seconds_to_target": common.median(t for t in trains if t is not None) if all(t is not None for t in trains) else None,
            "reached_in_all_runs": all(w is not None for w in walls),
            "median_final_test_acc": common.median(r["final_test_acc"] for r in runs[name]),
            "median_images_per_sec": common.median(p["images_per_sec"] for r in runs[name] for p in r["epochs"]),
            "median_startup_seconds": common.median(r["startup_seconds"] for r in runs[name] if r["startup_seconds"] is not None),
            "median_seconds_before_main": common.median(r["seconds_before_main"] for r in runs[name]
                                                        if r.get("seconds_before_main") is not None),
        }
    rows = [[n, s["median_wall_seconds_to_target"], s["median_train_seconds_to_target"], s["median_final_test_acc"],
             s["median_images_per_sec"], s["median_startup_seconds"], s["median_seconds_before_main"]]
            for n, s in summary.items()]
    print()
    print(common.table(rows, ["arm", f"wall s to {args.target:.0%}", "train-loop s", "final acc", "img/s",
                              "start-up s*", "launcher+imports s"]))
    print("* start-up: launch to the first training step, plus the first evaluation")
    result = {"setup": {"target": args.target, "epochs": args.epochs, "repeats": args.repeats, "arms": arms,
                        "train_subset": args.train_subset, "test_subset": args.test_subset,
                        "recipe_args": args.recipe_args, "load_average_before": load_before},
              "summary": summary, "runs": runs}
    out = common.write_result(args.out, result)
    print(f"wrote {out}")
    if args.plot != "none":
        make_plot(result, Path(args.plot))
        print(f"wrote {args.plot}")
    return result


def make_plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    target = result["setup"]["target"]
    for i, (name, runs) in enumerate(result["runs"].items()):
        color = f"C{i}"
        for j, run in enumerate(runs):
            pts = run["epochs"]
            for ax, key in zip(axes, ("wall_seconds", "train_seconds")):
                ax.plot([p[key] for p in pts], [p["test_acc"] for p in pts], "o-", color=color, alpha=1 if j == 0 else 0.4,
                        label=name if j == 0 else None)
    for ax, title in zip(axes, ("from the launch command (start-up, eval, checkpoints included)",
                                "training loop only")):
        ax.set_xlim(left=0)
        ax.axhline(target, color="0.3", ls="--", lw=1)
        ax.text(ax.get_xlim()[0], target, f" {target:.0%}", va="bottom", fontsize=8, color="0.3")
        ax.set_xlabel("seconds")
        ax.set_ylabel("test accuracy (after each epoch)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Fashion-MNIST, small_cnn, batch 128/process, {result['setup']['epochs']} epochs (cosine)", fontsize=10)
    common.save_figure(fig, path, result)


if __name__ == "__main__":
    main()
