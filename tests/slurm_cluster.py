"""A real two-node Slurm cluster on this one machine, for the slurm/ template tests.

It installs nothing: it runs Debian's ``munged``, ``slurmctld`` and two
``slurmd`` (nodes ``n1`` and ``n2``, both at 127.0.0.1 with their own ports)
from a ``slurm.conf`` written under :data:`STATE_DIR`. Client commands find
the cluster through ``SLURM_CONF`` (see :meth:`Cluster.env`). Starting is
idempotent: daemons already running from the same directory are reused, so
several test sessions (or a developer's shell) can share one cluster.

    python tests/slurm_cluster.py start    # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py stop

Needs root (slurmd runs jobs as their submitter and the config says
``SlurmUser=root``) and writes ``127.0.0.1 n1 n2`` into /etc/hosts so that the
node names resolve, as they do on a real cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE_DIR = Path(os.environ.get("VR_SLURM_DIR", "/tmp/vision-recipes-slurm"))
NODES = ("n1", "n2")
CPUS_PER_NODE = 2
# Ports away from Slurm's defaults (6817/6818) so that a site's own Slurm is left alone.
CTLD_PORT = int(os.environ.get("VR_SLURM_PORT", "16817"))
NODE_PORTS = {node: CTLD_PORT + 1 + i for i, node in enumerate(NODES)}
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "scancel")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


class SlurmError(RuntimeError):
    pass


def unavailable() -> str | None:
    """Why a local Slurm cluster cannot run here, or None if it can."""
    missing = [d for d in DAEMONS if not shutil.which(d) and not Path("/usr/sbin", d).exists()]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not found); install it with `apt-get install -y "
                "--no-install-recommends slurmctld slurmd slurm-client munge` (.ci/run does)")
    if os.geteuid() != 0:
        return "the local Slurm test cluster needs root (it runs slurmd and munged)"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _alive(pidfile: Path) -> bool:
    """The daemon named by the pid file runs (not a recycled pid, not a zombie)."""
    try:
        pid = int(pidfile.read_text().split()[0])
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, ValueError, IndexError):
        return False
    name = re.search(r"^Name:\s*(\S+)", status, re.M)
    return bool(name) and pidfile.name.startswith(name.group(1)[:15]) and "zombie" not in status


def node_cpus(node: str) -> set[int] | None:
    """The cores a simulated node's slurmd (and so its jobs) is pinned to: each node its own half.

    Both nodes live on one machine; without pinning a 2-node job runs twice as
    many threads as cores. None (no pinning) on a machine with a single core.
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < len(NODES):
        return None
    share = len(cores) // len(NODES)
    i = NODES.index(node)
    return set(cores[i * share:(i + 1) * share])


class Cluster:
    def __init__(self, state_dir: Path = STATE_DIR):
        self.dir = Path(state_dir)
        self.conf = self.dir / "slurm.conf"
        self.started_here = False

    # ------------------------------------------------------------------ config

    def config_text(self) -> str:
        d = self.dir
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 Port={NODE_PORTS[n]} CPUs={CPUS_PER_NODE} RealMemory=4096 State=UNKNOWN"
            for n in NODES)
        return f"""\
# Written by tests/slurm_cluster.py: two simulated nodes on 127.0.0.1.
ClusterName=vrtest
SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/ctld
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
JobCompType=jobcomp/filetxt
JobCompLoc={d}/jobcomp.txt
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=10
InactiveLimit=0
SlurmdTimeout=60
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""

    def env(self, base: dict | None = None) -> dict:
        """An environment in which sbatch/squeue/scontrol talk to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    # ------------------------------------------------------------------ start/stop

    def _run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def _ensure_hosts(self) -> None:
        hosts = Path("/etc/hosts")
        text = hosts.read_text()
        resolvable = all(re.search(rf"^\s*127\.0\.0\.1\s.*\b{n}\b", text, re.M) for n in NODES)
        if not resolvable:
            with hosts.open("a") as f:
                f.write(f"\n127.0.0.1 {' '.join(NODES)}  # vision-recipes Slurm test cluster\n")

    def _ensure_munge(self) -> None:
        if MUNGE_SOCKET.exists() and subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return
        key = Path("/etc/munge/munge.key")
        if not key.is_file():  # Debian's postinst normally creates it
            subprocess.run([_exe("mungekey") if shutil.which("mungekey") else "create-munge-key", "-f"], check=False,
                           capture_output=True)
        run_dir = MUNGE_SOCKET.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        for path in (run_dir, Path("/var/lib/munge"), Path("/var/log/munge")):
            path.mkdir(parents=True, exist_ok=True)
            shutil.chown(path, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _exe("munged"), "--force"], check=True, capture_output=True)
        for _ in range(50):
            if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise SlurmError("munged did not come up (see /var/log/munge/munged.log)")

    def running(self) -> bool:
        return (self.conf.is_file() and _alive(self.dir / "slurmctld.pid")
                and all(_alive(self.dir / f"slurmd.{n}.pid") for n in NODES))

    def start(self, timeout: float = 60) -> "Cluster":
        """Start whatever is not running yet and wait until both nodes are idle."""
        if reason := unavailable():
            raise SlurmError(reason)
        self.dir.mkdir(parents=True, exist_ok=True)
        text = self.config_text()
        if self.conf.is_file() and self.conf.read_text() != text:
            self.stop()  # a config from another version of this file: start afresh
        if not self.running():
            self.started_here = True
        self.conf.write_text(text)
        for sub in ("ctld", "spool"):
            (self.dir / sub).mkdir(exist_ok=True)
        self._ensure_hosts()
        self._ensure_munge()
        env = self.env()
        if not _alive(self.dir / "slurmctld.pid"):
            # -c: forget jobs of an earlier cluster; -i: ignore state files it cannot read.
            subprocess.run([_exe("slurmctld"), "-c", "-i", "-f", str(self.conf)], env=env, check=True,
                           capture_output=True)
        for node in NODES:
            if not _alive(self.dir / f"slurmd.{node}.pid"):
                cpus = node_cpus(node)
                subprocess.run([_exe("slurmd"), "-N", node, "-f", str(self.conf)], env=env, check=True,
                               capture_output=True, preexec_fn=(lambda c=cpus: os.sched_setaffinity(0, c)) if cpus else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.node_states()
            if len(states) == len(NODES) and all(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states.values()):
                return self
            for node, state in states.items():  # a node left DOWN by an earlier, killed slurmd
                if state.rstrip("*").startswith(("down", "drain")):
                    self._run("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
            time.sleep(0.5)
        raise SlurmError(f"nodes not idle after {timeout}s: {self.node_states()}; see {self.dir}/*.log")

    def stop(self) -> None:
        """Stop the daemons started from this directory (never munged, which others may use)."""
        pidfiles = [self.dir / f"slurmd.{n}.pid" for n in NODES] + [self.dir / "slurmctld.pid"]
        for pidfile in pidfiles:
            if _alive(pidfile):
                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if not _alive(pidfile):
                        break
                    time.sleep(0.1)

    # ------------------------------------------------------------------ jobs

    def busy(self) -> bool:
        """Jobs are queued or running (perhaps another session's)."""
        return bool(self._run("squeue", "-h", check=False).stdout.strip())

    def node_states(self) -> dict[str, str]:
        proc = self._run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        return dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)

    def sbatch(self, script: str | Path, *args: str, script_args=(), env: dict | None = None,
               cwd: str | Path | None = None) -> int:
        """``sbatch [args] script [script_args]``; the job id."""
        cmd = ["sbatch", "--parsable", *args, str(script), *script_args]
        proc = subprocess.run(cmd, env=self.env(env), cwd=cwd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed: {proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        proc = self._run("scontrol", "-o", "show", "job", str(job_id), check=False)
        fields = {}
        for token in proc.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_for(self, job_id: int, predicate, timeout: float, what: str, poll: float = 0.25) -> dict[str, str]:
        """Poll ``scontrol show job`` until ``predicate(info)``; raise SlurmError after ``timeout`` seconds.

        A requeued job waits for a begin time two minutes ahead (Slurm's
        credential lifetime: slurmd refuses the job id's new credentials until
        the old ones are past); it is released 3 s after it was seen pending
        (``scontrol update StartTime=now``): released in the same second as the
        requeue, it would fail with "Job credential revoked".
        """
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        requeued_at = None
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if predicate(info):
                return info
            if info.get("JobState") == "PENDING" and info.get("Restarts", "0") != "0" and info.get("Reason") == "BeginTime":
                requeued_at = requeued_at or time.monotonic()
                if time.monotonic() - requeued_at > 3:
                    self._run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            time.sleep(poll)
        raise SlurmError(f"job {job_id}: no {what} after {timeout:.0f}s (last: {info})")

    def wait_done(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait until the job has ended (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...)."""
        return self.wait_for(job_id, lambda info: info.get("JobState") in FINISHED, timeout, "end")

    def state(self, job_id: int) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def cancel(self, job_id: int, *args: str) -> None:
        self._run("scancel", *args, str(job_id), check=False)


def main(argv: list[str]) -> int:
    cluster = Cluster()
    if argv[:1] == ["start"]:
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    if argv[:1] == ["stop"]:
        cluster.stop()
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
