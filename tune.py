"""Search training and post-processing settings with Optuna, by cross-validation
over the training stories; then score the best settings once on the validation set.

    python tune.py --mods audio,text --trials 40 --epochs 60 --out_dir tune_AT
    python tune.py --mods audio,text --trials 60 --epochs 60 --out_dir tune_AT   # 20 more
    python tune.py --mods audio,text --trials 40 --epochs 60 --out_dir tune_AT --final
    python plot.py tune tune_AT

Each trial trains one model per training story held out (the validation folder is
not read) and scores the held-out predictions with post-processing that it samples
afterwards (see tuning.py). Trial 0 of a new study is the recommended recipe
(tuning.RECIPE). The study lives in <out_dir>/study.db (or --storage URL); running
the same command again resumes it: --trials N means N finished (completed or
pruned) trials in all. A line per finished trial says how it did and how long the
rest will take. Writes trials.csv, best.json (the settings that --select chose, as
flags for train.py and crossval.py, beside the recipe's scores) and a ledger row per
completed trial. --jobs N runs trials in N processes here; --scheduler ADDRESS on
the workers of a Dask cluster. --final trains the chosen settings on every training
video and prints their validation CCC (final/, final.json), or with --ensemble folds
averages the chosen trial's fold models kept by --keep_weights (final_folds/,
final_folds.json); it says by how much the chosen settings beat the recipe in CV.
"""
import argparse
from dataclasses import replace
from pathlib import Path

from empathy import (command, datasets, families, layout, ledger, options, parallel,
                     postprocessing, tuning, utils)


def get_args_parser():
    parser = argparse.ArgumentParser(
        "tune.py", description="Search settings with Optuna by cross-validation over the "
                               "training stories.",
        parents=[options.get_data_args_parser(), options.get_training_args_parser(),
                 options.get_fold_args_parser(), ledger.get_ledger_args_parser()])
    # Searched per trial, or not taken: a value given for them is refused (tuning.check_flags).
    parser.set_defaults(out_dir="./tune_out", lr=None, weight_decay=None, loss=None,
                        eval_freq=None, save_freq=None, ema=None, swa_start=None,
                        average_last=None)
    group = parser.add_argument_group("search")
    group.add_argument("--trials", type=int, default=30, metavar="N",
                       help="finished (completed or pruned) trials the study holds when the "
                            "command ends, those of earlier runs included (default: %(default)s)")
    group.add_argument("--models", default=",".join(families.FAMILIES), metavar="FAMILIES",
                       help="comma-separated model families searched (default: %(default)s)")
    group.add_argument("--objective", choices=tuning.OBJECTIVES, default="mean",
                       help="the mean CCC over held-out training stories, or mean minus std "
                            "(default: %(default)s)")
    group.add_argument("--storage", metavar="URL",
                       help="Optuna RDB storage URL, e.g. postgresql://user@host/db for "
                            "machines that share a study (default: sqlite:///<out_dir>/study.db)")
    group.add_argument("--study_name", default="tune",
                       help="the study's name in the storage (default: %(default)s)")
    group.add_argument("--select", choices=tuning.SELECTIONS, default="best",
                       help="the trial best.json and --final take: best, the best objective; "
                            "one_se, among the trials whose mean CCC is within one standard "
                            "error (over folds) of the best's, the one closest to the "
                            "recommended recipe (default: %(default)s)")
    group.add_argument("--keep_weights", action="store_true",
                       help="keep each completed fold's final weights (trial_<n>/val_on_<story>/"
                            "epoch_<epochs>.save), for --final --ensemble folds")
    group.add_argument("--final", action="store_true",
                       help="train the chosen settings on all training stories and score them "
                            "once on --test_dir")
    group.add_argument("--ensemble", choices=tuning.ENSEMBLES,
                       help="with --final: retrain, train the chosen settings once on every "
                            "training story; folds, average the chosen trial's fold models "
                            "(kept by --keep_weights) (default: retrain)")
    return parser


def main(args):
    tuning.check_flags(args)
    out_dir = Path(args.out_dir)
    runner = parallel.Runner.from_args(args)
    train_set = tuning.load_training_stories(args.train_dir, datasets.parse_mods(args.mods),
                                             args.stories, args.subjects)
    url = args.storage or tuning.default_storage(out_dir)
    attrs = tuning.study_attrs(args, train_set)
    run = tuning.base_run(args)
    if args.storage:
        tuning.check_storage(args.storage)
    if args.final:
        return final(args, train_set, url, attrs, run)
    tuning.check_study(tuning.existing_study(url, args.study_name), attrs, args.trials)
    tuning.check_outputs(out_dir, tuning.SEARCH_OUTPUTS)
    plan = options.Plan(
        outputs=[(out_dir, "--out_dir")], data=train_set, trains=True, runner=runner,
        options=replace(run, postprocessing_flags={"label_delay": tuning.MAX_LABEL_DELAY}))
    with command.Command(args, plan, out_dir):
        study = tuning.create_study(url, args.study_name, attrs)
        tuning.fail_dead_trials(study, out_dir, own_storage=args.storage is None)
        tuning.clear_unkept_weights(study, out_dir)
        tuning.write_study_record(out_dir, args.storage, args.study_name)
        config = tuning.TuneConfig.from_args(args, run, attrs["models"], runner)
        tuning.run_trials(runner, train_set, config, args.jobs)
        table, best = tuning.write_outputs(study, out_dir, args.select)
    print(f"{len(table)} finished trials in {out_dir / layout.TRIALS_TABLE}")
    if best is not None:
        print(f"{best['select']}: trial {best['trial']}, {args.objective} CCC "
              f"{best['value']:.4f}: {' '.join(best['flags'])}")
        print(best["chosen_by"])
        print(tuning.against_recipe(best))
    return best


def final(args, train_set, url, attrs, run):
    """--final: the chosen settings trained on every training video (or the chosen
    trial's fold models averaged), scored on --test_dir."""
    study = tuning.existing_study(url, args.study_name, must_exist=True)
    tuning.check_study(study, attrs)
    settings, chosen, best = tuning.final_settings(study, run, args.select)
    ensemble = args.ensemble or "retrain"
    weights = tuning.kept_fold_weights(best) if ensemble == "folds" else None
    test_set = datasets.load_videos(args.test_dir, train_set.mods)
    out_dir = Path(args.out_dir)
    run = replace(run, settings=settings, postprocessing_flags={
        name: getattr(chosen, name) for name in postprocessing.FLAGS})
    folder, record_name = ((out_dir / tuning.FOLD_ENSEMBLE_DIR, tuning.FOLD_ENSEMBLE_RECORD)
                           if weights else (out_dir / layout.FINAL_DIR, layout.FINAL_RECORD))
    tuning.check_outputs(out_dir, tuning.FINAL_OUTPUTS[ensemble])
    plan = options.Plan(outputs=[(folder, "--out_dir")], options=run,
                        data=test_set if weights else train_set, trains=not weights,
                        evaluated=weights or [])
    with command.Command(args, plan, out_dir, record=None):  # final.json records it
        if weights:
            result = tuning.run_fold_ensemble(train_set, test_set, out_dir, weights, run, chosen)
        else:
            result = tuning.run_final(train_set, test_set, out_dir, settings, run, chosen)
        record = {"trial": best["trial"], "flags": best["flags"], "val_ccc": result["ccc"],
                  "cv_value": best["value"], "test_dir": str(args.test_dir),
                  "select": best["select"], "ensemble": ensemble, "recipe": best["recipe"]}
        if weights:
            record["fold_val_ccc"] = dict(zip(best["fold_weights"], result["seed_ccc"]))
        utils.write_json(record, out_dir / record_name)
    print(best["chosen_by"])
    print(tuning.against_recipe(best))
    if weights:
        print("each fold model alone: " + ", ".join(
            f"val_on_{story} {ccc:.4f}" for story, ccc in record["fold_val_ccc"].items()))
    what = f"the mean of its {len(weights)} fold models" if weights else "the chosen settings"
    print(f"validation CCC of {what} (trial {best['trial']}, cross-validated "
          f"{best['value']:.4f}): {result['ccc']:.4f}")
    return record


def results_of(returned):
    """The ledger row's results: the best trial's CCC, or --final's validation CCC."""
    if "val_ccc" in returned:
        return {"mean_ccc": returned["val_ccc"]}
    return {"mean_ccc": returned["mean"], "std_ccc": returned["std"],
            "mean_minus_std": returned["mean"] - returned["std"]}


if __name__ == "__main__":
    ledger.run_cli(main, get_args_parser(), results_of)
