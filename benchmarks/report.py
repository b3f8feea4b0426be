"""Print the Markdown tables of docs/performance.md from the JSON results in benchmarks/results/.

    .venv/bin/python benchmarks/report.py                 # all results found
    .venv/bin/python benchmarks/report.py --only overhead # one section

Measures nothing: it formats what the other scripts wrote (with the date,
machine, load and command of each), so the page can be refreshed after a
re-run without retyping numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def provenance(r: dict) -> str:
    m = r["machine"]
    device = m["gpu"] or "no GPU"
    return (f"*Measured {m['date']} on `{m['host']}` ({m['cpu']}, {m['cores_usable']} cores, {device}; "
            f"torch {m['torch']}, timm {m['timm']}, accelerate {m['accelerate']}, deepspeed {m['deepspeed']}; "
            f"git {m['git']}); load average at the end {m['load_average_1_5_15']}. Command:*\n\n"
            f"```bash\n{r['command']}\n```\n")


def md(rows, headers) -> str:
    return common.table(rows, headers, markdown=True)


def overhead(r: dict) -> str:
    s, setup = r["summary"], r["setup"]
    arms = [a for a in setup["arms"] if a != "plain"]
    rows = [[a, s[a]["median_images_per_sec"], f"{s[a]['median_ratio_to_plain']:.3f}",
             f"{s[a].get('ratio_of_median_step_times', float('nan')):.3f}",
             f"{s[a]['min_ratio']:.3f} - {s[a]['max_ratio']:.3f}"] for a in arms]
    rows.append(["plain", s["plain"]["median_images_per_sec"], "1", "1", ""])
    out = [f"{setup['model']}, batch {setup['batch_size_per_process']} per process, {setup['processes']} process(es) x "
           f"{setup['threads_per_process']} thread(s), {setup['rounds']} rounds x {setup['steps_per_round']} steps per "
           f"arm, interleaved every {setup.get('interleave', 'round')}.\n",
           md(rows, ["arm", "median img/s", "median ratio to plain", "ratio of median step times", "range over rounds"])]
    for name, doc in setup.get("variants", {}).items():
        out.append(f"\n- `{name}`: {doc}")
    return "\n".join(out) + "\n"


def tta(r: dict) -> str:
    s = r["summary"]
    rows = []
    for name, runs in r["runs"].items():
        run = runs[0]
        eps = run["epochs"]
        per_epoch = "; ".join(f"{e['test_acc']:.4f} @ {e['wall_seconds']:.0f} s" for e in eps)
        rows.append([name, s[name]["median_wall_seconds_to_target"], s[name]["median_train_seconds_to_target"],
                     s[name]["median_images_per_sec"], per_epoch])
    target = r["setup"]["target"]
    out = [md(rows, ["arm", f"wall s to {target:.0%}", "training-loop s to it", "img/s", "test acc @ wall s, per epoch"]),
           "", "Commands of the arms:", ""]
    for name, runs in r["runs"].items():
        out.append(f"- {name}: `{runs[0]['command']}`")
    return "\n".join(out) + "\n"


def zero(r: dict) -> str:
    rows = [[t["run"], t["stage"], t["params"], t["params_formula"], t["grads"], t["grads_formula"], t["master"],
             t["master_formula"], t["optimizer_state"], t["optimizer_state_formula"], t["total"], t["reduce_buckets"]]
            for t in r["table"]]
    out = [md(rows, ["run", "stage", "params", "formula", "grads (peak)", "formula", "fp32 master", "formula",
                     "optimizer state", "formula", "total", "+ reduce buckets"])]
    setup = r["setup"]
    paper = [p for p in r["paper"]]
    prow = [[p["precision"], "DDP" if p["stage"] == 0 else f"ZeRO-{p['stage']}", p["world"],
             *(f"{p[k] / 2**30:.3f}" for k in ("params", "grads", "master", "optimizer_state", "total"))] for p in paper]
    out += ["", f"On paper: {setup['paper_model']} ({paper[0]['params'] / 1e6:.0f}M parameters), GiB per GPU of model "
                "states (activations and buffers not included):", "",
            md(prow, ["precision", "stage", "GPUs", "params", "grads", "fp32 master", "optimizer state", "total"])]
    return "\n".join(out) + "\n"


def scaling(r: dict) -> str:
    s = r["summary"]
    rows = [[n, v["processes"], v["median_images_per_sec"], f"{v['vs_1proc']:.2f}" if v["vs_1proc"] else "",
             ", ".join(f"{x:,.0f}" for x in v["all_images_per_sec"]),
             f"{v['comm_bytes_per_step_per_rank_fp32'] / 1e6:.2f}" if v["comm_bytes_per_step_per_rank_fp32"] else "0"]
            for n, v in s.items()]
    out = [md(rows, ["run", "processes", "median img/s", "vs 1 process", "all runs", "MB sent/step/rank (formula)"])]
    setup = r["setup"]
    links = list(setup["links_bytes_per_sec"])
    prow = [[p["world"], p["scheme"], f"{p['bytes_per_step_per_rank'] / 1e6:.1f}",
             *(f"{p['links'][l]['efficiency_no_overlap']:.0%} / {p['links'][l]['efficiency_full_overlap']:.0%}"
               for l in links)] for p in r["paper"]]
    out += ["", f"On paper: {setup['paper_model']}, {setup['grad_bytes']}-byte gradients, batch {setup['gpu_batch']}/GPU "
                f"at {setup['gpu_images_per_sec']:,.0f} img/s/GPU ({setup['gpu_speed_source']}). Scaling efficiency "
                "without / with full overlap of communication and compute:", "",
            md(prow, ["GPUs", "scheme", "MB/step/rank", *links])]
    return "\n".join(out) + "\n"


def gpu(r: dict) -> str:
    rows = [[x["name"], x.get("processes"), x.get("precision"), x.get("channels_last"), x.get("compile"),
             x.get("variant"), x.get("images_per_sec_per_gpu"), (x.get("peak_memory_bytes") or 0) / 2**30,
             "FAILED" if x.get("failed") else ""] for x in r["runs"]]
    setup = r["setup"]
    return (f"{setup['model'] if 'model' in setup else 'resnet50'} at {setup['image_size']}x{setup['image_size']}, "
            f"batch {setup['batch_size_per_gpu']}/GPU, {setup['steps']} timed steps after {setup['warmup']}.\n\n"
            + md(rows, ["run", "procs", "precision", "channels_last", "compile", "variant", "img/s per GPU/proc",
                        "peak GiB", ""]) + "\n")


SECTIONS = {
    "overhead": (["overhead_1proc.json", "overhead_2proc.json"], overhead),
    "time_to_accuracy": (["time_to_accuracy.json"], tta),
    "zero_memory": (["zero_memory.json"], zero),
    "scaling": (["scaling.json"], scaling),
    "gpu_suite": (["gpu_suite.json", "gpu_suite_cpu.json"], gpu),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(SECTIONS), default=None)
    p.add_argument("--results", default=str(common.RESULTS), help="folder of JSON results")
    args = p.parse_args(argv)
    for name, (files, fmt) in SECTIONS.items():
        if args.only and name != args.only:
            continue
        for f in files:
            path = Path(args.results) / f
            if not path.is_file():
                continue
            r = json.loads(path.read_text())
            print(f"<!-- {name}: {f} -->\n")
            print(fmt(r))
            print(provenance(r))


if __name__ == "__main__":
    main()
