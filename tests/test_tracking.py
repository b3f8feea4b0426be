"""Unit tests of shared/tracking.py: offline without credentials, run id kept in the run dir, key never written."""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]

from shared.tracking import RUN_ID_FILE, has_wandb_credentials, run_id, start_tracking, wandb_mode  # noqa: E402

FAKE_KEY = "0123456789abcdef0123456789abcdef0fake9999"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """No credentials anywhere: WANDB_* unset and HOME (so ~/.netrc) in an empty folder."""
    for key in list(os.environ):
        if key.startswith("WANDB_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("NETRC", raising=False)
    return home


def write_netrc(home: Path, text: str) -> None:
    path = home / ".netrc"
    path.write_text(text)
    path.chmod(0o600)


class FakeAccelerator:
    def __init__(self, main: bool = True):
        self.is_main_process = main
        self.printed: list[str] = []
        self.inits: list[tuple] = []

    def print(self, *args):
        self.printed.append(" ".join(map(str, args)))

    def init_trackers(self, project, config=None, init_kwargs=None):
        self.inits.append((project, config, init_kwargs))


def cfg(**kw):
    return SimpleNamespace(**{"tracker": "wandb", "project": "proj", "run_name": None, **kw})


# --------------------------------------------------------------------------- mode


def test_offline_without_credentials(home):
    assert has_wandb_credentials() is False
    assert wandb_mode() == "offline"


def test_online_with_key_in_environment(home, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert has_wandb_credentials() is True
    assert wandb_mode() == "online"


def test_online_with_netrc_entry(home):
    write_netrc(home, f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    assert has_wandb_credentials() is True and wandb_mode() == "online"


def test_netrc_for_other_hosts_or_unreadable_is_no_credential(home):
    write_netrc(home, "machine example.org\n  login user\n  password secret\n")
    assert wandb_mode() == "offline"
    write_netrc(home, "garbage token\n")  # unparseable: no crash, just offline
    assert has_wandb_credentials() is False


def test_empty_key_is_no_credential(home, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "")
    assert wandb_mode() == "offline"


@pytest.mark.parametrize("key, mode", [(None, "online"), (FAKE_KEY, "offline"), (FAKE_KEY, "disabled"),
                                       (None, "disabled")])
def test_wandb_mode_environment_wins(home, monkeypatch, key, mode):
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_MODE", mode)
    assert wandb_mode() == mode


# --------------------------------------------------------------------------- run id


def test_run_id_created_once_and_reused(tmp_path):
    first = run_id(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{12}", first)
    assert (tmp_path / RUN_ID_FILE).read_text() == first + "\n"
    assert run_id(tmp_path) == first
    assert run_id(str(tmp_path)) == first
    other = tmp_path / "other"
    other.mkdir()
    assert run_id(other) != first


def test_run_id_kept_from_an_earlier_job(tmp_path):
    (tmp_path / RUN_ID_FILE).write_text("earlier12345\n")
    assert run_id(tmp_path) == "earlier12345"


# --------------------------------------------------------------------------- start_tracking


def test_tracker_none_does_nothing(home, tmp_path):
    acc = FakeAccelerator()
    start_tracking(acc, cfg(tracker="none"), tmp_path, {"lr": 0.1})
    assert acc.inits == [] and acc.printed == []
    assert not (tmp_path / RUN_ID_FILE).exists()


def test_start_offline_passes_stored_id_and_says_how_to_sync(home, tmp_path):
    run_dir = tmp_path / "my_run"
    run_dir.mkdir()
    acc = FakeAccelerator()
    start_tracking(acc, cfg(), run_dir, {"lr": 0.1})
    rid = (run_dir / RUN_ID_FILE).read_text().strip()
    assert acc.inits == [("proj", {"lr": 0.1}, {"wandb": {
        "id": rid, "resume": "allow", "dir": str(run_dir), "mode": "offline", "name": "my_run"}})]
    assert acc.printed == [f"W&B: offline (no WANDB_API_KEY or ~/.netrc entry); upload later with "
                           f"`wandb sync {run_dir}/wandb/offline-run-*`"]
    # a requeued job starts again with the same id
    again = FakeAccelerator()
    start_tracking(again, cfg(run_name="named"), run_dir, {"lr": 0.1})
    assert again.inits[0][2]["wandb"]["id"] == rid and again.inits[0][2]["wandb"]["name"] == "named"


def test_start_online_with_key_never_leaks_it(home, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    acc = FakeAccelerator()
    start_tracking(acc, cfg(), tmp_path, {"lr": 0.1})
    ((_, _, init),) = acc.inits
    assert init["wandb"]["mode"] == "online" and acc.printed == []
    assert FAKE_KEY not in repr(acc.inits)
    out = capfd.readouterr()
    assert FAKE_KEY not in out.out + out.err
    assert all(FAKE_KEY.encode() not in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_non_main_process_creates_no_id_file(home, tmp_path):
    acc = FakeAccelerator(main=False)
    start_tracking(acc, cfg(), tmp_path, {})
    assert not (tmp_path / RUN_ID_FILE).exists()
    assert acc.inits[0][2]["wandb"]["id"] is None


# --------------------------------------------------------------------------- a real offline W&B run


@pytest.fixture
def fresh_accelerate(monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    for key in list(os.environ):
        if key.startswith("ACCELERATE_") or key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(key)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_real_offline_run_keeps_id_and_never_writes_the_key(home, tmp_path, monkeypatch, capfd, fresh_accelerate):
    pytest.importorskip("wandb")
    from accelerate import Accelerator

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)  # credentials present, but this run is forced offline
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ids = []
    for attempt in range(2):  # the second is a requeued job in the same run directory
        acc = Accelerator(cpu=True, log_with="wandb", project_dir=str(run_dir))
        start_tracking(acc, cfg(), run_dir, {"lr": 0.1, "attempt": attempt})
        acc.log({"train/loss": 1.0 / (attempt + 1)}, step=attempt)
        ids.append(acc.get_tracker("wandb").run.id)
        acc.end_training()
    stored = (run_dir / RUN_ID_FILE).read_text().strip()
    assert ids == [stored, stored]
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert runs and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{stored}(-\d+)?", p.name) for p in runs)
    written = [p for root in (run_dir, home) for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written)
    leaks = [str(p) for p in written if FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == []
    out = capfd.readouterr()
    assert FAKE_KEY not in out.out + out.err
