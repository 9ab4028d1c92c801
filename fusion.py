"""Decision-level fusion: a support vector regressor over the features of several models.

    python fusion.py feat_AT feat_ATV --normalize
    python fusion.py feat_AT feat_ATV --test fusion_preds/fusion_model.joblib

Each FEAT_DIR holds the per-second features that one model wrote with
`train.py --features` (one (seconds, 128) .npy per video). It is looked for first
where the guide's copy step puts it, `<train_dir>/<FEAT_DIR>` and
`<test_dir>/<FEAT_DIR>` (also as `<FEAT_DIR>/feat_train` or `feat_test` inside
them, which `cp -r` makes when the destination already exists), then where
train.py wrote it, `<FEAT_DIR>/feat_train` and `<FEAT_DIR>/feat_test`, so the copy
is optional. The features of all FEAT_DIRs are put side by side per second and an
RBF support vector regressor (C 0.01, gamma 'auto', epsilon 0.1) maps them to the
per-second valence. Several --C values are compared by leave-one-story-out
cross-validation over the training stories only.

Writes to --pred_dir (default ./fusion_preds): pred_test/ (one 25 fps CSV per test
video), pred_train/ (the training videos), fusion_model.joblib and args.json; with
--test, pred_test/ and test_args.json. The engine is svr_fusion.py.

A saved model is a joblib pickle, and loading a pickle can run arbitrary code:
pass --test only models that you made or that come from someone you trust.
"""
import argparse
from pathlib import Path

from empathy import layout, ledger, postprocessing, svr_fusion, utils


def get_args_parser():
    parser = argparse.ArgumentParser(
        "fusion.py", parents=[svr_fusion.get_args_parser(), ledger.get_ledger_args_parser()],
        description="Decision-level fusion of several models' features with an RBF SVR.")
    parser.add_argument("feat_dirs", nargs="+", metavar="FEAT_DIR",
                        help="feature folders written by train.py --features (copied into "
                             "the split folders, or left where train.py wrote them)")
    group = parser.add_argument_group("what to run")
    group.add_argument("--test", metavar="MODEL",
                       help="evaluate this saved fusion model on the test videos without "
                            "fitting (a joblib pickle: load only models you trust)")
    group.add_argument("--test_set", type=int, nargs="+", metavar="STORY",
                       help="re-split: pool both folders and test on these stories")
    group.add_argument("--pred_dir", default="./fusion_preds",
                       help="where predictions, the model and args.json go (default: %(default)s)")
    group.add_argument("--model_path", help="where to save the fitted model (default: "
                                            f"<pred_dir>/{layout.FUSION_MODEL})")
    return parser


def ledger_results(results):
    """The ledger's results: the test CCC, and the training CCC of a fitted model."""
    return {"mean_ccc": results["test"]["ccc"], "train_ccc": results.get("train", {}).get("ccc")}


def main(args):
    in_names = svr_fusion.input_names(args.feat_dirs, args.in_names)
    settings = svr_fusion.SVRSettings.from_args(args)
    pred_dir = Path(args.pred_dir)
    model_path = Path(args.model_path) if args.model_path else pred_dir / layout.FUSION_MODEL
    saved = svr_fusion.load_model(args.test) if args.test else None
    train_videos, test_videos, dims = svr_fusion.load_split(
        args.feat_dirs, in_names, args.train_dir, args.test_dir, args.test_set,
        with_train=saved is None)
    if saved:
        svr_fusion.check_compatible(saved, in_names, dims, args.test)
        saved_postprocessing = svr_fusion.saved_postprocessing(
            saved, postprocessing.flags_given(args), args.test)
    layout.check_output_folder(pred_dir, "--pred_dir")
    if not saved:
        svr_fusion.check_model_path(model_path)
    # Every input has been checked: only now is anything written.
    utils.check_writable(pred_dir)
    with layout.owned(pred_dir):
        if saved:
            results = svr_fusion.predict_saved(saved["model"], saved_postprocessing, test_videos,
                                               pred_dir)
        else:
            results = svr_fusion.fit_and_predict(settings, in_names, dims, train_videos,
                                                 test_videos, pred_dir, model_path)
        layout.write_run_record(args, pred_dir, layout.TEST_RUN_RECORD if saved else layout.RUN_RECORD)
    utils.print_results(results)
    print(f"predictions written to {pred_dir}" + ("" if saved else f", model to {model_path}"))
    return results


if __name__ == "__main__":
    ledger.run_cli(main, get_args_parser(), ledger_results)
