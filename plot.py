"""Plots of the files the scripts write, as PNG images.

    python plot.py predictions --pred_dir preds_AT/pred_test --annotations data/Validation/Annotations --out plots/predictions.png
    python plot.py epochs cv_AT/cv_epochs.csv --out plots/cv_epochs.png
    python plot.py subjects personal_AT/personalize.csv --out plots/personalize.png
    python plot.py stories cv_AT/crossval.csv --out plots/crossval.png
    python plot.py runs runs.csv --script crossval --out plots/runs.png
    python plot.py curves models_AT models_ATV --out plots/curves.png
    python plot.py tune tune_AT                       # tune_AT/history.png, importances.png

`predictions` draws predicted and annotated valence over time for chosen videos
(--videos, default the first two); `epochs` the mean held-out CCC per epoch of
cv_epochs.py with a band of one std over folds and the best epoch marked;
`subjects` each subject's CCC before and after personalize.py; `stories` the CCC
per held-out story of crossval.py or cv_fusion.py (or score.py's by_story.csv), the
generalized track; `runs` the mean CCC (with std bars) of the runs in the ledger
(runs.py), labelled by the settings in which they differ and grouped by them;
`curves` the training loss and validation CCC per epoch of training runs (their
metrics.csv), the best epoch marked as picked on validation, and the CCC of the
mean of the last epochs' predictions where --average_last gave one;
`tune` a tune.py study's optimization history and parameter importances (two PNGs
in its folder, or --out_dir).
Several CSV files (or --pred_dir folders) are drawn side by side, named by --labels
(default: their folder names).
"""
import argparse
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter


from empathy import layout, ledger, utils
from empathy.datasets import (list_videos, parse_video_name, read_annotation, read_prediction,
                      video_name)
from empathy.utils import FPS, ToolkitError

DEFAULT_VIDEOS = 2
# 1000 dpi already makes a 10 x 6 inch figure 60 megapixels; beyond it memory runs out.
MIN_DPI, MAX_DPI = 10, 1000
BEFORE_ALPHA = 0.45  # "before" bars are a lighter shade of their run's colour


# ---------------------------------------------------------------- flags

def get_common_args_parser():
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, help="PNG file to write, e.g. plots/cv_epochs.png")
    group.add_argument("--labels", nargs="+", metavar="NAME",
                       help="a legend name for each input, in order (default: folder names)")
    group.add_argument("--title", help="figure title (default: says what is drawn)")
    group.add_argument("--dpi", type=int, default=100, help="resolution (default: %(default)s)")
    return parser


def get_args_parser():
    parser = argparse.ArgumentParser(
        "plot.py", description="Plots of the files the scripts write, as PNG images.")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    common = [get_common_args_parser()]

    predictions = kinds.add_parser("predictions", parents=common,
                                   help="predicted and annotated valence over time")
    predictions.add_argument("--pred_dir", nargs="+", required=True, metavar="DIR",
                             help="folders of 25 fps predictions (e.g. preds_AT/pred_test)")
    predictions.add_argument("--annotations", default="./data/Validation/Annotations",
                             help="folder of the annotations (default: %(default)s)")
    predictions.add_argument("--videos", nargs="+", metavar="NAME",
                             help="videos to draw, e.g. Subject_1_Story_1 (default: the "
                                  f"first {DEFAULT_VIDEOS} with predictions)")

    epochs = kinds.add_parser("epochs", parents=common,
                              help="cross-validated CCC per epoch (cv_epochs.csv)")
    epochs.add_argument("csv", nargs="+", help="cv_epochs.csv files of cv_epochs.py")

    subjects = kinds.add_parser("subjects", parents=common,
                                help="CCC per subject before and after personalization")
    subjects.add_argument("csv", nargs="+", help="personalize.csv files of personalize.py")

    stories = kinds.add_parser("stories", parents=common,
                               help="CCC per held-out story (generalized track)")
    stories.add_argument("csv", nargs="+",
                         help="crossval.csv of crossval.py or cv_fusion.py, or by_story.csv "
                              "of score.py")

    runs = kinds.add_parser("runs", parents=common,
                            help="mean CCC of the runs in the ledger, by their settings")
    runs.add_argument("csv", nargs="?", default=ledger.DEFAULT_LEDGER,
                      help="the ledger CSV (default: %(default)s)")
    runs.add_argument("--script", help="only this script's runs, e.g. crossval")
    runs.add_argument("--where", nargs="+", default=[], metavar="KEY=VALUE",
                      help="only runs whose changed settings include these, e.g. loss=ccc")

    curves = kinds.add_parser("curves", parents=common,
                              help="training loss and validation CCC per epoch of training runs")
    curves.add_argument("dir", nargs="+", metavar="MODEL_DIR",
                        help="run folders holding metrics.csv (or their metrics.csv): "
                             "train.py's --model_dir, or a fold, seed or subject folder "
                             "(val_on_<story>, seed_<s>, subject_<s>)")
    add_tune_parser(kinds)
    return parser


def add_tune_parser(kinds):
    tune = kinds.add_parser("tune", help="optimization history and parameter importances of a "
                                         "tune.py study (two PNGs)")
    tune.add_argument("dir", help="the --out_dir of tune.py")
    tune.add_argument("--out_dir", help="folder of history.png and importances.png "
                                        "(default: DIR)")
    tune.add_argument("--dpi", type=int, default=100, help="resolution (default: %(default)s)")


# ---------------------------------------------------------------- inputs

def read_table(path, columns, producer, key=None):
    """A CSV with `columns`, all numeric, and `key`, read as text so that summary rows
    (`Mean`, `Std`) survive next to subject or story numbers."""
    table = read_csv(path, producer, key)
    return numeric_columns(table, path, columns, producer, key)


def read_csv(path, producer, key=None):
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"{path} does not exist: run {producer} first or check the path")
    try:
        return pd.read_csv(path, dtype={key: str} if key else None)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else "empty"
        raise ToolkitError(f"cannot read {path} as CSV ({reason}): pass a table "
                           f"written by {producer}") from None


def numeric_columns(table, path, columns, producer, key=None):
    missing = [column for column in [key, *columns] if column and column not in table.columns]
    if missing:
        raise ToolkitError(f"{path} has no column {','.join(missing)} (it has "
                           f"{','.join(map(str, table.columns))}): pass a table written by "
                           f"{producer}")
    for column in columns:
        numbers = pd.to_numeric(table[column], errors="coerce")
        if table.empty or numbers.isna().any():
            raise ToolkitError(f"{path}: column {column} is empty or not numeric: pass a "
                               f"table written by {producer}")
        table[column] = numbers
    return table


def per_key_rows(table, path, key, producer):
    """The rows of single subjects or stories (numeric keys), sorted; summary rows
    such as `Mean` are dropped, since the plots draw their own."""
    numeric = table[key].fillna("").str.strip().str.fullmatch(r"\d+")
    rows = table[numeric].copy()
    if rows.empty:
        raise ToolkitError(f"{path} has no row for a single {key}: pass a table written by "
                           f"{producer}")
    rows[key] = rows[key].str.strip().astype(int)
    return rows.sort_values(key)


def labels_for(inputs, labels):
    if labels is None:
        return [input_label(path) for path in inputs]
    if len(labels) != len(inputs):
        raise ToolkitError(f"--labels names {len(labels)} input(s) but {len(inputs)} were "
                           "given: give one name per input")
    return labels


def input_label(path):
    """cv_AT/cv_epochs.csv -> cv_AT; preds_AT/pred_test -> preds_AT/pred_test."""
    path = Path(path)
    if path.suffix == ".csv":
        return path.resolve().parent.name
    return str(path)


def parse_video(name):
    key = parse_video_name(Path(name).stem)
    if not key:
        raise ToolkitError(f"--videos {name} is not a video name: use Subject_<s>_Story_<t>, "
                           "e.g. Subject_1_Story_1")
    return key


def choose_videos(requested, annotations, predictions):
    """(subject, story) pairs to draw: those asked for, all annotated and predicted."""
    available = sorted(set(annotations).intersection(*predictions.values()))
    if not requested:
        if not available:
            raise ToolkitError("no video has both an annotation and a prediction in every "
                               "--pred_dir: check --annotations and --pred_dir")
        return available[:DEFAULT_VIDEOS]
    videos = [parse_video(name) for name in requested]
    for video in videos:
        if video not in annotations:
            raise ToolkitError(f"no annotation for {video_name(*video)} in the --annotations "
                               "folder: pick an annotated video")
        for folder, files in predictions.items():
            if video not in files:
                raise ToolkitError(f"{folder} has no prediction for {video_name(*video)}: "
                                   "pick a predicted video")
    return videos


# ---------------------------------------------------------------- figures

def new_figure(width, height):
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg, whatever backend the caller has set
    return figure


# Bar plots widen with their bars, up to this; beyond, bars get thinner instead.
MAX_WIDTH = 16  # inches
MAX_LEGEND_COLUMNS = 4


def bars_width(inches):
    """A bar plot's width: `inches` (its bars' room), from 6 to MAX_WIDTH."""
    return min(MAX_WIDTH, max(6, inches))


def outside_legend(figure, handles=None, labels=None):
    """A legend below the axes in as many columns (up to MAX_LEGEND_COLUMNS) as fit the
    figure's width, which a wider one would overrun and be cut off at; the figure
    grows by the legend's height, so that the axes keep theirs."""
    if handles is None:
        handles, labels = figure.axes[0].get_legend_handles_labels()
    if not handles:
        return None
    renderer = figure.canvas.get_renderer()
    room = 0.97 * figure.get_figwidth() * figure.dpi
    for columns in range(min(len(handles), MAX_LEGEND_COLUMNS), 0, -1):
        legend = figure.legend(handles, labels, loc="outside lower center", ncol=columns,
                               fontsize=8, frameon=False)
        box = legend.get_window_extent(renderer)
        if box.width <= room or columns == 1:
            break
        legend.remove()
    if box.width > room:  # one column of a long label: widen the figure to it
        figure.set_figwidth(box.width / figure.dpi / 0.97)
    figure.set_figheight(figure.get_figheight() + box.height / figure.dpi)
    return legend


def set_title(figure, text):
    """The figure's title, centred on it and wrapped into lines that fit its width (a
    long one, e.g. naming a ledger deep in folders, was cut off at both ends)."""
    title = figure.suptitle(text)
    renderer = figure.canvas.get_renderer()
    room = 0.95 * figure.get_figwidth() * figure.dpi
    characters = len(text)
    while title.get_window_extent(renderer).width > room and characters > 20:
        characters = int(characters * 0.9)
        title.set_text(textwrap.fill(text, characters))
    return title


def save_png(figure, out, dpi):
    try:
        with utils.atomic_path(out) as temporary:
            figure.savefig(temporary, format="png", dpi=dpi)
    except OSError as error:
        raise ToolkitError(f"cannot write {out} ({error.strerror}): choose a folder you can "
                           "write to") from None
    print(f"wrote {out}")


def check_out(out):
    """--out must name a PNG file whose folder is, or can become, a folder: checked
    before drawing, creating nothing."""
    if out.suffix.lower() != ".png":
        raise ToolkitError(f"--out {out} does not end in .png: plots are written as PNG")
    if out.is_dir():
        raise ToolkitError(f"--out {out} is a folder: give a file name in it, e.g. "
                           f"{out / 'plot.png'}")
    existing = next(folder for folder in out.parents if folder.exists())
    if not existing.is_dir():
        raise ToolkitError(f"--out {out}: {existing} is a file, not a folder: choose another "
                           "path for the plot")


def video_files(folder, what, producer):
    if not Path(folder).is_dir():
        raise ToolkitError(f"{what} folder {folder} does not exist: {producer}")
    return list_videos(folder)


def plot_predictions(args):
    annotations = video_files(args.annotations, "annotation",
                              "pass the split's Annotations folder with --annotations")
    predictions = {folder: video_files(folder, "prediction", "run train.py --test (or "
                                       "personalize.py, fusion.py) first or check --pred_dir")
                   for folder in args.pred_dir}
    labels = labels_for(args.pred_dir, args.labels)
    videos = choose_videos(args.videos, annotations, predictions)
    figure = new_figure(10, 1.2 + 2.4 * len(videos))
    axes = figure.subplots(len(videos), 1, squeeze=False)[:, 0]
    for axis, video in zip(axes, videos):
        annotation = read_annotation(annotations[video])
        seconds = np.arange(annotation.size) / FPS
        axis.plot(seconds, annotation, color="black", linewidth=1.6, label="annotation")
        for (folder, files), label in zip(predictions.items(), labels):
            prediction = utils.to_length(read_prediction(files[video]), annotation.size)
            axis.plot(seconds, prediction, linewidth=1.2,
                      label=f"{label} (CCC {utils.ccc(prediction, annotation):.2f})")
        axis.set_title(video_name(*video), fontsize=10)
        axis.set_ylabel("valence")
        axis.axhline(0, color="grey", linewidth=0.5)
        # Beside the axes: a legend inside would hide part of the series.
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("time (s)")
    set_title(figure, args.title or "Predicted and annotated valence")
    return figure


def plot_epochs(args):
    labels = labels_for(args.csv, args.labels)
    figure = new_figure(8, 4.5)
    axis = figure.subplots()
    one = len(args.csv) == 1  # one run: its folds fit on the figure, and a legend entry each
    whole = True
    for path, label in zip(args.csv, labels):
        table = read_table(path, ["epoch", "mean_ccc", "std_ccc"], "cv_epochs.py")
        table = table.sort_values("epoch")  # as they are: 1.5 is drawn at 1.5, not at 1
        whole &= bool((table["epoch"] % 1 == 0).all())
        epochs, mean, std = table["epoch"], table["mean_ccc"], table["std_ccc"]
        best = table.loc[mean.idxmax()]
        best_text = f"best epoch {best['epoch']:g} (CCC {best['mean_ccc']:.3f})"
        line, = axis.plot(epochs, mean, marker="o", markersize=3,
                          label=f"{label}: mean" if one else f"{label}: {best_text}")
        axis.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2,
                          label=f"{label}: mean ± std over folds" if one else None)
        if one:
            folds = [column for column in table.columns if column.startswith(layout.FOLD_PREFIX)]
            for index, column in enumerate(folds):
                axis.plot(epochs, table[column], color=line.get_color(), linewidth=0.6,
                          alpha=0.5, linestyle="--",
                          label=f"{label}: each fold ({len(folds)})" if index == 0 else None)
        axis.plot(best["epoch"], best["mean_ccc"], marker="*", markersize=16,
                  color=line.get_color(), markeredgecolor="black", linestyle="none",
                  label=f"{label}: {best_text}" if one else None)
        axis.axvline(best["epoch"], color=line.get_color(), linewidth=0.8, linestyle=":")
    if whole:  # ticks at whole epochs only where every epoch is one
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel("CCC on the held-out story")
    axis.grid(alpha=0.3)
    handles, names = axis.get_legend_handles_labels()
    if not one:  # what the band and stars of every run mean, said once
        handles += [Patch(color="grey", alpha=0.3), Line2D([], [], marker="*", markersize=12,
                                                           color="grey", markeredgecolor="black",
                                                           linestyle="none")]
        names += ["shaded: mean ± std over folds", "star: the run's best epoch"]
    # Below the axes: inside, it covered the curves, and with many runs it ran off the figure.
    outside_legend(figure, handles, names)
    set_title(figure, args.title or "Cross-validated CCC across epochs")
    return figure


def grouped_bars(axis, keys, series):
    """Bars side by side per key; `series` is a list of (values, label, style dict)."""
    width = 0.8 / len(series)
    positions = np.arange(len(keys))
    for index, (values, label, style) in enumerate(series):
        axis.bar(positions + (index - (len(series) - 1) / 2) * width, values, width,
                 label=label, **style)
    axis.set_xticks(positions, [str(key) for key in keys])
    axis.axhline(0, color="grey", linewidth=0.6)
    axis.grid(axis="y", alpha=0.3)
    # Below the figure: inside, the legend would cover the tallest bars.
    outside_legend(axis.figure)


def set_axis_labels(axis, xlabel, ylabel, title):
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    set_title(axis.figure, title)


def plot_subjects(args):
    labels = labels_for(args.csv, args.labels)
    tables = [per_key_rows(read_table(path, ["before_ccc", "after_ccc"], "personalize.py",
                                      key="subject"), path, "subject", "personalize.py")
              for path in args.csv]
    subjects = sorted(set().union(*(table["subject"] for table in tables)))
    figure = new_figure(bars_width(1 + 0.7 * len(subjects) * len(tables)), 4.5)
    axis = figure.subplots()
    series = []
    for index, (table, label) in enumerate(zip(tables, labels)):
        colour = f"C{index}"
        by_subject = table.set_index("subject").reindex(subjects)
        prefix = f"{label}: " if len(tables) > 1 else ""
        for column, when, alpha in (("before_ccc", "before", BEFORE_ALPHA),
                                    ("after_ccc", "after", 1.0)):
            series.append((by_subject[column].to_numpy(),
                           f"{prefix}{when} fine-tuning (mean {table[column].mean():.3f})",
                           dict(color=colour, alpha=alpha, edgecolor="black", linewidth=0.5)))
    grouped_bars(axis, subjects, series)
    set_axis_labels(axis, "subject (listener)", "CCC on the subject's test videos",
          args.title or "CCC per subject before and after personalization")
    return figure


def story_scores(path):
    """(per-story table with a `ccc` column, mean, std) of crossval.csv or by_story.csv."""
    producer = "crossval.py, cv_fusion.py or score.py --out_dir"
    table = read_csv(path, producer, key="story")
    column = "val_ccc" if "val_ccc" in table.columns else "ccc"
    table = numeric_columns(table, path, [column], producer, key="story")
    stories = per_key_rows(table, path, "story", producer)
    scores = stories.rename(columns={column: "ccc"})[["story", "ccc"]]
    # Population std, as crossval.csv's Std row.
    return scores, scores["ccc"].mean(), scores["ccc"].std(ddof=0)


def plot_stories(args):
    labels = labels_for(args.csv, args.labels)
    scored = [story_scores(path) for path in args.csv]
    stories = sorted(set().union(*(scores["story"] for scores, _, _ in scored)))
    figure = new_figure(bars_width(1 + 0.8 * len(stories) * len(scored)), 4.5)
    axis = figure.subplots()
    series = []
    for index, ((scores, mean, std), name) in enumerate(zip(scored, labels)):
        values = scores.set_index("story").reindex(stories)["ccc"].to_numpy()
        series.append((values, f"{name} (mean {mean:.3f} ± {std:.3f})",
                       dict(color=f"C{index}", edgecolor="black", linewidth=0.5)))
        axis.axhline(mean, color=f"C{index}", linestyle="--", linewidth=1)
    grouped_bars(axis, stories, series)
    set_axis_labels(axis, "held-out story", "CCC (mean over subjects)",
          args.title or "Generalized track: CCC per story (dashed: mean)")
    return figure


def plot_runs(args):
    rows = ledger.select(ledger.read_ledger(args.csv), args.script, args.where)
    rows = rows[rows["mean_ccc"].notna()]
    if rows.empty:
        raise ToolkitError(f"no run with a CCC in {args.csv} matches --script/--where: "
                           "choose runs that were scored")
    rows = rows.assign(label=ledger.run_labels(rows))
    rows = rows.sort_values(["label", "script", "time"], kind="stable")  # a setting's runs together
    scripts = list(dict.fromkeys(rows["script"]))
    # Horizontal bars, the first run on top: a run's label (its settings and folder) is
    # read beside its bar, as long as it is; slanted under vertical bars, labels ran
    # into each other and off the figure's left edge.
    names = [f"{textwrap.fill(label, RUN_LABEL_WIDTH)}\n{Path(str(folder)).name}"
             for label, folder in zip(rows["label"], rows["out_dir"])]
    lines = sum(name.count("\n") + 1 for name in names)
    figure = new_figure(9, 1.6 + 0.16 * lines + 0.2 * len(names))
    axis = figure.subplots()
    positions = np.arange(len(rows))[::-1]
    for index, script in enumerate(scripts):
        mine = (rows["script"] == script).to_numpy()
        axis.barh(positions[mine], rows["mean_ccc"][mine], 0.7,
                  xerr=rows["std_ccc"][mine].fillna(0), capsize=3, label=script,
                  color=f"C{index}", edgecolor="black", linewidth=0.5)
    axis.set_yticks(positions, names, fontsize=8)
    axis.set_ylim(-0.6, len(rows) - 0.4)
    axis.axvline(0, color="grey", linewidth=0.6)
    axis.grid(axis="x", alpha=0.3)
    axis.set_xlabel("mean CCC (bars: ± std)")
    outside_legend(figure)
    set_title(figure, args.title or f"Runs in {args.csv}, by the settings in which they differ")
    return figure


RUN_LABEL_WIDTH = 45  # characters of a run's settings per line, beside its bar


# ---------------------------------------------------------------- training curves

# metrics.csv's CCC of the mean of the last --average_last epochs' predictions (engine.py)
AVERAGE_COLUMN = "val_ccc_average"
TRAINING_SCRIPTS = "train.py, crossval.py or personalize.py"  # what writes metrics.csv


def read_metrics(folder):
    """A run's metrics.csv: epoch and train_loss in every row, val_ccc (NaN where the
    epoch was not evaluated, --eval_freq) and val_ccc_average (--average_last: in its
    last epochs only) where given."""
    path = Path(folder) / layout.METRICS
    if not path.is_file():
        raise ToolkitError(no_metrics(Path(folder)))
    table = read_csv(path, TRAINING_SCRIPTS)
    table = numeric_columns(table, path, ["epoch", "train_loss"], TRAINING_SCRIPTS)
    for column in ("val_ccc", AVERAGE_COLUMN):
        if column in table.columns:
            numbers = pd.to_numeric(table[column], errors="coerce")
            if (numbers.isna() & table[column].notna()).any():
                raise ToolkitError(f"{path}: column {column} is not numeric: pass a metrics.csv "
                                   "written by training")
            table[column] = numbers
    if "val_ccc" not in table.columns:
        raise ToolkitError(f"{path} has no column val_ccc: pass a metrics.csv written by "
                           "training")
    if table["val_ccc"].isna().all():
        raise ToolkitError(f"{path} has no validation CCC yet (no epoch was evaluated, see "
                           "--eval_freq): train further, or draw runs that were evaluated")
    return table.sort_values("epoch")


def no_metrics(folder):
    """Why `folder` is no run to draw, and which folders in it are."""
    if not folder.exists():
        return f"{folder} does not exist: give a folder that {TRAINING_SCRIPTS} trained a model in"
    inside = sorted(child.parent.name for child in folder.glob(f"*/{layout.METRICS}"))
    if not inside:
        return (f"{folder} has no {layout.METRICS}: give a folder that {TRAINING_SCRIPTS} trained "
                "a model in")
    return (f"{folder} has no {layout.METRICS}: it holds runs in {', '.join(inside[:4])}"
            f"{', ...' if len(inside) > 4 else ''}: give those folders")


def run_settings(folder):
    """The flags of the command that trained the run in `folder` (its args.json, or
    that of the folder above for a fold, seed or subject of a larger command); {}
    where there is none."""
    folder = Path(folder)
    parts = (layout.FOLD_PREFIX, layout.seed_dir("", "").name, layout.subject_dir("", "").name)
    above = [folder.absolute().parent] if folder.absolute().name.startswith(parts) else []
    for candidate in (folder, *above):
        record = candidate / layout.RUN_RECORD
        if record.is_file():
            try:
                settings = json.loads(record.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as error:
                raise ToolkitError(f"cannot read {record} ({str(error)[:80]}): restore it, or "
                                   "move it away to draw the run without its settings") from None
            return settings if isinstance(settings, dict) else {}
    return {}


def averaging_text(settings):
    """'--ema 0.99' or '--swa_start 30' (the validation CCC is the averaged weights'),
    or ''."""
    if settings.get("ema") is not None:
        return f"--ema {settings['ema']:g}"
    if settings.get("swa_start") is not None:
        return f"--swa_start {settings['swa_start']}"
    return ""


def draw_run(loss_axis, ccc_axis, table, colour, average_last=None):
    """One run's curves: loss, validation CCC (where evaluated), the best epoch starred
    and dotted, and the --average_last CCC dashed. Returns the legend's (handles,
    texts): the CCC line, the star and the dashed line (None without one)."""
    loss_axis.plot(table["epoch"], table["train_loss"], color=colour, linewidth=1.2)
    scored = table[table["val_ccc"].notna()]
    line, = ccc_axis.plot(scored["epoch"], scored["val_ccc"], color=colour, linewidth=1.2,
                          marker="o" if len(scored) <= 30 else None, markersize=3)
    best = scored.loc[scored["val_ccc"].idxmax()]  # the first of equals, as best.save's
    star, = ccc_axis.plot(best["epoch"], best["val_ccc"], marker="*", markersize=14,
                          color=colour, markeredgecolor="black", linestyle="none")
    for axis in (loss_axis, ccc_axis):
        axis.axvline(best["epoch"], color=colour, linewidth=0.8, linestyle=":")
    texts = [f"best epoch {best['epoch']:g} (CCC {best['val_ccc']:.3f})", None]
    averaged = (table.dropna(subset=[AVERAGE_COLUMN]) if AVERAGE_COLUMN in table.columns
                else table.iloc[:0])
    if averaged.empty:
        return [line, star, None], texts
    dashed, = ccc_axis.plot(averaged["epoch"], averaged[AVERAGE_COLUMN], color=colour,
                            linewidth=1.6, linestyle="--", marker="s", markersize=3)
    last = averaged.iloc[-1]
    count = average_last or len(averaged)
    texts[1] = (f"mean of the last {count} epochs' predictions: CCC "
                f"{last[AVERAGE_COLUMN]:.3f} at epoch {last['epoch']:g}")
    return [line, star, dashed], texts


def plot_curves(args):
    """Per run (metrics.csv): training loss (top) and validation CCC (bottom) per epoch,
    the best epoch starred as picked on validation, and with --average_last the CCC of
    the mean of the last epochs' predictions dashed. A run trained with --ema or
    --swa_start (its args.json) says so: its validation CCC is the averaged weights'."""
    # A run's metrics.csv stands for its folder.
    folders = [Path(folder).parent if Path(folder).name == layout.METRICS and Path(folder).is_file()
               else Path(folder) for folder in args.dir]
    labels = labels_for(folders, args.labels) if args.labels else folder_labels(folders)
    tables = [read_metrics(folder) for folder in folders]
    settings = [run_settings(folder) for folder in folders]
    one = len(tables) == 1
    figure = new_figure(8, 6)
    loss_axis, ccc_axis = figure.subplots(2, 1, sharex=True, height_ratios=[2, 3])
    handles, names = [], []
    for index, (table, label, flags) in enumerate(zip(tables, labels, settings)):
        (line, star, dashed), (best, average) = draw_run(
            loss_axis, ccc_axis, table, f"C{index % 10}", flags.get("average_last"))
        name = f"{label} ({averaging_text(flags)})" if averaging_text(flags) else label
        if one:
            handles += [line, star, *([dashed] if dashed else [])]
            names += [f"{name}: validation CCC", f"{best}, picked on validation",
                      *([f"--average_last, {average}"] if dashed else [])]
        else:
            handles.append(line)
            names.append(f"{name}: {best}" + (f"; {average}" if dashed else ""))
    if not one:  # what the stars and dashes of every run mean, said once
        handles.append(Line2D([], [], marker="*", markersize=12, color="grey",
                              markeredgecolor="black", linestyle="none"))
        names.append("star: the run's best epoch, picked on validation")
        if any(AVERAGE_COLUMN in table and table[AVERAGE_COLUMN].notna().any() for table in tables):
            handles.append(Line2D([], [], color="grey", linestyle="--"))
            names.append("dashed: CCC of the mean of the last epochs' predictions "
                         "(--average_last)")
    averaging = sorted({averaging_text(flags).split()[0] for flags in settings
                        if averaging_text(flags)})
    if averaging:
        handles.append(Line2D([], [], linestyle="none"))
        names.append(f"{' and '.join(averaging)}: the validation CCC is of the averaged weights")
    label_curve_axes(loss_axis, ccc_axis, tables)
    outside_legend(figure, handles, names)
    set_title(figure, args.title or ("Training curve" if one else "Training curves")
              + ": training loss and validation CCC per epoch")
    return figure


def folder_labels(folders):
    """Each run folder as given; several, from the folder above the one they share
    (cv/val_on_1, cv/val_on_2), so that long common paths do not crowd the legend."""
    if len(folders) == 1:
        return [str(folders[0])]
    paths = [Path(os.path.normpath(Path(folder).absolute())) for folder in folders]
    common = Path(os.path.commonpath(paths))
    return [str(path.relative_to(common.parent)) for path in paths]


def label_curve_axes(loss_axis, ccc_axis, tables):
    losses = pd.concat([table["train_loss"] for table in tables])
    if (losses > 0).all() and losses.max() > 10 * losses.min():
        loss_axis.set_yscale("log")  # a loss that falls by orders of magnitude
        loss_axis.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        loss_axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 0.05, not 5 x 10^-2
        loss_axis.yaxis.set_minor_formatter(NullFormatter())
    loss_axis.set_ylabel("training loss")
    ccc_axis.set_ylabel("validation CCC")
    ccc_axis.set_xlabel("epoch")
    if all((table["epoch"] % 1 == 0).all() for table in tables):
        ccc_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (loss_axis, ccc_axis):
        axis.grid(alpha=0.3)


PLOTS = {"predictions": plot_predictions, "epochs": plot_epochs,
         "subjects": plot_subjects, "stories": plot_stories, "runs": plot_runs,
         "curves": plot_curves}


# ---------------------------------------------------------------- tune.py studies

TUNE_PLOTS = ("history.png", "importances.png")


def plot_tune(args):
    """history.png (each finished trial's objective and the best so far) and
    importances.png (fANOVA importance of each searched setting), drawn by optuna's
    matplotlib visualization; needs two completed trials."""
    import warnings
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots
    from empathy import tuning
    if not MIN_DPI <= args.dpi <= MAX_DPI:
        raise ToolkitError(f"--dpi must be from {MIN_DPI} to {MAX_DPI}, got {args.dpi}")
    study = tuning.study_of(args.dir)
    completed = tuning.finished_trials(study, (TrialState.COMPLETE,))
    if len(completed) < 2:
        raise ToolkitError(f"{args.dir}: parameter importances need at least 2 completed "
                           f"trials, the study has {len(completed)}: run more trials")
    out_dir = Path(args.out_dir or args.dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        figures = [optuna_plots.plot_optimization_history(study).figure,
                   _importances(optuna_plots, study).figure]
    for figure, name in zip(figures, TUNE_PLOTS):
        figure.set_size_inches(9, 5.5)
        figure.set_layout_engine("constrained")  # room for long setting names
        save_png(figure, out_dir / name, args.dpi)
    return out_dir


def _importances(optuna_plots, study):
    try:
        return optuna_plots.plot_param_importances(study)
    except (ValueError, RuntimeError) as error:  # e.g. no setting varied between trials
        raise ToolkitError(f"parameter importances cannot be computed ({error})") from None


# ---------------------------------------------------------------- main

def main(args):
    if args.kind == "tune":
        return plot_tune(args)
    out = Path(args.out)
    check_out(out)
    if not MIN_DPI <= args.dpi <= MAX_DPI:
        raise ToolkitError(f"--dpi must be from {MIN_DPI} to {MAX_DPI}, got {args.dpi}")
    figure = PLOTS[args.kind](args)
    save_png(figure, out, args.dpi)
    return out


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
