"""Experiment tracking: the ledger of runs (runs.py, plot.py runs) and TensorBoard."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import crossval
import runs
import plot
from empathy import engine, ledger, tables
import train
from conftest import ROOT, run_script
from empathy.utils import ToolkitError


def run_recorded(module, *argv):
    """A script's command line as run_cli runs it: parsed, run, and recorded."""
    return ledger.run_cli(module.main, module.get_args_parser(), getattr(module, "ledger_results",
                                                                      tables.crossval_results),
                          argv=[str(arg) for arg in argv])


def test_two_runs_append_two_rows_with_their_settings_and_results(in_tmp, capsys):
    summaries = run_recorded(train, "--mods", "audio,text", "--epochs", 2, "--lr", 1e-3,
                             "--model_dir", "m", "--ledger", "ledger.csv")
    results = run_recorded(train, "--mods", "audio,text", "--model_dir", "m", "--test",
                           "--pred_dir", "p", "--ledger", "ledger.csv")
    rows = ledger.read_ledger(in_tmp / "ledger.csv")
    assert len(rows) == 2 and list(rows["script"]) == ["train.py", "train.py"]
    first, second = ledger.settings_of(rows)
    assert first == {"epochs": 2, "lr": 0.001, "mods": "audio,text"}
    assert second == {"mods": "audio,text", "test": True, "pred_dir": "p"}
    assert list(rows["out_dir"]) == ["m", "m"]
    assert list(rows["train_dir"]) == ["./data/Training"] * 2
    best = torch.load(in_tmp / "m" / "best.save", weights_only=True)
    # training: the last epoch's validation CCC (nothing picked), and the best epoch
    metrics = pd.read_csv(in_tmp / "m" / "metrics.csv")
    assert rows["mean_ccc"][0] == pytest.approx(summaries[0]["last_ccc"]) == \
        pytest.approx(metrics["val_ccc"].iloc[-1])
    assert rows["best_epoch"][0] == str(best["best_epoch"])
    assert rows["mean_ccc"][1] == pytest.approx(results["test"]["ccc"])
    assert rows["train_ccc"][1] == pytest.approx(results["train"]["ccc"])
    assert np.isnan(rows["train_ccc"][0]) and (rows["wall_s"] > 0).all()
    assert rows["versions"][0].startswith("python 3.") and f"torch {torch.__version__}" in \
        rows["versions"][0]
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        assert rows["commit"][0].removesuffix("+dirty") == head


def test_the_command_column_holds_the_command_line(in_tmp):
    result = run_script("crossval.py", "--mods", "audio,text", "--epochs", "1", "--out_dir", "cv",
                        "--stories", "1", "2", cwd=in_tmp)
    assert result.returncode == 0, result.stderr
    rows = ledger.read_ledger(in_tmp / "runs.csv")  # the default rows, in the working folder
    assert rows["command"][0].endswith("crossval.py --mods audio,text --epochs 1 --out_dir cv "
                                       "--stories 1 2")
    table = pd.read_csv(in_tmp / "cv" / "crossval.csv").set_index("story")
    # the last epoch's CCC over folds: nothing picked on the held-out stories
    assert rows["mean_ccc"][0] == pytest.approx(table.loc["Mean", "last_ccc"])
    assert rows["std_ccc"][0] == pytest.approx(table.loc["Std", "last_ccc"])
    assert rows["mean_minus_std"][0] == pytest.approx(table.loc["Mean-Std", "last_ccc"])
    assert rows["train_ccc"][0] == pytest.approx(table.loc["Mean", "train_ccc"])


APPENDER = """
import sys
sys.path.insert(0, {root!r})
from empathy import ledger, tables
for index in range(300):
    ledger.append_row({path!r}, {{"script": "w{worker}", "command": "x" * 500, "wall_s": index}})
"""


def test_processes_appending_at_once_lose_nothing(tmp_path):
    path = tmp_path / "ledger.csv"
    workers = [subprocess.Popen([sys.executable, "-c", APPENDER.format(root=str(ROOT), path=str(path),
                                                                       worker=worker)])
               for worker in range(3)]
    assert [worker.wait() for worker in workers] == [0, 0, 0]
    rows = ledger.read_ledger(path)
    assert len(rows) == 900
    for worker in range(3):
        assert sorted(rows[rows["script"] == f"w{worker}"]["wall_s"]) == list(range(300))
    assert (rows["command"] == "x" * 500).all()


def test_a_failed_or_stopped_run_appends_nothing(in_tmp, monkeypatch):
    with pytest.raises(SystemExit) as stopped:
        run_recorded(train, "--mods", "audio,text", "--model_dir", "m", "--lowpass", 30,
                     "--ledger", "ledger.csv")
    assert stopped.value.code == 1 and not (in_tmp / "ledger.csv").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "fit_seeds", interrupted)
    with pytest.raises(SystemExit) as stopped:
        run_recorded(train, "--mods", "audio,text", "--model_dir", "m", "--ledger", "ledger.csv")
    assert stopped.value.code == 130 and not (in_tmp / "ledger.csv").exists()


def test_ledger_none_writes_no_ledger_and_a_foreign_csv_is_refused(in_tmp, capsys):
    run_recorded(train, "--mods", "audio,text", "--epochs", 1, "--model_dir", "m", "--ledger", "none")
    assert not (in_tmp / "runs.csv").exists()
    annotation = in_tmp / "data" / "Validation" / "Annotations" / "Subject_1_Story_1.csv"
    before = annotation.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_recorded(train, "--mods", "audio,text", "--epochs", 1, "--model_dir", "n",
                     "--ledger", annotation)
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip() == (f"error: --ledger {annotation} is not a ledger of this toolkit "
                                     "(its first line is not the ledger's header): give another "
                                     "path, or none")
    assert annotation.read_bytes() == before and not (in_tmp / "n").exists()


def write_ledger(path, rows):
    for row in rows:
        ledger.append_row(path, {"script": "crossval.py", "out_dir": row[0], "settings": row[1],
                                 "mean_ccc": row[2], "std_ccc": row[3]})


def test_runs_py_filters_by_script_and_setting(tmp_path, capsys):
    path = tmp_path / "ledger.csv"
    write_ledger(path, [("cv_a", '{"loss": "ccc", "epochs": 5}', 0.3, 0.1),
                        ("cv_b", '{"epochs": 5}', 0.2, 0.05)])
    ledger.append_row(path, {"script": "train.py", "out_dir": "m", "settings": "{}"})
    shown = runs.main(runs.get_args_parser().parse_args([str(path), "--script", "crossval",
                                                         "--where", "loss=ccc"]))
    assert list(shown["out_dir"]) == ["cv_a"]
    assert list(ledger.select(ledger.read_ledger(path), where=["epochs=5"])["out_dir"]) == ["cv_a", "cv_b"]
    assert "cv_a" in capsys.readouterr().out
    with pytest.raises(ToolkitError, match="--where loss: write KEY=VALUE"):
        ledger.select(ledger.read_ledger(path), where=["loss"])
    with pytest.raises(ToolkitError, match="does not exist"):
        ledger.read_ledger(tmp_path / "missing.csv")


def test_plot_runs_draws_each_runs_mean_and_std_labelled_by_what_differs(tmp_path):
    path = tmp_path / "ledger.csv"
    write_ledger(path, [("cv_a", '{"loss": "ccc", "epochs": 5}', 0.3, 0.1),
                        ("cv_b", '{"epochs": 5}', 0.2, 0.05),
                        ("cv_c", '{"epochs": 5, "calibrate": true}', 0.25, 0.02)])
    ledger.append_row(path, {"script": "train.py", "out_dir": "feat", "settings": "{}"})  # no CCC
    args = plot.get_args_parser().parse_args(["runs", str(path), "--out", str(tmp_path / "r.png")])
    figure = plot.plot_runs(args)
    axis = figure.axes[0]
    bars = [patch for container in axis.containers if hasattr(container, "patches")
            for patch in container.patches]
    # Horizontal bars, the first run on top: each bar's length beside its label.
    labels = [tick.get_text() for tick in axis.get_yticklabels()]
    by_position = dict(zip(np.round(axis.get_yticks(), 6), labels))
    lengths = {by_position[round(bar.get_y() + bar.get_height() / 2, 6)]: bar.get_width()
               for bar in bars}
    # labelled by the settings that vary (epochs is 5 everywhere), grouped by label
    assert lengths == pytest.approx({"calibrate=true\ncv_c": 0.25, "default\ncv_b": 0.2,
                                     "loss=ccc\ncv_a": 0.3})
    assert labels[np.argmax(axis.get_yticks())] == "calibrate=true\ncv_c"
    error_bars = [line for container in axis.containers if hasattr(container, "lines")
                  for line in container.lines[2]]
    segments = error_bars[0].get_segments()
    assert sorted(round(float(s[1][0] - s[0][0]) / 2, 6) for s in segments) == [0.02, 0.05, 0.1]
    plot.main(args)
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------- TensorBoard

def scalars(folder, tag):
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_logs_every_epoch_of_every_fold(in_tmp):
    crossval.main(crossval.get_args_parser().parse_args(
        ["--mods", "audio,text", "--epochs", "3", "--eval_freq", "2", "--out_dir", "cv",
         "--stories", "1", "2", "--tensorboard", "tb"]))
    for story in (1, 2):
        logged = in_tmp / "tb" / "cv" / f"val_on_{story}"
        metrics = pd.read_csv(in_tmp / "cv" / f"val_on_{story}" / "metrics.csv")
        assert [step for step, _ in scalars(logged, "loss/train")] == [1, 2, 3]
        np.testing.assert_allclose([value for _, value in scalars(logged, "loss/train")],
                                   metrics["train_loss"], rtol=1e-6)
        validated = metrics.dropna(subset=["val_ccc"])  # --eval_freq 2, and the last epoch
        assert [step for step, _ in scalars(logged, "ccc/validation")] == [2, 3]
        np.testing.assert_allclose([value for _, value in scalars(logged, "ccc/validation")],
                                   validated["val_ccc"], rtol=1e-6)
        assert [value for _, value in scalars(logged, "learning_rate")] == pytest.approx([1e-5] * 3)


def test_a_tensorboard_path_that_is_a_file_is_refused_before_training(in_tmp):
    (in_tmp / "tb").write_text("not a folder")
    with pytest.raises(ToolkitError, match="--tensorboard tb is a file: give a folder"):
        train.main(train.get_args_parser().parse_args(
            ["--mods", "audio,text", "--epochs", "1", "--model_dir", "m", "--tensorboard", "tb"]))
    assert not (in_tmp / "m").exists()


def test_nothing_is_logged_without_the_flag(in_tmp):
    run_recorded(train, "--mods", "audio,text", "--epochs", 1, "--model_dir", "m", "--seeds", 2,
                 "--ledger", "none")
    assert not list(in_tmp.rglob("events.out.tfevents.*"))
    run_recorded(train, "--mods", "audio,text", "--epochs", 1, "--model_dir", "n", "--seeds", 2,
                 "--tensorboard", "tb", "--ledger", "none")
    assert sorted(path.parent.relative_to(in_tmp / "tb").as_posix()
                  for path in (in_tmp / "tb").rglob("events.out.tfevents.*")) == \
        ["n/seed_1", "n/seed_2"]
