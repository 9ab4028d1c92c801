"""Cross-validate the fusion LSTM across stories.

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
import parallel
import runs
import train
import utils
from utils import ToolkitError


def get_fold_args_parser():
    """Flags of every script that works on cross-validation folds."""
    parser = argparse.ArgumentParser(add_help=False,
                                     parents=[parallel.get_parallel_args_parser("run folds")])
    group = parser.add_argument_group("folds")
    group.add_argument("--out_dir", default="./cv_out",
                       help="folder of the folds val_on_<story>/ (default: %(default)s)")
    group.add_argument("--stories", type=int, nargs="+", metavar="STORY",
                       help="keep only these stories (default: all in both folders)")
    group.add_argument("--subjects", type=int, nargs="+", metavar="S",
                       help="keep only these subjects (default: all)")
    return parser


def get_args_parser():
    parser = argparse.ArgumentParser(
        "crossval.py", description="Cross-validate the fusion LSTM across stories.",
        parents=[train.get_data_args_parser(), train.get_training_args_parser(),
                 train.get_model_args_parser(), get_fold_args_parser(),
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


# ---------------------------------------------------------------- folds

def load_pool(train_dir, test_dir, mods, stories=None, subjects=None):
    """Training and validation videos pooled, restricted to `stories`/`subjects`."""
    pooled = datasets.load_videos([train_dir, test_dir], mods)
    if stories:
        datasets.check_known("story", stories, pooled.stories, "--stories")
    if subjects:
        datasets.check_known("subject", subjects, pooled.subjects, "--subjects")
    pooled = pooled.select(stories=stories, subjects=subjects)
    if len(pooled.stories) < 2:
        raise ToolkitError("cross-validation needs at least two stories: widen --stories")
    return pooled


def pool_for_tasks(pooled, args, runner):
    """The pooled videos as fold tasks get them from `runner` (parallel.Runner)."""
    return runner.data(pooled, load_pool, train_dir=Path(args.train_dir),
                       test_dir=Path(args.test_dir), mods=pooled.mods, stories=args.stories,
                       subjects=args.subjects)


def fold_sets(pooled, story):
    """(training videos, held-out videos) of the fold that holds out `story`."""
    return pooled.select(exclude_stories=[story]), pooled.select(stories=[story])


def check_checkpoints(out_dir, stories, epochs=(None,)):
    """Every fold must hold every checkpoint asked for, before any work starts."""
    for story in stories:
        for epoch in epochs:
            for path in runs.run_checkpoints(runs.fold_dir(out_dir, story),
                                             runs.checkpoint_name(epoch)):
                if not path.is_file():
                    saved = runs.saved_epochs(path.parent)
                    listing = (f"saved epochs: {_ranges(saved)}" if saved
                               else "run crossval.py without --test first")
                    raise ToolkitError(f"{path} does not exist ({listing})")


def _ranges(epochs):
    """[10, 20, 30, 50] -> '10-30 every 10, 50' (short lists of saved epochs)."""
    if len(epochs) < 3:
        return ", ".join(map(str, epochs))
    step = epochs[1] - epochs[0]
    if all(b - a == step for a, b in zip(epochs, epochs[1:])):
        return f"{epochs[0]}-{epochs[-1]} every {step}"
    return ", ".join(map(str, epochs[:20])) + (" ..." if len(epochs) > 20 else "")


def check_fresh_folds(out_dir, stories, settings, resume, overwrite):
    """Refuse to train over earlier folds unless asked to; returns {folder: whether the
    run continues from its last.save} for every fold (and seed)."""
    folders = [folder for story in stories
               for _, folder in settings.seed_runs(runs.fold_dir(out_dir, story))]
    return runs.check_fresh_runs(folders, resume, overwrite)


def check_test_epoch(test_epoch, settings):
    if test_epoch is not None and (test_epoch % settings.save_freq or test_epoch > settings.epochs):
        raise ToolkitError(f"--test_epoch {test_epoch} will not be saved: pick a multiple of "
                           f"--save_freq {settings.save_freq} up to --epochs")


# ---------------------------------------------------------------- one fold

def train_fold(pooled, story, out_dir, options):
    """Train the fold that holds out `story` (every seed, train.RunOptions `options`);
    returns fit()'s summaries."""
    device = utils.get_device(options.cuda)
    train_set, val_set = fold_sets(pooled, story)
    scaler = datasets.FeatureScaler.fit(train_set) if options.normalize else None
    settings = options.settings
    return train.fit_seeds(
        lambda: train.build_model(pooled.input_dims, device, settings.layers, settings.bidirectional),
        train_set.with_scaler(scaler), val_set.with_scaler(scaler), runs.fold_dir(out_dir, story),
        options, device)


def evaluate_fold(pooled, story, out_dir, checkpoint, options, features=False):
    """Evaluate a fold's checkpoint (every seed's) on its training and held-out videos,
    write the held-out predictions to <out_dir>/cv_pred/ (and features if asked)."""
    device, precision = utils.get_device(options.cuda), options.settings.precision
    train_set, val_set = fold_sets(pooled, story)
    folder = runs.fold_dir(out_dir, story)
    trained = train.load_trained(runs.run_checkpoints(folder, checkpoint), train_set,
                                 options.normalize, device)
    postprocessing = train.saved_postprocessing(trained, options.postprocessing_flags or {},
                                                train_set, [val_set])
    train_result = train.evaluate_seeds(trained, train_set, device, postprocessing, precision)
    val_result = train.evaluate_seeds(trained, val_set, device, postprocessing, precision)
    utils.write_predictions(Path(out_dir) / runs.CV_PREDICTIONS, val_set.videos,
                            val_result["frames"])
    if features:
        train.extract_features(trained, train_set, val_set, folder, device,
                               postprocessing.label_delay, precision)
    row = {"story": story, "train_ccc": train_result["ccc"], "val_ccc": val_result["ccc"],
           "epoch": trained[0].checkpoint.get("epoch")}
    if len(trained) > 1:
        row.update(val_ccc_seed_mean=np.mean(val_result["seed_ccc"]),
                   val_ccc_seed_std=np.std(val_result["seed_ccc"]))
    return row


def run_fold(pooled, story, out_dir, options, checkpoint, features, test_only):
    """Train a fold (unless `test_only`), then evaluate its `checkpoint`."""
    if not test_only:
        train_fold(pooled, story, out_dir, options)
    return evaluate_fold(pooled, story, out_dir, checkpoint, options, features)


# ---------------------------------------------------------------- main

def main(args):
    mods = datasets.parse_mods(args.mods)
    settings = train.TrainingSettings.from_args(args)
    out_dir = Path(args.out_dir)
    checkpoint = runs.checkpoint_name(args.test_epoch)
    runner = parallel.Runner.from_args(args)
    pooled = load_pool(args.train_dir, args.test_dir, mods, args.stories, args.subjects)
    runner.check()
    resumes = {}
    if args.test:
        check_checkpoints(out_dir, pooled.stories, [args.test_epoch])
    else:
        settings.check()
        check_test_epoch(args.test_epoch, settings)
        resumes = check_fresh_folds(out_dir, pooled.stories, settings, args.resume, args.overwrite)
    options = train.RunOptions.from_args(args, settings, resumes, runner)
    options.check()
    if not args.test:
        options.check_trainable(pooled)  # every fold trains on some of these videos
    for story in pooled.stories:
        for folder, seed_settings in options.resumed_runs(runs.fold_dir(runner.path(out_dir),
                                                                        story)):
            train.check_resumable(folder, seed_settings, pooled.mods, pooled.input_dims,
                                  args.normalize, options.postprocessing)
    train.check_tensorboard_dir(args.tensorboard)
    runs.check_output_folder(out_dir, "--out_dir")
    utils.check_writable(out_dir)
    with runs.owned(out_dir):
        if not args.test:
            check_fresh_folds(out_dir, pooled.stories, settings, args.resume, args.overwrite)
            runs.write_run_record(args, out_dir)
        pooled_for_tasks = pool_for_tasks(pooled, args, runner)
        tasks = [dict(pooled=pooled_for_tasks, story=story, out_dir=runner.path(out_dir),
                      options=options, checkpoint=checkpoint, features=args.features,
                      test_only=args.test)
                 for story in pooled.stories]
        table = utils.crossval_table(runner.run(run_fold, tasks, "folds"))
        utils.write_csv(table, out_dir / "crossval.csv")
    print(f"cross-validation of {checkpoint} per held-out story:")
    print(utils.format_table(table))
    return table


if __name__ == "__main__":
    runs.run_cli(main, get_args_parser(), runs.crossval_results)
