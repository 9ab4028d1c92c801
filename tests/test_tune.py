"""tune.py and tuning.py (issue 25): a resumable Optuna study over the training
stories, its outputs, --final, its refusals, and plot.py tune."""
import hashlib
import json
import logging
import shutil

import dask
import optuna
import pandas as pd
import pytest
from distributed import LocalCluster  # before dask.config.set: it adds distributed's defaults
from optuna.trial import TrialState
from pathlib import Path

import tuning
from conftest import ROOT, run_in_process
from postprocessing import Postprocessing

# The TCN is the quickest family on the tiny data; one epoch per fold, two folds.
TUNE = ("tune.py", "--mods", "audio,text", "--epochs", "1", "--models", "tcn", "--seed", "3",
        "--stories", "2", "4")
PARAMS = ["model", "tcn_channels", "tcn_kernel", "tcn_blocks", "lr", "weight_decay", "loss",
          "label_delay", "filter", "calibrate"]


def tune(*argv):
    return run_in_process(*TUNE, *map(str, argv))


def load_study(folder):
    return optuna.load_study(study_name="tune", storage=tuning.default_storage(folder))


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tune_master(tiny_data_master, tmp_path_factory):
    """A folder holding data/ and tune_AT/, a study of two finished trials (made once:
    the study records its data folder's absolute path, so tests copy only tune_AT)."""
    master = tmp_path_factory.mktemp("tune")
    shutil.copytree(tiny_data_master, master / "data")
    result = run_in_process(*TUNE, "--trials", "2", "--out_dir", "tune_AT", cwd=master)
    assert result.returncode == 0, result.stderr
    return master


@pytest.fixture
def study_of_two(tune_master, tmp_path, monkeypatch):
    """A private copy of the two-trial study, run from the folder that holds the data;
    tests write only under tmp_path."""
    monkeypatch.chdir(tune_master)
    shutil.copy(tune_master / "runs.csv", tmp_path / "runs.csv")
    return Path(shutil.copytree(tune_master / "tune_AT", tmp_path / "tune_AT"))


def test_a_rerun_resumes_to_the_trials_asked_for(study_of_two):
    ledger = study_of_two.parent / "runs.csv"
    result = tune("--trials", 4, "--out_dir", study_of_two, "--ledger", ledger)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(study_of_two / "trials.csv")
    assert list(table["number"]) == [0, 1, 2, 3]
    assert set(table["state"]) <= {"COMPLETE", "PRUNED"}
    assert {"ccc_story_2", "ccc_story_4", "mean", "std", *PARAMS} <= set(table)
    # Resuming draws new settings, not the first trials' again.
    assert table.loc[2, "lr"] != table.loc[0, "lr"]
    best = json.loads((study_of_two / "best.json").read_text())
    assert best["flags"][:6] == ["--mods", "audio,text", "--epochs", "1", "--model", "tcn"]
    assert best["value"] == pytest.approx(table["value"].max())
    rows = pd.read_csv(ledger)
    assert rows["command"].str.endswith(("# trial 0", "# trial 1", "# trial 2",
                                         "# trial 3")).sum() == 4
    assert rows["mean_ccc"].notna().all() and set(rows["script"]) == {"tune.py"}
    assert "best:" in result.stdout


def test_the_same_command_samples_the_same_settings(study_of_two, tmp_path):
    again = tune("--trials", 2, "--out_dir", tmp_path / "again", "--ledger", "none")
    assert again.returncode == 0, again.stderr
    first, second = (pd.read_csv(folder / "trials.csv")[PARAMS]
                     for folder in (study_of_two, tmp_path / "again"))
    pd.testing.assert_frame_equal(first, second)


def test_final_scores_the_best_settings_on_the_validation_stories(study_of_two):
    result = tune("--trials", 2, "--out_dir", study_of_two, "--final", "--ledger", "none")
    assert result.returncode == 0, result.stderr
    assert "validation CCC of the best settings" in result.stdout
    final = json.loads((study_of_two / "final.json").read_text())
    assert -1 <= final["val_ccc"] <= 1
    assert len(list((study_of_two / "final" / "pred_test").glob("*.csv"))) == 3


@pytest.mark.parametrize("argv, message", [
    (("--trials", 1), "--trials 1 is below the 2 trials the study has finished"),
    (("--trials", 3, "--mods", "audio"), "was made with mods audio,text, not audio"),
    (("--trials", 3, "--epochs", 2), "was made with epochs 1, not 2"),
    (("--trials", 3, "--models", "tcn,foo"), "unknown model family foo"),
    (("--trials", 3, "--models", ","), "leaves the search space empty"),
    (("--trials", 3, "--storage", "sqlite:///missing/study.db"), "cannot be opened"),
    (("--trials", 3, "--storage", "nonsense"), "cannot be opened"),
    (("--trials", 3, "--lr", "0.1"), "tune.py searches --lr"),
    (("--trials", 3, "--scheduler", "tcp://127.0.0.1:1"), "cannot reach the Dask scheduler"),
])
def test_bad_input_is_refused_in_one_line_leaving_the_study_as_it_was(study_of_two, argv,
                                                                       message):
    files = {path: digest(path) for path in study_of_two.rglob("*") if path.is_file()}
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = tune("--out_dir", study_of_two, "--ledger", study_of_two.parent / "runs.csv",
                      *argv)
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert {path: digest(path) for path in study_of_two.rglob("*") if path.is_file()} == files
    assert not Path("missing").exists()


def test_a_trial_left_running_by_a_killed_run_is_marked_failed(study_of_two):
    orphan = load_study(study_of_two).ask()  # as a process killed mid-trial leaves it
    result = tune("--trials", 2, "--out_dir", study_of_two, "--ledger", "none")
    assert result.returncode == 0, result.stderr
    states = {trial.number: trial.state for trial in load_study(study_of_two).trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.COMPLETE,
                      orphan.number: TrialState.FAIL}
    assert "marked 1 trial(s)" in result.stderr


def test_a_shared_storage_fails_only_this_folders_dead_trials(study_of_two, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    mine = tmp_path / "mine"
    assert tune("--trials", 1, "--out_dir", mine, "--storage", url,
                "--ledger", "none").returncode == 0
    study = optuna.load_study(study_name="tune", storage=url)
    other, dead = study.ask(), study.ask()  # another machine's live trial, and a dead one of ours
    dead.set_user_attr("worker", tuning.worker_tag(mine))
    assert tune("--trials", 1, "--out_dir", mine, "--storage", url,
                "--ledger", "none").returncode == 0
    states = {trial.number: trial.state for trial in
              optuna.load_study(study_name="tune", storage=url).trials}
    assert states[other.number] == TrialState.RUNNING and states[dead.number] == TrialState.FAIL
    assert not (mine / "study.db").exists() and (mine / "trials.csv").is_file()


def test_plot_tune_draws_the_history_and_the_importances(study_of_two):
    result = run_in_process("plot.py", "tune", str(study_of_two))
    assert result.returncode == 0, result.stderr
    for name in ("history.png", "importances.png"):
        assert (study_of_two / name).read_bytes()[:4] == b"\x89PNG"


def test_plot_tune_needs_two_completed_trials(study_of_two, tmp_path):
    one = tmp_path / "one"
    assert tune("--trials", 1, "--out_dir", one, "--ledger", "none").returncode == 0
    result = run_in_process("plot.py", "tune", str(one))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "need at least 2 completed trials, the study has 1" in result.stderr
    assert not (one / "history.png").exists()


def test_post_processing_is_scored_from_saved_predictions(study_of_two):
    """A fold's saved per-second predictions give the trial's fold CCC again."""
    import numpy as np
    import datasets
    trial = load_study(study_of_two).trials[0]
    train_set = tuning.load_training_stories("data/Training", ["audio", "text"], [2, 4])
    folds = {}
    for story in train_set.stories:
        fold_train, held_out = datasets.fold_sets(train_set, story)
        saved = np.load(study_of_two / "trial_0000" / f"val_on_{story}" / "held_out.npz")
        folds[story] = (fold_train, held_out, [saved[video.name] for video in held_out.videos])
    scores = tuning.rescore(folds, tuning.postprocessing_of(trial.params))
    assert {str(story): value for story, value in scores.items()} == pytest.approx(
        trial.user_attrs["fold_ccc"])
    # The pruner saw each epoch's held-out CCC (one epoch, two folds: steps 0 and 1); the
    # last step's running CCC is the folds' mean before post-processing.
    raw = tuning.rescore(folds, Postprocessing(label_delay=trial.params["label_delay"]))
    assert sorted(trial.intermediate_values) == [0, 1]
    assert trial.intermediate_values[1] == pytest.approx(tuning.objective_value(raw, "mean"))


def test_jobs_run_trials_in_processes_to_exactly_the_count(study_of_two):
    result = tune("--trials", 4, "--jobs", 2, "--out_dir", study_of_two, "--ledger", "none")
    assert result.returncode == 0, result.stderr
    states = [trial.state for trial in load_study(study_of_two).trials]
    assert len(states) == 4 and set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}


def test_failing_trials_are_marked_failed_and_a_run_of_them_stops(study_of_two, monkeypatch):
    def diverge(*args, **kwargs):
        raise tuning.ToolkitError("training diverged in epoch 1")
    monkeypatch.setattr(tuning, "train_and_predict", diverge)
    result = tune("--trials", 3, "--out_dir", study_of_two, "--ledger", "none")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(
        f"error: {tuning.MAX_FAILED_IN_A_ROW} trials in a row failed")
    states = [trial.state for trial in load_study(study_of_two).trials]
    assert states.count(TrialState.FAIL) == tuning.MAX_FAILED_IN_A_ROW
    assert TrialState.RUNNING not in states


def test_final_needs_a_study(study_of_two, tmp_path):
    result = tune("--out_dir", tmp_path / "none", "--final", "--ledger", "none")
    assert result.returncode == 1 and "run tune.py without --final first" in result.stderr
    assert not (tmp_path / "none").exists()


def test_the_pruner_judges_each_epochs_running_ccc_against_completed_trials():
    study = optuna.create_study(direction="maximize", pruner=tuning.LatestMedianPruner(3))
    for value in (0.1, 0.2, 0.3):  # completed trials: steps 0-7 of 2 folds of 4 epochs
        done = study.ask()
        for step in range(8):
            done.report(value, step)
        study.tell(done, value)

    def pruned_at(fold_ccc_by_epoch, finished):
        """The epoch of the second fold (finished: the first fold's CCC) that pruned it."""
        report = tuning.epoch_reporter(study.ask(), finished, fold=1, epochs=4)
        for epoch, ccc in enumerate(fold_ccc_by_epoch, 1):
            try:
                report({"epoch": epoch, "val_ccc": ccc})
            except optuna.TrialPruned:
                return epoch
        return None

    # The running CCC is (first fold + this epoch) / 2, against the median 0.2 at its step;
    # the first half of a fold's epochs (2 of 4) is never judged.
    assert pruned_at([-1.0, -1.0, 0.5, 0.5], finished=[0.0]) is None
    assert pruned_at([-1.0, -1.0, 0.5, 0.3], finished=[0.0]) == 4
    assert pruned_at([-1.0, -1.0, 0.3, 0.5], finished=[0.0]) == 3
    assert pruned_at([0.5, 0.5, 0.5, 0.5], finished=[-0.3]) == 3


def test_scheduler_runs_trials_on_a_dask_cluster_through_its_scheduler(study_of_two, tmp_path):
    environment = {"PYTHONPATH": str(ROOT), "OMG_CACHE_DIR": str(tmp_path / "cache")}
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
                      env=environment) as cluster:
        result = tune("--trials", 4, "--out_dir", study_of_two, "--ledger", "none",
                      "--scheduler", cluster.scheduler_address)
        assert result.returncode == 0, result.stderr
        assert not cluster.scheduler.extensions["optuna"].storages  # served for the run only
    trials = load_study(study_of_two).trials  # the folder's own study.db, resumed
    assert len(trials) == 4 and {trial.state for trial in trials} <= {TrialState.COMPLETE,
                                                                      TrialState.PRUNED}
    assert {trials[number].user_attrs["worker"] for number in (2, 3)} == {
        tuning.worker_tag(study_of_two)}
    assert list(pd.read_csv(study_of_two / "trials.csv")["number"]) == [0, 1, 2, 3]
    assert (study_of_two / "trial_0003" / "val_on_4" / "held_out.npz").is_file()
