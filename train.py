"""Train, test, or extract decision-level features from a fusion model (--model).

    python train.py --epochs 2000 --mods audio,text --model_dir models_AT
    python train.py --mods audio,text --model_dir models_AT --pred_dir preds_AT --test
    python train.py --mods audio,text --model_dir models_AT --feat_dir feat_AT --features

The flags are shared with the other training scripts (options.py); training,
prediction and checkpoints are the engine's (engine.py, checkpoints.py).
"""
import argparse
from pathlib import Path

import numpy as np

from empathy import command, datasets, layout, ledger, options, postprocessing, tables, utils
from empathy.utils import ToolkitError



def get_args_parser():
    parser = argparse.ArgumentParser(
        "train.py", parents=[options.get_data_args_parser(), options.get_training_args_parser(),
                             options.get_model_args_parser(), ledger.get_ledger_args_parser()],
        description="Train, test, or extract features from a fusion model (--model).")
    group = parser.add_argument_group("what to run")
    group.add_argument("--model_dir", default="./models",
                       help="folder of checkpoints and run records (default: %(default)s)")
    group.add_argument("--test", action="store_true",
                       help="evaluate <model_dir>/best.save (or --load): write predictions "
                            "to <pred_dir>/pred_train and pred_test and print CCC")
    group.add_argument("--features", action="store_true",
                       help="write decision-level features to <feat_dir>/feat_train and feat_test")
    group.add_argument("--load", help="checkpoint for --test/--features (default: "
                                      "<model_dir>/best.save)")
    group.add_argument("--pred_dir", default="./", help="where --test writes (default: %(default)s)")
    group.add_argument("--feat_dir", default="./",
                       help="where --features writes (default: %(default)s)")
    group.add_argument("--test_set", type=int, nargs="+", metavar="STORY",
                       help="re-split: pool both folders and test on these stories")
    group.add_argument("--subjects", type=int, nargs="+", metavar="S",
                       help="train and test on these subjects only")
    group.add_argument("--augment", type=int, metavar="N",
                       help="with --subjects: train on all videos, repeating the chosen "
                            "subjects' videos N times")
    group.add_argument("--overwrite", action="store_true",
                       help="train into a --model_dir that already holds a run")
    group.add_argument("--frame_counts", metavar="CSV",
                       help="for --test/--features on a --test_dir without Annotations: "
                            "a CSV with columns video,frames giving each video's frame count "
                            "(default: its feature rows x 25)")
    return parser


def main(args):
    mods = datasets.parse_mods(args.mods)
    if args.augment is not None and not args.subjects:
        raise ToolkitError("--augment needs --subjects: name the subjects whose videos to repeat")
    predicting = args.test or args.features
    if args.frame_counts and not predicting:
        raise ToolkitError("--frame_counts is for --test/--features on a --test_dir without "
                           "Annotations: leave it out when training")
    model_dir = Path(args.model_dir)
    train_set, test_set = datasets.load_train_test(
        args.train_dir, args.test_dir, mods, args.test_set, args.subjects, args.augment,
        unlabelled_test=predicting, frame_counts=args.frame_counts)
    if predicting:
        return predict_saved(args, model_dir, train_set, test_set)
    if not test_set.labelled:
        raise ToolkitError(f"{Path(args.test_dir) / datasets.ANNOTATION_FOLDER} does not exist: "
                           "training validates on --test_dir, which needs annotations")
    return train_new_model(args, model_dir, train_set, test_set)


def train_new_model(args, model_dir, train_set, test_set):
    """Training: every check before the first write, then one model per seed."""
    from empathy import engine
    settings = options.TrainingSettings.from_args(args)
    plan = options.Plan(outputs=[(model_dir, "--model_dir")],
                        options=options.RunOptions.from_args(args, settings), data=train_set,
                        trains=True, split_dirs=(args.train_dir, args.test_dir))
    with command.Command(args, plan, model_dir, runs=settings.seed_runs(model_dir)) as run:
        device = run.device
        scaler = datasets.FeatureScaler.fit(train_set) if args.normalize else None
        train_set, test_set = train_set.with_scaler(scaler), test_set.with_scaler(scaler)
        summaries = engine.fit_seeds(lambda: settings.new_model(train_set.input_dims, device),
                                     train_set, test_set, model_dir, run, device)
    print_training_summaries(summaries, model_dir)
    if settings.seeds > 1:
        print(seeds_summary(summaries, model_dir, train_set, test_set, args.normalize, device,
                            settings.precision))
    return summaries


def seeds_summary(summaries, model_dir, train_set, test_set, normalize, device, precision):
    """A --seeds run's line: first what can be reported, the validation CCC of the
    seeds' average prediction at the last epoch (of their --average_last averages,
    where kept), then each seed's own, then the picks, labelled."""
    from empathy import checkpoints, engine

    def average_ccc(name):
        trained, saved = engine.load_for_evaluation(checkpoints.run_checkpoints(model_dir, name),
                                                    train_set, normalize, {}, device)
        kept = engine.kept_averages(trained, test_set) if name == layout.LAST else None
        if kept is not None:
            return postprocessing.score_videos(test_set.videos, kept, saved)["ccc"]
        return engine.evaluate_seeds(trained, test_set, device, saved, precision)["ccc"]

    best = [summary["best_ccc"] for summary in summaries]
    last = [summary["last_ccc"] for summary in summaries]
    return (f"over {len(summaries)} seeds: their average prediction's validation CCC at the last "
            f"epoch {average_ccc(layout.LAST):.4f} (nothing picked); each seed's last epoch "
            f"{np.mean(last):.4f} +- {np.std(last):.4f}, best epoch {np.mean(best):.4f} +- "
            f"{np.std(best):.4f} (picked on validation); their best.save models' average "
            f"prediction: CCC {average_ccc(layout.BEST):.4f} (picked on validation)")


def print_training_summaries(summaries, model_dir):
    """Per seed: what can be reported (the last epoch, or the average of the last
    --average_last epochs' predictions), then the best epoch, labelled as picked on
    the validation videos."""
    for summary in summaries:
        stop = " (stopped by --patience)" if summary["stopped_early"] else ""
        where = layout.seed_dir(model_dir, summary["seed"]) if len(summaries) > 1 else model_dir
        print(f"{last_label(summary)} {summary['last_ccc']:.4f}; best validation CCC "
              f"{summary['best_ccc']:.4f} at epoch {summary['best_epoch']}, picked on "
              f"validation{stop} (checkpoints in {where})")


def last_label(summary):
    averaged = summary.get("averaged_epochs")
    if averaged:
        return (f"validation CCC of the last {averaged} epochs' average prediction "
                f"(epochs {summary['epoch'] - averaged + 1}-{summary['epoch']})")
    return f"validation CCC at the last epoch ({summary['epoch']})"


def ledger_results(returned):
    """The ledger's results of a run: the seeds' validation CCC at the last epoch (or
    of the --average_last average: nothing picked on validation) and their best
    epochs (training), or the test and training CCC (--test)."""
    if isinstance(returned, list):
        return tables.spread_results([summary["last_ccc"] for summary in returned],
                                     best_epoch=" ".join(str(s["best_epoch"]) for s in returned))
    return {"mean_ccc": returned["test"]["ccc"], "train_ccc": returned["train"]["ccc"]}


def predict_saved(args, model_dir, train_set, test_set):
    """--test and --features: evaluate a saved model (every seed's, for a --seeds run);
    returns the evaluations of --test (None for --features alone)."""
    from empathy import checkpoints, engine
    paths = [Path(args.load)] if args.load else checkpoints.run_checkpoints(model_dir)
    run = options.RunOptions.from_args(args)
    outputs = ([(args.pred_dir, "--pred_dir")] if args.test else []) + \
              ([(args.feat_dir, "--feat_dir")] if args.features else [])
    options.check_before_writing(options.Plan(outputs, run, data=train_set, evaluated=paths))
    device = run.device
    trained, saved = engine.load_for_evaluation(paths, train_set, args.normalize,
                                                run.postprocessing_flags, device, [test_set])
    results = None
    if args.test:
        results = engine.write_test_predictions(trained, train_set, test_set, args.pred_dir,
                                                device, saved, args.precision)
        utils.print_results(results)
    if args.features:
        engine.extract_features(trained, train_set, test_set, args.feat_dir, device,
                                saved.label_delay, args.precision)
        print(f"features written to {layout.features_dir(args.feat_dir, 'train')} and "
              f"{layout.features_dir(args.feat_dir, 'test')}")
    return results


if __name__ == "__main__":
    ledger.run_cli(main, get_args_parser(), ledger_results)
