"""Shared fixtures: tiny synthetic datasets written by make_data.py."""
import contextlib
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import make_data  # noqa: E402

TINY = dict(subjects=3, stories=5, seconds=30, dims="24,16,32,32")


def write_tiny_data(out_dir, file_format="npy", seed=0, **options):
    """make_data.py with the tiny sizes, overridable by keyword (e.g. seconds=12)."""
    argv = ["--out_dir", str(out_dir), "--format", file_format, "--seed", str(seed)]
    for name, value in {**TINY, **options}.items():
        argv += [f"--{name}", *map(str, value if isinstance(value, (list, tuple)) else [value])]
    make_data.main(make_data.get_args_parser().parse_args(argv))
    return Path(out_dir)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the CSV cache of every test out of the user's home."""
    monkeypatch.setenv("OMG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_data_master(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("master") / "data")


@pytest.fixture
def tiny_data(tiny_data_master, tmp_path):
    """A private copy of the tiny dataset at tmp_path/data (tests may damage it)."""
    return Path(shutil.copytree(tiny_data_master, tmp_path / "data"))


@pytest.fixture
def in_tmp(tiny_data, monkeypatch):
    """Run from a folder holding ./data, as the user guide assumes."""
    monkeypatch.chdir(tiny_data.parent)
    return tiny_data.parent


def assert_same_checkpoints(first_dir, second_dir, names):
    """The checkpoints `names` of two runs hold the same epoch and identical weights."""
    import torch
    for name in names:
        first = torch.load(Path(first_dir) / name, weights_only=True)
        second = torch.load(Path(second_dir) / name, weights_only=True)
        assert first["epoch"] == second["epoch"], name
        for key in first["model"]:
            torch.testing.assert_close(first["model"][key], second["model"][key], rtol=0, atol=0)


class Killed(Exception):
    """What `killed_after_epoch` raises in place of kill -9."""


@contextlib.contextmanager
def killed_after_epoch(monkeypatch, epoch):
    """Training in the block stops as kill -9 would right after epoch `epoch`'s files
    (metrics.csv and checkpoints) are written; the block must stop so."""
    from empathy import engine
    record = engine.TrainingRun.record

    def killing(run, row):
        record(run, row)
        if run.epoch == epoch:
            raise Killed
    monkeypatch.setattr(engine.TrainingRun, "record", killing)
    with pytest.raises(Killed):
        yield
    monkeypatch.setattr(engine.TrainingRun, "record", record)


def run_in_process(*argv, cwd=None):
    """`run_script`'s result without a new Python (seconds of starting torch): the
    script's main run in this process as its __main__ runs it (utils.run_cli), from
    `cwd`, with its stdout, stderr and exit status captured."""
    import contextlib
    import importlib
    import io
    import os
    import subprocess
    from empathy import utils
    module = importlib.import_module(Path(argv[0]).stem)
    stdout, stderr, status = io.StringIO(), io.StringIO(), 0
    previous = os.getcwd()
    try:
        os.chdir(cwd or previous)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                utils.run_cli(module.main, module.get_args_parser(), list(argv[1:]))
            except SystemExit as exit_info:
                status = exit_info.code if isinstance(exit_info.code, int) else int(
                    exit_info.code is not None)
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(argv, status, stdout.getvalue(), stderr.getvalue())


def run_script(*argv, cwd=None):
    """Run a top-level script as a user would; returns the CompletedProcess."""
    import subprocess
    return subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=cwd,
                          capture_output=True, text=True)


# inotify(7) events: a file or folder appeared, was renamed into place, or was written.
_IN_CREATE, _IN_MOVED_TO, _IN_CLOSE_WRITE = 0x100, 0x80, 0x8


def wait_until(condition, root, timeout=120):
    """Block until `condition()` holds, checking it again whenever a file under `root`
    is created or written (Linux inotify): no polling, no sleeping. Fails after
    `timeout` seconds without it."""
    import ctypes
    import os
    import select
    libc = ctypes.CDLL(None, use_errno=True)
    handle = libc.inotify_init1(os.O_NONBLOCK)
    assert handle >= 0, "inotify is not available"
    watched = set()
    try:
        while True:
            # Watch every folder, new ones included (inotify does not recurse).
            for folder in [Path(root), *(path for path in Path(root).rglob("*") if path.is_dir())]:
                if folder not in watched:
                    libc.inotify_add_watch(handle, bytes(folder),
                                           _IN_CREATE | _IN_MOVED_TO | _IN_CLOSE_WRITE)
                    watched.add(folder)
            if condition():
                return
            ready, _, _ = select.select([handle], [], [], timeout)
            assert ready, f"nothing changed under {root} for {timeout} s"
            os.read(handle, 1 << 16)  # the events themselves do not matter: look again
    finally:
        os.close(handle)
