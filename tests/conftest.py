import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `shared` from any working directory

os.environ.setdefault("WANDB_SILENT", "true")


def pytest_configure(config):
    if config.pluginmanager.hasplugin("timeout") and not config.getoption("timeout", None):
        config.option.timeout = 900  # a hung distributed test fails instead of blocking the run
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on machines without one)")
    config.addinivalue_line("markers", "slurm: submits jobs to a real local Slurm cluster")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
