"""The ledger: one row per run of the toolkit's scripts, in one CSV.

    python crossval.py --mods audio,text --out_dir cv_AT          # appends a row to ./runs.csv
    python runs.py                                                 # prints the ledger
    python runs.py runs.csv --script crossval --where loss=ccc
    python plot.py runs runs.csv --out plots/runs.png

Every run of train.py, crossval.py, cv_epochs.py, personalize.py, fusion.py and
cv_fusion.py that finishes appends one row to the ledger (`--ledger PATH`, default
./runs.csv; `--ledger none` skips it): when it ended, the script, the full command,
its output folder, the settings that differ from the script's defaults (as JSON),
the data folders, the results (mean, std and mean-std CCC, training CCC, best epoch),
the wall time, and the package versions and git commit of the toolkit. A run that
fails or is stopped appends nothing. Rows are appended under an exclusive lock
(fcntl), each in one write, so runs that finish at once lose nothing. runs.py at
the top level is its command line.
"""
import argparse
import csv
import fcntl
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from . import parallel, utils
from .utils import ToolkitError

DEFAULT_LEDGER = "runs.csv"
COLUMNS = ["time", "script", "command", "out_dir", "settings", "train_dir", "test_dir",
           "mean_ccc", "std_ccc", "mean_minus_std", "train_ccc", "best_epoch", "wall_s",
           "versions", "commit"]
RESULTS = ("mean_ccc", "std_ccc", "mean_minus_std", "train_ccc", "best_epoch")
OUTPUT_FLAGS = ("out_dir", "model_dir", "pred_dir", "feat_dir")  # the first one a script has
NOT_SETTINGS = {"help", "ledger"}
# Flags that say how a run ran, not what it computed: left out of the plot's labels.
OPERATIONAL = {"overwrite", "resume", "jobs", "scheduler", "cuda", "tensorboard"}
TOOLKIT_DIR = Path(__file__).resolve().parents[1]  # the checkout: its git commit goes in the row


def get_ledger_args_parser():
    """--ledger, taken by every script that records its runs."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("ledger")
    group.add_argument("--ledger", default=DEFAULT_LEDGER, metavar="PATH",
                       help="CSV to which the finished run appends one row of settings and "
                            "results; 'none' to skip (default: %(default)s)")
    return parser


# ---------------------------------------------------------------- writing the ledger

def ledger_path(args):
    """The ledger a run appends to (None for --ledger none), checked before the run
    starts: it must be a ledger already, or not exist yet."""
    value = getattr(args, "ledger", None)
    if value is None or value.lower() == "none":
        return None
    path = Path(value)
    if path.exists():
        if not path.is_file():
            raise ToolkitError(f"--ledger {path} is not a file: give a CSV path, or none")
        header = _first_line(path)
        if header and header != ",".join(COLUMNS):
            raise ToolkitError(f"--ledger {path} is not a ledger of this toolkit (its first line "
                               "is not the ledger's header): give another path, or none")
        # Found only after the run otherwise, when its row cannot be appended.
        if not os.access(path, os.W_OK):
            raise ToolkitError(f"--ledger {path} cannot be written (permission denied or "
                               "read-only): make it writable (chmod u+w), or give another "
                               "path, or none")
    _check_can_create(path)
    return path


def _check_can_create(path):
    """The ledger's folder is, or can become, a folder this process writes into:
    checked without creating it (the run may yet be refused)."""
    existing = next(folder for folder in Path(path).absolute().parents if folder.exists())
    if not existing.is_dir():
        raise ToolkitError(f"--ledger {path}: {existing} is a file, not a folder: give another "
                           "path, or none")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ToolkitError(f"--ledger {path} cannot be written ({existing} is not writable): "
                           "give another path, or none")


def _first_line(path):
    try:
        with open(path, "rb") as file:  # bytes: a damaged later line is not the header's fault
            return file.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    except OSError as error:
        raise ToolkitError(f"--ledger {path} cannot be read ({error.__class__.__name__}): give "
                           "another path, or none") from None


def record(path, script, parser, args, results, seconds, command=None):
    """Append the finished run's row to the ledger at `path`; `command` defaults to
    this process's command line."""
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "script": script,
           "command": command or " ".join(sys.argv), "out_dir": output_folder(args),
           "settings": json.dumps(changed_settings(parser, args), sort_keys=True, default=str),
           "train_dir": getattr(args, "train_dir", ""), "test_dir": getattr(args, "test_dir", ""),
           **{name: _plain(results.get(name)) for name in RESULTS},
           "wall_s": round(seconds, 2), "versions": versions(), "commit": toolkit_commit()}
    append_row(path, row)


def append_row(path, row):
    """One CSV line, written whole under an exclusive lock (with the header if the
    ledger is new), so that concurrent runs neither interleave nor lose rows."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            if os.fstat(file.fileno()).st_size == 0:  # a new ledger: the header first
                writer.writeheader()
            writer.writerow(row)
            file.write(text.getvalue())
            file.flush()
            os.fsync(file.fileno())
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def _plain(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def output_folder(args):
    for flag in OUTPUT_FLAGS:
        if getattr(args, flag, None) is not None:
            return str(getattr(args, flag))
    return ""


def changed_settings(parser, args):
    """{flag: value} of every setting that differs from the parser's default (the
    data folders and the output folder have columns of their own)."""
    output = next((flag for flag in OUTPUT_FLAGS if getattr(args, flag, None) is not None), None)
    skipped = NOT_SETTINGS | {"train_dir", "test_dir", output}
    return {name: value for name, value in vars(args).items()
            if name not in skipped and value != parser.get_default(name)}


def versions():
    import numpy
    import sklearn
    import torch
    return (f"python {platform.python_version()}; torch {torch.__version__}; numpy "
            f"{numpy.__version__}; pandas {pd.__version__}; scikit-learn {sklearn.__version__}")


def toolkit_commit():
    """The toolkit's git commit ('+dirty' with uncommitted changes), or '' outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(TOOLKIT_DIR), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode:
            return ""
        dirty = subprocess.run(["git", "-C", str(TOOLKIT_DIR), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_recorded(main, parser, args, ledger, results_of, command=None):
    """`main(args)`, and, if it returns, its row appended to `ledger` (None: no
    ledger); `results_of(what main returned)` gives the row's results."""
    start = time.perf_counter()
    returned = main(args)
    if ledger:
        results = results_of(returned) if returned is not None else {}
        record(ledger, parser.prog, parser, args, results, time.perf_counter() - start, command)
    return returned


def run_cli(main, parser, results_of, argv=None):
    """`utils.run_cli`, with the finished run recorded in its --ledger (which is
    checked before the run writes anything). A stop handler covers the whole run, to
    its ledger row, and the local workers end with it (parallel.whole_run)."""
    def run(args):
        with parallel.whole_run():
            return run_recorded(main, parser, args, ledger_path(args), results_of)
    return utils.run_cli(run, parser, argv)


# ---------------------------------------------------------------- reading the ledger

def read_ledger(path):
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"ledger {path} does not exist: run a script (it appends to "
                           f"./{DEFAULT_LEDGER}) or give the path of another ledger")
    if _first_line(path) != ",".join(COLUMNS):
        raise ToolkitError(f"{path} is not a ledger of this toolkit: its first line is not "
                           "the ledger's header")
    _check_rows(path)
    try:
        return pd.read_csv(path, dtype={"settings": str, "best_epoch": str, "commit": str},
                           keep_default_na=False, na_values=[""])
    except (ValueError, pd.errors.ParserError) as error:  # what _check_rows did not foresee
        raise ToolkitError(f"{path} cannot be read ({str(error).strip().splitlines()[0][:120]}): "
                           "fix or delete the damaged line") from None


NUMERIC = ("mean_ccc", "std_ccc", "mean_minus_std", "train_ccc", "wall_s")


def _check_rows(path):
    """Refuse a ledger with a damaged row (edited by hand, or cut short by a full
    disk), naming its line, before pandas fails on it with a traceback."""
    try:
        with open(path, encoding="utf-8", newline="") as file:
            reader = csv.reader(file)
            next(reader)  # the header, checked by the caller
            start = reader.line_num + 1
            for row in reader:
                problem = _row_problem(row)
                if problem:
                    raise ToolkitError(f"{path}, line {start}: a damaged row ({problem}): fix or "
                                       "delete that line")
                start = reader.line_num + 1
    except UnicodeDecodeError as error:
        line = path.read_bytes()[:error.start].count(b"\n") + 1
        raise ToolkitError(f"{path}, line {line}: a damaged row (not UTF-8 text): fix or "
                           "delete that line") from None
    except csv.Error as error:
        raise ToolkitError(f"{path}, line {start}: a damaged row ({error}): fix or delete "
                           "that line") from None


def _row_problem(row):
    """What is wrong with a ledger row (a list of fields), or None."""
    if len(row) != len(COLUMNS):
        return f"{len(row)} fields, not {len(COLUMNS)}"
    fields = dict(zip(COLUMNS, row))
    for name in NUMERIC:
        try:
            float(fields[name] or "nan")
        except ValueError:
            return f"{name} {fields[name][:40]!r} is not a number"
    try:
        settings = json.loads(fields["settings"] or "{}")
    except ValueError:
        settings = None
    if not isinstance(settings, dict):
        return "its settings are not a JSON object"
    return None


def varying_settings(settings):
    """The settings (not the OPERATIONAL flags) whose values differ between the rows
    (a setting missing from a row is at its default there)."""
    keys = sorted(set().union(*settings) - OPERATIONAL) if settings else []
    return [key for key in keys
            if len({json.dumps(row.get(key), sort_keys=True, default=str) for row in settings}) > 1]


def run_labels(ledger):
    """A label per row naming its values of the settings that vary between rows
    ("default" where it has none of them)."""
    settings = settings_of(ledger)
    varying = varying_settings(settings)
    return [", ".join(f"{key}={_as_text(row[key])}" for key in varying if key in row) or "default"
            for row in settings]


def settings_of(ledger):
    """Each row's changed settings as a dict."""
    return [json.loads(text) if isinstance(text, str) and text else {}
            for text in ledger["settings"]]


def select(ledger, script=None, where=()):
    """The rows of `script` (with or without .py) whose settings match every
    KEY=VALUE of `where` (values compared as the JSON text of the setting)."""
    keep = pd.Series(True, index=ledger.index)
    if script:
        keep &= ledger["script"] == (script if script.endswith(".py") else f"{script}.py")
    settings = settings_of(ledger)
    for condition in where:
        key, separator, value = condition.partition("=")
        if not separator or not key:
            raise ToolkitError(f"--where {condition}: write KEY=VALUE, e.g. loss=ccc")
        keep &= pd.Series([key in row and _as_text(row[key]) == value for row in settings],
                          index=ledger.index)
    return ledger[keep]


def _as_text(value):
    return value if isinstance(value, str) else json.dumps(value)


