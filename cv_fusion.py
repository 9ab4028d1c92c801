"""Cross-validate decision-level fusion across stories.

    python cv_fusion.py cv_AT cv_ATV --normalize --in_names AT ATV
    python cv_fusion.py cv_AT cv_ATV --in_names AT ATV --test

Each CV_DIR is a crossval.py output folder with features per fold:
`CV_DIR/val_on_<story>/feat_train` (the fold's training videos) and `feat_test`
(the held-out story), as `crossval.py --features` and `cv_epochs.py` write them.
The folds are the val_on_<story> folders of the first CV_DIR; every CV_DIR needs
the same ones. For each fold the fusion SVR of fusion.py (svr_fusion.py) is fitted on
the fold's training features (a --C grid is searched within those stories only) and
scored on the held-out story. Annotations are read from --train_dir and --test_dir
(pooled); nothing is written there.

Writes to --out_dir (default ./cv_fusion_out): val_on_<story>/fusion_model.joblib
and val_on_<story>/pred_train/ per fold, cv_pred/ (every held-out prediction, 25
fps), crossval.csv (train and validation CCC per held-out story, then Mean, Std and
Mean-Std) and args.json. `--test` scores the saved fold models without fitting;
they are joblib pickles, so use only folders you made or trust.
"""
import argparse
from pathlib import Path

from empathy import datasets, layout, ledger, parallel, postprocessing, svr_fusion, tables, utils
from empathy.utils import ToolkitError


def get_args_parser():
    parser = argparse.ArgumentParser(
        "cv_fusion.py", parents=[svr_fusion.get_args_parser(),
                                 parallel.get_parallel_args_parser("fit folds"),
                                 ledger.get_ledger_args_parser()],
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
    stories = layout.fold_stories(first)
    if not stories:
        raise ToolkitError(f"{first} has no val_on_<story> folders: give a crossval.py "
                           "--out_dir, after crossval.py --features has run")
    for cv_dir in cv_dirs[1:]:
        for story in stories:
            if not layout.fold_dir(cv_dir, story).is_dir():
                raise ToolkitError(f"{layout.fold_dir(cv_dir, story)} does not exist but "
                                   f"{layout.fold_dir(first, story)} does: every CV_DIR needs the "
                                   "same folds (cross-validate both models on the same stories)")
    return stories


def fold_folder(cv_dir, story, side):
    folder = layout.features_dir(layout.fold_dir(cv_dir, story), side)
    if not folder.is_dir():
        raise ToolkitError(f"{folder} does not exist: extract the fold's features with "
                           "crossval.py --features (or cv_epochs.py)")
    return folder


def load_fold(cv_dirs, story, annotations, in_names):
    """The training and held-out videos of one fold, checked to be what they claim."""
    sets, dims = {}, {}
    for side in ("train", "test"):
        folders = [[fold_folder(cv_dir, story, side)] for cv_dir in cv_dirs]
        sets[side], dims[side] = svr_fusion.load_fused_videos(folders, annotations, in_names)
    svr_fusion.check_same_dims(dims["train"], dims["test"], in_names)
    where = layout.fold_dir(cv_dirs[0], story)
    if any(video.story != story for video in sets["test"]):
        raise ToolkitError(f"{layout.features_dir(where, 'test')} holds videos of other stories "
                           f"than {story}: it is not this fold's held-out story; re-run "
                           "crossval.py --features")
    if any(video.story == story for video in sets["train"]):
        raise ToolkitError(f"{layout.features_dir(where, 'train')} holds videos of the held-out "
                           f"story {story}: re-run crossval.py --features")
    return sets["train"], sets["test"], dims["train"]


def load_folds(cv_dirs, in_names, train_dir, test_dir):
    """{held-out story: (training videos, held-out videos, input widths)} of every fold."""
    annotations = datasets.annotation_files([train_dir, test_dir])
    return {story: load_fold(cv_dirs, story, annotations, in_names)
            for story in list_folds(cv_dirs)}


def read_fold(cv_dirs, story, in_names, train_dir, test_dir):
    """One fold's videos, read by a cluster worker from the shared folders."""
    return load_fold(cv_dirs, story, datasets.annotation_files([train_dir, test_dir]), in_names)


def fold_tasks(folds, saved, args, in_names, settings, runner):
    """run_fold's arguments per fold: the loaded videos and saved models, as the
    tasks of `runner` (parallel.Runner) get them."""
    out_dir = runner.path(args.out_dir)
    return [dict(story=story, out_dir=out_dir, settings=settings, in_names=in_names,
                 postprocessing_flags=postprocessing.flags_given(args),
                 fold=runner.data(fold, read_fold, cv_dirs=[Path(d) for d in args.cv_dirs],
                                  story=story, in_names=in_names,
                                  train_dir=Path(args.train_dir), test_dir=Path(args.test_dir)),
                 saved=(runner.data(saved[story], svr_fusion.load_model,
                                    path=model_path(args.out_dir, story))
                        if story in saved else None))
            for story, fold in folds.items()]


def model_path(out_dir, story):
    return layout.fold_dir(out_dir, story) / layout.FUSION_MODEL


def load_fold_models(out_dir, folds, in_names, flags):
    """The saved model of every fold, for --test, checked to be usable with the
    post-processing `flags`."""
    models = {}
    for story, (_, _, dims) in folds.items():
        path = model_path(out_dir, story)
        models[story] = svr_fusion.load_model(path)
        svr_fusion.check_compatible(models[story], in_names, dims, path)
        svr_fusion.saved_postprocessing(models[story], flags, path)  # refuses before any write
    return models


def run_fold(story, fold, out_dir, settings, in_names, saved=None, postprocessing_flags=None):
    """Fit one fold (or take its saved model, post-processed as saved but for the
    `postprocessing_flags` given), score it and write its outputs; returns its row
    of the cross-validation table."""
    train_videos, test_videos, dims = fold
    fold_dir = layout.fold_dir(out_dir, story)
    if saved:
        model, c = saved["model"], saved["C"]
        postprocessing = svr_fusion.saved_postprocessing(saved, postprocessing_flags or {},
                                                         model_path(out_dir, story))
    else:
        model, c, postprocessing = svr_fusion.fit_and_save(
            train_videos, settings, in_names, dims, model_path(out_dir, story), verbose=False)
    train_result = svr_fusion.predict_and_write(model, train_videos, postprocessing,
                                                layout.predictions_dir(fold_dir, "train"))
    test_result = svr_fusion.predict_and_write(model, test_videos, postprocessing,
                                               out_dir / layout.CV_PREDICTIONS)
    return {"story": story, "train_ccc": train_result["ccc"], "val_ccc": test_result["ccc"],
            "C": c}


def main(args):
    in_names = svr_fusion.input_names(args.cv_dirs, args.in_names)
    settings = svr_fusion.SVRSettings.from_args(args)
    out_dir = Path(args.out_dir)
    runner = parallel.Runner.from_args(args)
    folds = load_folds(args.cv_dirs, in_names, args.train_dir, args.test_dir)
    saved = (load_fold_models(out_dir, folds, in_names, postprocessing.flags_given(args))
             if args.test else {})
    runner.check()
    layout.check_output_folder(out_dir, "--out_dir")
    # Every input has been checked: only now is anything written.
    utils.check_writable(out_dir)
    with layout.owned(out_dir):
        return fit_and_score(folds, saved, args, in_names, settings, runner)


def fit_and_score(folds, saved, args, in_names, settings, runner):
    """Every fold's model fitted (or the saved ones), scored, and the table written."""
    out_dir = Path(args.out_dir)
    rows = runner.run(run_fold, fold_tasks(folds, saved, args, in_names, settings, runner),
                      "folds")
    for row in rows:  # printed here: parallel folds would print out of order, or remotely
        print(f"{layout.fold_name(row['story'])}: C {row['C']:g}, train CCC "
              f"{row['train_ccc']:.4f}, val CCC {row['val_ccc']:.4f}")
    table = tables.crossval_table(rows)
    utils.write_csv(table, out_dir / layout.CROSSVAL_TABLE)
    layout.write_run_record(args, out_dir, layout.TEST_RUN_RECORD if args.test else layout.RUN_RECORD)
    print(utils.format_table(table))
    print(f"results in {out_dir / layout.CROSSVAL_TABLE}, held-out predictions in "
          f"{out_dir / layout.CV_PREDICTIONS}")
    return table


if __name__ == "__main__":
    ledger.run_cli(main, get_args_parser(), tables.crossval_results)
