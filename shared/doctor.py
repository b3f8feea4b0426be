"""Preflight checks: accelerate YAML, DeepSpeed JSON, recipe config and machine, before heavy work.

    python -m shared.doctor --config_file accelerate_configs/zero2.yaml [-c recipes/configs/x.yaml]

The recipes run the launch-time subset themselves (:func:`check_launch`,
:func:`check_processes`). Every message names the file and key at fault and
says what to do; all problems are reported at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from shared.config import closest

MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")
DEEPSPEED_YAML_KEYS = (
    "deepspeed_config_file", "zero_stage", "offload_optimizer_device", "offload_param_device",
    "offload_optimizer_nvme_path", "offload_param_nvme_path", "gradient_accumulation_steps", "gradient_clipping",
    "zero3_init_flag", "zero3_save_16bit_model", "deepspeed_multinode_launcher", "deepspeed_hostfile",
    "deepspeed_exclusion_filter", "deepspeed_inclusion_filter", "deepspeed_moe_layer_cls_names",
)
DEEPSPEED_TOP_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "fp16", "bf16", "amp",
    "torch_autocast", "optimizer", "scheduler", "pipeline", "steps_per_print", "wall_clock_breakdown", "dump_state",
    "prescale_gradients", "gradient_predivide_factor", "communication_data_type", "activation_checkpointing",
    "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "checkpoint", "data_types",
    "compile", "memory_breakdown", "sparse_gradients", "aio", "elasticity", "autotuning", "data_efficiency",
    "tensor_parallel", "sequence_parallel_size", "seq_parallel_communication_data_type", "disable_allgather",
)
# Optimizers DeepSpeed offloads natively; others are silently replaced by DeepSpeed's Adam
# unless "zero_force_ds_cpu_optimizer": false.
OFFLOAD_NATIVE_OPTIMIZERS = ("adam", "adamw")


class PreflightError(RuntimeError):
    """One or more configuration problems, each naming its file and key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("preflight failed:\n  - " + "\n  - ".join(problems))


def _raise(problems: list[str]) -> None:
    if problems:
        raise PreflightError(problems)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _zero_keys() -> list[str]:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    return sorted(set(fields) | {f.alias for f in fields.values() if f.alias})


def _unknown(keys, valid, where: str) -> list[str]:
    return [f"{where}: unknown key '{k}'{closest(str(k), valid)}" for k in keys if k not in valid]


# --------------------------------------------------------------------------- DeepSpeed JSON


def load_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PreflightError([f"DeepSpeed config {path} does not exist"])
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PreflightError([f"{path}: not valid JSON ({err})"]) from err


def check_deepspeed_json(path: str | Path, cfg: Any, world_size: int | None, machine: bool = True) -> list[str]:
    """The DeepSpeed JSON against DeepSpeed's keys, the recipe config and the machine."""
    ds = load_json(path)
    problems = _unknown(ds, DEEPSPEED_TOP_KEYS, str(path))
    zero = ds.get("zero_optimization", {})
    problems += _unknown(zero, _zero_keys(), f"{path} zero_optimization")
    stage = zero.get("stage", 0)

    def fixed(key):  # a number the user wrote instead of "auto"
        value = ds.get(key, "auto")
        return None if value == "auto" else value

    micro, accum, total = fixed("train_micro_batch_size_per_gpu"), fixed("gradient_accumulation_steps"), fixed("train_batch_size")
    if micro is not None and micro != cfg.batch_size:
        problems.append(f"{path}: train_micro_batch_size_per_gpu is {micro} but the recipe's batch_size is "
                        f"{cfg.batch_size}; set it to \"auto\" so the recipe decides")
    if accum is not None and accum != cfg.grad_accum_steps:
        problems.append(f"{path}: gradient_accumulation_steps is {accum} but the recipe's grad_accum_steps is "
                        f"{cfg.grad_accum_steps}; set it to \"auto\"")
    if total is not None and world_size:
        expected = (micro or cfg.batch_size) * (accum or cfg.grad_accum_steps) * world_size
        if total != expected:
            problems.append(f"{path}: train_batch_size is {total} but micro batch x accumulation x world size = "
                            f"{micro or cfg.batch_size} x {accum or cfg.grad_accum_steps} x {world_size} = {expected}; "
                            "set it to \"auto\"")
    if "gradient_clipping" not in ds:
        problems.append(f"{path}: no gradient_clipping key: Accelerate would silently clip at 1.0; "
                        "set \"gradient_clipping\": \"auto\" (the recipe's --clip-grad)")
    elif ds["gradient_clipping"] != "auto" and float(ds["gradient_clipping"]) != float(getattr(cfg, "clip_grad", 0.0)):
        problems.append(f"{path}: gradient_clipping is {ds['gradient_clipping']} but the recipe's clip_grad is "
                        f"{cfg.clip_grad}; set it to \"auto\"")
    offload = zero.get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme") and cfg.opt.lower() not in OFFLOAD_NATIVE_OPTIMIZERS and ds.get("zero_force_ds_cpu_optimizer", True):
        problems.append(f"{path}: offload_optimizer to {offload} with optimizer '{cfg.opt}': DeepSpeed would silently "
                        "replace it by its own Adam; add \"zero_force_ds_cpu_optimizer\": false, or use --opt adamw")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            problems.append(f"{path}: remove the '{key}' block: the recipe builds its {key} from its own config")
    if "pipeline" in ds:
        problems.append(f"{path}: a 'pipeline' block is ignored by Accelerate (no pipeline parallelism happens); "
                        "remove it")
    if ds.get("pipeline") and stage >= 2:
        problems.append(f"{path}: pipeline parallelism cannot be combined with ZeRO stage {stage} (DeepSpeed refuses it)")
    if machine and ds.get("fp16", {}).get("enabled") is True and not cuda_available():
        problems.append(f"{path}: fp16.enabled is true but this machine has no CUDA GPU (DeepSpeed on CPU cannot do "
                        "fp16); use \"bf16\": {\"enabled\": true} instead")
    if ds.get("fp16", {}).get("enabled") is True and ds.get("bf16", {}).get("enabled") is True:
        problems.append(f"{path}: fp16 and bf16 are both enabled; choose one")
    return problems


# --------------------------------------------------------------------------- accelerate YAML


def check_accelerate_yaml(path: str | Path, cfg: Any, machine: bool = True) -> list[str]:
    """The accelerate config file, its DeepSpeed JSON, the recipe config and the machine."""
    from accelerate.commands.config.config_args import ClusterConfig

    path = Path(path)
    if not path.is_file():
        raise PreflightError([f"accelerate config {path} does not exist"])
    data = yaml.safe_load(path.read_text()) or {}
    problems = _unknown(data, [f.name for f in dataclasses.fields(ClusterConfig)], str(path))
    ds_yaml = data.get("deepspeed_config") or {}
    problems += _unknown(ds_yaml, DEEPSPEED_YAML_KEYS, f"{path} deepspeed_config")
    kind = data.get("distributed_type", "NO")
    procs, machines = int(data.get("num_processes", 1)), int(data.get("num_machines", 1))
    precision = data.get("mixed_precision", "no")
    if isinstance(precision, bool):
        problems.append(f"{path}: mixed_precision: {str(precision).lower()} is read by YAML as a boolean; "
                        "write it quoted, e.g. mixed_precision: 'no'")
    elif precision not in MIXED_PRECISION:
        problems.append(f"{path}: mixed_precision '{precision}' is not one of {', '.join(MIXED_PRECISION)}")
    if "deepspeed_config_file" in ds_yaml and "mixed_precision" in data:
        problems.append(f"{path}: remove mixed_precision: with deepspeed_config_file, precision is set in the JSON "
                        "(\"bf16\"/\"fp16\" blocks); Accelerate raises a ValueError otherwise")
    if kind == "MULTI_CPU" and procs > 1:
        problems.append(f"{path}: distributed_type MULTI_CPU starts one process under accelerate launch (it expects "
                        "an MPI launch); use distributed_type: MULTI_GPU, which the recipes run on CPU with gloo")
    if kind == "DEEPSPEED" and machines > 1 and ds_yaml.get("deepspeed_multinode_launcher", "pdsh") != "standard":
        problems.append(f"{path}: multi-node DeepSpeed needs deepspeed_multinode_launcher: standard "
                        "(the default, pdsh, breaks under Slurm)")
    if kind == "DEEPSPEED" and "deepspeed_config_file" in ds_yaml:
        json_path = Path(ds_yaml["deepspeed_config_file"])
        if json_path.is_file():
            problems += check_deepspeed_json(json_path, cfg, procs, machine)
        else:
            problems.append(f"{path}: deepspeed_config_file {json_path} not found from {Path.cwd()}; accelerate opens "
                            "it relative to the directory you launch from (the repository root for the shipped "
                            "configs): launch from there or give an absolute path")
    if machine:
        if precision == "fp16" and not cuda_available():
            problems.append(f"{path}: mixed_precision fp16 needs a CUDA GPU and this machine has none (Accelerate "
                            "would silently train in fp32); use accelerate_configs/bf16.yaml (mixed_precision: bf16)")
        if not data.get("use_cpu") and cuda_available() and kind in ("MULTI_GPU", "DEEPSPEED"):
            import torch

            per_node = procs // max(machines, 1)
            if per_node > torch.cuda.device_count():
                problems.append(f"{path}: {per_node} processes per machine but only {torch.cuda.device_count()} GPU(s) here")
        problems += check_slurm(procs, machines, str(path), distributed_type=kind)
    return problems


def check_slurm(num_processes: int, num_machines: int, where: str, distributed_type: str | None = None,
                config: dict | None = None) -> list[str]:
    """Inside a Slurm job, the launch must fit the allocation: nodes, tasks and GPUs (or CPUs) per node.

    ``num_processes``/``num_machines`` are what the launch will start (the
    accelerate config plus any command-line overrides). Job-level variables are
    read, so the check gives the same answer in the batch script and inside an
    ``srun`` step. Each problem names both numbers and the Slurm variable.
    """
    import re

    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return []

    def counts(name: str) -> list[int]:  # "4", "gpu:a100:4", "2(x3),1" -> [4], [4], [2, 2, 2, 1]
        value = env.get(name, "")
        if ":" in value:
            value = value.rsplit(":", 1)[1]
        out = []
        for num, times in re.findall(r"(\d+)(?:\(x(\d+)\))?", value):
            out += [int(num)] * int(times or 1)
        return out

    node_var = "SLURM_JOB_NUM_NODES" if "SLURM_JOB_NUM_NODES" in env else "SLURM_NNODES"
    if not counts(node_var):
        return []
    nodes = counts(node_var)[0]
    machines = max(num_machines, 1)
    per_node, uneven = divmod(num_processes, machines)
    launch = f"{num_processes} process(es) on {num_machines} machine(s)"
    problems = []
    if num_machines != nodes:
        effect = ("the launch would wait for machines that never start" if num_machines > nodes
                  else "nodes would sit idle")
        problems.append(f"{where}: num_machines is {num_machines} but the Slurm allocation has {nodes} node(s) "
                        f"({node_var}={nodes}): {effect}; the slurm/ templates pass --num_machines from the allocation")
    if uneven:
        problems.append(f"{where}: num_processes {num_processes} is not a multiple of num_machines {num_machines}")
    gpu_var = "SLURM_GPUS_ON_NODE" if counts("SLURM_GPUS_ON_NODE") else "SLURM_GPUS_PER_NODE"
    gpus = counts(gpu_var)[0] if counts(gpu_var) else 0
    # Tasks per node is the job's own value only in the batch script (an srun step has its own).
    tasks = counts("SLURM_NTASKS_PER_NODE") if "SLURM_STEP_ID" not in env else []
    slots = gpus or (tasks[0] if tasks else 1)
    if distributed_type == "NO" and (nodes > 1 or slots > 1 or num_processes > 1):
        problems.append(f"{where}: distributed_type 'NO' runs a single process, but the allocation has {nodes} "
                        f"node(s) x {slots} {'GPU(s)' if gpus else 'task(s)'} per node: every node would train "
                        "alone as rank 0; use a multi-process config (e.g. cpu_ddp.yaml, multi_gpu.yaml, "
                        "multinode_ddp.yaml) or ask for one node with one task/GPU")
    elif gpus and per_node != gpus:
        problems.append(f"{where}: {per_node} process(es) per node ({launch}) but the allocation has {gpus} GPU(s) "
                        f"per node ({gpu_var}={env[gpu_var]}); use one process per GPU")
    if tasks and tasks[0] > 1 and per_node != tasks[0] and distributed_type != "NO":
        problems.append(f"{where}: {per_node} process(es) per node ({launch}) but the allocation has {tasks[0]} "
                        f"task(s) per node (SLURM_NTASKS_PER_NODE={tasks[0]}); ask for one task per process "
                        "(CPU nodes) or one task per node (GPU nodes, --gpus-per-node sets the processes)")
    cpus = counts("SLURM_JOB_CPUS_PER_NODE") or counts("SLURM_CPUS_ON_NODE")
    if not gpus and cpus and per_node > min(cpus):
        problems.append(f"{where}: {per_node} process(es) per node ({launch}) but only {min(cpus)} CPU(s) "
                        f"allocated per node (SLURM_JOB_CPUS_PER_NODE={env.get('SLURM_JOB_CPUS_PER_NODE', cpus[0])}): "
                        "processes would share cores; ask for --ntasks-per-node/--cpus-per-task to match")
    ds = (config or {}).get("deepspeed_config") or {}
    if distributed_type == "DEEPSPEED" and nodes > 1 and ds.get("deepspeed_multinode_launcher", "pdsh") != "standard":
        problems.append(f"{where}: DeepSpeed on {nodes} nodes needs deepspeed_config: deepspeed_multinode_launcher: "
                        "standard (one launcher per node through srun); the default, pdsh, ssh-es into the nodes "
                        "itself and hangs or fails under Slurm")
    return problems


# --------------------------------------------------------------------------- at launch


def check_launch(cfg: Any) -> None:
    """What a recipe can check from the launcher's environment before creating the Accelerator."""
    problems = []
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "fp16" and not cuda_available():
        problems.append("the accelerate config asks for mixed_precision fp16 (ACCELERATE_MIXED_PRECISION=fp16) but "
                        "this machine has no CUDA GPU, so it would silently train in fp32; use bf16 "
                        "(accelerate_configs/bf16.yaml)")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    if deepspeed and os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        problems.append("ACCELERATE_USE_CPU is set beside a DeepSpeed config: Accelerate would silently drop "
                        "DeepSpeed; unset ACCELERATE_USE_CPU (the recipes run DeepSpeed on CPU with gloo by themselves)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if deepspeed and ds_file and ds_file != "none":
        problems += check_deepspeed_json(ds_file, cfg, world)
    if "LOCAL_WORLD_SIZE" in os.environ:
        problems += check_slurm(world, world // int(os.environ["LOCAL_WORLD_SIZE"]), "the launch")
    _raise(problems)


def check_processes(accelerator) -> None:
    """The launcher's WORLD_SIZE must be the world the Accelerator sees (else ranks train duplicates)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        _raise([f"the launcher started {launched} processes but this one sees a world of "
                f"{accelerator.num_processes} (rank {accelerator.process_index}): every process would train "
                "the same samples. On a machine without GPUs use an accelerate config with distributed_type: "
                "MULTI_GPU (the recipes switch to gloo on CPU by themselves), e.g. accelerate_configs/cpu_ddp.yaml"])


# --------------------------------------------------------------------------- CLI


def load_recipe(recipe: str):
    """A recipe script imported as a module (by name in recipes/, or by path), once."""
    path = Path(recipe)
    if not path.is_file():
        path = Path(__file__).resolve().parents[1] / "recipes" / f"{recipe}.py"
    name = f"recipe_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_recipe_config(recipe: str, yaml_path: str | None):
    """The recipe's Config dataclass filled from its YAML (defaults where absent)."""
    from shared.config import load_yaml

    config_cls = load_recipe(recipe).Config
    return config_cls(**(load_yaml(yaml_path, config_cls) if yaml_path else {}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", required=True, help="accelerate config YAML")
    parser.add_argument("-c", "--config", help="recipe YAML (default: the recipe's defaults)")
    parser.add_argument("--recipe", default="image_classification", help="recipe name or path, for its defaults")
    parser.add_argument("--skip-machine-checks", action="store_true",
                        help="check the files only, not against this machine (e.g. on a login node)")
    args = parser.parse_args(argv)
    try:
        cfg = load_recipe_config(args.recipe, args.config)
        problems = check_accelerate_yaml(args.config_file, cfg, machine=not args.skip_machine_checks)
    except (PreflightError, ValueError) as err:
        problems = getattr(err, "problems", [str(err)])
    if problems:
        print("preflight failed:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 1
    print(f"ok: {args.config_file} is consistent with the recipe config and this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
