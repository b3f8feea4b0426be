"""Helpers shared by the benchmark scripts: machine facts, tables, JSON results, plots, launches.

Not a benchmark itself. Every script in this folder imports it first; it puts
the repository root on ``sys.path`` so that ``shared`` and ``recipes`` import
from a plain clone, as the recipes do.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"  # machine-readable results (JSON), kept in git
DOCS = ROOT / "docs"  # plots (PNG) shown in docs/performance.md
# run folders of launched recipes (git-ignored); BENCH_SCRATCH moves them (the tests use a temporary folder)
SCRATCH = Path(os.environ.get("BENCH_SCRATCH") or ROOT / "runs" / "benchmarks")
BIN = Path(sys.executable).parent
CONFIGS = ROOT / "accelerate_configs"
RECIPE = ROOT / "recipes" / "image_classification.py"


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (what ``uptime`` prints)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """Date, machine and software versions recorded beside every result."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "load_average_1_5_15": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    for name in ("timm", "accelerate", "deepspeed"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not recorded
            info[name] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10)
        info["git"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


def command_line() -> str:
    """The command that produced a result, as a user would type it from the repository root."""
    if os.environ.get("BENCH_COMMAND"):  # set by relaunch(): the command the user typed
        return os.environ["BENCH_COMMAND"]
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    launcher = ".venv/bin/python"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        launcher = f".venv/bin/accelerate launch --num_processes {os.environ['WORLD_SIZE']}"
    return " ".join([launcher, str(script), *sys.argv[1:]])


def launched() -> bool:
    """True inside ``accelerate launch`` / torchrun (the launcher sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def relaunch(processes: int, config: str = "cpu_ddp.yaml", drop: Sequence[str] = ("--processes",)) -> int:
    """Run this script again under ``accelerate launch`` with ``processes`` processes; return its exit code.

    Lets a benchmark offer ``--processes 2`` as one command. ``drop`` names
    options (with one value) removed from the re-launched command line.
    """
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg in drop:
            skip = True
            continue
        if any(arg.startswith(d + "=") for d in drop):
            continue
        argv.append(arg)
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / config), "--num_processes", str(processes),
           "--main_process_port", str(free_port()), str(Path(sys.argv[0]).resolve()), *argv]
    env = {**os.environ, "BENCH_COMMAND": command_line(), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


# --------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{max(0, digits - 2)}f}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    return "" if value is None else str(value)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str], markdown: bool = False) -> str:
    """A plain-text (or Markdown) table; numbers formatted with :func:`fmt`."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if markdown:
        lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    else:
        lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def write_result(path: str | Path, result: dict) -> Path:
    """Write a JSON result (with the machine facts and the command) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"benchmark": path.stem, "command": command_line(), "machine": machine_info()}
    full = {**header, **{k: v for k, v in result.items() if k not in header}}
    result.clear()
    result.update(full)  # the caller sees the command and machine too (for plots)
    path.write_text(json.dumps(full, indent=2, default=float) + "\n")
    return path


def pyplot():
    """matplotlib's pyplot with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, result: dict) -> None:
    """Write date, machine and command in small print under a figure, save it as PNG and close it."""
    info, command = result["machine"], result["command"]
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    text = (f"{info['date']}  |  {info['cpu']}, {info['cores_usable']} cores"
            f"{', ' + info['gpu'] if info.get('gpu') else ', no GPU'}  |  load {info['load_average_1_5_15']}\n{command}")
    fig.text(0.01, 0.005, text, fontsize=6, color="0.4", va="bottom", ha="left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------- recipes


def load_recipe(path: Path = RECIPE):
    """Import a recipe file as a module (its ``main`` is guarded, so nothing runs)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str | None, args: Sequence[str], *, script: Path = RECIPE, launch_args: Sequence[str] = (),
           env: dict | None = None, timeout: float = 3600, echo: bool = False) -> dict:
    """``accelerate launch --config_file accelerate_configs/<config> script args`` (``config=None``: plain python).

    See :func:`run_timed` for what it returns.
    """
    if config is None:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / config),
               "--main_process_port", str(free_port()), *launch_args, str(script), *args]
    return run_timed(cmd, env=env, timeout=timeout, echo=echo)


def run_timed(cmd: Sequence[str], *, env: dict | None = None, timeout: float = 3600, echo: bool = False) -> dict:
    """Run ``cmd`` from the repository root, time-stamping every output line as it arrives.

    Returns the exit code, the output and ``lines``: (seconds since the start,
    line) for every line, so a benchmark can read when each epoch ended from
    the outside, start-up included.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true",
                "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions")),
                **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines = []
    try:
        for raw in proc.stdout:
            # tqdm redraws with \r: keep the last state of each line
            line = raw.rstrip("\n").split("\r")[-1]
            lines.append((time.perf_counter() - start, line))
            if echo:
                print(f"  [{lines[-1][0]:7.1f}s] {line}", flush=True)
            if time.perf_counter() - start > timeout:
                proc.kill()
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "\n".join(line for _, line in lines)
    return {"cmd": list(cmd), "returncode": proc.returncode, "seconds": time.perf_counter() - start,
            "lines": lines, "output": output}


def short_command(cmd: Sequence[str]) -> str:
    """A launched command as a user would type it from the repository root."""
    out = []
    for i, c in enumerate(cmd):
        c = str(c)
        if i == 0:
            c = ".venv/bin/" + Path(c).name
        out.append(c.replace(str(ROOT) + "/", ""))
    text = " ".join(out)
    return re.sub(r" --main_process_port \d+", "", text)


def check_launch(run: dict) -> None:
    if run["returncode"] != 0:
        raise RuntimeError(f"exit code {run['returncode']} from {' '.join(run['cmd'])}\n{run['output'][-4000:]}")


EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)\s+train_loss (\S+)\s+test_acc (\S+)")
