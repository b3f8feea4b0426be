"""Unit tests of shared/bootstrap.py, without creating real virtual environments or touching the network."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from shared import bootstrap  # noqa: E402


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Record commands and venv creations instead of running them; use a private requirements.txt."""
    log = {"run": [], "venv": []}
    req = tmp_path / "requirements.txt"
    req.write_text("torch==2.14.1\ntimm==1.0.31\n")
    monkeypatch.setattr(bootstrap, "REQUIREMENTS", req)
    monkeypatch.setattr(bootstrap, "run", lambda cmd: log["run"].append(cmd))

    def create(path, with_pip=False):
        log["venv"].append((Path(path), with_pip))
        (Path(path) / "bin").mkdir(parents=True)
        (Path(path) / "bin" / "python").write_text("")

    monkeypatch.setattr(bootstrap.venv, "create", create)
    return log


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pip_install(venv: Path) -> list[str]:
    return [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r",
            str(bootstrap.REQUIREMENTS)]


def test_ensure_venv_skips_when_stamp_matches(calls, tmp_path, capsys):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / ".requirements.sha256").write_text(digest(bootstrap.REQUIREMENTS) + "\n")
    bootstrap.ensure_venv(venv)
    assert calls == {"run": [], "venv": []}
    assert capsys.readouterr().out == f"{venv}: up to date with requirements.txt\n"


def test_ensure_venv_creates_installs_and_stamps(calls, tmp_path):
    venv = tmp_path / "venv"
    bootstrap.ensure_venv(venv)
    assert calls["venv"] == [(venv, True)]
    assert calls["run"] == [pip_install(venv)]
    assert (venv / ".requirements.sha256").read_text() == digest(bootstrap.REQUIREMENTS) + "\n"
    bootstrap.ensure_venv(venv)  # second time: nothing to do
    assert len(calls["run"]) == 1 and len(calls["venv"]) == 1


def test_ensure_venv_reinstalls_when_requirements_change(calls, tmp_path):
    venv = tmp_path / "venv"
    bootstrap.ensure_venv(venv)
    bootstrap.REQUIREMENTS.write_text("torch==2.14.1\ntimm==1.0.32\n")
    bootstrap.ensure_venv(venv)
    assert calls["venv"] == [(venv, True)]  # the existing environment is reused...
    assert calls["run"] == [pip_install(venv)] * 2  # ...and updated
    assert (venv / ".requirements.sha256").read_text().strip() == digest(bootstrap.REQUIREMENTS)


def test_failed_install_leaves_no_stamp(calls, tmp_path, monkeypatch):
    def fail(cmd):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(bootstrap, "run", fail)
    venv = tmp_path / "venv"
    with pytest.raises(subprocess.CalledProcessError):
        bootstrap.ensure_venv(venv)
    assert not (venv / ".requirements.sha256").exists()  # the next run tries again


def test_real_requirements_are_pinned():
    lines = [ln.strip() for ln in bootstrap.REQUIREMENTS.read_text().splitlines() if ln.strip()
             and not ln.startswith("#")]
    assert lines and all("==" in ln for ln in lines), lines
    names = {ln.split("==")[0].lower() for ln in lines}
    assert {"torch", "timm", "accelerate", "deepspeed", "transformers", "wandb", "pyyaml"} <= names


def test_main_links_and_skips_data(calls, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bootstrap, "ensure_fashion_mnist", lambda: pytest.fail("--no-data must skip the data step"))
    venv, link = tmp_path / "cache" / "venv", tmp_path / ".venv"
    link.symlink_to(tmp_path / "stale")  # an old link is replaced
    assert bootstrap.main(["--venv", str(venv), "--link", str(link), "--no-data"]) == 0
    assert link.is_symlink() and link.resolve() == venv.resolve()
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"ready: {venv}/bin/accelerate launch ... (or: source {venv}/bin/activate)")
    assert bootstrap.main(["--venv", str(venv), "--link", str(link), "--no-data"]) == 0  # idempotent
    assert link.resolve() == venv.resolve() and len(calls["run"]) == 1


def test_fashion_mnist_already_there(monkeypatch, tmp_path, capsys):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    monkeypatch.setattr(bootstrap, "FASHION_MNIST", tmp_path)
    monkeypatch.setattr(bootstrap, "run", lambda cmd: pytest.fail(f"nothing to install, ran {cmd}"))
    bootstrap.ensure_fashion_mnist()
    assert capsys.readouterr().out == f"Fashion-MNIST: found in {tmp_path}\n"


def test_fashion_mnist_installed_with_apt_as_root(monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(bootstrap, "FASHION_MNIST", tmp_path / "missing")
    monkeypatch.setattr(bootstrap, "run", ran.append)
    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: "/usr/bin/apt-get" if name == "apt-get" else None)
    monkeypatch.setattr(bootstrap.os, "geteuid", lambda: 0)
    bootstrap.ensure_fashion_mnist()
    assert ran == [["/usr/bin/apt-get", "update", "-qq"],
                   ["/usr/bin/apt-get", "install", "-y", "-qq", "--no-install-recommends", "dataset-fashion-mnist"]]


def test_fashion_mnist_without_apt_falls_back_to_download(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bootstrap, "FASHION_MNIST", tmp_path / "missing")
    monkeypatch.setattr(bootstrap, "run", lambda cmd: pytest.fail(f"no apt: ran {cmd}"))
    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: None)
    bootstrap.ensure_fashion_mnist()
    assert capsys.readouterr().out == ("Fashion-MNIST: no apt here; the recipe downloads it into --data-dir on "
                                       "first use (needs internet)\n")


def test_bootstrap_imports_only_the_standard_library():
    """It runs before anything is installed: a fresh interpreter without site-packages must import it."""
    proc = subprocess.run([sys.executable, "-S", "-c", "import shared.bootstrap"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
