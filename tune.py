"""Search training and post-processing settings with Optuna, by cross-validation
over the training stories; then score the best settings once on the validation set.

    python tune.py --mods audio,text --trials 40 --epochs 60 --out_dir tune_AT
    python tune.py --mods audio,text --trials 60 --epochs 60 --out_dir tune_AT   # 20 more
    python tune.py --mods audio,text --trials 40 --epochs 60 --out_dir tune_AT --final
    python plot.py tune tune_AT

Each trial trains one model per training story held out (the validation folder is
not read) and scores the held-out predictions with post-processing that it samples
afterwards (see tuning.py). The study lives in <out_dir>/study.db (or --storage
URL); running the same command again resumes it: --trials N means N finished
(completed or pruned) trials in all. Writes trials.csv, best.json (the best
settings as flags for train.py and crossval.py) and a ledger row per completed
trial. --jobs N runs trials in N processes here; --scheduler ADDRESS on the workers
of a Dask cluster. --final trains the best settings on every training video and
prints their validation CCC (final/, final.json).
"""
import argparse
from dataclasses import replace
from pathlib import Path

import datasets
import families
import options
import parallel
import postprocessing
import runs
import tuning
import utils


def get_args_parser():
    parser = argparse.ArgumentParser(
        "tune.py", description="Search settings with Optuna by cross-validation over the "
                               "training stories.",
        parents=[options.get_data_args_parser(), options.get_training_args_parser(),
                 options.get_fold_args_parser(), runs.get_ledger_args_parser()])
    # Searched per trial, or not taken: a value given for them is refused (tuning.check_flags).
    parser.set_defaults(out_dir="./tune_out", lr=None, weight_decay=None, loss=None,
                        eval_freq=None, save_freq=None)
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
    group.add_argument("--final", action="store_true",
                       help="train the study's best settings on all training stories and "
                            "score them once on --test_dir")
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
    options.check_before_writing(options.Plan(
        outputs=[(out_dir, "--out_dir")], data=train_set, trains=True, runner=runner,
        options=replace(run, postprocessing_flags={"label_delay": tuning.MAX_LABEL_DELAY})))
    with runs.owned(out_dir):
        study = tuning.create_study(url, args.study_name, attrs)
        tuning.fail_dead_trials(study, out_dir, own_storage=args.storage is None)
        runs.write_run_record(args, out_dir)
        tuning.write_study_record(out_dir, args.storage, args.study_name)
        config = tuning.TuneConfig.from_args(args, run, attrs["models"], runner)
        tuning.run_trials(runner, train_set, config, args.jobs)
        table, best = tuning.write_outputs(study, out_dir)
    print(f"{len(table)} finished trials in {out_dir / runs.TRIALS_TABLE}")
    if best is not None:
        print(f"best: trial {best['trial']}, {args.objective} CCC {best['value']:.4f}: "
              f"{' '.join(best['flags'])}")
    return best


def final(args, train_set, url, attrs, run):
    """--final: the best settings trained on every training video, scored on --test_dir."""
    study = tuning.existing_study(url, args.study_name, must_exist=True)
    tuning.check_study(study, attrs)
    settings, chosen, best = tuning.final_settings(study, run)
    test_set = datasets.load_videos(args.test_dir, train_set.mods)
    out_dir = Path(args.out_dir)
    run = replace(run, settings=settings, postprocessing_flags={
        name: getattr(chosen, name) for name in postprocessing.FLAGS})
    options.check_before_writing(options.Plan(outputs=[(out_dir / runs.FINAL_DIR, "--out_dir")],
                                              options=run, data=train_set, trains=True))
    with runs.owned(out_dir):
        result = tuning.run_final(train_set, test_set, out_dir, settings, run, chosen)
        record = {"trial": best["trial"], "flags": best["flags"], "val_ccc": result["ccc"],
                  "cv_value": best["value"], "test_dir": str(args.test_dir)}
        utils.write_json(record, out_dir / runs.FINAL_RECORD)
    print(f"validation CCC of the best settings (trial {best['trial']}, cross-validated "
          f"{best['value']:.4f}): {result['ccc']:.4f}")
    return record


def results_of(returned):
    """The ledger row's results: the best trial's CCC, or --final's validation CCC."""
    if "val_ccc" in returned:
        return {"mean_ccc": returned["val_ccc"]}
    return {"mean_ccc": returned["mean"], "std_ccc": returned["std"],
            "mean_minus_std": returned["mean"] - returned["std"]}


if __name__ == "__main__":
    runs.run_cli(main, get_args_parser(), results_of)
