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
import re
import sys
from pathlib import Path

import numpy as np

import datasets
import runs
import train
import utils
from utils import ToolkitError


def get_fold_args_parser():
    """Flags of every script that works on cross-validation folds."""
    parser = argparse.ArgumentParser(add_help=False,
                                     parents=[utils.get_parallel_args_parser("run folds")])
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
        train.check_known("story", stories, pooled.stories, "--stories")
    if subjects:
        train.check_known("subject", subjects, pooled.subjects, "--subjects")
    pooled = pooled.select(stories=stories, subjects=subjects)
    if len(pooled.stories) < 2:
        raise ToolkitError("cross-validation needs at least two stories: widen --stories")
    return pooled


def pool_for_tasks(pooled, args):
    """The videos fold tasks get: the loaded ones (local processes memory-map them), or,
    with --scheduler, what lets each worker load them from the shared data folders."""
    if not args.scheduler:
        return pooled
    return utils.load_on_workers(
        load_pool, train_dir=utils.task_path(args.train_dir, args.scheduler),
        test_dir=utils.task_path(args.test_dir, args.scheduler), mods=pooled.mods,
        stories=args.stories, subjects=args.subjects)


def fold_dir(out_dir, story):
    return Path(out_dir) / f"val_on_{story}"


def fold_sets(pooled, story):
    """(training videos, held-out videos) of the fold that holds out `story`."""
    return pooled.select(exclude_stories=[story]), pooled.select(stories=[story])


def checkpoint_name(epoch=None):
    return f"epoch_{epoch}.save" if epoch is not None else "best.save"


def saved_epochs(folder):
    return sorted(int(match.group(1)) for path in Path(folder).glob("epoch_*.save")
                  if (match := re.fullmatch(r"epoch_(\d+)\.save", path.name)))


def check_checkpoints(out_dir, stories, epochs=(None,)):
    """Every fold must hold every checkpoint asked for, before any work starts."""
    for story in stories:
        folder = fold_dir(out_dir, story)
        for epoch in epochs:
            for path in train.run_checkpoints(folder, checkpoint_name(epoch)):
                if not path.is_file():
                    saved = saved_epochs(path.parent)
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
               for _, folder in settings.seed_runs(fold_dir(out_dir, story))]
    return train.check_fresh_runs(folders, resume, overwrite)


# ---------------------------------------------------------------- one fold

def train_fold(pooled, story, out_dir, settings, normalize, cuda, resumes=None, progress=True,
               postprocessing_flags=None, tensorboard_dir=None):
    """Train the fold that holds out `story` (every seed); returns fit()'s summaries."""
    device = utils.get_device(cuda)
    train_set, val_set = fold_sets(pooled, story)
    scaler = datasets.FeatureScaler.fit(train_set) if normalize else None
    return train.fit_seeds(
        lambda: train.build_model(pooled.input_dims, device, settings.layers, settings.bidirectional),
        train_set.with_scaler(scaler), val_set.with_scaler(scaler), fold_dir(out_dir, story),
        settings, device, resumes, progress,
        utils.Postprocessing.resolve(**(postprocessing_flags or {})), tensorboard_dir)


def evaluate_fold(pooled, story, out_dir, checkpoint, normalize, cuda, features=False,
                  postprocessing_flags=None):
    """Evaluate a fold's checkpoint (every seed's) on its training and held-out videos,
    write the held-out predictions to <out_dir>/cv_pred/ (and features if asked)."""
    device = utils.get_device(cuda)
    train_set, val_set = fold_sets(pooled, story)
    trained = train.load_trained(train.run_checkpoints(fold_dir(out_dir, story), checkpoint),
                                 train_set, normalize, device)
    postprocessing = train.saved_postprocessing(trained, postprocessing_flags or {}, train_set,
                                                [val_set])
    train_result = train.evaluate_seeds(trained, train_set, device, postprocessing)
    val_result = train.evaluate_seeds(trained, val_set, device, postprocessing)
    train.write_predictions(Path(out_dir) / "cv_pred", val_set, val_result["frames"])
    if features:
        train.extract_features(trained, train_set, val_set, fold_dir(out_dir, story), device,
                               postprocessing.label_delay)
    row = {"story": story, "train_ccc": train_result["ccc"], "val_ccc": val_result["ccc"],
           "epoch": trained[0].checkpoint.get("epoch")}
    if len(trained) > 1:
        row.update(val_ccc_seed_mean=np.mean(val_result["seed_ccc"]),
                   val_ccc_seed_std=np.std(val_result["seed_ccc"]))
    return row


def run_fold(pooled, story, out_dir, settings, normalize, cuda, test_only, checkpoint,
             features, resumes, progress, postprocessing_flags, tensorboard_dir=None):
    if not test_only:
        train_fold(pooled, story, out_dir, settings, normalize, cuda, resumes, progress,
                   postprocessing_flags, tensorboard_dir)
    return evaluate_fold(pooled, story, out_dir, checkpoint, normalize, cuda, features,
                         postprocessing_flags)


# ---------------------------------------------------------------- main

def main(args):
    mods = datasets.parse_mods(args.mods)
    settings = train.TrainingSettings.from_args(args)
    out_dir = Path(args.out_dir)
    checkpoint = checkpoint_name(args.test_epoch)
    pooled = load_pool(args.train_dir, args.test_dir, mods, args.stories, args.subjects)
    utils.check_scheduler(args.scheduler)
    resumes = {}
    if args.test:
        check_checkpoints(out_dir, pooled.stories, [args.test_epoch])
    else:
        settings.check()
        if args.test_epoch is not None and (args.test_epoch % settings.save_freq
                                            or args.test_epoch > settings.epochs):
            raise ToolkitError(f"--test_epoch {args.test_epoch} will not be saved: pick a "
                               f"multiple of --save_freq {settings.save_freq} up to --epochs")
        resumes = check_fresh_folds(out_dir, pooled.stories, settings, args.resume, args.overwrite)
        train.check_tensorboard_dir(args.tensorboard)
        utils.check_writable(out_dir)
        utils.write_json({**vars(args), "command": " ".join(sys.argv)}, out_dir / "args.json")

    common = dict(pooled=pool_for_tasks(pooled, args),
                  out_dir=utils.task_path(out_dir, args.scheduler), settings=settings,
                  normalize=args.normalize, cuda=args.cuda, test_only=args.test,
                  checkpoint=checkpoint, features=args.features,
                  progress=args.jobs == 1 and not args.scheduler,
                  postprocessing_flags=train.postprocessing_flags(args),
                  tensorboard_dir=args.tensorboard and utils.task_path(args.tensorboard,
                                                                        args.scheduler))
    resumes = {utils.task_path(folder, args.scheduler): resume for folder, resume in resumes.items()}
    tasks = [dict(story=story, resumes=resumes, **common) for story in pooled.stories]
    folds = utils.run_parallel(run_fold, tasks, args.jobs, "folds", args.scheduler)
    table = utils.crossval_table(folds)
    utils.write_csv(table, out_dir / "crossval.csv")
    print(f"cross-validation of {checkpoint} per held-out story:")
    print(utils.format_table(table))
    return table


if __name__ == "__main__":
    runs.run_cli(main, get_args_parser(), runs.crossval_results)
