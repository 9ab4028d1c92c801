"""Shared fixtures: tiny synthetic datasets written by make_data.py."""
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


def run_script(*argv, cwd=None):
    """Run a top-level script as a user would; returns the CompletedProcess."""
    import subprocess
    return subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=cwd,
                          capture_output=True, text=True)
