"""The output layout: where results lie, the names that spell it, and the checks
that a run starts fresh or resumes what it began.

empathy/datasets.py draws the input tree; this is the output tree of the scripts,
whose names and patterns only the names and functions below spell:

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
import contextlib
import fcntl
import os
import platform
import re
import sys
import time
from pathlib import Path

from . import datasets, utils
from .utils import ToolkitError


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


