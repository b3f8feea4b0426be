"""Set up a fresh machine: the Python environment and the default data set.

    python3 -m shared.bootstrap [--venv .venv]

Standard library only (it runs before anything is installed). It creates the
virtual environment and installs requirements.txt into it (skipped when the
environment already holds exactly these requirements), then makes sure
Fashion-MNIST is available: Debian's dataset-fashion-mnist package where apt
can install it, otherwise the recipe downloads it on first use.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements.txt"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ensure_venv(path: Path) -> None:
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = path / ".requirements.sha256"
    if stamp.is_file() and stamp.read_text().strip() == digest:
        print(f"{path}: up to date with requirements.txt")
        return
    if not (path / "bin" / "python").exists():
        venv.create(path, with_pip=True)
    run([str(path / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", str(REQUIREMENTS)])
    stamp.write_text(digest + "\n")


def ensure_fashion_mnist() -> None:
    if FASHION_MNIST.is_dir() and any(FASHION_MNIST.glob("train-images*")):
        print(f"Fashion-MNIST: found in {FASHION_MNIST}")
        return
    apt = shutil.which("apt-get")
    if apt and os.geteuid() == 0:
        run([apt, "update", "-qq"])
        run([apt, "install", "-y", "-qq", "--no-install-recommends", "dataset-fashion-mnist"])
    elif apt and shutil.which("sudo"):
        run(["sudo", apt, "install", "-y", "-qq", "--no-install-recommends", "dataset-fashion-mnist"])
    else:
        print("Fashion-MNIST: no apt here; the recipe downloads it into --data-dir on first use (needs internet)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m shared.bootstrap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", default=str(ROOT / ".venv"), help="virtual environment to create or update")
    parser.add_argument("--link", help="also make this path a symbolic link to --venv (CI keeps the venv in a cache)")
    parser.add_argument("--no-data", action="store_true", help="skip the Fashion-MNIST step")
    args = parser.parse_args(argv)
    if sys.version_info[:2] != (3, 11):
        print(f"warning: requirements.txt is pinned for Python 3.11; this is {sys.version.split()[0]}")
    venv_path = Path(args.venv).absolute()
    ensure_venv(venv_path)
    if args.link and Path(args.link).absolute() != venv_path:
        link = Path(args.link)
        if link.is_symlink() or link.exists():
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
        link.symlink_to(venv_path)
    if not args.no_data:
        ensure_fashion_mnist()
    print(f"ready: {venv_path}/bin/accelerate launch ... (or: source {venv_path}/bin/activate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
