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
(fcntl), each in one write, so runs that finish at once lose nothing.

Where results lie. `datasets.py` draws the input tree; this is the output tree of
the scripts, whose names and patterns only the functions below spell:

    <model_dir>/                 a model folder (train.py --model_dir; a fold; a subject)
        args.json                the command's flags and command line (write_run_record)
        best.save                best validation CCC so far          (engine.fit)
        last.save                the newest state, with the optimizer, for --resume
        epoch_<N>.save           every --save_freq epochs
        metrics.csv              per epoch: train_loss, val_ccc
        seed_<s>/                with --seeds N: a model folder per seed, instead
    <pred_dir>/pred_train/, pred_test/    25 fps predictions, <video name>.csv
    <feat_dir>/feat_train/, feat_test/    decision-level features, <video name>.npy
    <out_dir of crossval.py>/
        args.json  crossval.csv
        cv_epochs_args.json  cv_epochs.csv      (cv_epochs.py)
        cv_pred/                 the held-out predictions of every fold
        ensemble.csv  ensemble_pred/     --ensemble_dir: the fold ensemble's predictions
        postprocessing.json  postprocessing_candidates.csv   --choose_postprocessing
        val_on_<story>/          the fold that holds out <story>: a model folder,
                                 with feat_train/ and feat_test/ (--features, cv_epochs.py)
    <out_dir of personalize.py>/
        init.save  args.json  personalize.csv  pred_test/
        subject_<s>/             a model folder per subject; with --inner_cv also
            inner_val_on_<story>/, inner_cv.csv (inner_<method>/val_on_<story>/
            per method where --finetune, --anchor or --mix give several)
    <pred_dir of fusion.py>/     fusion_model.joblib, pred_train/, pred_test/, args.json
                                 (test_args.json for --test)
    <out_dir of cv_fusion.py>/   args.json (test_args.json), crossval.csv, cv_pred/,
                                 val_on_<story>/fusion_model.joblib and pred_train/
    <out_dir of tune.py>/        study.db (the Optuna study, unless --storage), study.json,
                                 args.json, trials.csv, best.json, trial_<n>/val_on_<story>/
                                 (metrics.csv, held_out.npz), final/ and final.json (--final)
    <out_dir of compare_options.py>/  args.json, compare.csv, personalize.csv, a
                                 crossval.py folder per option, personal_<option>/
"""
import thread_policy  # noqa: F401  first: how OpenMP threads wait, set before torch loads

import argparse
import contextlib
import csv
import fcntl
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

import datasets
import parallel
import utils
from utils import ToolkitError

DEFAULT_LEDGER = "runs.csv"
COLUMNS = ["time", "script", "command", "out_dir", "settings", "train_dir", "test_dir",
           "mean_ccc", "std_ccc", "mean_minus_std", "train_ccc", "best_epoch", "wall_s",
           "versions", "commit"]
RESULTS = ("mean_ccc", "std_ccc", "mean_minus_std", "train_ccc", "best_epoch")
OUTPUT_FLAGS = ("out_dir", "model_dir", "pred_dir", "feat_dir")  # the first one a script has
NOT_SETTINGS = {"help", "ledger"}
# Flags that say how a run ran, not what it computed: left out of the plot's labels.
OPERATIONAL = {"overwrite", "resume", "jobs", "scheduler", "cuda", "tensorboard"}
TOOLKIT_DIR = Path(__file__).resolve().parent


def get_ledger_args_parser():
    """--ledger, taken by every script that records its runs."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("ledger")
    group.add_argument("--ledger", default=DEFAULT_LEDGER, metavar="PATH",
                       help="CSV to which the finished run appends one row of settings and "
                            "results; 'none' to skip (default: %(default)s)")
    return parser


# ---------------------------------------------------------------- the output tree

RUN_RECORD = "args.json"
TEST_RUN_RECORD = "test_args.json"  # fusion's --test: beside the fitting run's record
CV_EPOCHS_RUN_RECORD = "cv_epochs_args.json"  # cv_epochs.py: beside crossval.py's record
BEST, LAST, METRICS = "best.save", "last.save", "metrics.csv"
EPOCH_CHECKPOINT = re.compile(r"epoch_(\d+)\.save")
FOLD_PREFIX, INNER_FOLD_PREFIX = "val_on_", "inner_val_on_"
FOLD_FOLDER = re.compile(rf"{FOLD_PREFIX}(\d+)")
CV_PREDICTIONS = "cv_pred"
INIT_CHECKPOINT = "init.save"  # personalize.py's starting model
CROSSVAL_TABLE, CV_EPOCHS_TABLE = "crossval.csv", "cv_epochs.csv"
# crossval.py --ensemble_dir and --choose_postprocessing (read by --postprocessing_from)
ENSEMBLE_PREDICTIONS, ENSEMBLE_TABLE = "ensemble_pred", "ensemble.csv"
POSTPROCESSING_CHOICE, POSTPROCESSING_CANDIDATES = ("postprocessing.json",
                                                    "postprocessing_candidates.csv")
PERSONALIZE_TABLE, INNER_CV_TABLE = "personalize.csv", "inner_cv.csv"
FUSION_MODEL = "fusion_model.joblib"
COMPARE_TABLE, RECIPES_TABLE = "compare.csv", "recipes.csv"  # compare_options.py
# tune.py's study folder (tuning.py)
STUDY_FILE, STUDY_RECORD = "study.db", "study.json"
TRIALS_TABLE, BEST_RECORD, FINAL_RECORD = "trials.csv", "best.json", "final.json"
FINAL_DIR, HELD_OUT_PREDICTIONS, ASK_LOCK = "final", "held_out.npz", ".ask.lock"


def predictions_dir(pred_dir, side):
    """<pred_dir>/pred_<side>: the 25 fps predictions of the "train" or "test" videos."""
    return Path(pred_dir) / f"pred_{side}"


def trial_dir(out_dir, number):
    """<out_dir>/trial_<number, 4 digits>: a tune.py trial's folds."""
    return Path(out_dir) / f"trial_{number:04d}"


def features_dir(feat_dir, side):
    """<feat_dir>/feat_<side>: the decision-level features of the "train" or "test" videos."""
    return Path(feat_dir) / f"feat_{side}"


def checkpoint_name(epoch=None):
    """epoch_<epoch>.save, or best.save for None."""
    return f"epoch_{epoch}.save" if epoch is not None else BEST


def seed_dir(run_dir, seed):
    return Path(run_dir) / f"seed_{seed}"


def fold_name(story):
    """val_on_<story>: a fold's folder, and its column in tables."""
    return f"{FOLD_PREFIX}{story}"


def fold_dir(out_dir, story):
    return Path(out_dir) / fold_name(story)


def inner_fold_dir(subject_folder, story, method_name=None):
    """A fold of personalize.py's inner cross-validation: inner_val_on_<story>/, or
    inner_<method>/val_on_<story>/ when --inner_cv compares several methods."""
    if method_name is None:
        return Path(subject_folder) / f"{INNER_FOLD_PREFIX}{story}"
    return Path(subject_folder) / f"inner_{method_name}" / fold_name(story)


def subject_dir(out_dir, subject):
    return Path(out_dir) / f"subject_{subject}"


def fold_stories(cv_dir):
    """The held-out stories of the val_on_<story> folders in `cv_dir`."""
    return sorted(int(match.group(1)) for path in Path(cv_dir).iterdir()
                  if path.is_dir() and (match := FOLD_FOLDER.fullmatch(path.name)))


def saved_epochs(folder):
    """The epochs N of the epoch_<N>.save files in `folder`, in order."""
    return sorted(int(match.group(1)) for path in Path(folder).glob("epoch_*.save")
                  if (match := EPOCH_CHECKPOINT.fullmatch(path.name)))


def run_checkpoints(run_dir, name=BEST):
    """The checkpoints `name` of the run in `run_dir`: its own, or one per seed_<s>/
    folder of a --seeds run. A run that --patience stopped before the epoch of
    `epoch_<N>.save` stands for it with its last.save (training ended there)."""
    run_dir = Path(run_dir)
    folders = ([run_dir] if (run_dir / LAST).exists() or (run_dir / name).exists()
               else sorted((path for path in run_dir.glob("seed_*") if path.is_dir()),
                           key=lambda path: path.name) or [run_dir])
    return [_checkpoint_or_stop(folder, name) for folder in folders]


def _checkpoint_or_stop(folder, name):
    path = folder / name
    epoch = EPOCH_CHECKPOINT.fullmatch(name)
    if path.is_file() or not epoch or not (folder / LAST).is_file():
        return path
    import checkpoints  # torch, only when a checkpoint must be read
    last = checkpoints.load_checkpoint(folder / LAST)
    if last.get("stopped_early") and last["epoch"] < int(epoch.group(1)):
        return folder / LAST
    return path


def check_fold_checkpoints(out_dir, stories, epochs=(None,), epoch_flags="--test_epoch"):
    """Every fold must hold every checkpoint asked for, before any work starts;
    `epoch_flags` are the flags that chose the epochs, which the error advises on."""
    for story in stories:
        for epoch in epochs:
            for path in run_checkpoints(fold_dir(out_dir, story), checkpoint_name(epoch)):
                if not path.is_file():
                    raise ToolkitError(f"{path} does not exist"
                                       f"{_saved_advice(path.parent, epoch, epoch_flags)}")


def _saved_advice(folder, epoch, epoch_flags):
    """' (saved epochs: 10-50 every 10): choose ...' for a missing checkpoint in `folder`."""
    saved = saved_epochs(folder)
    if not saved:
        return (" (run crossval.py without --test first)" if epoch is None or
                not (Path(folder) / METRICS).is_file() else
                " (the run saved no epoch_<N>.save: train it with crossval.py --save_freq N)")
    advice = f" (saved epochs: {_ranges(saved)})"
    if epoch is None:
        return advice
    if "/" not in epoch_flags:
        return f"{advice}: give {epoch_flags} one of them"
    step = math.gcd(*(b - a for a, b in zip(saved, saved[1:]))) if len(saved) > 1 else 1
    return (f"{advice}: choose {epoch_flags} among them, e.g. --epoch_min {saved[0]} "
            f"--epoch_max {saved[-1]} --epoch_step {step}")


def _ranges(epochs):
    """[10, 20, 30, 50] -> '10-30 every 10, 50' (short lists of saved epochs)."""
    if len(epochs) < 3:
        return ", ".join(map(str, epochs))
    step = epochs[1] - epochs[0]
    if all(b - a == step for a, b in zip(epochs, epochs[1:])):
        return f"{epochs[0]}-{epochs[-1]} every {step}"
    return ", ".join(map(str, epochs[:20])) + (" ..." if len(epochs) > 20 else "")


def check_fresh_model_dir(model_dir, resume, overwrite):
    """Refuse to train over an earlier run unless asked to resume or overwrite it."""
    model_dir = Path(model_dir)
    if resume:
        if not (model_dir / LAST).is_file():
            raise ToolkitError(f"--resume: {model_dir / LAST} does not exist: train "
                               "without --resume first")
    elif _holds_a_run(model_dir) and not overwrite:
        raise ToolkitError(f"{model_dir} already holds a run: pass --resume to continue it, "
                           "--overwrite to replace it, or choose another --model_dir (--out_dir)")


def _holds_a_run(folder):
    """Whether `folder` holds a run's files; best.save and metrics.csv count too: a run
    that died before its first last.save (--save_freq epochs) still holds epochs of work."""
    return any((Path(folder) / name).exists() for name in (LAST, BEST, METRICS))


def check_fresh_runs(folders, resume, overwrite):
    """`check_fresh_model_dir` for the runs of several seeds (or folds); returns
    {folder: whether it continues from its last.save}. With --resume, runs that had
    not saved yet (the command stopped before reaching them) start afresh."""
    saved = {folder: (Path(folder) / LAST).is_file() for folder in folders}
    if resume and not any(saved.values()):
        began = _record_of_started_run(folders)
        if began is None or any(_holds_a_run(folder) for folder in folders):
            check_fresh_model_dir(folders[0], resume, overwrite)  # nothing to resume: says so
        # Stopped before any run wrote a file (e.g. Ctrl-C while workers started): afresh.
        if began.absolute() not in _NOTED:  # scripts check again once they own the folder
            _NOTED.add(began.absolute())
            print(f"note: --resume: no run in {began.parent} had saved a {LAST} yet: they "
                  "start from the beginning", file=sys.stderr)
    for folder in folders:  # with --resume, an unsaved run starts afresh, as documented
        check_fresh_model_dir(folder, resume and saved[folder], overwrite or resume)
    return {folder: resume and saved[folder] for folder in folders}


_NOTED = set()


def _record_of_started_run(folders):
    """The args.json of the command that made the run folders `folders`, if one was
    started there (in their common folder or the one above: a run's seeds, folds or
    subjects), else None."""
    common = Path(os.path.commonpath([str(folder) for folder in folders]))
    candidates = [common]
    if common.name.startswith((subject_dir("", "").name, FOLD_PREFIX)):
        candidates.append(common.parent)  # one subject's or one fold's runs
    return next((folder / RUN_RECORD for folder in candidates
                 if (folder / RUN_RECORD).is_file()), None)


LOCK = ".lock"  # in an output folder while a run writes there


@contextlib.contextmanager
def owned(folder):
    """Hold an output folder for as long as this run writes there, so that a second
    run into it is refused instead of mixing its files with this one's. The lock
    (flock on <folder>/.lock) ends with the process, however it ends: after a crash
    the folder is free again, with nothing to clean up."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / LOCK).is_dir():
        raise ToolkitError(f"{folder / LOCK} is a folder: runs keep their lock of {folder} in a "
                           "file there; move it away")
    with open(folder / LOCK, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise ToolkitError(f"{folder} is in use by a run in progress ({owner}): wait for it "
                               "to end, or choose another output folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {platform.node()}, since {time.strftime('%H:%M:%S')}\n")
        handle.flush()
        try:
            yield folder
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_output_folder(folder, flag):
    """Refuse an output folder, or an output file, inside a split folder's data (e.g.
    --pred_dir data/Validation/Annotations, data_stats.py --out
    data/Training/Annotations/Subject_1_Story_2.csv), where outputs would replace
    annotations or features. The path is checked as written (with `..` taken out)
    and with its links followed, so a link into the data is refused too."""
    names = {datasets.ANNOTATION_FOLDER, *datasets.MODALITY_FOLDERS.values()}
    written = Path(os.path.normpath(Path(folder).absolute()))
    inside = [part for path in (written, Path(os.path.realpath(written)))
              for part in path.parts if part in names]
    if inside:
        raise ToolkitError(f"{flag} {folder} is inside a split folder's {inside[-1]}: outputs "
                           "there would replace its data; choose a folder outside the data")


def write_run_record(args, folder, name=RUN_RECORD):
    """The flags of this run and its command line, as args.json in its output folder."""
    utils.write_json({**vars(args), "command": " ".join(sys.argv)}, Path(folder) / name)


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


# ---------------------------------------------------------------- what each script reports

SEED_COLUMNS = ("val_ccc_seed_mean", "val_ccc_seed_std")
# crossval.py's columns after the guide's, where its rows have them: the epoch of the
# evaluated checkpoint (best.save's is picked on the held-out story), then those of
# each fold's last.save, where nothing is picked. One more column of last.save goes
# at the end; a name ending in _ccc gets the summary rows, one ending in _epoch not.
FOLD_COLUMNS = ("val_epoch", "last_ccc", "last_epoch", "average_last_ccc")
SUMMARY_ROWS = ("Mean", "Std", "Mean-Std")
# crossval.csv's columns that nothing was picked for, in the order the ledger prefers them
REPORTED_COLUMNS = ("average_last_ccc", "last_ccc")


def crossval_table(folds):
    """crossval.csv: the cross-validation table of crossval.py and cv_fusion.py.

    `folds` holds one dict per held-out story: {"story", "train_ccc", "val_ccc"},
    for --seeds runs "val_ccc_seed_mean" and "val_ccc_seed_std" (of the seeds' own
    CCC), and crossval.py's FOLD_COLUMNS. Rows follow for Mean, Std (population, as
    numpy's default) and Mean-Std, a conservative score that favours settings that
    do well on every story, of every CCC column (a fold without a value makes them
    NaN: a mean over the other folds would pass for one over all); epochs are left
    blank there.
    """
    columns = [name for name in ("train_ccc", "val_ccc", *SEED_COLUMNS, *FOLD_COLUMNS)
               if name in folds[0]]
    epochs = [name for name in columns if name.endswith("_epoch")]
    scores = [name for name in columns if name not in epochs]
    table = pd.DataFrame(folds, columns=["story", *columns])
    values = table[scores].astype(float)
    mean, std = values.mean(skipna=False), values.std(ddof=0, skipna=False)
    summary = pd.DataFrame([mean, std, mean - std])
    summary.insert(0, "story", list(SUMMARY_ROWS))
    summary[epochs] = ""
    table = table.astype({"story": object, **dict.fromkeys(epochs, object)})
    return pd.concat([table, summary], ignore_index=True)[["story", *columns]]


def crossval_results(table):
    """The ledger's results of a crossval.csv-shaped table (crossval.py, cv_fusion.py):
    the mean, std and mean-std over folds of the number that can be reported, where
    the table has one for every fold (crossval.py's average_last_ccc, else last_ccc:
    nothing picked on the held-out stories), else of val_ccc."""
    rows = table.set_index("story")
    reported = next((name for name in REPORTED_COLUMNS
                     if name in rows and not pd.isna(rows.loc["Mean", name])), "val_ccc")
    return {"mean_ccc": rows.loc["Mean", reported], "std_ccc": rows.loc["Std", reported],
            "mean_minus_std": rows.loc["Mean-Std", reported],
            "train_ccc": rows.loc["Mean", "train_ccc"]}


def spread_results(values, **extra):
    """Mean, std and mean-std of a list of CCCs (seeds, subjects)."""
    series = pd.Series(values, dtype=float)
    mean, std = series.mean(), series.std(ddof=0)
    return {"mean_ccc": mean, "std_ccc": std, "mean_minus_std": mean - std, **extra}


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


def get_args_parser():
    parser = argparse.ArgumentParser(
        "runs.py", description="Print the ledger of runs, filtered by script or setting.")
    parser.add_argument("ledger", nargs="?", default=DEFAULT_LEDGER,
                        help="the ledger CSV (default: %(default)s)")
    parser.add_argument("--script", help="only this script's runs, e.g. crossval")
    parser.add_argument("--where", nargs="+", default=[], metavar="KEY=VALUE",
                        help="only runs whose changed settings include these, e.g. loss=ccc mods=audio,text")
    parser.add_argument("--all_columns", action="store_true",
                        help="show the command, data folders, versions and commit too")
    return parser


def main(args):
    rows = select(read_ledger(args.ledger), args.script, args.where)
    if rows.empty:
        print(f"no run in {args.ledger} matches")
        return rows
    shown = rows if args.all_columns else rows[["time", "script", "out_dir", "settings", *RESULTS,
                                                "wall_s"]]
    with pd.option_context("display.max_colwidth", 80, "display.width", 250):
        print(utils.format_table(shown))
    return rows


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
