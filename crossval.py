"""Cross-validate a fusion model (--model) across stories.

    python crossval.py --epochs 2000 --mods audio,text --out_dir cv_AT --save_freq 10
    python crossval.py --mods audio,text --out_dir cv_AT --test --test_epoch 1360
    python crossval.py --mods audio,text --out_dir cv_train --stories 2 4 5 8 \\
        --ensemble_dir data/Validation --choose_postprocessing

Training and validation videos are pooled; for each story, a model is trained with
that story held out, into <out_dir>/val_on_<story>/ (the files train.py writes).
Then each fold's best.save (or epoch_<--test_epoch>.save) is evaluated: held-out
predictions go to <out_dir>/cv_pred/, and <out_dir>/crossval.csv gets one row per
held-out story (train CCC, val CCC and the evaluated epoch; best.save's epoch is
picked on the held-out story itself) and rows Mean, Std and Mean-Std. Beside them,
last_ccc and last_epoch are each fold's last.save's (the last epoch, with the
averaged weights of --ema/--swa_start): nothing is picked there, so that is the
number to report. With --seeds N each fold trains N seeds (val_on_<story>/seed_<s>/);
the CCC is that of their average prediction, and columns add the mean and std of
the seeds' own CCC.

--ensemble_dir DIR: every fold's model predicts the videos of DIR, which no fold
holds, and the mean of their per-second predictions (a fold ensemble) is written
to <out_dir>/ensemble_pred/ and scored beside each fold's model (ensemble.csv).
--choose_postprocessing: the folds' held-out predictions of last.save are re-scored
under candidate post-processing; the best mean over folds goes to
<out_dir>/postprocessing.json, which train.py and personalize.py take with
--postprocessing_from. Folds run side by side with --jobs N, or on a Dask cluster
with --scheduler ADDRESS.
"""
import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from empathy import (command, datasets, layout, ledger, options, parallel, postprocessing,
                     tables, utils)
from empathy.utils import ToolkitError

# imported on first use: --help loads no torch


def get_args_parser():
    parser = argparse.ArgumentParser(
        "crossval.py", description="Cross-validate a fusion model across stories.",
        parents=[options.get_data_args_parser(), options.get_training_args_parser(),
                 options.get_model_args_parser(), options.get_fold_args_parser(),
                 ledger.get_ledger_args_parser()])
    group = parser.add_argument_group("what to run")
    group.add_argument("--test", action="store_true",
                       help="evaluate the saved folds without training")
    group.add_argument("--test_epoch", type=int, metavar="N",
                       help="evaluate epoch_<N>.save of every fold instead of best.save")
    group.add_argument("--features", action="store_true",
                       help="write each fold's decision-level features to "
                            "val_on_<story>/feat_train and feat_test")
    group.add_argument("--overwrite", action="store_true",
                       help="retrain folds that already hold a run")
    group.add_argument("--ensemble_dir", metavar="DIR",
                       help="a split folder of videos that no fold holds (e.g. data/Validation "
                            "with --stories 2 4 5 8): every fold's model (last.save, or "
                            "epoch_<--test_epoch>.save) predicts them, and the mean of their "
                            "per-second predictions, a fold ensemble (nothing is chosen on "
                            "these videos), goes to <out_dir>/ensemble_pred/; its CCC and each "
                            "fold model's go to <out_dir>/ensemble.csv")
    group.add_argument("--choose_postprocessing", action="store_true",
                       help="re-score the folds' held-out predictions of last.save under "
                            "candidate post-processing (none, --smooth 2 to 20 s, --lowpass "
                            "0.002 to 0.05 Hz, each with and without --calibrate); every "
                            "candidate's mean +- std over folds goes to "
                            "<out_dir>/postprocessing_candidates.csv, the best mean to "
                            "<out_dir>/postprocessing.json, for --postprocessing_from")
    return parser


def check_test_epoch(test_epoch, settings):
    if test_epoch is not None and (test_epoch % settings.save_freq or test_epoch > settings.epochs):
        raise ToolkitError(f"--test_epoch {test_epoch} will not be saved: pick a multiple of "
                           f"--save_freq {settings.save_freq} up to --epochs")


def load_ensemble_videos(folder, pooled, subjects=None):
    """The videos of --ensemble_dir (`subjects`' only, if given): with the folds'
    modalities and widths, and of stories that no fold holds (the ensemble is
    scored on videos none of its models trained on). A folder without annotations
    is predicted, not scored."""
    if not Path(folder).is_dir():
        raise ToolkitError(f"--ensemble_dir {folder} does not exist: give a split folder of "
                           "videos that are in no fold, e.g. data/Validation with --stories "
                           "2 4 5 8")
    for mod in pooled.mods:
        if not (Path(folder) / datasets.MODALITY_FOLDERS[mod]).is_dir():
            raise ToolkitError(f"--ensemble_dir {folder} has no {datasets.MODALITY_FOLDERS[mod]} "
                               f"folder: the folds' models read --mods {','.join(pooled.mods)}")
    videos = datasets.load_videos(folder, pooled.mods, unlabelled=True)
    for mod, width in videos.input_dims.items():
        if width != pooled.input_dims[mod]:
            raise ToolkitError(f"--ensemble_dir {folder}: its {mod} features have {width} "
                               f"columns, the folds' {pooled.input_dims[mod]}: give a folder of "
                               "the same features")
    shared = sorted(set(videos.stories) & set(pooled.stories))
    if shared:
        raise ToolkitError(f"--ensemble_dir {folder} holds story {shared[0]}, which the folds "
                           f"hold too ({layout.fold_name(shared[0])}): an ensemble is scored on "
                           "videos none of its models trained on; leave the story out of "
                           "--stories, or give another folder")
    videos = videos.select(subjects=subjects)
    if not len(videos):
        raise ToolkitError(f"--ensemble_dir {folder} has no video of --subjects "
                           f"{' '.join(map(str, subjects))}")
    return videos


def check_last_checkpoints(out_dir, stories, flag):
    """Every fold's last.save, which `flag` needs, exists (checked before any write)."""
    from empathy import checkpoints
    for story in stories:
        for path in checkpoints.run_checkpoints(layout.fold_dir(out_dir, story), layout.LAST):
            if not path.is_file():
                raise ToolkitError(f"{flag}: {path} does not exist (it holds the fold's last "
                                   "epoch): train the folds with crossval.py first, or "
                                   "--resume them")


def saved_checkpoints(args, out_dir, stories, checkpoint):
    """--test: the checkpoints to evaluate (each fold's first seed's, for the check
    before writing), every one asked for checked to exist; a last.save that no
    flag needs may be missing (a fold copied without it): its columns are NaN."""
    from empathy import checkpoints
    checkpoints.check_fold_checkpoints(out_dir, stories, [args.test_epoch])
    if args.choose_postprocessing:
        check_last_checkpoints(out_dir, stories, "--choose_postprocessing")
    if args.ensemble_dir and args.test_epoch is None:
        check_last_checkpoints(out_dir, stories, "--ensemble_dir")
    evaluated = []
    for story in stories:
        for name in (checkpoint, layout.LAST):
            paths = checkpoints.run_checkpoints(layout.fold_dir(out_dir, story), name)
            if paths[0].is_file() and paths[0] not in evaluated:
                evaluated.append(paths[0])
    return evaluated


# ---------------------------------------------------------------- one fold

def train_fold(pooled, story, out_dir, run):
    """Train the fold that holds out `story` (every seed, options.RunOptions `run`);
    returns fit()'s summaries."""
    from empathy import engine
    device = run.device
    train_set, val_set = datasets.fold_sets(pooled, story)
    scaler = datasets.FeatureScaler.fit(train_set) if run.normalize else None
    return engine.fit_seeds(lambda: run.settings.new_model(pooled.input_dims, device),
                            train_set.with_scaler(scaler), val_set.with_scaler(scaler),
                            layout.fold_dir(out_dir, story), run, device)


def load_fold(train_set, folder, checkpoint, run, evaluated=()):
    """A fold's saved models `checkpoint` (one per seed) and the post-processing to
    evaluate them with."""
    from empathy import checkpoints, engine
    return engine.load_for_evaluation(checkpoints.run_checkpoints(folder, checkpoint), train_set,
                                      run.normalize, run.postprocessing_flags, run.device,
                                      evaluated)


def predict_average(trained, video_set, run):
    """Per-second predictions of every video: the mean of the seeds' models'."""
    from empathy import engine
    per_seed = [engine.predict(model.network, video_set.with_scaler(model.scaler), run.device,
                               precision=run.settings.precision) for model in trained]
    return [np.mean(rows, axis=0) for rows in zip(*per_seed)]


def epoch_of(trained):
    """The epoch of a fold's models: one number, or each seed's where they differ."""
    epochs = [model.checkpoint.get("epoch") for model in trained]
    return epochs[0] if len(set(epochs)) == 1 else " ".join(map(str, epochs))


def evaluate_fold(pooled, story, out_dir, checkpoint, run, features=False):
    """Evaluate a fold's checkpoint (every seed's) on its training and held-out videos,
    write the held-out predictions to <out_dir>/cv_pred/ (and features if asked);
    then its last.save (`last_columns`)."""
    from empathy import engine
    device, precision = run.device, run.settings.precision
    train_set, val_set = datasets.fold_sets(pooled, story)
    folder = layout.fold_dir(out_dir, story)
    trained, saved = load_fold(train_set, folder, checkpoint, run, [val_set])
    train_result = engine.evaluate_seeds(trained, train_set, device, saved, precision)
    val_result = engine.evaluate_seeds(trained, val_set, device, saved, precision)
    utils.write_predictions(Path(out_dir) / layout.CV_PREDICTIONS, val_set.videos,
                            val_result["frames"])
    if features:
        engine.extract_features(trained, train_set, val_set, folder, device, saved.label_delay,
                                precision)
    row = {"story": story, "train_ccc": train_result["ccc"], "val_ccc": val_result["ccc"]}
    if len(trained) > 1:
        row.update(tables.seed_columns("val_ccc", val_result["seed_ccc"]))
    return {**row, "val_epoch": epoch_of(trained), **last_columns(train_set, val_set, folder, run)}


def last_columns(train_set, val_set, folder, run):
    """The columns of the fold's last.save (tables.FOLD_COLUMNS), where nothing is
    picked on the held-out story: its CCC there (of the averaged weights with --ema
    or --swa_start: last.save's "model") and its epoch; NaN for a fold without one.
    With --average_last, "average_last_ccc" is that of the mean of the last epochs'
    predictions that last.save keeps."""
    from empathy import checkpoints, engine
    if not all(path.is_file() for path in checkpoints.run_checkpoints(folder, layout.LAST)):
        return {"last_ccc": np.nan, "last_epoch": ""}
    last, saved = load_fold(train_set, folder, layout.LAST, run)
    scored = postprocessing.score_videos(val_set.videos, predict_average(last, val_set, run), saved)
    columns = {"last_ccc": scored["ccc"], "last_epoch": epoch_of(last)}
    kept = engine.kept_averages(last, val_set)
    if kept is not None:
        columns["average_last_ccc"] = postprocessing.score_videos(val_set.videos, kept,
                                                                  saved)["ccc"]
    return columns


def run_fold(pooled, story, out_dir, run, checkpoint, features, test_only):
    """Train a fold (unless `test_only`), then evaluate its `checkpoint`."""
    if not test_only:
        train_fold(pooled, story, out_dir, run)
    return evaluate_fold(pooled, story, out_dir, checkpoint, run, features)


# ---------------------------------------------------------------- the fold ensemble

def fold_ensemble(pooled, videos, out_dir, checkpoint, run):
    """Every fold's models `checkpoint` predict `videos`; the ensemble is the mean of
    the folds' per-second predictions. Returns (table: each fold model's CCC on the
    videos, their mean and the ensemble's; the ensemble's 25 fps predictions).

    Each fold model is scored with its own post-processing. The ensemble averages
    raw per-second predictions and is post-processed once, as the folds are, with
    the listener statistics of the pooled videos (every fold's training videos, what
    the ensemble as a whole learnt from): averaging calibrated predictions instead
    would shrink each listener's spread below what calibration sets."""
    rows, per_fold = [], []
    for story in pooled.stories:
        train_set, _ = datasets.fold_sets(pooled, story)
        trained, saved = load_fold(train_set, layout.fold_dir(out_dir, story), checkpoint, run,
                                   [videos])
        per_fold.append(predict_average(trained, videos, run))
        own = postprocessing.unscored(postprocessing.score_videos(
            videos.videos, per_fold[-1], saved), videos.videos)
        rows.append({"model": layout.fold_name(story), "epoch": epoch_of(trained),
                     "ccc": own["ccc"]})
    mean = [np.mean(rows_of_video, axis=0) for rows_of_video in zip(*per_fold)]
    together = saved.with_listener_stats(pooled.videos) if saved.calibrate else saved
    ensemble = postprocessing.unscored(postprocessing.score_videos(videos.videos, mean, together),
                                       videos.videos)
    table = tables.with_summary_rows(pd.DataFrame(rows), "model", ["ccc"], rows=("Mean",))
    table.loc[len(table)] = {"model": "ensemble", "epoch": "", "ccc": ensemble["ccc"]}
    return table, ensemble["frames"]


# ---------------------------------------------------------------- post-processing

def choose_postprocessing(pooled, out_dir, run):
    """Re-score every fold's held-out predictions of last.save under each candidate
    (postprocessing.candidates); returns (the candidates' table, the choice's record)."""
    from empathy import engine
    folds = {}
    for story in pooled.stories:
        train_set, val_set = datasets.fold_sets(pooled, story)
        last, saved = load_fold(train_set, layout.fold_dir(out_dir, story), layout.LAST, run)
        # what the fold reports: with --average_last, the mean of its last epochs' predictions
        held_out = engine.kept_averages(last, val_set) or predict_average(last, val_set, run)
        folds[story] = (train_set.videos, val_set.videos, held_out)
    scored, best = postprocessing.compare_candidates(folds, saved.label_delay)
    spreads = [tables.spread(pd.Series(scores.values(), dtype=float)) for _, scores in scored]
    table = pd.DataFrame([
        {"candidate": postprocessing.as_flags(candidate), "smooth": candidate.smooth,
         "lowpass": candidate.lowpass, "calibrate": candidate.calibrate,
         "mean_ccc": spread.mean, "std_ccc": spread.std,
         **{layout.fold_name(story): value for story, value in scores.items()},
         "chosen": "*" if index == best else ""}
        for index, ((candidate, scores), spread) in enumerate(zip(scored, spreads))])
    chosen, scores = scored[best]
    record = postprocessing.choice_record(chosen, scores, pooled.mods, last[0].scaler is not None,
                                          pooled.stories, pooled.subjects)
    return table, record


# ---------------------------------------------------------------- main

def main(args):
    mods = datasets.parse_mods(args.mods)
    settings = options.TrainingSettings.from_args(args)
    out_dir = Path(args.out_dir)
    checkpoint = layout.checkpoint_name(args.test_epoch)
    runner = parallel.Runner.from_args(args)
    pooled = datasets.load_pool(args.train_dir, args.test_dir, mods, args.stories, args.subjects)
    ensemble_videos = (load_ensemble_videos(args.ensemble_dir, pooled, args.subjects)
                       if args.ensemble_dir else None)
    runs, evaluated = [], []
    if args.test:
        evaluated = saved_checkpoints(args, out_dir, pooled.stories, checkpoint)
    else:
        check_test_epoch(args.test_epoch, settings)
        runs = [seed_run for story in pooled.stories
                for seed_run in settings.seed_runs(layout.fold_dir(out_dir, story))]
    plan = options.Plan(outputs=[(out_dir, "--out_dir")],
                        options=options.RunOptions.from_args(args, settings, runner=runner),
                        data=pooled, trains=not args.test, evaluated=evaluated, runner=runner)
    with command.Command(args, plan, out_dir, runs, record=None if args.test else
                         layout.RUN_RECORD) as run:
        pooled_for_tasks = datasets.pool_for_tasks(pooled, runner, args.train_dir, args.test_dir,
                                                   args.stories, args.subjects)
        tasks = [dict(pooled=pooled_for_tasks, story=story, out_dir=runner.path(out_dir), run=run,
                      checkpoint=checkpoint, features=args.features, test_only=args.test)
                 for story in pooled.stories]
        table = tables.crossval_table(runner.run(run_fold, tasks, "folds"))
        utils.write_csv(table, out_dir / layout.CROSSVAL_TABLE)
        print_crossval(table, checkpoint)
        if ensemble_videos is not None:
            write_ensemble(pooled, ensemble_videos, out_dir, args, run)
        if args.choose_postprocessing:
            write_choice(pooled, out_dir, run)
    return table


# ---------------------------------------------------------------- outputs

def print_crossval(table, checkpoint):
    """The table, with what was picked on the held-out stories and what was not."""
    print(f"cross-validation of {checkpoint} per held-out story:")
    print(utils.format_table(table))
    picked = ("the epoch with the best CCC on the held-out story itself: picked on the "
              "held-out story, not a number to report" if checkpoint == layout.BEST else
              "the same epoch in every fold: picked on the held-out stories if it was chosen "
              "by looking at them (cv_epochs.py)")
    print(f"val_ccc, val_epoch: {checkpoint}, {picked}")
    print("last_ccc, last_epoch: last.save, the last epoch (the averaged weights with --ema or "
          "--swa_start): nothing picked on the held-out story")
    if "average_last_ccc" in table:
        print("average_last_ccc: the mean of the last --average_last epochs' predictions that "
              "last.save keeps: nothing picked on the held-out story")


def write_ensemble(pooled, videos, out_dir, args, run):
    """The fold ensemble on --ensemble_dir: predictions, table, and what it printed."""
    checkpoint = layout.LAST if args.test_epoch is None else layout.checkpoint_name(args.test_epoch)
    table, frames = fold_ensemble(pooled, videos, out_dir, checkpoint, run)
    utils.write_predictions(out_dir / layout.ENSEMBLE_PREDICTIONS, videos.videos, frames)
    utils.write_csv(table, out_dir / layout.ENSEMBLE_TABLE)
    print(f"fold ensemble on {args.ensemble_dir} ({len(videos)} videos): each fold's "
          f"{checkpoint}, and the mean of their per-second predictions (nothing chosen on "
          "these videos):")
    print(utils.format_table(table))
    if table["ccc"].isna().all():
        print(f"the videos of {args.ensemble_dir} have no annotations (or constant ones): "
              "predictions written, no CCC")
    print(f"ensemble predictions in {out_dir / layout.ENSEMBLE_PREDICTIONS}, table in "
          f"{out_dir / layout.ENSEMBLE_TABLE}")


def write_choice(pooled, out_dir, run):
    """--choose_postprocessing: every candidate, and the choice, written and printed."""
    table, record = choose_postprocessing(pooled, out_dir, run)
    utils.write_csv(table, out_dir / layout.POSTPROCESSING_CANDIDATES)
    utils.write_json(record, out_dir / layout.POSTPROCESSING_CHOICE)
    print("post-processing of the folds' held-out predictions of last.save, CCC mean +- std "
          "over folds:")
    for row in table.itertuples():
        print(f"  {row.candidate:<28} {row.mean_ccc:.4f} +- {row.std_ccc:.4f}"
              f"{'   <- chosen (best mean)' if row.chosen else ''}")
    print(f"chosen: {record['flags']} (CV {record['cv_mean']:.4f} +- {record['cv_std']:.4f}), in "
          f"{out_dir / layout.POSTPROCESSING_CHOICE}; train.py and personalize.py take it with "
          f"--postprocessing_from {out_dir}")


if __name__ == "__main__":
    ledger.run_cli(main, get_args_parser(), tables.crossval_results)
