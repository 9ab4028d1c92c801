"""Print the ledger: one row per finished run of the toolkit's scripts, in runs.csv.

    python runs.py                                                 # prints ./runs.csv
    python runs.py runs.csv --script crossval --where loss=ccc
    python plot.py runs runs.csv --out plots/runs.png

What a row holds, and how rows are written, is empathy/ledger.py's docstring; this is
the ledger's command line.
"""
import argparse

import pandas as pd

from empathy import ledger, utils


def get_args_parser():
    parser = argparse.ArgumentParser(
        "runs.py", description="Print the ledger of runs, filtered by script or setting.")
    parser.add_argument("ledger", nargs="?", default=ledger.DEFAULT_LEDGER,
                        help="the ledger CSV (default: %(default)s)")
    parser.add_argument("--script", help="only this script's runs, e.g. crossval")
    parser.add_argument("--where", nargs="+", default=[], metavar="KEY=VALUE",
                        help="only runs whose changed settings include these, e.g. loss=ccc mods=audio,text")
    parser.add_argument("--all_columns", action="store_true",
                        help="show the command, data folders, versions and commit too")
    return parser


def main(args):
    rows = ledger.select(ledger.read_ledger(args.ledger), args.script, args.where)
    if rows.empty:
        print(f"no run in {args.ledger} matches")
        return rows
    shown = rows if args.all_columns else rows[["time", "script", "out_dir", "settings", *ledger.RESULTS,
                                                "wall_s"]]
    with pd.option_context("display.max_colwidth", 80, "display.width", 250):
        print(utils.format_table(shown))
    return rows


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
