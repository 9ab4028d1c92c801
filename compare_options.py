"""Compare the training and post-processing options by cross-validation.

    python make_data.py --out_dir data_compare --subjects 10 --stories 5 --seconds 120
    python compare_options.py --train_dir data_compare/Training --test_dir data_compare/Validation

Runs crossval.py once per option (the default first) with the same data, epochs and
learning rate, into <out_dir>/<option>/, and prints a Markdown table of the held-out
CCC of each (mean, std and mean-std over folds) with its wall time; the table is
also written to <out_dir>/compare.csv. Smoothing needs no training: it re-evaluates
the default run's checkpoints with --smooth.
"""
import argparse
import re
import shutil
import time
from pathlib import Path

import pandas as pd

import crossval
import train
import utils

# (name, crossval.py flags, whether it re-evaluates the default run instead of training)
VARIANTS = [
    ("default", [], False),
    ("--loss ccc", ["--loss", "ccc"], False),
    ("--label_delay 3", ["--label_delay", "3"], False),
    ("--smooth 4", ["--smooth", "4"], True),
    ("--smooth 4 --smooth_window gaussian", ["--smooth", "4", "--smooth_window", "gaussian"], True),
    ("--bidirectional", ["--bidirectional"], False),
    ("--layers 2", ["--layers", "2"], False),
    ("--seeds 3", ["--seeds", "3"], False),
    ("--patience 3", ["--patience", "3"], False),
]


def get_args_parser():
    parser = argparse.ArgumentParser(
        "compare_options.py", parents=[train.get_split_args_parser()],
        description="Compare the training and post-processing options by cross-validation.")
    parser.add_argument("--mods", default="audio,text", help="modalities (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per fold (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="folds run side by side (default: %(default)s)")
    parser.add_argument("--out_dir", default="./compare", help="where the runs go (default: %(default)s)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these options, by folder name, e.g. default loss_ccc "
                             "smooth_4 (the smoothing options need the default run)")
    return parser


def variant_folder(out_dir, name):
    return Path(out_dir) / (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "default")


def copy_best_checkpoints(source, target):
    """The default run's best.save of every fold, for re-evaluating it another way."""
    for checkpoint in sorted(Path(source).glob("val_on_*/best.save")):
        destination = Path(target) / checkpoint.parent.name / "best.save"
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkpoint, destination)


def run_variant(name, flags, reevaluate, common, out_dir):
    """Cross-validate one option; returns its table row."""
    folder = variant_folder(out_dir, name)
    if reevaluate:
        default = variant_folder(out_dir, "default")
        if not (default / "crossval.csv").is_file():
            raise utils.ToolkitError(f"{name} re-evaluates the default run, but {default} has "
                                     "none: include default in --only")
        copy_best_checkpoints(default, folder)
        argv = common + ["--out_dir", str(folder), "--test", *flags]
    else:
        argv = common + ["--out_dir", str(folder), "--overwrite", *flags]
    start = time.perf_counter()
    table = crossval.main(crossval.get_args_parser().parse_args(argv))
    seconds = time.perf_counter() - start
    summary = table.set_index("story")["val_ccc"]
    return {"option": name, "mean_ccc": summary["Mean"], "std_ccc": summary["Std"],
            "mean_minus_std": summary["Mean-Std"], "seconds": seconds}


def markdown(table):
    lines = ["| option | mean CCC | std | mean-std | wall time |", "|---|---|---|---|---|"]
    for row in table.itertuples():
        lines.append(f"| `{row.option}` | {row.mean_ccc:.4f} | {row.std_ccc:.4f} | "
                     f"{row.mean_minus_std:.4f} | {row.seconds:.0f} s |")
    return "\n".join(lines)


def main(args):
    names = {variant_folder(args.out_dir, name).name: name for name, _, _ in VARIANTS}
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        raise utils.ToolkitError(f"--only: unknown option {unknown[0]}; choose from "
                                 + ", ".join(names))
    chosen = {names[folder] for folder in args.only} if args.only else set(names.values())
    common = ["--train_dir", args.train_dir, "--test_dir", args.test_dir, "--mods", args.mods,
              "--epochs", str(args.epochs), "--lr", str(args.lr), "--jobs", str(args.jobs),
              "--save_freq", str(args.epochs)]
    utils.check_writable(args.out_dir)
    rows = [run_variant(name, flags, reevaluate, common, args.out_dir)
            for name, flags, reevaluate in VARIANTS if name in chosen]
    table = pd.DataFrame(rows)
    utils.write_csv(table, Path(args.out_dir) / "compare.csv")
    print(f"\nheld-out CCC of crossval.py --mods {args.mods} --epochs {args.epochs} --lr {args.lr}:")
    print(markdown(table))
    return table


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
