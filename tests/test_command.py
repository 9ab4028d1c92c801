"""The run protocol (empathy/command.py) and the one table builder (empathy/tables.py,
issue 35): every refusal before the first write, the fresh check again once the
folder is held, args.json once the checks pass; mean, population std and mean-std
rows equal to those computed by hand."""
import argparse
import ast
import fcntl
import json
import math

import pandas as pd
import pytest

from conftest import ROOT
from empathy import layout, options, tables
from empathy.command import Command
from empathy.utils import ToolkitError

PROTOCOL_SCRIPTS = ("train.py", "crossval.py", "cv_epochs.py", "personalize.py", "tune.py")


def flags(**changed):
    """Parsed flags as a training script has them."""
    return argparse.Namespace(**{"resume": False, "overwrite": False, "lr": 1e-5, **changed})


def plan_for(folder, settings=options.TrainingSettings()):
    return options.Plan(outputs=[(folder, "--out_dir")], options=options.RunOptions(settings))


def files_in(folder):
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def lock_is_held(folder):
    """Whether some open file holds the flock of layout.owned on `folder`."""
    if not (folder / layout.LOCK).is_file():
        return False
    with open(folder / layout.LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


# ---------------------------------------------------------------- the protocol

def test_args_json_is_written_once_the_checks_pass_and_the_folder_is_held(tmp_path):
    out = tmp_path / "out"
    with Command(flags(lr=0.5), plan_for(out), out) as run:
        assert lock_is_held(out)
        record = json.loads((out / layout.RUN_RECORD).read_text())
        assert record["lr"] == 0.5 and "command" in record
        assert run.resumes == {}
    assert not lock_is_held(out)  # released when the block ends
    assert files_in(out) == [layout.LOCK, layout.RUN_RECORD]


@pytest.mark.parametrize("record, written", [(None, []),
                                             (layout.CV_EPOCHS_RUN_RECORD,
                                              [layout.CV_EPOCHS_RUN_RECORD])])
def test_the_run_record_is_named_by_the_command(tmp_path, record, written):
    with Command(flags(), plan_for(tmp_path / "out"), tmp_path / "out", record=record):
        pass
    assert files_in(tmp_path / "out") == sorted([layout.LOCK, *written])


def test_a_second_run_into_a_held_folder_is_refused_before_writing(tmp_path):
    out = tmp_path / "out"
    with Command(flags(lr=0.1), plan_for(out), out):
        before = (out / layout.RUN_RECORD).read_bytes()
        with pytest.raises(ToolkitError, match="is in use by a run in progress"):
            with Command(flags(lr=0.2), plan_for(out), out):
                pytest.fail("the block of a refused command ran")
        assert (out / layout.RUN_RECORD).read_bytes() == before  # the first run's, untouched
        assert lock_is_held(out)  # the refusal left the first run's hold alone
    assert files_in(out) == [layout.LOCK, layout.RUN_RECORD]


def test_a_folder_holding_a_run_is_refused_before_anything_is_made(tmp_path):
    settings = options.TrainingSettings()
    run_dir = tmp_path / "out" / "val_on_1"
    run_dir.mkdir(parents=True)
    (run_dir / layout.METRICS).write_text("epoch,train_loss,val_ccc\n")
    with pytest.raises(ToolkitError, match=r"val_on_1 already holds a run: pass --resume"):
        with Command(flags(), plan_for(tmp_path / "out", settings), tmp_path / "out",
                     runs=settings.seed_runs(run_dir)):
            pytest.fail("the block of a refused command ran")
    assert files_in(tmp_path / "out") == ["val_on_1"]  # no lock, no args.json
    assert files_in(run_dir) == [layout.METRICS]


def test_a_refused_check_before_writing_makes_no_folder(tmp_path):
    with pytest.raises(ToolkitError, match="--epochs must be at least 1, got 0"):
        with Command(flags(), plan_for(tmp_path / "out", options.TrainingSettings(epochs=0)),
                     tmp_path / "out"):
            pytest.fail("the block of a refused command ran")
    assert not (tmp_path / "out").exists()


def test_the_fresh_check_is_repeated_once_the_folder_is_held(tmp_path, monkeypatch):
    settings = options.TrainingSettings()
    out = tmp_path / "out"
    held_at_each_check = []
    real_check = layout.check_fresh_runs

    def check_fresh_runs(folders, resume, overwrite):
        held_at_each_check.append(lock_is_held(out))
        return real_check(folders, resume, overwrite)

    monkeypatch.setattr(layout, "check_fresh_runs", check_fresh_runs)
    with Command(flags(), plan_for(out, settings), out, runs=settings.seed_runs(out / "fold")):
        pass
    assert held_at_each_check == [False, True]


def test_a_run_that_finished_meanwhile_is_found_inside_the_lock(tmp_path, monkeypatch):
    """Another run ends in the run folder between the first fresh check and the lock
    (here: while the checks before writing run): the second check refuses, and the
    command writes no args.json."""
    settings = options.TrainingSettings()
    out, run_dir = tmp_path / "out", tmp_path / "out" / "val_on_1"

    def another_run_finishes(plan):
        run_dir.mkdir(parents=True)
        (run_dir / layout.LAST).write_bytes(b"another run's")

    monkeypatch.setattr(options, "check_before_writing", another_run_finishes)
    with pytest.raises(ToolkitError, match="val_on_1 already holds a run"):
        with Command(flags(), plan_for(out, settings), out, runs=settings.seed_runs(run_dir)):
            pytest.fail("the block of a refused command ran")
    assert not (out / layout.RUN_RECORD).exists()
    assert not lock_is_held(out)


def test_resumed_runs_are_checked_and_handed_to_the_block(tmp_path, monkeypatch):
    """--resume: the runs with a last.save go to the check before writing as resumed,
    the command's own checks get the resumes, and the block's RunOptions know them."""
    settings = options.TrainingSettings(seeds=2)
    out = tmp_path / "out"
    (layout.seed_dir(out, 1)).mkdir(parents=True)
    (layout.seed_dir(out, 1) / layout.LAST).write_bytes(b"saved")
    (out / layout.RUN_RECORD).write_text("{}")  # the command that began these runs
    checked, order = [], []
    monkeypatch.setattr(options, "check_before_writing",
                        lambda plan: (checked.append(plan), order.append("before writing")))
    with Command(flags(resume=True), plan_for(out, settings), out,
                 runs=settings.seed_runs(out),
                 checks=[lambda resumes: order.append(("own", dict(resumes)))]) as run:
        order.append("block")
    resumes = {layout.seed_dir(out, 1): True, layout.seed_dir(out, 2): False}
    assert order == ["before writing", ("own", resumes), "block"]
    assert [(folder, seed.seed) for folder, seed in checked[0].resumed] == \
        [(layout.seed_dir(out, 1), 1)]
    assert checked[0].options.resumes == resumes
    assert run.resumes_run(layout.seed_dir(out, 1)) and not run.resumes_run(layout.seed_dir(out, 2))


def test_an_error_in_the_block_releases_the_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="in the block"):
        with Command(flags(), plan_for(out), out):
            raise RuntimeError("in the block")
    assert not lock_is_held(out)
    with Command(flags(), plan_for(out), out):  # free again
        assert lock_is_held(out)


@pytest.mark.parametrize("script", PROTOCOL_SCRIPTS)
def test_the_scripts_take_their_folders_through_the_one_protocol(script):
    """No script holds a folder, checks for earlier runs or writes args.json itself."""
    tree = ast.parse((ROOT / script).read_text())
    called = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert "command.Command" in called
    assert not called & {"layout.owned", "layout.check_fresh_runs", "layout.check_fresh_model_dir",
                         "layout.write_run_record"}


# ---------------------------------------------------------------- the table builder

def population_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / len(values))


def test_summary_rows_are_mean_population_std_and_mean_minus_std():
    folds = [{"story": 1, "train_ccc": 0.5, "val_ccc": 0.1, "val_epoch": 3},
             {"story": 2, "train_ccc": 0.7, "val_ccc": 0.3, "val_epoch": 5},
             {"story": 4, "train_ccc": 0.9, "val_ccc": 0.8, "val_epoch": 9}]
    table = tables.crossval_table(folds).set_index("story")
    assert list(table.index) == [1, 2, 4, "Mean", "Std", "Mean-Std"]
    for column in ("train_ccc", "val_ccc"):
        values = [fold[column] for fold in folds]
        mean, std = sum(values) / 3, population_std(values)
        assert table.loc["Mean", column] == pytest.approx(mean)
        assert table.loc["Std", column] == pytest.approx(std)
        assert table.loc["Mean-Std", column] == pytest.approx(mean - std)
    # population, not sample std: [0.1, 0.3, 0.8] gives 0.2944, not 0.3606
    assert table.loc["Std", "val_ccc"] == pytest.approx(0.29439, abs=1e-5)
    assert list(table.loc[["Mean", "Std", "Mean-Std"], "val_epoch"]) == ["", "", ""]


def test_a_missing_fold_makes_the_summary_missing_unless_asked_to_skip_it():
    table = pd.DataFrame({"subject": [1, 2, 3], "after_ccc": [0.2, math.nan, 0.6],
                          "finetune": ["all", "head", "all"]})
    kept = tables.with_summary_rows(table, "subject", ["after_ccc"])
    assert kept["after_ccc"].iloc[3:].isna().all()  # no mean over 2 of 3 passing for all
    skipped = tables.with_summary_rows(table, "subject", ["after_ccc"], rows=("Mean",),
                                       skipna=True)
    assert list(skipped["subject"]) == [1, 2, 3, "Mean"]
    assert skipped["after_ccc"].iloc[-1] == pytest.approx(0.4)
    assert skipped["finetune"].iloc[-1] == ""  # no mean of the methods


def test_summary_columns_are_the_spread_of_each_row():
    per_fold = pd.DataFrame({"val_on_1": [0.1, 0.5], "val_on_2": [0.3, 0.5],
                             "val_on_4": [0.8, math.nan]})
    columns = tables.summary_columns(per_fold)
    values = [0.1, 0.3, 0.8]
    assert list(columns) == ["mean_ccc", "std_ccc", "mean_minus_std"]
    assert columns.loc[0, "mean_ccc"] == pytest.approx(0.4)
    assert columns.loc[0, "std_ccc"] == pytest.approx(population_std(values))
    assert columns.loc[0, "mean_minus_std"] == pytest.approx(0.4 - population_std(values))
    assert columns.loc[1].isna().all()
    assert list(tables.summary_columns(per_fold, ("mean_ccc", "std_ccc"))) == ["mean_ccc",
                                                                             "std_ccc"]


def test_the_ledger_spread_of_seeds_and_subjects():
    results = tables.spread_results([0.2, 0.4, 0.9], best_epoch="3 4 5")
    assert results["mean_ccc"] == pytest.approx(0.5)
    assert results["std_ccc"] == pytest.approx(population_std([0.2, 0.4, 0.9]))
    assert results["mean_minus_std"] == pytest.approx(0.5 - population_std([0.2, 0.4, 0.9]))
    assert results["best_epoch"] == "3 4 5"


def test_the_spread_over_seeds_is_named_for_its_score():
    columns = tables.seed_columns("val_ccc", [0.1, 0.3, 0.8])
    assert list(columns) == ["val_ccc_seed_mean", "val_ccc_seed_std"]
    assert columns["val_ccc_seed_mean"] == pytest.approx(0.4)
    assert columns["val_ccc_seed_std"] == pytest.approx(population_std([0.1, 0.3, 0.8]))
    assert math.isnan(tables.seed_columns("after_ccc", [0.1, math.nan])["after_ccc_seed_mean"])
