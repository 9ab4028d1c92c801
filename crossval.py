"""Cross-validate the fusion LSTM across stories.

    python crossval.py --epochs 2000 --mods audio,text --out_dir cv_AT --save_freq 10
    python crossval.py --mods audio,text --out_dir cv_AT --test --test_epoch 1360

Training and validation videos are pooled; for each story, a model is trained with
that story held out, into <out_dir>/val_on_<story>/ (the files train.py writes).
Then each fold's best.save (or epoch_<--test_epoch>.save) is evaluated: held-out
predictions go to <out_dir>/cv_pred/, and <out_dir>/crossval.csv gets one row per
held-out story (train CCC, val CCC) and rows Mean, Std and Mean-Std.
Folds run side by side with --jobs N, or on a Dask cluster with --scheduler ADDRESS.
"""
import argparse
import re
import sys
from pathlib import Path

import datasets
import models
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
                 get_fold_args_parser()])
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
            path = folder / checkpoint_name(epoch)
            if not path.is_file():
                saved = saved_epochs(folder)
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


def check_fresh_folds(out_dir, stories, resume, overwrite):
    """Refuse to train over earlier folds unless asked to; returns {story: whether the
    fold continues from its last.save}. With --resume, folds that have not saved yet
    (the run stopped before reaching them, e.g. with its Dask scheduler) start afresh."""
    saved = {story: (fold_dir(out_dir, story) / "last.save").is_file() for story in stories}
    if resume and not any(saved.values()):
        train.check_fresh_model_dir(fold_dir(out_dir, stories[0]), resume, overwrite)
    for story in stories:
        train.check_fresh_model_dir(fold_dir(out_dir, story), resume and saved[story], overwrite)
    return {story: resume and saved[story] for story in stories}


# ---------------------------------------------------------------- one fold

def train_fold(pooled, story, out_dir, settings, normalize, cuda, resume=False, progress=True):
    """Train the fold that holds out `story`; returns fit()'s summary."""
    utils.seed_everything(settings.seed)
    device = utils.get_device(cuda)
    train_set, val_set = fold_sets(pooled, story)
    scaler = datasets.FeatureScaler.fit(train_set) if normalize else None
    model = train.build_model(pooled.input_dims, device)
    return train.fit(model, train_set.with_scaler(scaler), val_set.with_scaler(scaler),
                     fold_dir(out_dir, story), settings, device, resume=resume,
                     progress=progress)


def evaluate_fold(pooled, story, out_dir, checkpoint, normalize, cuda, features=False):
    """Evaluate a fold's checkpoint on its training and held-out videos, write the
    held-out predictions to <out_dir>/cv_pred/ (and features if asked)."""
    device = utils.get_device(cuda)
    train_set, val_set = fold_sets(pooled, story)
    path = fold_dir(out_dir, story) / checkpoint
    model, state = models.load_model(path, pooled.mods, pooled.input_dims, device)
    scaler = train.resolve_scaler(state, normalize, train_set, path)
    train_set, val_set = train_set.with_scaler(scaler), val_set.with_scaler(scaler)
    train_result = train.evaluate(model, train_set, device)
    val_result = train.evaluate(model, val_set, device)
    train.write_predictions(Path(out_dir) / "cv_pred", val_set, val_result["frames"])
    if features:
        train.extract_features(model, train_set, val_set, fold_dir(out_dir, story), device)
    return {"story": story, "train_ccc": train_result["ccc"], "val_ccc": val_result["ccc"],
            "epoch": state.get("epoch")}


def run_fold(pooled, story, out_dir, settings, normalize, cuda, test_only, checkpoint,
             features, resume, progress):
    if not test_only:
        train_fold(pooled, story, out_dir, settings, normalize, cuda, resume, progress)
    return evaluate_fold(pooled, story, out_dir, checkpoint, normalize, cuda, features)


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
        resumes = check_fresh_folds(out_dir, pooled.stories, args.resume, args.overwrite)
        utils.check_writable(out_dir)
        utils.write_json({**vars(args), "command": " ".join(sys.argv)}, out_dir / "args.json")

    common = dict(pooled=pool_for_tasks(pooled, args),
                  out_dir=utils.task_path(out_dir, args.scheduler), settings=settings,
                  normalize=args.normalize, cuda=args.cuda, test_only=args.test,
                  checkpoint=checkpoint, features=args.features,
                  progress=args.jobs == 1 and not args.scheduler)
    tasks = [dict(story=story, resume=resumes.get(story, False), **common)
             for story in pooled.stories]
    folds = utils.run_parallel(run_fold, tasks, args.jobs, "folds", args.scheduler)
    table = utils.crossval_table(folds)
    utils.write_csv(table, out_dir / "crossval.csv")
    print(f"cross-validation of {checkpoint} per held-out story:")
    print(utils.format_table(table))
    return table


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
