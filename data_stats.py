"""Describe the annotations (and features) of split folders: a first look at a dataset.

    python data_stats.py data/Training data/Validation
    python data_stats.py data/Training data/Validation --mods audio,text --out stats.csv

How much do listeners agree on the same story, how step-like are the annotations,
how much do videos and listeners differ, how slowly does valence change, and how
strongly does the best single feature follow it? Prints one row per statistic
(mean, median, min and max over what it is computed on) and writes them to --out.
The folders are pooled; a video whose annotation is constant (the dummy annotations
of a test split) is left out and counted.
"""
import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from empathy import datasets, layout, utils
from empathy.utils import FPS, ToolkitError

GRIDS = (0.1, 0.05, 0.025, 0.02, 0.01, 0.005, 0.001)  # coarsest first
COLUMNS = ["statistic", "over", "count", "mean", "median", "min", "max"]


def get_args_parser():
    parser = argparse.ArgumentParser(
        "data_stats.py", description="Describe the annotations and features of split folders.")
    parser.add_argument("split_dirs", nargs="+", metavar="SPLIT_DIR",
                        help="split folders holding Annotations/ (pooled)")
    parser.add_argument("--mods", default="",
                        help="modalities whose best single feature to correlate with valence, "
                             "e.g. audio,text (default: none; reading 4096-d features takes a while)")
    parser.add_argument("--out", default="data_stats.csv",
                        help="CSV to write the table to (default: %(default)s)")
    return parser


# ---------------------------------------------------------------- loading

def load_annotations(split_dirs):
    """{(subject, story): 25 fps annotation} of the pooled folders, and how many
    constant (dummy) annotations were left out."""
    for split_dir in split_dirs:
        folder = Path(split_dir) / datasets.ANNOTATION_FOLDER
        if not folder.is_dir():
            raise ToolkitError(f"{folder} does not exist: give split folders that hold "
                               "Annotations/ (e.g. data/Training)")
    annotations, constant = {}, 0
    for key, path in datasets.annotation_files(split_dirs).items():
        values = datasets.read_annotation(path)
        if np.ptp(values) == 0:
            constant += 1
            continue
        annotations[key] = values.astype(np.float64)
    if not annotations:
        raise ToolkitError(f"no annotation that varies in {', '.join(map(str, split_dirs))}: "
                           "give folders with real annotations (a test split's are dummies)")
    return annotations, constant


# ---------------------------------------------------------------- statistics

def summary_row(statistic, over, values):
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return {"statistic": statistic, "over": over, "count": 0}
    return {"statistic": statistic, "over": over, "count": values.size, "mean": values.mean(),
            "median": np.median(values), "min": values.min(), "max": values.max()}


def by_story(annotations):
    """{story: {subject: annotation}} for stories annotated by two or more listeners,
    each cut to the story's shortest annotation (recordings differ by a few frames)."""
    stories = {}
    for (subject, story), values in annotations.items():
        stories.setdefault(story, {})[subject] = values
    shared = {}
    for story, listeners in stories.items():
        if len(listeners) > 1:
            length = min(values.size for values in listeners.values())
            shared[story] = {subject: values[:length] for subject, values in listeners.items()}
    return shared


def pairwise_agreement(story_listeners):
    """Mean CCC over every pair of listeners of one story."""
    return np.mean([utils.ccc(a, b) for a, b in
                    itertools.combinations(story_listeners.values(), 2)])


def others_agreement(story_listeners):
    """Mean over listeners of the CCC of the other listeners' mean against them."""
    series = np.stack(list(story_listeners.values()))
    total = series.sum(axis=0)
    return np.mean([utils.ccc((total - own) / (len(series) - 1), own) for own in series])


def value_grid(all_values):
    """The coarsest step (from GRIDS) on which every value lies, or None."""
    for step in GRIDS:
        if np.allclose(all_values / step, np.round(all_values / step), rtol=0, atol=1e-3):
            return step
    return None


def autocorrelation_half_life(series):
    """Seconds until the autocorrelation of a per-second series falls below 0.5
    (its length if it never does; NaN for a constant series)."""
    centred = series - series.mean()
    energy = float(centred @ centred)
    if energy == 0:
        return np.nan
    for lag in range(1, centred.size):
        if float(centred[:-lag] @ centred[lag:]) / energy < 0.5:
            return float(lag)
    return float(centred.size)


def annotation_statistics(annotations):
    """The rows of the table that need annotations only."""
    videos = list(annotations.values())
    all_values = np.concatenate(videos)
    stories = by_story(annotations)
    listeners = {}
    for (subject, _), values in annotations.items():
        listeners.setdefault(subject, []).append(values)
    changes = sum(int(np.count_nonzero(np.diff(values))) for values in videos)
    grid = value_grid(all_values)
    listener_means = [np.mean([values.mean() for values in own]) for own in listeners.values()]
    rows = [
        summary_row("pairwise CCC of two listeners on the same story (mean per story)",
                    "stories", [pairwise_agreement(s) for s in stories.values()]),
        summary_row("CCC of the other listeners' mean against one listener (mean per story)",
                    "stories", [others_agreement(s) for s in stories.values()]),
        summary_row("fraction of 25 fps frames that differ from the previous frame", "frames",
                    [changes / sum(values.size - 1 for values in videos)]),
        summary_row(f"value grid step ({'continuous' if grid is None else f'{grid:g}'})",
                    "frames", [np.nan if grid is None else grid]),
        summary_row("fraction of frames exactly 0", "frames", [np.mean(all_values == 0)]),
        summary_row("per-video standard deviation", "videos", [values.std() for values in videos]),
        summary_row("per-video mean", "videos", [values.mean() for values in videos]),
        summary_row("per-listener mean over their videos", "listeners", listener_means),
        summary_row("sd of the per-listener means across listeners", "listeners",
                    [np.std(listener_means)]),
        summary_row("per-listener standard deviation (all their frames)", "listeners",
                    [np.concatenate(own).std() for own in listeners.values()]),
        summary_row("autocorrelation of the per-second series falls below 0.5 after (s)",
                    "videos", [autocorrelation_half_life(datasets.per_second(values))
                               for values in videos]),
        summary_row("story length (s)", "videos", [values.size / FPS for values in videos]),
    ]
    return rows


def feature_statistics(split_dirs, mods, annotations):
    """Per modality: the Pearson r with the per-second valence, per video, of the
    one feature that follows valence best over all videos pooled."""
    video_set = datasets.load_videos(list(split_dirs), mods)
    targets = video_set.targets.numpy().astype(np.float64)  # the per-second valence
    videos = [(v.start, v.labelled_seconds) for v in video_set.videos
              if (v.subject, v.story) in annotations]
    rows = []
    for mod in mods:
        storage = video_set.features[mod].numpy()
        per_video = [(storage[start:start + length].astype(np.float64),
                      targets[start:start + length]) for start, length in videos]
        features = np.concatenate([video_rows for video_rows, _ in per_video])
        target = np.concatenate([valence for _, valence in per_video])
        best = int(np.nanargmax(np.abs(_pearson_columns(features, target))))
        per_video_r = [_pearson_columns(video_rows[:, [best]], valence)[0]
                       for video_rows, valence in per_video]
        rows.append(summary_row(f"Pearson r of the best single {mod} feature (column {best}) "
                                "with valence, per video", "videos", per_video_r))
    return rows


def _pearson_columns(features, target):
    """Pearson r of every column with `target` (NaN for a constant column)."""
    centred = features - features.mean(axis=0)
    target = target - target.mean()
    scale = np.sqrt((centred ** 2).sum(axis=0) * (target @ target))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, (centred.T @ target) / scale, np.nan)


# ---------------------------------------------------------------- main

def main(args):
    mods = datasets.parse_mods(args.mods) if args.mods.strip() else []
    out = Path(args.out)
    layout.check_output_folder(out, "--out")  # never over an annotation or feature file
    if out.is_dir():
        raise ToolkitError(f"--out {out} is a folder: give the CSV file to write, e.g. "
                           f"{out / 'data_stats.csv'}")
    annotations, constant = load_annotations(args.split_dirs)
    rows = annotation_statistics(annotations)
    if mods:
        rows += feature_statistics(args.split_dirs, mods, annotations)
    table = pd.DataFrame(rows, columns=COLUMNS)
    utils.check_writable(out.parent)
    utils.write_csv(table, out)
    subjects = {subject for subject, _ in annotations}
    stories = {story for _, story in annotations}
    print(f"{len(annotations)} annotated videos ({len(subjects)} listeners, {len(stories)} "
          f"stories) in {', '.join(map(str, args.split_dirs))}"
          + (f"; {constant} constant (dummy) annotations left out" if constant else ""))
    print(utils.format_table(table))
    print(f"table written to {out}")
    return table


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
