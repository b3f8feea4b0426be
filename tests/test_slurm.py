"""The slurm/ templates, submitted with sbatch to a real two-node Slurm cluster on this machine.

tests/slurm_cluster.py starts Debian's slurmctld, two slurmd (nodes n1 and n2,
each pinned to its own half of the cores) and munged. Every job here is a real
template from slurm/ running the real recipe; only the recipe arguments are
small. The tests judge outcomes: machine ranks, world size, losses, weights
bit for bit, restart counts, W&B run ids, exit states, log messages. The
check_slurm unit tests at the end need no cluster.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from launch import BIN, CONFIGS, ROOT
from slurm_cluster import Cluster, SlurmError, unavailable

SLURM_DIR = ROOT / "slurm"
TEMPLATES = ("single_node.sh", "multinode_ddp.sh", "multinode_deepspeed.sh", "cpu.sh")
# 3000 samples in global batches of 100 (2 ranks x 50): 30 optimizer steps per epoch, 2 epochs.
# A checkpoint every 5 steps lets a test see that training is under way.
STEPS_PER_EPOCH, EPOCHS = 30, 2
ARGS = ["--train-subset", "3000", "--test-subset", "500", "--batch-size", "50", "--epochs", str(EPOCHS),
        "--log-every", "5", "--checkpoint-every-steps", "5"]
# The multi-node GPU templates on this CPU cluster: no GPUs, one process (task) per node.
CPU_OVERRIDES = ["--gpus-per-node=0", "--cpus-per-task=1"]
JOB_TIMEOUT = 300  # a hang detector on a slow, shared 2-core machine, not a speed requirement


# --------------------------------------------------------------------------- helpers


@dataclass
class Job:
    cluster: Cluster
    id: int
    out_dir: Path
    log_path: Path

    @property
    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text.replace("\r", "\n")  # progress bars

    @property
    def summary(self) -> dict:
        return json.loads((self.out_dir / "summary.json").read_text())

    def info(self) -> dict:
        return self.cluster.job(self.id)

    def wait_done(self, timeout: float = JOB_TIMEOUT) -> dict:
        try:
            return self.cluster.wait_done(self.id, timeout)
        except SlurmError as err:
            self.cluster.cancel(self.id)
            raise AssertionError(f"{err}\n--- log ---\n{self.log[-6000:]}") from err

    def wait_for_checkpoint(self, step: int, timeout: float = JOB_TIMEOUT) -> Path:
        path = self.out_dir / "checkpoints" / f"step_{step:08d}"
        deadline = time.monotonic() + timeout
        while not (path / "progress.json").is_file():
            if time.monotonic() > deadline or self.cluster.state(self.id) in ("COMPLETED", "FAILED", "CANCELLED"):
                self.cluster.cancel(self.id)
                raise AssertionError(f"no checkpoint {path} (job {self.cluster.state(self.id)})\n{self.log[-6000:]}")
            time.sleep(0.05)
        return path

    def machine_ranks(self) -> dict[str, int]:
        """Node name -> machine rank, as each srun task printed it before starting its launcher."""
        return {node: int(rank) for node, rank in re.findall(r"\[slurm\] node (\S+): machine_rank (\d+) of", self.log)}


def job_env(**extra: str) -> dict:
    """The submitting environment: this interpreter's bin first on PATH, no outer Slurm job, no W&B key.

    DeepSpeed's JIT-built ops get their own cache: a cache shared with processes
    whose paths differ (the .venv symlink or the real venv) is rebuilt at every
    switch, 1-4 minutes each time on 2 cores.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "WANDB_", "ACCELERATE_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    env["TORCH_EXTENSIONS_DIR"] = os.path.join(extensions, "slurm-tests")
    env.update(extra)
    return env


def submit(cluster: Cluster, template: str, out_dir: Path, *recipe_args: str, sbatch_args=(), **env) -> Job:
    log = out_dir.parent / f"{out_dir.name}.log"
    job_id = cluster.sbatch(SLURM_DIR / template, f"--output={log}", f"--job-name={out_dir.name}", *sbatch_args,
                            script_args=recipe_args, env=job_env(OUTPUT_DIR=str(out_dir), **env), cwd=ROOT)
    return Job(cluster, job_id, out_dir, log)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def worker_pids(job_id: int, rank: int) -> list[int]:
    """Recipe processes of a job with the given global rank (torchrun sets RANK in the worker's environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == str(job_id) and env.get("RANK") == str(rank) and "LOCAL_RANK" in env:
            found.append(int(proc.name))
    return found


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster():
    if reason := unavailable():
        pytest.skip(reason)
    c = Cluster().start()
    yield c
    if c.started_here and not c.busy():  # leave a cluster that others are using
        c.stop()


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory) -> Job:
    """A single-node, 2-process CPU job run to the end without interruption (slurm/cpu.sh as shipped)."""
    job = submit(cluster, "cpu.sh", tmp_path_factory.mktemp("slurm") / "reference", *ARGS, "--tracker", "none")
    job.info_at_end = job.wait_done()
    return job


# --------------------------------------------------------------------------- jobs on the cluster


@pytest.mark.slurm
def test_single_node_two_process_cpu_job(reference):
    info = reference.info_at_end
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", reference.log[-4000:]
    assert reference.machine_ranks() == {"n1": 0} or reference.machine_ranks() == {"n2": 0}
    assert "1 node(s) x 2 process(es)" in reference.log
    summary = reference.summary
    assert summary["world_size"] == 2
    assert summary["global_step"] == STEPS_PER_EPOCH * EPOCHS and summary["epochs"] == EPOCHS
    assert summary["train_loss"] < 1.0 and summary["test_acc"] > 0.6  # it learned (chance: 2.30, 0.1)
    assert (reference.out_dir / "model.safetensors").is_file()


@pytest.mark.slurm
def test_two_node_job_has_two_machine_ranks_and_trains_like_one_node(cluster, reference, tmp_path):
    # The shipped multi-node DDP template, on CPU: no GPUs, so one process (task) per node.
    job = submit(cluster, "multinode_ddp.sh", tmp_path / "two_nodes", *ARGS, "--tracker", "none",
                 sbatch_args=CPU_OVERRIDES)
    info = job.wait_done()
    assert info["JobState"] == "COMPLETED", job.log[-6000:]
    assert info["NodeList"] == "n[1-2]"
    assert job.machine_ranks() == {"n1": 0, "n2": 1}  # one launcher per node, ranks expanded on each node
    summary, ref = job.summary, reference.summary
    assert summary["world_size"] == 2 and summary["global_step"] == ref["global_step"]
    # Same global batch (2 x 50) and data order as the 1-node job: the same training.
    assert summary["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-3, abs=1e-4)
    assert summary["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-2, abs=1e-3)
    a, b = weights(job.out_dir), weights(reference.out_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-2


@pytest.mark.slurm
def test_preempted_job_checkpoints_requeues_and_resumes_bit_identical(cluster, reference, tmp_path):
    secret = "vr0test0secret0" + "f" * 25  # a fake API key: it must never reach a log or a file
    job = submit(cluster, "cpu.sh", tmp_path / "preempted", *ARGS, "--tracker", "wandb", WANDB_API_KEY=secret)
    job.wait_for_checkpoint(5)  # training is under way, in the first epoch
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job.id)], env=cluster.env(), check=True)
    # The job checkpoints at step K, mid-epoch, and requeues itself (it is pending now, not yet restarted).
    cluster.wait_for(job.id, lambda i: i.get("Restarts") == "1", JOB_TIMEOUT, "requeue")
    stopped = re.findall(r"stopping on SIGUSR1: checkpoint (\S+) saved at step (\d+)", job.log)
    assert len(stopped) == 1, job.log[-6000:]
    ckpt, step = Path(stopped[0][0]), int(stopped[0][1])
    assert 5 <= step < STEPS_PER_EPOCH
    progress = json.loads((ckpt / "progress.json").read_text())  # "which step it reached"
    assert progress == {"epoch": 0, "batch": step, "global_step": step, "samples": step * 100}
    seconds = (ckpt / "progress.json").stat().st_mtime - signalled
    print(f"\n[slurm] preemption: signal to checkpoint (step {step}) written: {seconds:.2f} s")

    # It runs again (SLURM_RESTART_COUNT=1), resumes at exactly step K and finishes.
    info = job.wait_done()
    log = job.log
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-6000:]
    assert "restart 0 (SLURM_RESTART_COUNT=0" in log and "restart 1 (SLURM_RESTART_COUNT=1" in log
    resumed = re.findall(r"resumed from (\S+) \(epoch \d+, step (\d+)\)", log)
    assert resumed == [(str(ckpt), str(step))], log[-6000:]

    # Nothing trained twice or skipped: the same step count and bit-identical weights as the
    # uninterrupted job.
    assert job.summary["global_step"] == reference.summary["global_step"] == STEPS_PER_EPOCH * EPOCHS
    a, b = weights(job.out_dir), weights(reference.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # W&B: offline on the compute node (even with a key), one run id before and after the requeue.
    run_id = (job.out_dir / "wandb_run_id").read_text().strip()
    runs = sorted((job.out_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", r.name) for r in runs), runs
    assert all((r / f"run-{run_id}.wandb").is_file() for r in runs)
    # ... and slurm/wandb_sync.sh would upload both parts, oldest first, into that run.
    sync = subprocess.run([str(SLURM_DIR / "wandb_sync.sh"), "--dry-run", str(job.out_dir)], env=job_env(),
                          capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    listed = re.findall(r"^to sync: (.+)$", sync.stdout, re.M)
    assert [Path(p).name for p in listed] == [r.name for r in runs], sync.stdout + sync.stderr
    assert "Would sync 2 run(s)" in sync.stdout + sync.stderr

    # The API key is in no log and no file of the run.
    assert secret not in log
    for path in job.out_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.slurm
def test_preemption_reaches_every_node_and_the_restart_cap_holds(cluster, tmp_path):
    # Two nodes, one process each; no requeue allowed (MAX_RESTARTS=0).
    job = submit(cluster, "cpu.sh", tmp_path / "capped", *ARGS, "--epochs", "50", "--tracker", "none",
                 sbatch_args=["--nodes=2", "--ntasks-per-node=1"], MAX_RESTARTS="0")
    job.wait_for_checkpoint(5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job.id)], env=cluster.env(), check=True)
    info = job.wait_done()
    log = job.log
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0" and info["Restarts"] == "0", log[-6000:]
    # Each node's recipe process got SIGUSR1 itself (one that had not would say "stopping on --stop-after-steps").
    stops = re.findall(r"stopping on (\S+): checkpoint (\S+) saved at step (\d+)", log)
    assert len(stops) == 2 and {s[0] for s in stops} == {"SIGUSR1"} and stops[0][1:] == stops[1][1:], stops
    assert (Path(stops[0][1]) / "progress.json").is_file()
    assert "restart cap MAX_RESTARTS=0 reached: not requeued" in log


@pytest.mark.slurm
def test_killed_rank_ends_the_whole_job(cluster, tmp_path):
    # Two nodes, one process each (slurm/cpu.sh on 2 nodes); long enough that it cannot finish first.
    job = submit(cluster, "cpu.sh", tmp_path / "killed", *ARGS, "--epochs", "50", "--tracker", "none",
                 sbatch_args=["--nodes=2", "--ntasks-per-node=1"])
    job.wait_for_checkpoint(5)
    pids = worker_pids(job.id, rank=1)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    killed = time.monotonic()
    info = job.wait_done(timeout=180)  # the deadline only detects a hang (srun KillWait is 10 s here)
    elapsed = time.monotonic() - killed
    print(f"\n[slurm] killed rank 1: the job ended {elapsed:.1f} s later")
    log = job.log
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log[-6000:]
    assert not (job.out_dir / "summary.json").exists()
    assert "Signal 9 (SIGKILL) received by PID" in log and re.search(r"rank\s*:\s*1 \(local_rank: 0\)", log)
    assert "training failed" in log and "not requeued" in log
    assert not worker_pids(job.id, rank=0) and not worker_pids(job.id, rank=1)


@pytest.mark.slurm
def test_preflight_refuses_config_that_does_not_fit_the_allocation(cluster, tmp_path):
    # 1. A single-process config on an allocation of 2 tasks: every task would train alone as rank 0.
    single = submit(cluster, "cpu.sh", tmp_path / "single_process", *ARGS, "--tracker", "none",
                    ACCELERATE_CONFIG="accelerate_configs/single_gpu.yaml")
    # 2. Multi-node DeepSpeed with the default pdsh launcher: it would hang or fail under Slurm.
    config = yaml.safe_load((CONFIGS / "multinode_zero2.yaml").read_text())
    del config["deepspeed_config"]["deepspeed_multinode_launcher"]
    pdsh = tmp_path / "pdsh_zero2.yaml"
    pdsh.write_text(yaml.safe_dump(config))
    deepspeed = submit(cluster, "multinode_deepspeed.sh", tmp_path / "pdsh", *ARGS, "--tracker", "none",
                       sbatch_args=CPU_OVERRIDES, ACCELERATE_CONFIG=str(pdsh))
    expected = [
        (single, ["accelerate_configs/single_gpu.yaml (distributed_type NO, launched as 1 machine(s) x 2 process(es)): "
                  "distributed_type 'NO' runs a single process, but the allocation has 1 node(s) x 2 task(s) per node"]),
        (deepspeed, [f"{pdsh} (distributed_type DEEPSPEED, launched as 2 machine(s) x 2 process(es)): DeepSpeed on 2 "
                     "nodes needs deepspeed_config: deepspeed_multinode_launcher: standard"]),
    ]
    for job, messages in expected:
        info = job.wait_done(timeout=120)
        log = job.log
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
        assert "preflight failed:" in log and all(m in log for m in messages), log
        assert "machine_rank" not in log and not (job.out_dir / "checkpoints").exists()  # nothing was launched


@pytest.mark.slurm
def test_multinode_deepspeed_job(cluster, reference, tmp_path):
    job = submit(cluster, "multinode_deepspeed.sh", tmp_path / "zero2", *ARGS, "--tracker", "none",
                 sbatch_args=CPU_OVERRIDES)
    info = job.wait_done(timeout=JOB_TIMEOUT + 180)  # the first DeepSpeed run on a machine JIT-builds an op
    assert info["JobState"] == "COMPLETED", job.log[-6000:]
    assert job.machine_ranks() == {"n1": 0, "n2": 1}
    summary = job.summary
    assert summary["zero_stage"] == 2 and summary["world_size"] == 2
    assert summary["global_step"] == reference.summary["global_step"]
    assert summary["train_loss"] == pytest.approx(reference.summary["train_loss"], rel=1e-2)


# --------------------------------------------------------------------------- templates (no cluster needed)


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_headers(template):
    text = (SLURM_DIR / template).read_text()
    assert subprocess.run(["bash", "-n", str(SLURM_DIR / template)]).returncode == 0
    for header in ("--signal=B:USR1@", "--requeue", "--open-mode=append", "--nodes=", "--ntasks-per-node="):
        assert f"#SBATCH {header}" in text, header
    assert "source \"${REPO:-$SLURM_SUBMIT_DIR}/slurm/common.sh\"" in text and text.rstrip().endswith('launch "$@"')
    assert "ACCELERATE_CONFIG:=accelerate_configs/" in text
    assert not re.search(r"^#SBATCH --(partition|account)", text, re.M)  # no site hard-coded


# --------------------------------------------------------------------------- check_slurm (no cluster needed)


@pytest.fixture
def allocation(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)

    def set_env(**env):
        monkeypatch.setenv("SLURM_JOB_ID", "7")
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
    return set_env


def check(*args, **kwargs):
    from shared.doctor import check_slurm

    return check_slurm(*args, **kwargs)


def test_check_slurm_gpu_template_allocation_fits(allocation):
    # What the batch script of multinode_ddp.sh sees with --nodes=4 --gpus-per-node=8 --ntasks-per-node=1.
    allocation(SLURM_JOB_NUM_NODES=4, SLURM_GPUS_ON_NODE=8, SLURM_NTASKS_PER_NODE=1, SLURM_JOB_CPUS_PER_NODE="64(x4)")
    assert check(32, 4, "x.yaml", distributed_type="MULTI_GPU") == []
    assert check(16, 4, "x.yaml") == ["x.yaml: 4 process(es) per node (16 process(es) on 4 machine(s)) but the "
                                      "allocation has 8 GPU(s) per node (SLURM_GPUS_ON_NODE=8); use one process "
                                      "per GPU"]


def test_check_slurm_nodes_named_with_the_variable(allocation):
    allocation(SLURM_JOB_NUM_NODES=2, SLURM_NNODES=1)  # inside a 1-node step of a 2-node job
    problems = check(2, 1, "x.yaml")
    assert problems[0].startswith("x.yaml: num_machines is 1 but the Slurm allocation has 2 node(s) "
                                  "(SLURM_JOB_NUM_NODES=2): nodes would sit idle")


def test_check_slurm_cpu_tasks_and_cores(allocation):
    # --ntasks-per-node=4 --cpus-per-task=1 on 1 node: 4 processes fit, 2 or 8 do not.
    allocation(SLURM_JOB_NUM_NODES=1, SLURM_NTASKS_PER_NODE=4, SLURM_JOB_CPUS_PER_NODE=4)
    assert check(4, 1, "x.yaml") == []
    assert "the allocation has 4 task(s) per node (SLURM_NTASKS_PER_NODE=4)" in check(2, 1, "x.yaml")[0]
    problems = check(8, 1, "x.yaml")
    assert any("only 4 CPU(s) allocated per node (SLURM_JOB_CPUS_PER_NODE=4)" in p for p in problems), problems
    # Inside an srun step the tasks per node are the step's (1 launcher): not compared.
    allocation(SLURM_STEP_ID=0, SLURM_NTASKS_PER_NODE=1)
    assert check(4, 1, "the launch") == []


def test_check_slurm_single_process_config_on_many_tasks(allocation):
    allocation(SLURM_JOB_NUM_NODES=2, SLURM_GPUS_PER_NODE="a100:4")
    problems = check(8, 2, "single_gpu.yaml", distributed_type="NO")
    assert problems == ["single_gpu.yaml: distributed_type 'NO' runs a single process, but the allocation has 2 "
                        "node(s) x 4 GPU(s) per node: every node would train alone as rank 0; use a multi-process "
                        "config (e.g. cpu_ddp.yaml, multi_gpu.yaml, multinode_ddp.yaml) or ask for one node with "
                        "one task/GPU"]


def test_preflight_script(allocation):
    allocation(SLURM_JOB_NUM_NODES=1, SLURM_NTASKS_PER_NODE=2, SLURM_JOB_CPUS_PER_NODE=2)
    run = [str(BIN / "python"), str(SLURM_DIR / "preflight.py"), "--num_machines", "1", "--num_processes", "2"]
    ok = subprocess.run([*run, "--config_file", "accelerate_configs/cpu_ddp.yaml"], cwd=ROOT, capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "preflight ok" in ok.stdout, ok.stderr
    bad = subprocess.run([*run, "--config_file", "accelerate_configs/multinode_zero2.yaml"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 0, bad.stderr  # the template overrides num_machines: a multi-node YAML is fine
    refused = subprocess.run([*run, "--config_file", "accelerate_configs/single_gpu.yaml"], cwd=ROOT,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "distributed_type 'NO' runs a single process" in refused.stderr
