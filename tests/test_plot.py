"""plot.py: each kind of plot draws the values of its tables (checked on the figure
before it is saved) and writes a real PNG; bad input is one error line."""
import struct

import numpy as np
import pandas as pd
import pytest

import plot
from empathy import datasets, tables, utils
from conftest import run_in_process, run_script

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) in pixels, read from the PNG header."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_sensible_png(path):
    width, height = png_size(path)
    assert 400 <= width <= 2500 and 250 <= height <= 2500
    assert 5_000 < path.stat().st_size < 200_000
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def run_plot(*argv):
    return plot.main(plot.get_args_parser().parse_args([str(arg) for arg in argv]))


def draw(*argv):
    """The figure a plot command draws, before it is saved."""
    args = plot.get_args_parser().parse_args([str(arg) for arg in argv] + ["--out", "x.png"])
    return plot.PLOTS[args.kind](args)


def legend_texts(figure):
    return [text.get_text() for legend in [*figure.legends, *(axis.get_legend()
            for axis in figure.axes if axis.get_legend())] for text in legend.get_texts()]


def bar_heights(axis):
    return [patch.get_height() for patch in axis.patches]


def plot_error(capsys, *argv):
    """The one line that plot.py prints for bad input (and exits 1 with)."""
    with pytest.raises(SystemExit) as stopped:
        utils.run_cli(plot.main, plot.get_args_parser(), [str(arg) for arg in argv])
    assert stopped.value.code == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.count("\n") == 1
    return stderr


@pytest.fixture
def table_files(tmp_path):
    """CSV files shaped like those cv_epochs.py, personalize.py, crossval.py and
    score.py write, with made-up numbers."""
    epochs = np.arange(10, 101, 10)
    folds = {f"val_on_{story}": 0.3 + 0.1 * np.sin(epochs / 30 + story) for story in (1, 2, 4)}
    cv_epochs = pd.DataFrame({"epoch": epochs, **folds})
    values = cv_epochs[list(folds)].to_numpy()
    cv_epochs.insert(1, "mean_ccc", values.mean(axis=1))
    cv_epochs.insert(2, "std_ccc", values.std(axis=1))
    cv_epochs.insert(3, "mean_minus_std", cv_epochs["mean_ccc"] - cv_epochs["std_ccc"])
    personal = pd.DataFrame({"subject": ["1", "2", "3", "Mean"], "before_ccc": [0.1, 0.2, -0.1, 0.07],
                             "after_ccc": [0.3, 0.25, 0.1, 0.22]})
    folds = [{"story": s, "train_ccc": 0.6, "val_ccc": v} for s, v in ((1, 0.4), (2, 0.2), (4, 0.3))]
    paths = {"cv_epochs": tmp_path / "cv_AT" / "cv_epochs.csv",
             "personal": tmp_path / "personal_AT" / "personalize.csv",
             "crossval": tmp_path / "cv_AT" / "crossval.csv",
             "crossval_atv": tmp_path / "cv_ATV" / "crossval.csv",
             "by_story": tmp_path / "scores_AT" / "by_story.csv"}
    utils.write_csv(cv_epochs, paths["cv_epochs"])
    utils.write_csv(personal, paths["personal"])
    utils.write_csv(tables.crossval_table(folds), paths["crossval"])
    utils.write_csv(tables.crossval_table([{**f, "val_ccc": f["val_ccc"] + 0.05} for f in folds]),
                    paths["crossval_atv"])
    utils.write_csv(pd.DataFrame({"story": [1, 3], "ccc": [0.2, 0.4]}), paths["by_story"])
    return paths


@pytest.fixture
def predictions(tiny_data, tmp_path):
    """Noisy copies of the validation annotations, one frame short, as train.py writes."""
    rng = np.random.default_rng(0)
    annotations = tiny_data / "Validation" / "Annotations"
    folder = tmp_path / "preds_AT" / "pred_test"
    for path in annotations.iterdir():
        truth = datasets.read_annotation(path)
        utils.write_valence(folder / path.name, truth[:-1] * 0.5 + rng.normal(0, 0.1, truth.size - 1))
    return annotations, folder


def test_epochs_plot_marks_the_best_epoch(table_files, tmp_path, capsys):
    table = pd.read_csv(table_files["cv_epochs"])
    axis, = draw("epochs", table_files["cv_epochs"]).axes
    mean, *folds, best = axis.get_lines()[:5]
    np.testing.assert_allclose(mean.get_ydata(), table["mean_ccc"])
    np.testing.assert_allclose([line.get_ydata() for line in folds],
                               [table["val_on_1"], table["val_on_2"], table["val_on_4"]])
    best_row = table.loc[table["mean_ccc"].idxmax()]
    assert (best.get_xdata()[0], best.get_ydata()[0]) == (best_row["epoch"], best_row["mean_ccc"])
    assert f"cv_AT: best epoch {int(best_row['epoch'])} (CCC {best_row['mean_ccc']:.3f})" in \
        legend_texts(axis.figure)
    assert axis.get_xlabel() == "epoch"

    out = run_plot("epochs", table_files["cv_epochs"], "--out", tmp_path / "plots" / "cv_epochs.png")
    assert_sensible_png(out)
    assert f"wrote {out}" in capsys.readouterr().out


def test_subjects_plot_draws_one_or_several_runs(table_files, tmp_path):
    axis, = draw("subjects", table_files["personal"], table_files["personal"], "--labels", "AT", "ATV").axes
    before, after = [0.1, 0.2, -0.1], [0.3, 0.25, 0.1]
    assert bar_heights(axis) == pytest.approx(before + after + before + after)
    assert [tick.get_text() for tick in axis.get_xticklabels()] == ["1", "2", "3"]
    assert "ATV: after fine-tuning (mean 0.217)" in legend_texts(axis.figure)
    assert_sensible_png(run_plot("subjects", table_files["personal"], "--out", tmp_path / "one.png"))
    assert_sensible_png(run_plot("subjects", table_files["personal"], table_files["personal"],
                                 "--labels", "AT", "ATV", "--out", tmp_path / "two.png"))


def test_stories_plot_reads_crossval_and_score_tables(table_files, tmp_path):
    axis, = draw("stories", table_files["crossval"], table_files["by_story"], "--labels", "AT", "scored").axes
    nan = float("nan")
    np.testing.assert_allclose(bar_heights(axis), [0.4, 0.2, nan, 0.3, 0.2, nan, 0.4, nan])
    assert [tick.get_text() for tick in axis.get_xticklabels()] == ["1", "2", "3", "4"]
    dashed = [line.get_ydata()[0] for line in axis.get_lines() if line.get_linestyle() == "--"]
    assert dashed == pytest.approx([0.3, 0.3])  # each run's mean
    assert legend_texts(axis.figure) == [f"AT (mean 0.300 ± {np.std([0.4, 0.2, 0.3]):.3f})",
                                         "scored (mean 0.300 ± 0.100)"]
    out = run_plot("stories", table_files["crossval"], table_files["crossval_atv"], table_files["by_story"],
                   "--labels", "AT", "ATV", "scored", "--title", "Per story",
                   "--out", tmp_path / "stories.png")
    assert_sensible_png(out)


def test_predictions_plot_draws_chosen_videos(predictions, tmp_path):
    annotations, folder = predictions
    figure = draw("predictions", "--pred_dir", folder, "--labels", "AT", "--annotations",
                  annotations, "--videos", "Subject_1_Story_1", "Subject_3_Story_1")
    for axis, video in zip(figure.axes, ["Subject_1_Story_1", "Subject_3_Story_1"]):
        truth = datasets.read_annotation(annotations / f"{video}.csv")
        prediction = datasets.read_annotation(folder / f"{video}.csv")
        prediction = np.append(prediction, prediction[-1])  # aligned: the last frame repeated
        annotation_line, prediction_line = axis.get_lines()[:2]
        np.testing.assert_allclose(annotation_line.get_ydata(), truth)
        np.testing.assert_allclose(prediction_line.get_ydata(), prediction)
        assert axis.get_title() == video
        assert axis.get_legend().get_texts()[1].get_text() == \
            f"AT (CCC {utils.ccc(prediction, truth):.2f})"
    out = run_plot("predictions", "--pred_dir", folder, folder, "--labels", "AT", "again",
                   "--annotations", annotations, "--videos", "Subject_1_Story_1",
                   "Subject_3_Story_1", "--out", tmp_path / "predictions.png")
    assert_sensible_png(out)
    assert png_size(out)[1] > png_size(run_plot(
        "predictions", "--pred_dir", folder, "--annotations", annotations,
        "--videos", "Subject_2_Story_1", "--out", tmp_path / "one.png"))[1]


def test_default_videos_are_the_first_two_predicted():
    annotations = {(1, 1): "a", (2, 1): "b", (3, 1): "c"}
    predictions = {"AT": {(2, 1): "x", (3, 1): "y"}, "ATV": {(1, 1): "z", (2, 1): "w", (3, 1): "v"}}
    assert plot.choose_videos(None, annotations, predictions) == [(2, 1), (3, 1)]


def test_command_line_writes_a_png(table_files, tmp_path):
    result = run_script("plot.py", "stories", str(table_files["crossval"]), "--out",
                        str(tmp_path / "stories.png"))
    assert result.returncode == 0, result.stderr
    assert_sensible_png(tmp_path / "stories.png")


def test_missing_file_is_one_error_line(tmp_path):
    result = run_in_process("plot.py", "epochs", str(tmp_path / "cv_AT" / "cv_epochs.csv"),
                        "--out", str(tmp_path / "x.png"))
    assert result.returncode == 1
    assert result.stderr == (f"error: {tmp_path / 'cv_AT' / 'cv_epochs.csv'} does not exist: "
                             "run cv_epochs.py first or check the path\n")
    assert not (tmp_path / "x.png").exists()


def test_wrong_columns_are_named(table_files, tmp_path, capsys):
    out = tmp_path / "x.png"
    error = plot_error(capsys, "epochs", table_files["personal"], "--out", out)
    assert "has no column epoch,mean_ccc,std_ccc" in error and "cv_epochs.py" in error
    error = plot_error(capsys, "subjects", table_files["cv_epochs"], "--out", out)
    assert "has no column subject,before_ccc,after_ccc" in error
    error = plot_error(capsys, "stories", table_files["personal"], "--out", out)
    assert "has no column story" in error
    assert not out.exists()


@pytest.mark.parametrize("content", ["", "epoch,mean_ccc,std_ccc\n", "epoch,mean_ccc,std_ccc\n1,x,0\n"])
def test_empty_or_non_numeric_tables_are_refused(tmp_path, capsys, content):
    path = tmp_path / "cv_epochs.csv"
    path.write_text(content)
    error = plot_error(capsys, "epochs", path, "--out", tmp_path / "x.png")
    assert str(path) in error


def test_bad_options_are_refused(table_files, predictions, tmp_path, capsys):
    annotations, folder = predictions
    assert "does not end in .png" in plot_error(
        capsys, "epochs", table_files["cv_epochs"], "--out", tmp_path / "x.jpg")
    assert "--labels names 2 input(s) but 1 were given" in plot_error(
        capsys, "epochs", table_files["cv_epochs"], "--labels", "a", "b", "--out", tmp_path / "x.png")
    assert "is not a video name" in plot_error(
        capsys, "predictions", "--pred_dir", folder, "--annotations", annotations,
        "--videos", "Story_1", "--out", tmp_path / "x.png")
    assert "no annotation for Subject_9_Story_1" in plot_error(
        capsys, "predictions", "--pred_dir", folder, "--annotations", annotations,
        "--videos", "Subject_9_Story_1", "--out", tmp_path / "x.png")
    assert "prediction folder" in plot_error(
        capsys, "predictions", "--pred_dir", tmp_path / "nowhere", "--annotations", annotations,
        "--out", tmp_path / "x.png")


def test_summary_rows_alone_are_refused(tmp_path, capsys):
    path = tmp_path / "personalize.csv"
    path.write_text("subject,before_ccc,after_ccc\nMean,0.1,0.2\n")
    assert "has no row for a single subject" in plot_error(
        capsys, "subjects", path, "--out", tmp_path / "x.png")


# ---------------------------------------------------------------- training curves (issue 36)

def write_run(folder, epochs=12, eval_freq=1, average_last=None, seed=0, **flags):
    """A run folder as training leaves it: metrics.csv (val_ccc where evaluated,
    val_ccc_average in the last --average_last epochs) and args.json with `flags`."""
    rng = np.random.default_rng(seed)
    epoch = np.arange(1, epochs + 1)
    evaluated = (epoch % eval_freq == 0) | (epoch > epochs - (average_last or 0))
    table = pd.DataFrame({"epoch": epoch, "train_loss": 0.5 / epoch + rng.uniform(0, 0.02, epochs),
                          "val_ccc": np.where(evaluated,
                                              0.6 - 0.4 / epoch + rng.normal(0, 0.03, epochs),
                                              np.nan)})
    if average_last:
        table["val_ccc_average"] = np.where(epoch > epochs - average_last,
                                            table["val_ccc"] - 0.01, np.nan)
    utils.write_csv(table, folder / "metrics.csv")
    utils.write_json({"ema": None, "swa_start": None, "average_last": average_last, **flags},
                     folder / "args.json")
    return table


def test_curves_draw_loss_ccc_the_best_epoch_and_the_average(tmp_path):
    table = write_run(tmp_path / "models_AT", eval_freq=2, average_last=4, ema=0.99)
    loss_axis, ccc_axis = draw("curves", tmp_path / "models_AT").axes
    loss, = loss_axis.get_lines()[:1]
    np.testing.assert_allclose(loss.get_ydata(), table["train_loss"])
    ccc, star, dashed = [line for line in ccc_axis.get_lines() if line.get_linestyle() != ":"]
    scored = table.dropna(subset=["val_ccc"])
    np.testing.assert_allclose(ccc.get_xdata(), scored["epoch"])  # evaluated epochs only
    best = scored.loc[scored["val_ccc"].idxmax()]
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (best["epoch"], best["val_ccc"])
    np.testing.assert_allclose(dashed.get_xdata(), [9, 10, 11, 12])
    texts = legend_texts(ccc_axis.figure)
    assert texts[:2] == [f"{tmp_path / 'models_AT'} (--ema 0.99): validation CCC",
                         f"best epoch {best['epoch']:g} (CCC {best['val_ccc']:.3f}), picked on "
                         "validation"]
    assert texts[2].startswith("--average_last, mean of the last 4 epochs' predictions: CCC ")
    assert texts[3] == "--ema: the validation CCC is of the averaged weights"
    assert ccc_axis.get_xlabel() == "epoch" and loss_axis.get_ylabel() == "training loss"


@pytest.mark.parametrize("count", [1, 3, 10])
def test_curves_of_1_3_and_10_runs_keep_every_text_on_the_figure(tmp_path, count):
    from test_reliability_runs import overrun
    folders = []
    for run in range(count):  # long names, as crossval.py's folds of a described run
        folder = tmp_path / f"cv_audio_text_lr1e-4_run_{run}" / "val_on_1"
        flags = [{}, {"ema": 0.99}, {"swa_start": 5}][run % 3]
        write_run(folder, epochs=20 + run, average_last=3 if run % 2 else None, seed=run, **flags)
        folders.append(folder)
    figure = draw("curves", *folders)
    assert overrun(figure) == [0, 0, 0, 0]
    texts = legend_texts(figure)
    # One run by the folder given; several from the folder above the one they share.
    names = [folder if count == 1 else folder.relative_to(tmp_path.parent) for folder in folders]
    assert all(any(text.startswith(f"{name}") for text in texts) for name in names)
    if count > 1:
        assert "star: the run's best epoch, picked on validation" in texts
        assert "--ema and --swa_start: the validation CCC is of the averaged weights" in texts
    out = run_plot("curves", *folders, "--out", tmp_path / f"curves_{count}.png")
    width, height = png_size(out)
    assert 600 <= width <= 2500 and 400 <= height <= 2500


def test_curves_refuse_a_folder_without_metrics_naming_the_runs_inside(tmp_path, capsys):
    write_run(tmp_path / "cv" / "val_on_1")
    write_run(tmp_path / "cv" / "val_on_2")
    error = plot_error(capsys, "curves", tmp_path / "cv", "--out", tmp_path / "x.png")
    assert error == (f"error: {tmp_path / 'cv'} has no metrics.csv: it holds runs in val_on_1, "
                     "val_on_2: give those folders\n")
    (tmp_path / "cv" / "val_on_1" / "metrics.csv").write_text("epoch,train_loss,val_ccc\n1,x,0.1\n")
    assert "column train_loss is empty or not numeric" in plot_error(
        capsys, "curves", tmp_path / "cv" / "val_on_1", "--out", tmp_path / "x.png")
    (tmp_path / "cv" / "val_on_2" / "args.json").unlink()
    (tmp_path / "cv" / "args.json").write_text("{not json")  # a fold's is its command's
    assert f"cannot read {tmp_path / 'cv' / 'args.json'}" in plot_error(
        capsys, "curves", tmp_path / "cv" / "val_on_2", "--out", tmp_path / "x.png")
    assert "does not exist" in plot_error(capsys, "curves", tmp_path / "nowhere", "--out",
                                          tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_curves_take_a_runs_metrics_file_for_its_folder(tmp_path):
    write_run(tmp_path / "m", swa_start=3)
    figure = draw("curves", tmp_path / "m" / "metrics.csv")
    assert legend_texts(figure)[0] == f"{tmp_path / 'm'} (--swa_start 3): validation CCC"
