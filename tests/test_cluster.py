"""--scheduler on a real Dask cluster: a scheduler and two worker processes on
127.0.0.1, started here, run crossval, cv_epochs, personalize and cv_fusion, whose
numbers and files must equal those of a local --jobs 1 run; one test kills a worker
as soon as it runs a fold.

The cluster runs go through the scripts as a user types them (a subprocess, with a
time limit, so that a hang fails the test instead of stalling the suite)."""
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import dask
import pandas as pd
import pytest
from distributed import LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

import crossval
import cv_epochs
import cv_fusion
import personalize
from empathy import utils
from conftest import ROOT

RUN_TIMEOUT_S = 120   # one script run on the cluster
KILL_TIMEOUT_S = 60   # how long the killer waits for a fold to start
# One thread per task, as on the workers: float sums depend on how work splits among threads.
FOLDS = ["--mods", "audio", "--stories", "1", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The address of a local cluster laid out as the README's `dask worker
    --nthreads 1 --nworkers 2` lays one out; the scheduler runs in this process."""
    environment = {"PYTHONPATH": str(ROOT),
                   "OMG_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "cache")}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
                      env=environment) as cluster:
        yield cluster


def run(module, *argv):
    """A script's main in this process: the local --jobs 1 reference."""
    return module.main(module.get_args_parser().parse_args(list(argv)))


def run_on_cluster(cluster, script, *argv, cwd):
    finished = subprocess.run([sys.executable, str(ROOT / script), *argv,
                               "--scheduler", cluster.scheduler_address],
                              cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stdout


def files(folder):
    """{relative path: bytes} of every file a run wrote, but its record of the command."""
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(Path(folder).rglob("*"))
            if path.is_file() and path.name not in ("args.json", "test_args.json")}


def assert_same_outputs(local, remote, *names):
    """The same files in the same places, and byte-identical `names` (folders or files)."""
    local_files, remote_files = files(local), files(remote)
    assert local_files.keys() == remote_files.keys()
    for name, content in local_files.items():
        if any(name == prefix or name.startswith(prefix + "/") for prefix in names):
            assert remote_files[name] == content, name


# ---------------------------------------------------------------- crossval.py

def test_crossval_on_the_cluster_equals_a_local_run(cluster, in_tmp):
    argv = [*FOLDS, "--epochs", "2", "--save_freq", "2", "--features"]
    run(crossval, *argv, "--out_dir", "local")
    printed = run_on_cluster(cluster, "crossval.py", *argv, "--out_dir", "remote", cwd=in_tmp)

    pd.testing.assert_frame_equal(pd.read_csv(in_tmp / "local" / "crossval.csv"),
                                  pd.read_csv(in_tmp / "remote" / "crossval.csv"))
    assert_same_outputs(in_tmp / "local", in_tmp / "remote", "crossval.csv", "cv_pred",
                        "val_on_1/feat_test", "val_on_2/feat_train", "val_on_1/metrics.csv")
    assert "Mean-Std" in printed


class TaskStarts(SchedulerPlugin):
    """Sets `started` when the scheduler hands a task to a worker."""

    def __init__(self):
        self.started = threading.Event()

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "processing":
            self.started.set()


def kill_a_busy_worker(cluster, starts, killed):
    """As soon as a worker has a task, SIGKILL it; its pid goes into `killed`."""
    if not starts.started.wait(KILL_TIMEOUT_S):
        return
    busy = [worker for worker in list(cluster.scheduler.workers.values()) if worker.processing]
    if busy:
        os.kill(busy[0].pid, signal.SIGKILL)
        killed.append(busy[0].pid)


def test_a_killed_worker_costs_only_its_task(cluster, in_tmp):
    argv = [*FOLDS, "--epochs", "12", "--save_freq", "4"]
    run(crossval, *argv, "--out_dir", "local")
    killed, starts = [], TaskStarts()
    cluster.scheduler.add_plugin(starts, name="task-starts")
    killer = threading.Thread(target=kill_a_busy_worker, args=(cluster, starts, killed))
    killer.start()
    try:
        run_on_cluster(cluster, "crossval.py", *argv, "--out_dir", "remote", cwd=in_tmp)
    finally:
        killer.join(KILL_TIMEOUT_S)
        cluster.scheduler.remove_plugin(name="task-starts")
    assert killed, "no worker was killed: the folds finished before one could be"

    # The killed fold was run again from the start, on the other worker.
    pd.testing.assert_frame_equal(pd.read_csv(in_tmp / "remote" / "crossval.csv"),
                                  pd.read_csv(in_tmp / "local" / "crossval.csv"))
    assert_same_outputs(in_tmp / "local", in_tmp / "remote", "cv_pred", "val_on_1/metrics.csv",
                        "val_on_2/metrics.csv")


# ---------------------------------------------------------------- the other scripts

def test_epochs_subjects_and_fusion_folds_on_the_cluster(cluster, in_tmp):
    run(crossval, *FOLDS, "--epochs", "2", "--save_freq", "1", "--out_dir", "cv")
    shutil.copytree(in_tmp / "cv", in_tmp / "cv_remote")

    # cv_epochs.py: every fold at every epoch, then the best epoch's features.
    epochs = ["--epoch_min", "1", "--epoch_max", "2", "--epoch_step", "1"]
    run(cv_epochs, *FOLDS, *epochs, "--out_dir", "cv")
    run_on_cluster(cluster, "cv_epochs.py", *FOLDS, *epochs, "--out_dir", "cv_remote",
                   cwd=in_tmp)
    assert_same_outputs(in_tmp / "cv", in_tmp / "cv_remote", "cv_epochs.csv",
                        "val_on_1/feat_train", "val_on_2/feat_test")

    # cv_fusion.py: fit every fold, then score the saved fold models (--test).
    run(cv_fusion, "cv", "--in_names", "AT", "--out_dir", "fusion")
    run_on_cluster(cluster, "cv_fusion.py", "cv_remote", "--in_names", "AT",
                   "--out_dir", "fusion_remote", cwd=in_tmp)
    assert_same_outputs(in_tmp / "fusion", in_tmp / "fusion_remote", "crossval.csv", "cv_pred",
                        "val_on_2/pred_train")
    printed = run_on_cluster(cluster, "cv_fusion.py", "cv_remote", "--in_names", "AT",
                             "--out_dir", "fusion_remote", "--test", cwd=in_tmp)
    assert "val_on_1: C 0.01" in printed
    assert (in_tmp / "fusion_remote" / "crossval.csv").read_bytes() == \
        (in_tmp / "fusion" / "crossval.csv").read_bytes()

    # personalize.py: one task per subject, fine-tuning the same init.save.
    for out_dir in ("personal", "personal_remote"):
        (in_tmp / out_dir).mkdir()
        shutil.copy(in_tmp / "cv" / "val_on_1" / "best.save", in_tmp / out_dir / "init.save")
    run(personalize, "--mods", "audio", "--epochs", "2", "--threads", "1", "--out_dir",
        "personal")
    run_on_cluster(cluster, "personalize.py", "--mods", "audio", "--epochs", "2", "--threads",
                   "1", "--out_dir", "personal_remote", cwd=in_tmp)
    assert_same_outputs(in_tmp / "personal", in_tmp / "personal_remote", "personalize.csv",
                        "pred_test", "subject_3/metrics.csv")


# ---------------------------------------------------------------- errors and resuming

def test_an_unreachable_scheduler_is_one_line_and_writes_nothing(in_tmp, capsys):
    with socket.socket() as probe:  # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    capsys.readouterr()
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), \
            pytest.raises(SystemExit) as exit_info:
        utils.run_cli(crossval.main, crossval.get_args_parser(),
                      [*FOLDS, "--epochs", "1", "--out_dir", "cv",
                       "--scheduler", f"tcp://127.0.0.1:{port}"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        f"error: cannot reach the Dask scheduler at tcp://127.0.0.1:{port}: start one with "
        "'dask scheduler' or check the address\n")
    assert not (in_tmp / "cv").exists()


def test_resume_after_a_lost_scheduler_skips_finished_folds_and_starts_unsaved_ones(in_tmp):
    """As after a scheduler died: one fold finished, the other never saved."""
    argv = [*FOLDS, "--epochs", "2", "--save_freq", "2", "--out_dir", "cv"]
    whole = run(crossval, *argv)
    finished = (in_tmp / "cv" / "val_on_1" / "last.save").stat().st_mtime_ns
    shutil.rmtree(in_tmp / "cv" / "val_on_2")
    resumed = run(crossval, *argv, "--resume")
    assert (in_tmp / "cv" / "val_on_1" / "last.save").stat().st_mtime_ns == finished
    pd.testing.assert_frame_equal(whole, resumed)
