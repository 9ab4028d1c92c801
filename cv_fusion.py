"""Cross-validate decision-level fusion across stories.

    python cv_fusion.py cv_AT cv_ATV --normalize --in_names AT ATV
    python cv_fusion.py cv_AT cv_ATV --in_names AT ATV --test

Each CV_DIR is a crossval.py output folder with features per fold:
`CV_DIR/val_on_<story>/feat_train` (the fold's training videos) and `feat_test`
(the held-out story), as `crossval.py --features` and `cv_epochs.py` write them.
The folds are the val_on_<story> folders of the first CV_DIR; every CV_DIR needs
the same ones. For each fold the fusion SVR of fusion.py is fitted on the fold's
training features (a --C grid is searched within those stories only) and scored on
the held-out story. Annotations are read from --train_dir and --test_dir (pooled);
nothing is written there.

Writes to --out_dir (default ./cv_fusion_out): val_on_<story>/fusion_model.joblib
and val_on_<story>/pred_train/ per fold, cv_pred/ (every held-out prediction, 25
fps), crossval.csv (train and validation CCC per held-out story, then Mean, Std and
Mean-Std) and args.json. `--test` scores the saved fold models without fitting;
they are joblib pickles, so use only folders you made or trust.
"""
import argparse
import re
import sys
from pathlib import Path

import datasets
import fusion
import runs
import train
import utils
from utils import ToolkitError

FOLD_FOLDER = re.compile(r"^val_on_(\d+)$")


def get_args_parser():
    parser = argparse.ArgumentParser(
        "cv_fusion.py", parents=[fusion.get_svr_args_parser(),
                                 utils.get_parallel_args_parser("fit folds"),
                                 runs.get_ledger_args_parser()],
        description="Cross-validate decision-level fusion across stories.")
    parser.add_argument("cv_dirs", nargs="+", metavar="CV_DIR",
                        help="crossval.py output folders holding val_on_<story>/feat_train "
                             "and feat_test")
    group = parser.add_argument_group("what to run")
    group.add_argument("--test", action="store_true",
                       help="score the fold models saved in --out_dir without fitting "
                            "(joblib pickles: use only folders you trust)")
    group.add_argument("--out_dir", default="./cv_fusion_out",
                       help="where models, predictions and crossval.csv go "
                            "(default: %(default)s)")
    return parser


def list_folds(cv_dirs):
    """The held-out stories: the val_on_<story> folders of the first CV_DIR, which
    every other CV_DIR must also have."""
    first = Path(cv_dirs[0])
    if not first.is_dir():
        raise ToolkitError(f"cross-validation folder {first} does not exist: run crossval.py "
                           f"--out_dir {first} --features first, or fix the path")
    stories = sorted(int(match.group(1)) for match in map(FOLD_FOLDER.match,
                     (path.name for path in first.iterdir() if path.is_dir())) if match)
    if not stories:
        raise ToolkitError(f"{first} has no val_on_<story> folders: give a crossval.py "
                           "--out_dir, after crossval.py --features has run")
    for cv_dir in map(Path, cv_dirs[1:]):
        for story in stories:
            if not (cv_dir / f"val_on_{story}").is_dir():
                raise ToolkitError(f"{cv_dir / f'val_on_{story}'} does not exist but "
                                   f"{first / f'val_on_{story}'} does: every CV_DIR needs the "
                                   "same folds (cross-validate both models on the same stories)")
    return stories


def fold_folder(cv_dir, story, side):
    folder = Path(cv_dir) / f"val_on_{story}" / f"feat_{side}"
    if not folder.is_dir():
        raise ToolkitError(f"{folder} does not exist: extract the fold's features with "
                           "crossval.py --features (or cv_epochs.py)")
    return folder


def load_fold(cv_dirs, story, annotations, in_names):
    """The training and held-out videos of one fold, checked to be what they claim."""
    sets, dims = {}, {}
    for side in ("train", "test"):
        folders = [[fold_folder(cv_dir, story, side)] for cv_dir in cv_dirs]
        sets[side], dims[side] = fusion.load_fused_videos(folders, annotations, in_names)
    fusion.check_same_dims(dims["train"], dims["test"], in_names)
    where = Path(cv_dirs[0]) / f"val_on_{story}"
    if any(video.story != story for video in sets["test"]):
        raise ToolkitError(f"{where / 'feat_test'} holds videos of other stories than {story}: "
                           "it is not this fold's held-out story; re-run crossval.py --features")
    if any(video.story == story for video in sets["train"]):
        raise ToolkitError(f"{where / 'feat_train'} holds videos of the held-out story {story}: "
                           "re-run crossval.py --features")
    return sets["train"], sets["test"], dims["train"]


def load_folds(cv_dirs, in_names, train_dir, test_dir):
    """{held-out story: (training videos, held-out videos, input widths)} of every fold."""
    annotations = datasets.annotation_files([train_dir, test_dir])
    return {story: load_fold(cv_dirs, story, annotations, in_names)
            for story in list_folds(cv_dirs)}


def read_fold(cv_dirs, story, in_names, train_dir, test_dir):
    """One fold's videos, read by a cluster worker from the shared folders."""
    return load_fold(cv_dirs, story, datasets.annotation_files([train_dir, test_dir]), in_names)


def fold_tasks(folds, saved, args, in_names, settings):
    """run_fold's arguments per fold: the loaded videos and saved models (local
    processes memory-map them), or, with --scheduler, what lets each worker read
    them from the shared folders itself."""
    out_dir = utils.task_path(args.out_dir, args.scheduler)
    common = dict(out_dir=out_dir, settings=settings, in_names=in_names,
                  postprocessing_flags=train.postprocessing_flags(args))
    if not args.scheduler:
        return [dict(story=story, fold=fold, saved=saved.get(story), **common)
                for story, fold in folds.items()]
    shared = dict(cv_dirs=[utils.task_path(cv_dir, args.scheduler) for cv_dir in args.cv_dirs],
                  in_names=in_names, train_dir=utils.task_path(args.train_dir, args.scheduler),
                  test_dir=utils.task_path(args.test_dir, args.scheduler))
    return [dict(story=story, fold=utils.load_on_workers(read_fold, story=story, **shared),
                 saved=utils.load_on_workers(fusion.load_model, path=out_dir / f"val_on_{story}"
                                             / fusion.MODEL_FILE) if story in saved else None,
                 **common)
            for story in folds]


def load_fold_models(out_dir, folds, in_names, flags):
    """The saved model of every fold, for --test, checked to be usable with the
    post-processing `flags`."""
    models = {}
    for story, (_, _, dims) in folds.items():
        path = Path(out_dir) / f"val_on_{story}" / fusion.MODEL_FILE
        models[story] = fusion.load_model(path)
        fusion.check_compatible(models[story], in_names, dims, path)
        fusion.saved_postprocessing(models[story], flags, path)  # refuses before any write
    return models


def run_fold(story, fold, out_dir, settings, in_names, saved=None, postprocessing_flags=None):
    """Fit one fold (or take its saved model, post-processed as saved but for the
    `postprocessing_flags` given), score it and write its outputs; returns its row
    of the cross-validation table."""
    train_videos, test_videos, dims = fold
    fold_dir = out_dir / f"val_on_{story}"
    if saved:
        model, c = saved["model"], saved["C"]
        postprocessing = fusion.saved_postprocessing(saved, postprocessing_flags or {},
                                                     fold_dir / fusion.MODEL_FILE)
    else:
        model, c = fusion.fit_with_c_choice(train_videos, settings, verbose=False)
        postprocessing = fusion.fitted_postprocessing(settings, train_videos)
        fusion.save_model(fold_dir / fusion.MODEL_FILE, fusion.model_record(
            model, c, settings, in_names, dims, train_videos))
    train_result = fusion.evaluate(model, train_videos, postprocessing)
    test_result = fusion.evaluate(model, test_videos, postprocessing)
    fusion.write_predictions(fold_dir / "pred_train", train_videos, train_result["frames"])
    fusion.write_predictions(out_dir / "cv_pred", test_videos, test_result["frames"])
    return {"story": story, "train_ccc": train_result["ccc"], "val_ccc": test_result["ccc"],
            "C": c}


def main(args):
    in_names = fusion.input_names(args.cv_dirs, args.in_names)
    settings = fusion.SVRSettings.from_args(args)
    out_dir = Path(args.out_dir)
    folds = load_folds(args.cv_dirs, in_names, args.train_dir, args.test_dir)
    saved = (load_fold_models(out_dir, folds, in_names, train.postprocessing_flags(args))
             if args.test else {})
    utils.check_scheduler(args.scheduler)
    # Every input has been checked: only now is anything written.
    utils.check_writable(out_dir)

    rows = utils.run_parallel(run_fold, fold_tasks(folds, saved, args, in_names, settings),
                              args.jobs, "folds", args.scheduler)
    for row in rows:  # printed here: parallel folds would print out of order, or remotely
        print(f"val_on_{row['story']}: C {row['C']:g}, train CCC {row['train_ccc']:.4f}, "
              f"val CCC {row['val_ccc']:.4f}")
    table = utils.crossval_table(rows)
    utils.write_csv(table, out_dir / "crossval.csv")
    utils.write_json({**vars(args), "command": " ".join(sys.argv)},
                     out_dir / ("test_args.json" if args.test else "args.json"))
    print(utils.format_table(table))
    print(f"results in {out_dir / 'crossval.csv'}, held-out predictions in {out_dir / 'cv_pred'}")
    return table


if __name__ == "__main__":
    runs.run_cli(main, get_args_parser(), runs.crossval_results)
