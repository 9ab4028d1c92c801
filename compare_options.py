"""Compare the training and post-processing options by cross-validation.

    python make_data.py --preset realistic --out_dir data_compare --subjects 10 --stories 5
    python compare_options.py --train_dir data_compare/Training --test_dir data_compare/Validation

Runs crossval.py once per option (the default first) with the same data, epochs and
learning rate, into <out_dir>/<option>/, and prints a Markdown table of the held-out
CCC of each (mean, std and mean-std over folds) with its wall time; the table is
also written to <out_dir>/compare.csv. Filtering alone needs no training: --smooth
and --lowpass re-evaluate the default run's checkpoints. Options that change what
is scored (--calibrate) train, so that the best epoch is chosen on what is reported.

Then personalization: the default run's model for the fold that holds out story 1
(as the user guide copies cv_AT/val_on_1/best.save) is fine-tuned per listener with
personalize.py, with and without --inner_cv and --calibrate, and with each
fine-tuning method of finetuning.py (--finetune head, adapter, --anchor, --mix, and
--mix_weighting, and --inner_cv choosing among them), into
<out_dir>/personal_<option>/. Each --inner_cv row comes again with --inner_init, its
inner folds starting from a crossval.py run over the training stories
(<out_dir>/training_stories_cv/, made once). A second table (the personalized track:
the mean over listeners of their story-1 CCC before and after, how many listeners got
worse, the gain --inner_cv estimated beside the one measured, and the disk each run
takes) is written to <out_dir>/personalize.csv. --personal_only runs some of its rows.

--recipes compares whole recipes instead, as the real data asks (validation CCC
that swings from epoch to epoch): each is trained once with story 1 validating
(train.py) and cross-validated over every story (crossval.py), and the table gives
what can be reported (the last epoch's validation CCC, or its average's), the best
epoch's (picked on validation, labelled so), the std of the validation CCC over the
last 20 epochs, the last epoch's CV mean +- std, and the wall time; it goes to
<out_dir>/recipes.csv. The fold ensemble and the CV-chosen post-processing
cross-validate over the training stories only, and score story 1 once.

    python make_data.py --preset unstable --out_dir data_unstable
    python compare_options.py --recipes --train_dir data_unstable/Training --test_dir data_unstable/Validation
"""
import argparse
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

import crossval
import personalize
import train
from empathy import datasets, finetuning, layout, ledger, parallel, postprocessing, tables, utils

# (name, crossval.py flags, whether it re-evaluates the default run instead of training)
VARIANTS = [
    ("default", [], False),
    ("--loss ccc", ["--loss", "ccc"], False),
    ("--label_delay 3", ["--label_delay", "3"], False),
    ("--smooth 4", ["--smooth", "4"], True),
    ("--smooth 4 --smooth_window gaussian", ["--smooth", "4", "--smooth_window", "gaussian"], True),
    ("--lowpass 0.01", ["--lowpass", "0.01"], True),
    ("--calibrate", ["--calibrate"], False),
    ("--loss ccc --calibrate", ["--loss", "ccc", "--calibrate"], False),
    ("--lowpass 0.01 --calibrate", ["--lowpass", "0.01", "--calibrate"], False),
    ("--bidirectional", ["--bidirectional"], False),
    ("--layers 2", ["--layers", "2"], False),
    ("--seeds 3", ["--seeds", "3"], False),
    ("--patience 3", ["--patience", "3"], False),
]


# The recipes of --recipes: (name, flags added to RECIPE_DATA's, how it is run).
# "train": train.py on story 1 and crossval.py over every story; "ensemble": the
# folds of the training stories average their predictions of story 1
# (crossval.py --ensemble_dir); "chosen_postprocessing": crossval.py over the
# training stories chooses the post-processing, then train.py takes it.
HONEST_BASE = ["--normalize", "--loss", "ccc", "--calibrate", "--lr", "1e-4"]
RECIPES = [
    ("the guide's default", [], "train"),
    ("--normalize --loss ccc --calibrate --lr 1e-4", HONEST_BASE, "train"),
    ("+ --ema 0.99", [*HONEST_BASE, "--ema", "0.99"], "train"),
    ("+ --swa_start 21", [*HONEST_BASE, "--swa_start", "21"], "train"),
    ("+ --average_last 10", [*HONEST_BASE, "--average_last", "10"], "train"),
    ("+ --ema 0.99 --average_last 10", [*HONEST_BASE, "--ema", "0.99", "--average_last", "10"],
     "train"),
    ("fold ensemble of the training folds", HONEST_BASE, "ensemble"),
    ("+ post-processing chosen by CV", HONEST_BASE, "chosen_postprocessing"),
    ("+ --swa_start 21, post-processing chosen by CV", [*HONEST_BASE, "--swa_start", "21"],
     "chosen_postprocessing"),
    ("+ --swa_start 1", [*HONEST_BASE, "--swa_start", "1"], "train"),
    ("+ --swa_start 1, post-processing chosen by CV", [*HONEST_BASE, "--swa_start", "1"],
     "chosen_postprocessing"),
    ("+ --seeds 5", [*HONEST_BASE, "--seeds", "5"], "train"),
    ("+ --swa_start 1 --seeds 5", [*HONEST_BASE, "--swa_start", "1", "--seeds", "5"], "train"),
    ("+ --swa_start 1 --weight_decay 5e-3", [*HONEST_BASE, "--swa_start", "1", "--weight_decay",
                                             "5e-3"], "train"),
]
RECIPE_EPOCHS = 60
STABILITY_EPOCHS = 20  # the std of the validation CCC over this many last epochs


def get_args_parser():
    parser = argparse.ArgumentParser(
        "compare_options.py", parents=[datasets.get_split_args_parser()],
        description="Compare the training and post-processing options by cross-validation.")
    parser.add_argument("--mods", help="modalities (default: audio,text; with --recipes "
                                       "audio,text,v_sub)")
    parser.add_argument("--epochs", type=int, help="epochs per fold (default: 20; with --recipes "
                                                   f"{RECIPE_EPOCHS})")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="folds run side by side (default: %(default)s)")
    parser.add_argument("--out_dir", default="./compare", help="where the runs go (default: %(default)s)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these options, by folder name, e.g. default loss_ccc "
                             "smooth_4 (the filtering options and personalization need the "
                             "default run)")
    parser.add_argument("--ledger", default=ledger.DEFAULT_LEDGER, metavar="PATH",
                        help="ledger to which every cross-validation and personalization run "
                             "appends its row (see runs.py); 'none' to skip (default: %(default)s)")
    parser.add_argument("--personal_epochs", type=int, default=10, metavar="N",
                        help="fine-tuning epochs per listener (with --inner_cv: at most N); "
                             "0 skips personalization (default: %(default)s)")
    parser.add_argument("--recipes", nargs="*", metavar="NAME",
                        help="compare the recipes of RECIPES instead (by folder name, e.g. "
                             "ema_0_99; none named: all), --mods audio,text,v_sub, "
                             f"{RECIPE_EPOCHS} epochs unless --epochs is given; see above")
    parser.add_argument("--personal_only", nargs="+", metavar="NAME",
                        help="run only these rows of the personalization table, by folder name "
                             "(e.g. inner_cv_calibrate inner_cv_finetune_head; default: all)")
    return parser


# (name, personalize.py flags) of the personalization table; "init.save" only evaluates.
PERSONAL_VARIANTS = [
    ("fine-tune", []),
    ("fine-tune --calibrate", ["--calibrate"]),
    ("--inner_cv", ["--inner_cv"]),
    ("--inner_cv --calibrate", ["--inner_cv", "--calibrate"]),
    ("--inner_cv --finetune head", ["--inner_cv", "--finetune", "head"]),
    ("--inner_cv --finetune adapter", ["--inner_cv", "--finetune", "adapter"]),
    ("--inner_cv --anchor 0.01 0.1 1", ["--inner_cv", "--anchor", "0.01", "0.1", "1"]),
    ("--inner_cv --mix 0.25 0.5", ["--inner_cv", "--mix", "0.25", "0.5"]),
    ("--inner_cv --mix 0.5 --mix_weighting uniform similar",
     ["--inner_cv", "--mix", "0.5", "--mix_weighting", "uniform", "similar"]),
    ("--inner_cv among all methods", ["--inner_cv", "--finetune", "all", "head", "adapter",
                                      "--anchor", "0", "0.1", "--mix", "0", "0.5"]),
    ("--inner_cv --calibrate --finetune head", ["--inner_cv", "--calibrate", "--finetune", "head"]),
    ("--inner_cv --calibrate --finetune adapter",
     ["--inner_cv", "--calibrate", "--finetune", "adapter"]),
]
# Each --inner_cv row again with --inner_init: its inner folds start from a crossval.py run
# over the training stories (TRAINING_STORIES_CV, run once and shared by the rows).
TRAINING_STORIES_CV = "training_stories_cv"
PERSONAL_VARIANTS += [(f"{name} --inner_init", [*flags, "--inner_init", TRAINING_STORIES_CV])
                      for name, flags in PERSONAL_VARIANTS if "--inner_cv" in flags]


def variant_folder(out_dir, name):
    return Path(out_dir) / (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "default")


def default_fold_model(out_dir):
    """The checkpoint personalization starts from, as the user guide's: story 1's fold."""
    return layout.fold_dir(variant_folder(out_dir, "default"), 1) / layout.BEST


def copy_best_checkpoints(source, target):
    """The default run's best.save and last.save of every fold, for re-evaluating it
    another way."""
    for story in layout.fold_stories(source):
        for name in (layout.BEST, layout.LAST):
            checkpoint = layout.fold_dir(source, story) / name
            if not checkpoint.is_file():
                continue
            destination = layout.fold_dir(target, story) / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(checkpoint, destination)


def run_recorded(script, argv, ledger_file, results_of):
    """`script`'s main on `argv`, its run appended to `ledger_file` (if any) as if
    it had been run from the command line."""
    parser = script.get_args_parser()
    return ledger.run_recorded(script.main, parser, parser.parse_args(argv), ledger_file,
                               results_of, command=" ".join([parser.prog, *argv]))


def run_variant(name, flags, reevaluate, common, out_dir, ledger_file=None):
    """Cross-validate one option; returns its table row."""
    folder = variant_folder(out_dir, name)
    if reevaluate:
        default = variant_folder(out_dir, "default")
        if not (default / layout.CROSSVAL_TABLE).is_file():
            raise utils.ToolkitError(f"{name} re-evaluates the default run, but {default} has "
                                     "none: include default in --only")
        copy_best_checkpoints(default, folder)
        argv = common + ["--out_dir", str(folder), "--test", *flags]
    else:
        argv = common + ["--out_dir", str(folder), "--overwrite", *flags]
    start = time.perf_counter()
    table = run_recorded(crossval, argv, ledger_file, tables.crossval_results)
    seconds = time.perf_counter() - start
    summary = tables.crossval_results(table)
    return {"option": name, "mean_ccc": summary["mean_ccc"], "std_ccc": summary["std_ccc"],
            "mean_minus_std": summary["mean_minus_std"], "seconds": seconds}


def run_personalization(name, flags, common, out_dir, epochs, ledger_file=None, cv_common=()):
    """Fine-tune the default run's story-1 model per listener; returns its table row
    (the mean over listeners of their CCC before and after, of the gain --inner_cv
    estimated and the one measured, and the disk the run's folder takes). A row with
    --inner_init first cross-validates over the training stories (crossval.py with
    `cv_common`), once."""
    init = default_fold_model(out_dir)
    if not init.is_file():
        raise utils.ToolkitError(f"personalization starts from {init}, which does not exist: "
                                 "include default in --only, on data whose story 1 validates")
    folder = Path(out_dir) / f"personal_{variant_folder(out_dir, name).name}"
    if folder.exists():  # its disk use is measured: nothing of an earlier run may stay
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copyfile(init, folder / layout.INIT_CHECKPOINT)
    start = time.perf_counter()
    if TRAINING_STORIES_CV in flags:
        cv_dir = training_stories_cv(out_dir, common, cv_common, ledger_file)
        flags = [str(cv_dir) if flag == TRAINING_STORIES_CV else flag for flag in flags]
    argv = [*common, "--out_dir", str(folder), "--epochs", str(epochs), "--overwrite",
            "--save_freq", str(epochs), *flags]
    table = run_recorded(personalize, argv, ledger_file, personalize.ledger_results)
    mean = table.set_index("subject").loc["Mean"]
    subjects = table[table["subject"] != "Mean"]
    return {"option": name, "before_ccc": mean["before_ccc"], "after_ccc": mean["after_ccc"],
            "worse": int((subjects["after_ccc"] < subjects["before_ccc"]).sum()),
            "listeners": len(subjects), "mean_epochs": mean.get("epochs", epochs),
            "methods": chosen_methods(subjects),
            "estimated_gain": mean.get("estimated_gain", np.nan),
            "measured_gain": mean["after_ccc"] - mean["before_ccc"],
            "disk_mb": folder_bytes(folder) / 1e6, "seconds": time.perf_counter() - start}


def training_stories_cv(out_dir, common, cv_common, ledger_file=None):
    """The crossval.py run over the training folder's stories that --inner_init rows
    start their inner folds from (made once, with the default run's flags)."""
    folder = Path(out_dir) / TRAINING_STORIES_CV
    if not (folder / layout.CROSSVAL_TABLE).is_file():
        train_dir = dict(zip(common[::2], common[1::2]))["--train_dir"]
        stories = sorted({story for _, story in datasets.annotation_files([train_dir])})
        argv = [*cv_common, "--stories", *map(str, stories), "--out_dir", str(folder),
                "--overwrite"]
        run_recorded(crossval, argv, ledger_file, tables.crossval_results)
    return folder


def folder_bytes(folder):
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def chosen_methods(subjects):
    """What the listeners got, e.g. 'head x4, none x6' (blank without a method column)."""
    if "finetune" not in subjects:
        return ""
    names = [finetuning.Method.from_row(row).name if row["finetune"] != finetuning.KEPT_INIT
             else row["finetune"] for _, row in subjects.iterrows()]
    return ", ".join(f"{name} x{count}" for name, count in pd.Series(names).value_counts().items())


def personal_markdown(table):
    lines = ["| personalize.py | CCC before | CCC after | listeners worse | gain estimated by "
             "--inner_cv | gain measured | mean epochs | chosen | disk | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table.itertuples():
        estimated = "" if pd.isna(row.estimated_gain) else f"{row.estimated_gain:+.4f}"
        lines.append(f"| `{row.option}` | {row.before_ccc:.4f} | {row.after_ccc:.4f} | "
                     f"{row.worse} of {row.listeners} | {estimated} | {row.measured_gain:+.4f} | "
                     f"{row.mean_epochs:.1f} | {row.methods} | {row.disk_mb:.0f} MB | "
                     f"{row.seconds:.0f} s |")
    return "\n".join(lines)


def markdown(table):
    lines = ["| option | mean CCC | std | mean-std | wall time |", "|---|---|---|---|---|"]
    for row in table.itertuples():
        lines.append(f"| `{row.option}` | {row.mean_ccc:.4f} | {row.std_ccc:.4f} | "
                     f"{row.mean_minus_std:.4f} | {row.seconds:.0f} s |")
    return "\n".join(lines)


def chosen_personal_variants(out_dir, only):
    """The rows of PERSONAL_VARIANTS that --personal_only names (all without it)."""
    names = {variant_folder(out_dir, name).name: (name, flags) for name, flags in PERSONAL_VARIANTS}
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise utils.ToolkitError(f"--personal_only: unknown row {unknown[0]}; choose from "
                                 + ", ".join(names))
    return [names[folder] for folder in only] if only else list(names.values())


# ---------------------------------------------------------------- --recipes

def validation_curve(model_dir):
    """(reportable CCC, best CCC, its epoch, std over the last epochs) of a training run
    from its metrics.csv: the last epoch's, or of the --average_last average at the
    last epoch."""
    from empathy import checkpoints
    metrics = pd.read_csv(checkpoints.run_checkpoints(model_dir, layout.METRICS)[0])
    last = metrics.iloc[-1]
    reported = last.get("val_ccc_average", np.nan)
    reported = last["val_ccc"] if pd.isna(reported) else reported
    best = metrics["val_ccc"].idxmax()
    return (reported, metrics.loc[best, "val_ccc"], int(metrics.loc[best, "epoch"]),
            metrics["val_ccc"].tail(STABILITY_EPOCHS).std(ddof=0))


def seeds_curve(model_dir, train_dir, test_dir, mods):
    """validation_curve's four numbers for a --seeds run, from the validation CCC of
    the seeds' average prediction at every epoch (each seed's epoch_<N>.save, as
    train.py --test scores best.save's; the recipe trains with --save_freq 1 for this).
    A seed's own metrics.csv would show the swings that the average smooths. The
    epochs' checkpoints are deleted once scored, but for the last."""
    from empathy import checkpoints, engine
    train_set, val_set = datasets.load_train_test(train_dir, test_dir, mods.split(","))
    epochs = layout.saved_epochs(checkpoints.run_checkpoints(model_dir, layout.LAST)[0].parent)
    curve = {}
    for epoch in epochs:
        paths = checkpoints.run_checkpoints(model_dir, layout.checkpoint_name(epoch))
        trained, saved = engine.load_for_evaluation(paths, train_set, False, {}, "cpu", [val_set])
        curve[epoch] = engine.evaluate_seeds(trained, val_set, "cpu", saved)["ccc"]
        if epoch != epochs[-1]:
            for path in paths:
                path.unlink()
    curve = pd.Series(curve)
    return (curve.iloc[-1], curve.max(), int(curve.idxmax()),
            curve.tail(STABILITY_EPOCHS).std(ddof=0))


def without_chosen(flags):
    """`flags` less those that a post-processing choice sets (--calibrate, --smooth,
    --lowpass, ...): --postprocessing_from brings the choice, which may differ."""
    chosen = {f"--{name}" for name in postprocessing.CHOSEN}
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in chosen:
            skip = flag != "--calibrate"  # the others take a value
        else:
            kept.append(flag)
    return kept


def run_recipe(name, flags, kind, common, out_dir, jobs, ledger_file=None):
    """One row of the recipes' table."""
    folder = variant_folder(out_dir, name)
    start = time.perf_counter()
    row = {"recipe": name, "best_ccc": np.nan, "best_epoch": "", "std_last": np.nan}
    cv = [*common, *flags, "--jobs", str(jobs), "--overwrite"]
    if kind == "train":
        seeds = "--seeds" in flags
        run_recorded(train, [*common, *flags, "--model_dir", str(folder / "val"), "--overwrite",
                             *(["--save_freq", "1"] if seeds else [])],
                     ledger_file, train.ledger_results)
        row["val_ccc"], row["best_ccc"], row["best_epoch"], row["std_last"] = (
            seeds_curve(folder / "val", *common[1:6:2]) if seeds
            else validation_curve(folder / "val"))
        table = run_recorded(crossval, [*cv, "--out_dir", str(folder / "cv")], ledger_file,
                             tables.crossval_results)
        row["cv"] = f"{len(table) - len(tables.SUMMARY_ROWS)} folds"
    else:  # over the training stories only; story 1 (the test folder) is scored once
        training = [str(story) for story in datasets.load_videos(common[1], ["audio"]).stories]
        cv += ["--stories", *training, "--out_dir", str(folder / "cv")]
        if kind == "ensemble":
            table = run_recorded(crossval, [*cv, "--ensemble_dir", common[3]], ledger_file,
                                 tables.crossval_results)
            ensemble = pd.read_csv(folder / "cv" / layout.ENSEMBLE_TABLE).set_index("model")
            row["val_ccc"] = ensemble.loc["ensemble", "ccc"]
        else:
            table = run_recorded(crossval, [*cv, "--choose_postprocessing"], ledger_file,
                                 tables.crossval_results)
            run_recorded(train, [*common, *without_chosen(flags), "--model_dir",
                                 str(folder / "val"), "--overwrite", "--postprocessing_from",
                                 str(folder / "cv")],
                         ledger_file, train.ledger_results)
            row["val_ccc"], row["best_ccc"], row["best_epoch"], row["std_last"] = \
                validation_curve(folder / "val")
        row["cv"] = f"{len(training)} training folds"
    summary = tables.crossval_results(table)  # the last epoch's (or its average's)
    if kind == "chosen_postprocessing":  # the chosen candidate's own CV: picked on those folds
        choice = json.loads((folder / "cv" / layout.POSTPROCESSING_CHOICE).read_text())
        summary = {"mean_ccc": choice["cv_mean"], "std_ccc": choice["cv_std"]}
        row["cv"] += f", {choice['flags'] or 'none'} picked on them"
    row.update(cv_mean=summary["mean_ccc"], cv_std=summary["std_ccc"],
               seconds=time.perf_counter() - start)
    return row


def recipes_markdown(table):
    lines = [f"| recipe | validation CCC, last epoch (nothing picked) | best epoch's CCC (picked "
             f"on validation) | std over the last {STABILITY_EPOCHS} epochs | CV at the last "
             "epoch, mean +- std | wall time |", "|---|---|---|---|---|---|"]
    for row in table.itertuples():
        best = f"{row.best_ccc:.4f} (epoch {row.best_epoch})" if row.best_epoch != "" else "n/a"
        std = f"{row.std_last:.4f}" if not pd.isna(row.std_last) else "n/a"
        lines.append(f"| `{row.recipe}` | {row.val_ccc:.4f} | {best} | {std} | {row.cv_mean:.4f} "
                     f"+- {row.cv_std:.4f} ({row.cv}) | {row.seconds:.0f} s |")
    return "\n".join(lines)


def chosen_recipes(out_dir, names):
    folders = {variant_folder(out_dir, name).name: recipe for recipe in RECIPES
               for name in [recipe[0]]}
    unknown = sorted(set(names) - set(folders))
    if unknown:
        raise utils.ToolkitError(f"--recipes: unknown recipe {unknown[0]}; choose from "
                                 + ", ".join(folders))
    return [folders[name] for name in names] if names else RECIPES


def compare_recipes(args):
    recipes = chosen_recipes(args.out_dir, args.recipes)
    mods, epochs = args.mods or "audio,text,v_sub", args.epochs or RECIPE_EPOCHS
    if epochs < max(STABILITY_EPOCHS, 21):
        raise utils.ToolkitError(f"--recipes needs --epochs {max(STABILITY_EPOCHS, 21)} or more "
                                 f"(--swa_start 21, the std over the last {STABILITY_EPOCHS}), "
                                 f"got {epochs}")
    common = ["--train_dir", args.train_dir, "--test_dir", args.test_dir, "--mods", mods,
              "--epochs", str(epochs), "--save_freq", str(epochs)]
    ledger_file = ledger.ledger_path(args)
    utils.check_writable(args.out_dir)
    layout.write_run_record(args, args.out_dir)
    table = pd.DataFrame([run_recipe(name, flags, kind, common, args.out_dir, args.jobs,
                                     ledger_file)
                          for name, flags, kind in recipes])
    utils.write_csv(table, Path(args.out_dir) / layout.RECIPES_TABLE)
    print(f"\nrecipes, --mods {mods} --epochs {epochs}, story 1 validating:")
    print(recipes_markdown(table))
    return table


def main(args):
    # --jobs reaches crossval.py's checks only after a train.py run or args.json: check it first
    parallel.Runner(args.jobs).check()
    if args.recipes is not None:
        return compare_recipes(args)
    args.mods, args.epochs = args.mods or "audio,text", args.epochs or 20
    names = {variant_folder(args.out_dir, name).name: name for name, _, _ in VARIANTS}
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        raise utils.ToolkitError(f"--only: unknown option {unknown[0]}; choose from "
                                 + ", ".join(names))
    chosen = {names[folder] for folder in args.only} if args.only else set(names.values())
    common = ["--train_dir", args.train_dir, "--test_dir", args.test_dir, "--mods", args.mods,
              "--epochs", str(args.epochs), "--lr", str(args.lr), "--jobs", str(args.jobs),
              "--save_freq", str(args.epochs)]
    if args.personal_epochs < 0:
        raise utils.ToolkitError(f"--personal_epochs must be 0 or more, got {args.personal_epochs}")
    personal_variants = chosen_personal_variants(args.out_dir, args.personal_only)
    ledger_file = ledger.ledger_path(args)
    utils.check_writable(args.out_dir)
    layout.write_run_record(args, args.out_dir)
    rows = [run_variant(name, flags, reevaluate, common, args.out_dir, ledger_file)
            for name, flags, reevaluate in VARIANTS if name in chosen]
    table = pd.DataFrame(rows)
    utils.write_csv(table, Path(args.out_dir) / layout.COMPARE_TABLE)
    personal = None
    if args.personal_epochs and "default" in chosen:
        personal_common = ["--train_dir", args.train_dir, "--test_dir", args.test_dir,
                           "--mods", args.mods, "--lr", str(args.lr), "--jobs", str(args.jobs)]
        personal = pd.DataFrame([run_personalization(name, flags, personal_common, args.out_dir,
                                                     args.personal_epochs, ledger_file, common)
                                 for name, flags in personal_variants])
        utils.write_csv(personal, Path(args.out_dir) / layout.PERSONALIZE_TABLE)
    print(f"\nheld-out CCC of crossval.py --mods {args.mods} --epochs {args.epochs} --lr {args.lr}:")
    print(markdown(table))
    if personal is not None:
        print(f"\npersonalized track (story 1, mean over listeners) of personalize.py from "
              f"{default_fold_model(args.out_dir)}, "
              f"--epochs {args.personal_epochs} --lr {args.lr}:")
        print(personal_markdown(personal))
    return table, personal


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
