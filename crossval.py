"""Cross-validate a fusion model (--model) across stories.

    python crossval.py --epochs 2000 --mods audio,text --out_dir cv_AT --save_freq 10
    python crossval.py --mods audio,text --out_dir cv_AT --test --test_epoch 1360

Training and validation videos are pooled; for each story, a model is trained with
that story held out, into <out_dir>/val_on_<story>/ (the files train.py writes).
Then each fold's best.save (or epoch_<--test_epoch>.save) is evaluated: held-out
predictions go to <out_dir>/cv_pred/, and <out_dir>/crossval.csv gets one row per
held-out story (train CCC, val CCC) and rows Mean, Std and Mean-Std. With --seeds N
each fold trains N seeds (val_on_<story>/seed_<s>/); the CCC is that of their
average prediction, and columns add the mean and std of the seeds' own CCC.
Folds run side by side with --jobs N, or on a Dask cluster with --scheduler ADDRESS.
"""
import argparse
from pathlib import Path

import numpy as np

import datasets
import options
import parallel
import runs
import utils
from utils import LazyModule, ToolkitError

engine = LazyModule("engine")  # imported on first use: --help loads no torch


def get_args_parser():
    parser = argparse.ArgumentParser(
        "crossval.py", description="Cross-validate a fusion model across stories.",
        parents=[options.get_data_args_parser(), options.get_training_args_parser(),
                 options.get_model_args_parser(), options.get_fold_args_parser(),
                 runs.get_ledger_args_parser()])
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
    return parser


def check_test_epoch(test_epoch, settings):
    if test_epoch is not None and (test_epoch % settings.save_freq or test_epoch > settings.epochs):
        raise ToolkitError(f"--test_epoch {test_epoch} will not be saved: pick a multiple of "
                           f"--save_freq {settings.save_freq} up to --epochs")


# ---------------------------------------------------------------- one fold

def train_fold(pooled, story, out_dir, run):
    """Train the fold that holds out `story` (every seed, options.RunOptions `run`);
    returns fit()'s summaries."""
    device = run.device
    train_set, val_set = datasets.fold_sets(pooled, story)
    scaler = datasets.FeatureScaler.fit(train_set) if run.normalize else None
    return engine.fit_seeds(lambda: run.settings.new_model(pooled.input_dims, device),
                            train_set.with_scaler(scaler), val_set.with_scaler(scaler),
                            runs.fold_dir(out_dir, story), run, device)


def evaluate_fold(pooled, story, out_dir, checkpoint, run, features=False):
    """Evaluate a fold's checkpoint (every seed's) on its training and held-out videos,
    write the held-out predictions to <out_dir>/cv_pred/ (and features if asked)."""
    device, precision = run.device, run.settings.precision
    train_set, val_set = datasets.fold_sets(pooled, story)
    folder = runs.fold_dir(out_dir, story)
    trained, saved = engine.load_for_evaluation(runs.run_checkpoints(folder, checkpoint),
                                                train_set, run.normalize,
                                                run.postprocessing_flags, device, [val_set])
    train_result = engine.evaluate_seeds(trained, train_set, device, saved, precision)
    val_result = engine.evaluate_seeds(trained, val_set, device, saved, precision)
    utils.write_predictions(Path(out_dir) / runs.CV_PREDICTIONS, val_set.videos,
                            val_result["frames"])
    if features:
        engine.extract_features(trained, train_set, val_set, folder, device, saved.label_delay,
                                precision)
    row = {"story": story, "train_ccc": train_result["ccc"], "val_ccc": val_result["ccc"],
           "epoch": trained[0].checkpoint.get("epoch")}
    if len(trained) > 1:
        row.update(val_ccc_seed_mean=np.mean(val_result["seed_ccc"]),
                   val_ccc_seed_std=np.std(val_result["seed_ccc"]))
    return row


def run_fold(pooled, story, out_dir, run, checkpoint, features, test_only):
    """Train a fold (unless `test_only`), then evaluate its `checkpoint`."""
    if not test_only:
        train_fold(pooled, story, out_dir, run)
    return evaluate_fold(pooled, story, out_dir, checkpoint, run, features)


# ---------------------------------------------------------------- main

def main(args):
    mods = datasets.parse_mods(args.mods)
    settings = options.TrainingSettings.from_args(args)
    out_dir = Path(args.out_dir)
    checkpoint = runs.checkpoint_name(args.test_epoch)
    runner = parallel.Runner.from_args(args)
    pooled = datasets.load_pool(args.train_dir, args.test_dir, mods, args.stories, args.subjects)
    folders = [folder for story in pooled.stories
               for _, folder in settings.seed_runs(runs.fold_dir(out_dir, story))]
    evaluated = []
    if args.test:
        runs.check_fold_checkpoints(out_dir, pooled.stories, [args.test_epoch])
        evaluated = [paths[0] for story in pooled.stories
                     if (paths := runs.run_checkpoints(runs.fold_dir(out_dir, story), checkpoint))]
        resumes = {}
    else:
        check_test_epoch(args.test_epoch, settings)
        resumes = runs.check_fresh_runs(folders, args.resume, args.overwrite)
    run = options.RunOptions.from_args(args, settings, resumes, runner)
    resumed = [resumed_run for story in pooled.stories  # every fold trains on some of pooled
               for resumed_run in run.resumed_runs(runs.fold_dir(runner.path(out_dir), story))]
    options.check_before_writing(options.Plan(
        outputs=[(out_dir, "--out_dir")], options=run, data=pooled, trains=not args.test,
        resumed=resumed, evaluated=evaluated, runner=runner))
    with runs.owned(out_dir):
        if not args.test:
            runs.check_fresh_runs(folders, args.resume, args.overwrite)  # none began meanwhile
            runs.write_run_record(args, out_dir)
        pooled_for_tasks = datasets.pool_for_tasks(pooled, runner, args.train_dir, args.test_dir,
                                                   args.stories, args.subjects)
        tasks = [dict(pooled=pooled_for_tasks, story=story, out_dir=runner.path(out_dir), run=run,
                      checkpoint=checkpoint, features=args.features, test_only=args.test)
                 for story in pooled.stories]
        table = runs.crossval_table(runner.run(run_fold, tasks, "folds"))
        utils.write_csv(table, out_dir / runs.CROSSVAL_TABLE)
    print(f"cross-validation of {checkpoint} per held-out story:")
    print(utils.format_table(table))
    return table


if __name__ == "__main__":
    runs.run_cli(main, get_args_parser(), runs.crossval_results)
