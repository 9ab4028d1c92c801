"""Issue 36: the stop handler covers a `--jobs` run from its first check to its last
write (the ledger row). SIGTERM sent to the parent alone, as `kill PID` does, at
several points of a short `crossval.py --jobs 2` run, the table's write included:
status 130, no process of the run left (its workers, their resource trackers, a
blocked `git`), nothing of it left in /dev/shm, and a state that --resume completes."""
import contextlib
import os
import select
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest

import crossval
from empathy import layout
from conftest import ROOT, wait_until

MARK = "OMG_STOP_WINDOW_RUN"  # an environment variable that every process of a run inherits


def processes_of(mark):
    """{pid: command line} of the live processes whose environment holds `mark`:
    the run's processes however they were reparented after their parent died."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if f"{MARK}={mark}".encode() in (entry / "environ").read_bytes().split(b"\0") \
                    and (entry / "stat").read_text().split(") ")[-1][0] != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
    return found


def wait_ended(pids, timeout=60):
    """Block until each process of `pids` has ended (a pidfd becomes readable when it
    does): an event, not a poll. Returns those still running after `timeout` s."""
    running = []
    for pid in pids:
        try:
            handle = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([handle], [], [], timeout)[0]:
                running.append(pid)
        finally:
            os.close(handle)
    return running


def shm_of(pid):
    """What joblib and loky keep in /dev/shm for the process `pid`."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return []
    return sorted(path.name for path in shm.iterdir()
                  if path.name.startswith((f"joblib_memmapping_folder_{pid}_", f"sem.loky-{pid}-")))


@pytest.fixture
def blocking_git(tmp_path):
    """A `git` first on PATH that says it was called (a file) and then waits on its
    standard input, which the test never writes: the ledger row is being made."""
    folder = tmp_path / "bin"
    folder.mkdir()
    git = folder / "git"
    git.write_text(f"#!/bin/sh\ntouch {tmp_path / 'git_called'}\nexec cat > /dev/null\n")
    git.chmod(0o755)
    return folder


FOLDS = ["--mods", "audio", "--stories", "1", "2", "--threads", "1", "--out_dir", "cv"]


@pytest.mark.parametrize("point", ["starting", "training", "ledger row"])
def test_sigterm_anywhere_in_a_jobs_run_ends_it_whole(in_tmp, blocking_git, point):
    mark = uuid.uuid4().hex
    epochs = "100000" if point == "training" else "2"
    env = {**os.environ, MARK: mark, "PATH": f"{blocking_git}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "crossval.py"), *FOLDS, "--jobs", "2", "--epochs", epochs,
         "--save_freq", "1", "--ledger", "runs.csv"],
        cwd=in_tmp, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    reached = {"starting": lambda: (in_tmp / "cv" / layout.RUN_RECORD).is_file(),
               "training": lambda: all(len(path.read_text().splitlines()) > 1 for path in [
                   in_tmp / "cv" / fold / layout.METRICS for fold in ("val_on_1", "val_on_2")]
                   if path.is_file()) and len(list((in_tmp / "cv").glob("*/metrics.csv"))) == 2,
               "ledger row": lambda: (in_tmp / "git_called").is_file()}[point]

    def ready():
        assert process.poll() is None, f"the run ended early: {process.communicate()[1][-2000:]}"
        return reached()
    try:
        wait_until(ready, in_tmp)
        process.send_signal(signal.SIGTERM)  # to the parent alone
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "leaked" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
    left = processes_of(mark)
    # The workers were joined before the parent exited; the resource trackers end as
    # their pipes from the parent close (an event: waited for, not polled).
    assert not [line for line in left.values() if b"LokyProcess" in line], left
    assert wait_ended(left) == [], processes_of(mark)
    assert shm_of(process.pid) == []
    assert not (in_tmp / "runs.csv").exists()  # an interrupted run has no ledger row
    if point == "ledger row":  # the table was written whole before the signal
        table = pd.read_csv(in_tmp / "cv" / layout.CROSSVAL_TABLE)
        assert list(table["story"][:2]) == ["1", "2"]
    trained = [pd.read_csv(path)["epoch"].max() for path in (in_tmp / "cv").glob("*/metrics.csv")]
    epochs = str(max([2, *trained]) + (point == "training"))  # a long run: one epoch more
    resumed = crossval.main(crossval.get_args_parser().parse_args(
        [*FOLDS, "--epochs", epochs, "--save_freq", "1", "--ledger", "none", "--resume"]))
    assert list(resumed["story"][:2]) == [1, 2]
