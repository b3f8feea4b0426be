"""Unit tests of shared/doctor.py: every shipped config passes, every known bad config is named precisely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]

from shared.doctor import load_recipe  # noqa: E402
from shared import doctor  # noqa: E402
from shared.doctor import (  # noqa: E402
    PreflightError, check_accelerate_yaml, check_deepspeed_json, check_launch, check_processes, check_slurm,
)

CONFIGS = ROOT / "accelerate_configs"
SHIPPED = sorted(p.name for p in CONFIGS.glob("*.yaml"))
GPU_ONLY = {"fp16.yaml", "multi_gpu.yaml"}  # need CUDA GPUs; the others run on this CPU machine
CPU_RUNNABLE = [name for name in SHIPPED if name not in GPU_ONLY]
HAS_CUDA = doctor.cuda_available()
cpu_machine = pytest.mark.skipif(HAS_CUDA, reason="checks what this CPU-only machine reports")



@pytest.fixture
def cfg():
    return load_recipe("image_classification").Config()  # batch_size 128, grad_accum_steps 1, clip_grad 0.0, opt sgd


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Run from the repository root (the shipped YAMLs name their JSON relative to it), outside any Slurm job."""
    monkeypatch.chdir(ROOT)
    for key in list(os.environ):
        if key.startswith(("SLURM_", "ACCELERATE_")) or key in ("WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                                "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(key)


def write_yaml(tmp_path: Path, text: str, name: str = "acc.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


DS_GOOD = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2},
}


def write_json(tmp_path: Path, changes: dict | None = None, drop: tuple = (), name: str = "ds.json") -> Path:
    ds = json.loads(json.dumps(DS_GOOD))
    for key in drop:
        ds.pop(key)
    ds.update(changes or {})
    path = tmp_path / name
    path.write_text(json.dumps(ds))
    return path


DDP = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
"""


def deepspeed_yaml(json_path: Path, extra: str = "", top: str = "", machines: int = 1) -> str:
    return (f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {json_path}\n{extra}"
            f"num_processes: 2\nnum_machines: {machines}\nmachine_rank: 0\n{top}")


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_passes_file_checks(cfg, name):
    assert check_accelerate_yaml(CONFIGS / name, cfg, machine=False) == []


@cpu_machine
@pytest.mark.parametrize("name", CPU_RUNNABLE)
def test_cpu_runnable_config_passes_machine_checks(cfg, name):
    assert check_accelerate_yaml(CONFIGS / name, cfg, machine=True) == []


@pytest.mark.parametrize("name", sorted(p.name for p in (CONFIGS / "deepspeed").glob("*.json")))
def test_shipped_deepspeed_json_passes(cfg, name):
    assert check_deepspeed_json(CONFIGS / "deepspeed" / name, cfg, world_size=2) == []


def test_every_deepspeed_yaml_names_an_existing_json():
    import yaml

    for name in SHIPPED:
        data = yaml.safe_load((CONFIGS / name).read_text())
        if data.get("distributed_type") == "DEEPSPEED":
            assert (ROOT / data["deepspeed_config"]["deepspeed_config_file"]).is_file(), name
            assert "mixed_precision" not in data, name


def test_recipe_yamls_agree_with_every_shipped_config():
    recipe = load_recipe("image_classification")
    for recipe_yaml in sorted((ROOT / "recipes" / "configs").glob("*.yaml")):
        from shared.config import load_yaml

        recipe_cfg = recipe.Config(**load_yaml(recipe_yaml, recipe.Config))
        for name in SHIPPED:
            assert check_accelerate_yaml(CONFIGS / name, recipe_cfg, machine=False) == [], (recipe_yaml.name, name)


def test_config_files_named_in_docstrings_exist():
    import re

    named = {}
    for source in sorted((ROOT / "recipes").glob("*.py")) + sorted((ROOT / "shared").glob("*.py")):
        for ref in re.findall(r"accelerate_configs/[\w./-]+\.(?:yaml|json)", source.read_text()):
            named.setdefault(ref, source.relative_to(ROOT).as_posix())
    assert named, "no config named anywhere?"
    missing = {ref: where for ref, where in named.items() if not (ROOT / ref).is_file()}
    assert missing == {}


@cpu_machine
def test_fp16_yaml_fails_on_this_machine_and_suggests_bf16(cfg):
    path = Path("accelerate_configs/fp16.yaml")
    assert check_accelerate_yaml(path, cfg, machine=True) == [
        f"{path}: mixed_precision fp16 needs a CUDA GPU and this machine has none (Accelerate would silently "
        "train in fp32); use accelerate_configs/bf16.yaml (mixed_precision: bf16)"]


def test_gpu_count_checked_on_a_gpu_machine(cfg, monkeypatch):
    import torch

    monkeypatch.setattr(doctor, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert check_accelerate_yaml(CONFIGS / "multi_gpu.yaml", cfg) == [
        f"{CONFIGS / 'multi_gpu.yaml'}: 8 processes per machine but only 4 GPU(s) here"]
    assert check_accelerate_yaml(CONFIGS / "fp16.yaml", cfg) == []  # fp16 is fine where there is CUDA
    assert check_accelerate_yaml(CONFIGS / "cpu_ddp.yaml", cfg) == []  # use_cpu: GPUs do not matter


# --------------------------------------------------------------------------- bad accelerate YAMLs


def test_unquoted_no_is_a_yaml_boolean(cfg, tmp_path):
    path = write_yaml(tmp_path, DDP.replace("mixed_precision: 'no'", "mixed_precision: no"))
    assert check_accelerate_yaml(path, cfg, machine=False) == [
        f"{path}: mixed_precision: false is read by YAML as a boolean; write it quoted, e.g. mixed_precision: 'no'"]


def test_unknown_mixed_precision_value(cfg, tmp_path):
    path = write_yaml(tmp_path, DDP.replace("'no'", "fp32"))
    assert check_accelerate_yaml(path, cfg, machine=False) == [
        f"{path}: mixed_precision 'fp32' is not one of no, fp16, bf16, fp8"]


def test_unknown_yaml_key_with_suggestion(cfg, tmp_path):
    path = write_yaml(tmp_path, DDP.replace("num_processes: 2", "num_proceses: 2"))
    assert check_accelerate_yaml(path, cfg, machine=False) == [
        f"{path}: unknown key 'num_proceses' (did you mean 'num_processes'?)"]


def test_unknown_deepspeed_config_subkey(cfg, tmp_path):
    ds = write_json(tmp_path)
    path = write_yaml(tmp_path, deepspeed_yaml(ds, extra="  zero_stag: 2\n"))
    assert check_accelerate_yaml(path, cfg, machine=False) == [
        f"{path} deepspeed_config: unknown key 'zero_stag' (did you mean 'zero_stage'?)"]


def test_mixed_precision_beside_deepspeed_config_file(cfg, tmp_path):
    ds = write_json(tmp_path)
    path = write_yaml(tmp_path, deepspeed_yaml(ds, top="mixed_precision: bf16\n"))
    assert check_accelerate_yaml(path, cfg, machine=False) == [
        f"{path}: remove mixed_precision: with deepspeed_config_file, precision is set in the JSON "
        "(\"bf16\"/\"fp16\" blocks); Accelerate raises a ValueError otherwise"]


def test_multi_cpu_with_two_processes(cfg, tmp_path):
    path = write_yaml(tmp_path, DDP.replace("MULTI_GPU", "MULTI_CPU"))
    assert check_accelerate_yaml(path, cfg, machine=False) == [
        f"{path}: distributed_type MULTI_CPU starts one process under accelerate launch (it expects an MPI "
        "launch); use distributed_type: MULTI_GPU, which the recipes run on CPU with gloo"]
    one = write_yaml(tmp_path, DDP.replace("MULTI_GPU", "MULTI_CPU").replace("num_processes: 2", "num_processes: 1"),
                     name="one.yaml")
    assert check_accelerate_yaml(one, cfg, machine=False) == []


def test_multinode_deepspeed_needs_standard_launcher(cfg, tmp_path):
    ds = write_json(tmp_path)
    path = write_yaml(tmp_path, deepspeed_yaml(ds, machines=2))
    assert check_accelerate_yaml(path, cfg, machine=False) == [
        f"{path}: multi-node DeepSpeed needs deepspeed_multinode_launcher: standard (the default, pdsh, breaks "
        "under Slurm)"]
    fixed = write_yaml(tmp_path, deepspeed_yaml(ds, extra="  deepspeed_multinode_launcher: standard\n", machines=2),
                       name="fixed.yaml")
    assert check_accelerate_yaml(fixed, cfg, machine=False) == []


def test_all_problems_reported_at_once(cfg, tmp_path):
    ds = write_json(tmp_path, {"optimizer": {"type": "Adam"}}, drop=("gradient_clipping",))
    path = write_yaml(tmp_path, deepspeed_yaml(ds, extra="  zero_stag: 2\n", top="mixed_precision: no\n"))
    problems = check_accelerate_yaml(path, cfg, machine=False)
    assert len(problems) == 5
    assert [p.split(":")[0] for p in problems] == [f"{path} deepspeed_config", str(path), str(path), str(ds), str(ds)]


def test_missing_files(cfg, tmp_path):
    with pytest.raises(PreflightError) as info:
        check_accelerate_yaml(tmp_path / "nope.yaml", cfg)
    assert info.value.problems == [f"accelerate config {tmp_path / 'nope.yaml'} does not exist"]
    assert str(info.value) == f"preflight failed:\n  - accelerate config {tmp_path / 'nope.yaml'} does not exist"
    with pytest.raises(PreflightError) as info:
        check_deepspeed_json(tmp_path / "nope.json", cfg, 2)
    assert info.value.problems == [f"DeepSpeed config {tmp_path / 'nope.json'} does not exist"]
    bad = tmp_path / "bad.json"
    bad.write_text("{'stage': 2}")
    with pytest.raises(PreflightError) as info:
        check_deepspeed_json(bad, cfg, 2)
    assert info.value.problems[0].startswith(f"{bad}: not valid JSON (")


def test_json_path_relative_to_yaml_only_is_reported(cfg, tmp_path):
    folder = tmp_path / "my_configs"
    folder.mkdir()
    write_json(folder, name="my_zero2.json")
    path = write_yaml(folder, deepspeed_yaml(Path("my_zero2.json")))
    try:
        problems = check_accelerate_yaml(path, cfg, machine=False)  # run from the repository root
    except PreflightError as err:
        problems = err.problems
    assert any("my_zero2.json" in p for p in problems), problems


# --------------------------------------------------------------------------- bad DeepSpeed JSON


def test_unknown_top_level_and_zero_keys(cfg, tmp_path):
    path = write_json(tmp_path, {"train_batch_sise": "auto", "zero_optimization": {"stage": 2, "overlap_com": True}})
    assert check_deepspeed_json(path, cfg, 2) == [
        f"{path}: unknown key 'train_batch_sise' (did you mean 'train_batch_size'?)",
        f"{path} zero_optimization: unknown key 'overlap_com' (did you mean 'overlap_comm'?)",
    ]


def test_zero_key_aliases_are_known(cfg, tmp_path):
    path = write_json(tmp_path, {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                                                        "stage3_max_live_parameters": 1e9, "overlap_comm": True}})
    assert check_deepspeed_json(path, cfg, 2) == []


def test_train_batch_size_arithmetic(cfg, tmp_path):
    path = write_json(tmp_path, {"train_batch_size": 100})
    assert check_deepspeed_json(path, cfg, 2) == [
        f"{path}: train_batch_size is 100 but micro batch x accumulation x world size = 128 x 1 x 2 = 256; "
        "set it to \"auto\""]
    assert check_deepspeed_json(write_json(tmp_path, {"train_batch_size": 256}), cfg, 2) == []
    accum = load_recipe("image_classification").Config(batch_size=16, grad_accum_steps=4)
    path = write_json(tmp_path, {"train_batch_size": 64})
    assert check_deepspeed_json(path, accum, 2) == [
        f"{path}: train_batch_size is 64 but micro batch x accumulation x world size = 16 x 4 x 2 = 128; "
        "set it to \"auto\""]


def test_micro_batch_and_accumulation_must_match_recipe(cfg, tmp_path):
    path = write_json(tmp_path, {"train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 4})
    assert check_deepspeed_json(path, cfg, 2) == [
        f"{path}: train_micro_batch_size_per_gpu is 64 but the recipe's batch_size is 128; set it to \"auto\" so "
        "the recipe decides",
        f"{path}: gradient_accumulation_steps is 4 but the recipe's grad_accum_steps is 1; set it to \"auto\"",
    ]
    assert check_deepspeed_json(write_json(tmp_path, {"train_micro_batch_size_per_gpu": 128}), cfg, 2) == []


def test_gradient_clipping_missing_or_different(cfg, tmp_path):
    path = write_json(tmp_path, drop=("gradient_clipping",))
    assert check_deepspeed_json(path, cfg, 2) == [
        f"{path}: no gradient_clipping key: Accelerate would silently clip at 1.0; set \"gradient_clipping\": "
        "\"auto\" (the recipe's --clip-grad)"]
    path = write_json(tmp_path, {"gradient_clipping": 1.0})
    assert check_deepspeed_json(path, cfg, 2) == [
        f"{path}: gradient_clipping is 1.0 but the recipe's clip_grad is 0.0; set it to \"auto\""]
    assert check_deepspeed_json(write_json(tmp_path, {"gradient_clipping": 0.0}), cfg, 2) == []


def test_offload_with_sgd_needs_force_false(cfg, tmp_path):
    zero = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    path = write_json(tmp_path, {"zero_optimization": zero})
    assert check_deepspeed_json(path, cfg, 2) == [
        f"{path}: offload_optimizer to cpu with optimizer 'sgd': DeepSpeed would silently replace it by its own "
        "Adam; add \"zero_force_ds_cpu_optimizer\": false, or use --opt adamw"]
    assert check_deepspeed_json(write_json(tmp_path, {"zero_optimization": zero,
                                                      "zero_force_ds_cpu_optimizer": False}), cfg, 2) == []
    adamw = load_recipe("image_classification").Config(opt="adamw")
    assert check_deepspeed_json(write_json(tmp_path, {"zero_optimization": zero}), adamw, 2) == []


def test_optimizer_scheduler_and_pipeline_blocks(cfg, tmp_path):
    path = write_json(tmp_path, {"optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"},
                                 "pipeline": {"stages": 2}})
    assert check_deepspeed_json(path, cfg, 2) == [
        f"{path}: remove the 'optimizer' block: the recipe builds its optimizer from its own config",
        f"{path}: remove the 'scheduler' block: the recipe builds its scheduler from its own config",
        f"{path}: a 'pipeline' block is ignored by Accelerate (no pipeline parallelism happens); remove it",
        f"{path}: pipeline parallelism cannot be combined with ZeRO stage 2 (DeepSpeed refuses it)",
    ]
    stage1 = write_json(tmp_path, {"pipeline": {"stages": 2}, "zero_optimization": {"stage": 1}})
    assert check_deepspeed_json(stage1, cfg, 2) == [
        f"{stage1}: a 'pipeline' block is ignored by Accelerate (no pipeline parallelism happens); remove it"]


@cpu_machine
def test_fp16_json_on_cpu(cfg, tmp_path):
    path = write_json(tmp_path, {"fp16": {"enabled": True}, "bf16": {"enabled": False}})
    assert check_deepspeed_json(path, cfg, 2, machine=True) == [
        f"{path}: fp16.enabled is true but this machine has no CUDA GPU (DeepSpeed on CPU cannot do fp16); use "
        "\"bf16\": {\"enabled\": true} instead"]
    assert check_deepspeed_json(path, cfg, 2, machine=False) == []
    # "auto" is decided by the launch precision, which check_launch looks at
    assert check_deepspeed_json(write_json(tmp_path, {"fp16": {"enabled": "auto"}}), cfg, 2) == []


def test_fp16_and_bf16_both_enabled(cfg, tmp_path):
    path = write_json(tmp_path, {"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    assert f"{path}: fp16 and bf16 are both enabled; choose one" in check_deepspeed_json(path, cfg, 2, machine=False)


def test_fp16_json_through_the_yaml_check(cfg, tmp_path):
    ds = write_json(tmp_path, {"fp16": {"enabled": True}})
    path = write_yaml(tmp_path, deepspeed_yaml(ds))
    problems = check_accelerate_yaml(path, cfg, machine=not HAS_CUDA)
    assert problems == ([] if HAS_CUDA else [
        f"{ds}: fp16.enabled is true but this machine has no CUDA GPU (DeepSpeed on CPU cannot do fp16); use "
        "\"bf16\": {\"enabled\": true} instead"])


# --------------------------------------------------------------------------- Slurm


def slurm(monkeypatch, **env):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))


def test_slurm_outside_a_job_checks_nothing():
    assert check_slurm(16, 3, "x.yaml") == []


def test_slurm_node_count_mismatch(monkeypatch):
    slurm(monkeypatch, SLURM_NNODES=2, SLURM_GPUS_ON_NODE=4)
    problems = check_slurm(8, 1, "x.yaml")
    assert problems and problems[0].startswith(
        "x.yaml: num_machines is 1 but the Slurm allocation has 2 node(s) (SLURM_NNODES=2)")


def test_slurm_gpu_count_mismatch(monkeypatch):
    slurm(monkeypatch, SLURM_NNODES=2, SLURM_GPUS_ON_NODE=4)
    problems = check_slurm(4, 2, "x.yaml")
    assert len(problems) == 1
    assert problems[0].startswith("x.yaml: 2 process(es) per node")
    assert "the allocation has 4 GPU(s) per node (SLURM_GPUS_ON_NODE=4)" in problems[0]


def test_slurm_matching_allocation(monkeypatch):
    slurm(monkeypatch, SLURM_NNODES=2, SLURM_GPUS_ON_NODE=4)
    assert check_slurm(8, 2, "x.yaml") == []
    monkeypatch.delenv("SLURM_GPUS_ON_NODE")
    assert check_slurm(2, 2, "x.yaml") == []  # CPU nodes, one process each


def test_slurm_in_the_yaml_check(cfg, monkeypatch):
    slurm(monkeypatch, SLURM_NNODES=1)
    assert check_accelerate_yaml(CONFIGS / "cpu_ddp.yaml", cfg, machine=False) == []  # file checks only
    problems = check_accelerate_yaml(CONFIGS / "multinode_ddp.yaml", cfg, machine=True)
    assert any(p.startswith(f"{CONFIGS / 'multinode_ddp.yaml'}: num_machines is 2 but the Slurm allocation has "
                            "1 node(s)") for p in problems), problems


# --------------------------------------------------------------------------- at launch


def test_check_processes_world_mismatch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PreflightError) as info:
        check_processes(SimpleNamespace(num_processes=1, process_index=0))
    assert info.value.problems == [
        "the launcher started 2 processes but this one sees a world of 1 (rank 0): every process would train the "
        "same samples. On a machine without GPUs use an accelerate config with distributed_type: MULTI_GPU (the "
        "recipes switch to gloo on CPU by themselves), e.g. accelerate_configs/cpu_ddp.yaml"]
    check_processes(SimpleNamespace(num_processes=2, process_index=1))  # matching: no error
    monkeypatch.delenv("WORLD_SIZE")
    check_processes(SimpleNamespace(num_processes=1, process_index=0))  # plain `python recipe.py`


@cpu_machine
def test_check_launch_fp16_on_cpu(cfg, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(PreflightError) as info:
        check_launch(cfg)
    assert info.value.problems == [
        "the accelerate config asks for mixed_precision fp16 (ACCELERATE_MIXED_PRECISION=fp16) but this machine "
        "has no CUDA GPU, so it would silently train in fp32; use bf16 (accelerate_configs/bf16.yaml)"]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    check_launch(cfg)


def test_check_launch_deepspeed_json(cfg, monkeypatch, tmp_path):
    path = write_json(tmp_path, {"train_micro_batch_size_per_gpu": 64, "train_batch_size": 128})
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(PreflightError) as info:
        check_launch(cfg)
    assert info.value.problems == [
        f"{path}: train_micro_batch_size_per_gpu is 64 but the recipe's batch_size is 128; set it to \"auto\" so "
        "the recipe decides",
        f"{path}: train_batch_size is 128 but micro batch x accumulation x world size = 64 x 1 x 4 = 256; set it "
        "to \"auto\""]
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(CONFIGS / "deepspeed" / "zero2.json"))
    check_launch(cfg)


def test_check_launch_refuses_use_cpu_with_deepspeed(cfg, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(CONFIGS / "deepspeed" / "zero2.json"))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu` or a shell export sets
    with pytest.raises(PreflightError) as info:
        check_launch(cfg)
    assert any("ACCELERATE_USE_CPU" in p and "DeepSpeed" in p for p in info.value.problems)


def test_check_launch_inside_slurm(cfg, monkeypatch):
    slurm(monkeypatch, SLURM_NNODES=1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 machines of 2 processes, in a 1-node allocation
    with pytest.raises(PreflightError) as info:
        check_launch(cfg)
    assert info.value.problems[0].startswith("the launch: num_machines is 2 but the Slurm allocation has 1 node(s)")


# --------------------------------------------------------------------------- CLI


def test_cli_every_shipped_config_with_skip_machine_checks(capsys):
    results = {}
    for name in SHIPPED:
        code = doctor.main(["--config_file", f"accelerate_configs/{name}", "--skip-machine-checks"])
        out = capsys.readouterr()
        results[name] = (code, out.out.strip(), out.err)
    assert results == {name: (0, f"ok: accelerate_configs/{name} is consistent with the recipe config and this "
                                 "machine", "") for name in SHIPPED}


def test_cli_recipe_yaml_against_deepspeed_json(capsys, tmp_path):
    ds = write_json(tmp_path, {"train_micro_batch_size_per_gpu": 64})
    acc = write_yaml(tmp_path, deepspeed_yaml(ds))
    recipe_ok = write_yaml(tmp_path, "batch_size: 64\n", name="recipe.yaml")
    assert doctor.main(["--config_file", str(acc), "-c", str(recipe_ok), "--skip-machine-checks"]) == 0
    capsys.readouterr()
    assert doctor.main(["--config_file", str(acc), "--skip-machine-checks"]) == 1
    assert capsys.readouterr().err == (
        f"preflight failed:\n  - {ds}: train_micro_batch_size_per_gpu is 64 but the recipe's batch_size is 128; "
        "set it to \"auto\" so the recipe decides\n")
    bad = write_yaml(tmp_path, "bach_size: 64\n", name="bad.yaml")
    assert doctor.main(["--config_file", str(acc), "-c", str(bad)]) == 1
    assert capsys.readouterr().err == (
        f"preflight failed:\n  - {bad}: unknown key 'bach_size' (did you mean 'batch_size'?)\n")


@cpu_machine
def test_cli_subprocess_fp16_fails_naming_file_and_bf16():
    proc = subprocess.run([sys.executable, "-m", "shared.doctor", "--config_file", "accelerate_configs/fp16.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert ("preflight failed:\n  - accelerate_configs/fp16.yaml: mixed_precision fp16 needs a CUDA GPU and this "
            "machine has none (Accelerate would silently train in fp32); use accelerate_configs/bf16.yaml "
            "(mixed_precision: bf16)\n") in proc.stderr
    assert "Traceback" not in proc.stderr
