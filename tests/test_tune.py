"""tune.py and tuning.py (issues 25 and 33): a resumable Optuna study over the
training stories, its outputs, --final, its refusals, and plot.py tune; the recipe
as trial 0, --select one_se, --ensemble folds with --keep_weights, the progress lines."""
import hashlib
import json
import logging
import shutil

import dask
import optuna
import pandas as pd
import pytest
import torch
from distributed import LocalCluster  # before dask.config.set: it adds distributed's defaults
from optuna.trial import TrialState
from pathlib import Path

from empathy import precision, tuning
from conftest import ROOT, run_in_process
from empathy.postprocessing import Postprocessing

# The TCN is the quickest family on the tiny data; one epoch per fold, two folds.
TUNE = ("tune.py", "--mods", "audio,text", "--epochs", "1", "--models", "tcn", "--seed", "3",
        "--stories", "2", "4")
PARAMS = ["model", "tcn_channels", "tcn_kernel", "tcn_blocks", "lr", "weight_decay", "loss",
          "label_delay", "averaging", "average_last", "filter", "calibrate"]
# The recipe's family searched, and the folds' weights kept (--ensemble folds).
RECIPE_TUNE = (*TUNE[:TUNE.index("--models")], "--models", "lstm,tcn",
               *TUNE[TUNE.index("--models") + 2:], "--keep_weights")


def tune(*argv):
    return run_in_process(*TUNE, *map(str, argv))


def tune_recipe(*argv):
    return run_in_process(*RECIPE_TUNE, *map(str, argv))


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


@pytest.fixture(scope="module")
def recipe_master(tiny_data_master, tmp_path_factory):
    """Like tune_master, with the recipe's family searched and weights kept: tune_lstm/."""
    master = tmp_path_factory.mktemp("tune_recipe")
    shutil.copytree(tiny_data_master, master / "data")
    result = run_in_process(*RECIPE_TUNE, "--trials", "2", "--out_dir", "tune_lstm",
                            "--ledger", "none", cwd=master)
    assert result.returncode == 0, result.stderr
    return master


@pytest.fixture
def recipe_study(recipe_master, tmp_path, monkeypatch):
    """A private copy of tune_lstm/ (its kept weights' paths point into the master's)."""
    monkeypatch.chdir(recipe_master)
    return Path(shutil.copytree(recipe_master / "tune_lstm", tmp_path / "tune_lstm"))


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


def test_a_cosine_study_keeps_its_schedule_and_gives_it_in_best_flags(tune_master, tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tune_master)
    result = tune("--trials", 1, "--out_dir", tmp_path / "cos", "--ledger", "none",
                  "--lr_schedule", "cosine", "--keep_weights")
    assert result.returncode == 0, result.stderr
    kept = sorted((tmp_path / "cos" / "trial_0000").glob("val_on_*/epoch_1.save"))
    assert len(kept) == 2  # the trial's folds trained with the schedule
    for path in kept:
        assert torch.load(path, weights_only=True)["training"]["lr_schedule"] == "cosine"
    best = json.loads((tmp_path / "cos" / "best.json").read_text())
    assert best["flags"][:6] == ["--mods", "audio,text", "--epochs", "1", "--lr_schedule", "cosine"]
    assert load_study(tmp_path / "cos").user_attrs["lr_schedule"] == "cosine"
    again = tune("--trials", 2, "--out_dir", tmp_path / "cos", "--ledger", "none")
    assert again.returncode == 1
    assert "was made with lr_schedule cosine, not constant" in again.stderr


def test_a_study_from_before_lr_schedule_continues_as_constant():
    class OldStudy:  # its attributes lack lr_schedule
        study_name, user_attrs = "tune", {"epochs": 1}

        def get_trials(self, deepcopy, states):
            return []
    tuning.check_study(OldStudy(), {"epochs": 1, "lr_schedule": "constant"})
    with pytest.raises(tuning.ToolkitError, match="made with lr_schedule constant, not cosine"):
        tuning.check_study(OldStudy(), {"epochs": 1, "lr_schedule": "cosine"})


def test_the_same_command_samples_the_same_settings(study_of_two, tmp_path):
    again = tune("--trials", 2, "--out_dir", tmp_path / "again", "--ledger", "none")
    assert again.returncode == 0, again.stderr
    first, second = (pd.read_csv(folder / "trials.csv")[PARAMS]
                     for folder in (study_of_two, tmp_path / "again"))
    pd.testing.assert_frame_equal(first, second)


def test_final_scores_the_best_settings_on_the_validation_stories(study_of_two):
    result = tune("--trials", 2, "--out_dir", study_of_two, "--final", "--ledger", "none")
    assert result.returncode == 0, result.stderr
    assert "validation CCC of the chosen settings" in result.stdout
    assert "--select best chose trial" in result.stdout
    assert "no trial of the recommended recipe in this study" in result.stdout
    final = json.loads((study_of_two / "final.json").read_text())
    assert -1 <= final["val_ccc"] <= 1
    assert len(list((study_of_two / "final" / "pred_test").glob("*.csv"))) == 3


@pytest.mark.parametrize("argv, message", [
    (("--trials", 1), "--trials 1 is below the 2 trials the study has finished"),
    (("--trials", 3, "--mods", "audio"), "was made with mods audio,text, not audio"),
    (("--trials", 3, "--epochs", 2), "was made with epochs 1, not 2"),
    (("--trials", 3, "--lr_schedule", "cosine"), "was made with lr_schedule constant, not cosine"),
    (("--trials", 3, "--models", "tcn,foo"), "unknown model family foo"),
    (("--trials", 3, "--models", ","), "leaves the search space empty"),
    (("--trials", 3, "--storage", "sqlite:///missing/study.db"), "cannot be opened"),
    (("--trials", 3, "--storage", "nonsense"), "cannot be opened"),
    (("--trials", 3, "--lr", "0.1"), "tune.py searches --lr"),
    (("--trials", 3, "--ema", "0.9"), "tune.py searches --ema"),
    (("--trials", 3, "--swa_start", "1"), "tune.py searches --swa_start"),
    (("--trials", 3, "--average_last", "1"), "tune.py searches --average_last"),
    (("--trials", 1, "--select", "one_se"), "--select one_se needs at least 2 completed trials"),
    (("--trials", 3, "--ensemble", "folds"), "--ensemble folds says how --final scores"),
    (("--trials", 2, "--final", "--ensemble", "folds"),
     "which were not kept: search with --keep_weights"),
    (("--trials", 3, "--scheduler", "tcp://127.0.0.1:1"), "cannot reach the Dask scheduler"),
    (("--trials", 3, "--storage", "sqlite:///:memory:"), "is an SQLite database in memory, "
     "which each connection and process sees empty"),
    (("--trials", 3, "--storage", "sqlite://"), "is an SQLite database in memory"),
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
    from empathy import datasets
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
    # The trials ran in two other processes; this one printed a line for each.
    assert sorted(line.split()[1] for line in result.stdout.splitlines()
                  if line.startswith("trial ")) == ["2", "3"]


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
    # Read through the scheduler, the study gave a progress line per trial.
    assert "| 4/4 trials, " in result.stdout


# ---------------------------------------------------------------- issue 33

def test_trial_0_is_the_recipe_and_a_resume_does_not_enqueue_it_again(recipe_study):
    first = load_study(recipe_study).trials[0]
    assert first.params == tuning.RECIPE and first.user_attrs["recipe"]
    assert first.state == TrialState.COMPLETE
    result = tune_recipe("--trials", 3, "--out_dir", recipe_study, "--ledger", "none")
    assert result.returncode == 0, result.stderr
    trials = load_study(recipe_study).trials
    assert len(trials) == 3 and [trial.user_attrs.get("recipe", False) for trial in trials] == [
        True, False, False]
    assert trials[0].params == tuning.RECIPE and trials[2].params != tuning.RECIPE
    table = pd.read_csv(recipe_study / "trials.csv")
    assert list(table["recipe"]) == [True, False, False]
    best = json.loads((recipe_study / "best.json").read_text())
    assert best["select"] == "best" and best["recipe"]["trial"] == 0
    assert best["recipe"]["mean"] == pytest.approx(table.loc[0, "mean"])
    # The recipe trial's flags repeat it in train.py/crossval.py: --swa_start among them.
    assert tuning.as_flags(tuning.RECIPE) == [
        "--model", "lstm", "--layers", "1", "--hidden_dim", "512", "--dropout", "0.0",
        "--lr", "0.0001", "--weight_decay", "0.005", "--loss", "ccc", "--label_delay", "0.0",
        "--swa_start", "1", "--calibrate"]
    # A progress line for the one trial this command ran, none for earlier ones.
    lines = [line for line in result.stdout.splitlines() if line.startswith("trial ")]
    assert len(lines) == 1 and lines[0].startswith("trial 2 ") and "| 3/3 trials, " in lines[0]


def test_without_the_recipes_family_no_trial_is_enqueued_and_it_says_so(study_of_two,
                                                                          tmp_path, monkeypatch):
    result = tune("--trials", 1, "--out_dir", tmp_path / "one", "--ledger", "none")
    assert result.returncode == 0, result.stderr
    assert ("note: no trial of the recommended recipe: --models tcn leaves out its family, "
            "lstm") in result.stderr
    assert not load_study(tmp_path / "one").trials[0].user_attrs.get("recipe")
    assert tuning.recipe_outside(["lstm"], 60) is None
    assert tuning.recipe_outside(["lstm"], 1) is None
    monkeypatch.setitem(tuning.RECIPE, "average_last", 5)  # searched up to epochs // 4
    assert tuning.recipe_outside(["lstm"], 8) == (
        "its average_last 5 is not searched with --epochs 8")


def completed(number, params, mean, std, folds=4):
    """A hand-built completed trial with the user attributes run_trial sets (`folds`
    fold CCCs, all equal to `mean`: only their count matters here)."""
    trial = optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=mean, params=params,
        distributions={name: optuna.distributions.CategoricalDistribution([value])
                       for name, value in params.items()},
        user_attrs={"mean": mean, "std": std,
                    "fold_ccc": {str(story): mean for story in range(folds)}})
    trial.number = number
    return trial


def test_one_se_chooses_the_trial_closest_to_the_recipe_within_one_standard_error():
    recipe = tuning.RECIPE
    trials = [completed(0, recipe, 0.10, 0.02),
              completed(1, {"model": "tcn", "tcn_channels": 32, "lr": 1e-3}, 0.20, 0.08),
              completed(2, {**recipe, "lr": 3e-4}, 0.17, 0.05),
              completed(3, {**recipe, "lr": 3e-4, "loss": "mse"}, 0.19, 0.05),
              completed(4, {**recipe, "weight_decay": 1e-5}, 0.18, 0.05),
              completed(5, recipe, 0.159, 0.01)]
    # Trial 1 differs in model and lr, has tcn_channels, and lacks the recipe's other 12.
    assert [tuning.distance_to_recipe(trial.params) for trial in trials] == [0, 15, 1, 2, 1, 0]
    best = tuning.select_trial(trials, "best")
    assert best.chosen.number == best.best.number == 1
    # The best's standard error: 0.08 / sqrt(4 folds) = 0.04, so means from 0.16 count;
    # trials 2 and 4 differ from the recipe in one setting each: the higher mean wins.
    one_se = tuning.select_trial(trials, "one_se")
    assert one_se.standard_error == pytest.approx(0.04)
    assert one_se.within == (1, 2, 3, 4) and one_se.chosen.number == 4
    assert one_se.best.number == 1
    assert "--select one_se chose trial 4 (1 settings differ from the recipe)" in \
        one_se.describe()


def test_final_one_se_and_the_choice_it_records(recipe_study):
    result = tune_recipe("--trials", 2, "--out_dir", recipe_study,
                         "--ledger", "none", "--final", "--select", "one_se")
    assert result.returncode == 0, result.stderr
    final = json.loads((recipe_study / "final.json").read_text())
    assert final["select"] == "one_se" and final["ensemble"] == "retrain"
    assert "--select one_se chose trial" in result.stdout
    assert "the recipe" in result.stdout.splitlines()[1]


def test_one_se_needs_two_completed_trials(study_of_two, tmp_path):
    one = tmp_path / "one"
    assert tune("--trials", 1, "--out_dir", one, "--ledger", "none").returncode == 0
    files = {path: digest(path) for path in one.rglob("*") if path.is_file()}
    result = tune("--trials", 1, "--out_dir", one, "--ledger", "none", "--final",
                  "--select", "one_se")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: --select one_se needs at least 2 completed trials "
                                    "to compare, the study tune has 1")
    assert {path: digest(path) for path in one.rglob("*") if path.is_file()} == files


def test_fold_ensemble_is_the_mean_of_the_kept_fold_models_predictions(recipe_study):
    import numpy as np
    from empathy import checkpoints, datasets, engine
    from empathy.postprocessing import score_videos
    best = json.loads((recipe_study / "best.json").read_text())
    result = tune_recipe("--trials", 2, "--out_dir", recipe_study,
                         "--ledger", "none", "--final", "--ensemble", "folds")
    assert result.returncode == 0, result.stderr
    # Only the last epoch's checkpoint of each fold is kept.
    trial_dir = Path(best["fold_weights"]["2"]).parents[1]
    assert sorted(path.name for path in trial_dir.rglob("*.save")) == ["epoch_1.save"] * 2
    train_set = tuning.load_training_stories("data/Training", ["audio", "text"], [2, 4])
    test_set = datasets.load_videos("data/Validation", train_set.mods)
    cpu, per_fold = precision.get_device(False), []
    for story, path in best["fold_weights"].items():
        model = checkpoints.load_trained([path], train_set, False, cpu)[0]
        per_fold.append(engine.predict(model.network, test_set, cpu))
        # What the kept (averaged) weights predict of the held-out story is what the
        # trial scored: held_out.npz holds the run's reported predictions.
        _, held_out = datasets.fold_sets(train_set, int(story))
        saved = np.load(Path(path).parent / "held_out.npz")
        for video, rows in zip(held_out.videos, engine.predict(model.network, held_out, cpu)):
            np.testing.assert_allclose(saved[video.name], rows, rtol=0, atol=1e-6)
    mean = [np.mean(rows, axis=0) for rows in zip(*per_fold)]
    post = tuning.postprocessing_of(best["params"])
    post = post.with_listener_stats(train_set.videos) if post.calibrate else post
    expected = score_videos(test_set.videos, mean, post)
    record = json.loads((recipe_study / "final_folds.json").read_text())
    assert record["ensemble"] == "folds" and record["val_ccc"] == pytest.approx(expected["ccc"])
    for video, frames in zip(test_set.videos, expected["frames"]):
        written = np.loadtxt(recipe_study / "final_folds" / "pred_test" / f"{video.name}.csv",
                             skiprows=1)
        np.testing.assert_allclose(written, frames, atol=1e-6)
    assert f"validation CCC of the mean of its 2 fold models (trial {best['trial']}" in \
        result.stdout
    assert "each fold model alone: val_on_2" in result.stdout


def test_fold_ensemble_refuses_weights_that_are_gone(recipe_study, tmp_path):
    best = json.loads((recipe_study / "best.json").read_text())
    moved = tmp_path / "moved.save"
    gone = Path(best["fold_weights"]["4"])
    shutil.move(gone, moved)
    try:
        files = {path: digest(path) for path in recipe_study.rglob("*") if path.is_file()}
        result = tune_recipe("--trials", 2, "--out_dir", recipe_study,
                             "--ledger", "none", "--final", "--ensemble", "folds")
        assert {path: digest(path) for path in recipe_study.rglob("*")
                if path.is_file()} == files
    finally:
        shutil.move(moved, gone)  # the weights belong to the module's master study
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: --ensemble folds: {gone}, one of trial "
                                    f"{best['trial']}'s kept fold weights, is gone")
    assert "--keep_weights" in result.stderr


def test_the_progress_line_says_how_a_trial_did_and_how_long_the_rest_takes():
    done = completed(3, {"lr": 1e-3}, 0.25, 0.05, folds=2)
    done.user_attrs["fold_ccc"] = {"2": 0.2, "4": 0.3}
    best = completed(1, {"lr": 1e-3}, 0.4, 0.1)
    assert tuning.progress_line(done, 2, best, "mean", 4, 10, 125.0, 187.4) == (
        "trial 3 COMPLETE: CCC 0.2500 +- 0.0500 over 2/2 folds | best mean 0.4000 (trial 1) | "
        "4/10 trials, 0:02:05 elapsed, about 0:03:07 left at this pace")
    pruned = optuna.trial.create_trial(state=TrialState.PRUNED,
                                       user_attrs={"fold_ccc": {"2": 0.1}})
    pruned.number = 4
    assert tuning.progress_line(pruned, 2, None, "mean", 5, 10, 3700, 3700).startswith(
        "trial 4 PRUNED: CCC 0.1000 +- 0.0000 over 1/2 folds | none completed yet | "
        "5/10 trials, 1:01:40 elapsed")
    failed = optuna.trial.create_trial(state=TrialState.FAIL,
                                       user_attrs={"error": "training diverged in epoch 1"})
    failed.number = 5
    assert tuning.progress_line(failed, 2, best, "mean", 5, 10, 60, 60).startswith(
        "trial 5 FAIL: training diverged in epoch 1 | best mean 0.4000 (trial 1)")


def test_a_trials_held_out_predictions_are_the_mean_its_average_last_reports(
        tiny_data_master, tmp_path):
    """train_and_predict returns what the run reports at its end: with --average_last 2,
    the mean of the last two epochs' per-second predictions, not the last model's."""
    import numpy as np
    from empathy import checkpoints, datasets, engine, options
    train_set = tuning.load_training_stories(tiny_data_master / "Training", ["audio", "text"],
                                             [2, 4])
    fold_train, held_out = datasets.fold_sets(train_set, 4)
    params = {"model": "tcn", "tcn_channels": 32, "tcn_kernel": 2, "tcn_blocks": 3}
    settings = options.TrainingSettings(epochs=2, save_freq=1, seed=3, model="tcn",
                                        model_options=tuning.model_options(params),
                                        average_last=2)
    per_second, _ = tuning.train_and_predict(fold_train, held_out, tmp_path, settings,
                                             options.RunOptions(settings), Postprocessing())
    cpu = precision.get_device(False)
    by_epoch = [engine.predict(checkpoints.load_trained([tmp_path / f"epoch_{epoch}.save"],
                                                        fold_train, False, cpu)[0].network,
                               held_out, cpu) for epoch in (1, 2)]
    for got, first, second in zip(per_second, *by_epoch):
        np.testing.assert_allclose(got, (first + second) / 2, rtol=0, atol=1e-6)
        assert not np.allclose(got, second)


# ---------------------------------------------------------------- issue 36

def test_an_output_that_is_a_folder_is_refused_before_the_first_trial(study_of_two):
    (study_of_two / "trials.csv").unlink()
    (study_of_two / "trials.csv").mkdir()
    files = {path: digest(path) for path in study_of_two.rglob("*") if path.is_file()}
    result = tune("--trials", 3, "--out_dir", study_of_two, "--ledger", "none")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr == (f"error: {study_of_two / 'trials.csv'} is a folder, but tune.py "
                             "writes the table of trials there as a file: move it away, or give "
                             "another --out_dir\n")
    assert len(load_study(study_of_two).trials) == 2  # no trial ran
    assert {path: digest(path) for path in study_of_two.rglob("*") if path.is_file()} == files
    (study_of_two / "final.json").mkdir()
    result = tune("--trials", 2, "--out_dir", study_of_two, "--final", "--ledger", "none")
    assert result.returncode == 1 and "final.json is a folder" in result.stderr
    assert not (study_of_two / "final").exists()


def foreign_database(path):
    import sqlite3
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as database:
        database.execute("CREATE TABLE measurements (subject INTEGER, valence REAL)")
    return path


def test_a_study_file_optuna_cannot_open_is_named_not_as_a_storage_flag(study_of_two, tmp_path):
    import sqlite3
    folder = tmp_path / "odd"
    folder.mkdir()
    with sqlite3.connect(folder / "study.db") as database:  # Optuna's tables, not its columns
        for table in tuning.OPTUNA_TABLES:
            database.execute(f"CREATE TABLE {table} (x)")
    result = tune("--out_dir", folder, "--ledger", "none", "--trials", 2)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {folder / 'study.db'} cannot be opened as an Optuna "
                                    "study (")
    assert "restore it from a copy, or move it away" in result.stderr


@pytest.mark.parametrize("kind", ["foreign", "garbage", "truncated", "folder"])
def test_a_study_file_that_is_not_a_readable_study_is_named_with_what_to_do(study_of_two,
                                                                             tmp_path, kind):
    folder = tmp_path / "new_tune"
    study_file = folder / "study.db"
    if kind == "foreign":
        foreign_database(study_file)
    elif kind == "folder":
        study_file.mkdir(parents=True)
    else:
        folder.mkdir()
        whole = (study_of_two / "study.db").read_bytes()
        study_file.write_bytes(b"\x00garbage" * 400 if kind == "garbage" else
                               whole[:len(whole) // 2])
    files = sorted(path.name for path in folder.iterdir())
    before = digest(study_file) if study_file.is_file() else None
    expected = {"foreign": f"{study_file} is another program's SQLite database (its tables: "
                           "measurements), not an Optuna study: tune.py would add its tables to "
                           "it; give tune.py a file of its own (another --out_dir or --storage)",
                "garbage": f"{study_file} cannot be read as an Optuna study (file is not a "
                           "database): it is damaged, truncated or not an SQLite file; restore it "
                           "from a copy, or move it away to start a new study there",
                "truncated": f"{study_file} cannot be read as an Optuna study (",
                "folder": f"{study_file} is not a file"}[kind]
    for argv in (("--trials", 2), ("--trials", 2, "--final")):
        result = tune("--out_dir", folder, "--ledger", "none", *argv)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"error: {expected}") and "--storage sqlite" not in \
            result.stderr
    if kind != "folder":  # the study file also named through plot.py tune and --storage
        tuning.write_study_record(folder, None, "tune")
        result = run_in_process("plot.py", "tune", str(folder))
        assert result.returncode == 1 and result.stderr.startswith(f"error: {expected}")
        (folder / "study.json").unlink()
        result = tune("--out_dir", tmp_path / "elsewhere", "--storage", f"sqlite:///{study_file}",
                      "--trials", 2, "--ledger", "none")
        assert result.stderr.startswith(f"error: {expected}") and result.returncode == 1
        assert digest(study_file) == before  # read, never written
    assert sorted(path.name for path in folder.iterdir()) == files
    assert not (tmp_path / "elsewhere").exists()


def test_weights_left_by_a_killed_trial_go_and_kept_ones_stay(recipe_study):
    study = optuna.load_study(study_name="tune", storage=tuning.default_storage(recipe_study))
    dead = study.ask()  # as a tune.py killed mid-trial (SIGKILL) leaves it
    dead_fold = recipe_study / f"trial_{dead.number:04d}" / "val_on_2"
    dead_fold.mkdir(parents=True)
    for name in ("best.save", "last.save", ".best.save.abcd1234.tmp"):
        (dead_fold / name).write_bytes(b"weights")
    kept = sorted(recipe_study.glob("trial_*/val_on_*/epoch_1.save"))
    assert len(kept) == 4  # recorded by --keep_weights for the two completed trials
    stray = kept[0].parent / "best.save"  # a completed trial's fold keeps only its epoch_1.save
    stray.write_bytes(b"weights")
    result = tune_recipe("--trials", 2, "--out_dir", recipe_study, "--ledger", "none")
    assert result.returncode == 0, result.stderr
    assert "note: deleted 3 checkpoint(s) that stopped trials had left" in result.stderr
    assert sorted(recipe_study.rglob("*.save")) == kept
    assert list(dead_fold.iterdir()) == [] and not stray.exists()


def test_ctrl_c_advises_the_plain_rerun(study_of_two, tmp_path):
    import signal
    import subprocess
    import sys
    from conftest import wait_until
    process = subprocess.Popen([sys.executable, str(ROOT / "tune.py"), *TUNE[1:TUNE.index(
        "--epochs")], "--epochs", "1000", *TUNE[TUNE.index("--epochs") + 2:], "--trials", "1",
        "--out_dir", str(tmp_path / "stopped"), "--ledger", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stopped" / "trial_0000" / "val_on_2" / "metrics.csv"
    try:
        wait_until(lambda: process.poll() is not None or metrics.is_file(), tmp_path)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" not in stderr and "last.save" not in stderr
    assert f"{tuning.TRIAL_STOPPED}\n" in stderr  # the plain rerun, tested above, goes on
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert not list((tmp_path / "stopped").rglob("*.save"))
    assert load_study(tmp_path / "stopped").trials[0].state == TrialState.FAIL
