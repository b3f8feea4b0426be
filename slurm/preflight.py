"""Preflight for the slurm/ templates: the accelerate config, as the template launches it, against the allocation.

    python slurm/preflight.py --config_file accelerate_configs/multinode_ddp.yaml --num_machines 2 --num_processes 8

Run by slurm/common.sh in the batch script, before any `accelerate launch`: a
launch that cannot fit the allocation (a single-process config on several
nodes, processes per node != GPUs or tasks per node, multi-node DeepSpeed
without the standard launcher, ...) would otherwise hang or train every node
as rank 0 until the wall-clock limit. Exit code 2 with every problem named.
The recipe repeats the check from inside the launch (shared.doctor.check_launch).
Imports only PyYAML and shared.doctor, so it costs well under a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `shared` from a plain clone

import yaml  # noqa: E402

from shared.doctor import check_slurm  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", required=True, help="accelerate config YAML")
    parser.add_argument("--num_machines", type=int, required=True, help="machines the template will launch")
    parser.add_argument("--num_processes", type=int, required=True, help="processes over all machines")
    args = parser.parse_args(argv)
    path = Path(args.config_file)
    if not path.is_file():
        print(f"preflight failed:\n  - accelerate config {path} does not exist", file=sys.stderr)
        return 2
    config = yaml.safe_load(path.read_text()) or {}
    kind = config.get("distributed_type", "NO")
    where = f"{path} (distributed_type {kind}, launched as {args.num_machines} machine(s) x {args.num_processes} process(es))"
    problems = check_slurm(args.num_processes, args.num_machines, where, distributed_type=kind, config=config)
    if problems:
        print("preflight failed:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    print(f"preflight ok: {path} fits this allocation ({args.num_machines} node(s), {args.num_processes} process(es))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
