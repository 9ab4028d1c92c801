"""Hyper-parameter search on Optuna (tune.py): the search space, the study and its
storage, the cross-validated objective, and what a study leaves.

A trial samples the training settings (model family and its sizes, learning rate,
weight decay, loss, label delay, and averaging over epochs: --ema or --swa_start,
and --average_last), trains one model per training story held out (folds as
crossval.py's, over the training stories only: the validation folder is not read)
and keeps each fold's per-second held-out predictions, as the run reports them at
its end (averaged weights, or the mean of its last epochs' predictions). Only then
does it sample the post-processing (smoothing or low-pass, calibration) and score
those predictions with it (postprocessing.score_videos): post-processing is
searched by re-scoring, never by retraining. The objective is the mean CCC over
folds (or mean minus std). After each epoch the trial's running CCC (see
`epoch_reporter`) goes to a median pruner (`LatestMedianPruner`), which stops trials
that fall behind.

Trial 0 of a new study is the recommended recipe (`RECIPE`), so that what the
search finds is compared with what it must beat. `--select best` takes the trial
with the best objective; `--select one_se` the one closest to the recipe among those
within one standard error of the best (`select_trial`).

The study lives in SQLite (<out_dir>/study.db, or --storage URL): one file that
optuna-dashboard reads as is, transactions that a killed process cannot leave
half-written, and the same code for the PostgreSQL or MySQL server that several
machines share. Its user attributes hold what defines the objective (data folder,
modalities, stories, epochs, ...), so a study is never continued with other ones.
With --scheduler the trials run on a Dask cluster's workers, and the scheduler
serves them the storage (optuna-integration's DaskStorage, `served_by_scheduler`).

    <out_dir>/study.db            the study (unless --storage)
    <out_dir>/study.json          its storage URL and name (plot.py tune, --final)
    <out_dir>/args.json           the flags of the last tune.py command
    <out_dir>/trials.csv          one row per finished trial
    <out_dir>/best.json           the selected trial's settings as flags, its scores,
                                  the rule that chose it, and the recipe's scores
    <out_dir>/trial_<n>/val_on_<story>/   metrics.csv and held-out per-second
                                  predictions (held_out.npz); with --keep_weights the
                                  fold's final weights (epoch_<epochs>.save) too
    <out_dir>/final/              --final: the model, pred_test/, and final.json beside
    <out_dir>/final_folds/        --final --ensemble folds: pred_test/, and
                                  final_folds.json beside
"""
import contextlib
import datetime
import fcntl
import json
import math
import platform
import sqlite3
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState
from tqdm import tqdm

from . import datasets, families, layout, ledger, options, parallel, tables, utils
from .postprocessing import Postprocessing, score_videos
from .utils import ToolkitError

# Imported on first use: tune.py --help loads no torch.

OBJECTIVES = ("mean", "mean_minus_std")
SELECTIONS = ("best", "one_se")
ENSEMBLES = ("retrain", "folds")
FILTERS = ("none", "smooth", "lowpass")
AVERAGING = ("none", "ema", "swa")  # at most one way of averaging the weights
MAX_FAILED_IN_A_ROW = 5  # a space where every trial diverges would otherwise never end
PROGRESS_EVERY_S = 5.0  # how often the progress lines look for finished trials
FOLD_ENSEMBLE_DIR, FOLD_ENSEMBLE_RECORD = "final_folds", "final_folds.json"


# ---------------------------------------------------------------- the search space

@dataclass(frozen=True)
class Param:
    """One searched setting, named as its flag without the dashes: `kind` int, float,
    log (a float on a log scale), choice or bool; `values` (low, high) or the choices."""
    name: str
    kind: str
    values: tuple = (False, True)
    step: float = None

    def sample(self, trial):
        if self.kind == "int":
            return trial.suggest_int(self.name, *self.values)
        if self.kind in ("float", "log"):
            return trial.suggest_float(self.name, *self.values, log=self.kind == "log",
                                       step=self.step)
        return trial.suggest_categorical(self.name, list(self.values))

    def contains(self, value):
        if self.kind in ("choice", "bool"):
            return value in self.values
        low, high = self.values
        return low <= value <= high


TRAINING = (Param("lr", "log", (1e-5, 1e-2)), Param("weight_decay", "log", (1e-6, 1e-2)),
            Param("loss", "choice", tuple(utils.LOSSES)),
            Param("label_delay", "float", (0.0, 5.0), step=0.5))
RECURRENT = (Param("layers", "int", (1, 2)), Param("bidirectional", "bool"),
             Param("hidden_dim", "choice", (64, 128, 256, 512)),
             Param("dropout", "float", (0.0, 0.5), step=0.1))
# Sizes of each family, by its size flags; a family's flags that are not listed keep
# their defaults (the transformer's dropout has no flag).
FAMILY_SIZES = {
    "lstm": RECURRENT, "gru": RECURRENT,
    "tcn": (Param("tcn_channels", "choice", (32, 64, 128)), Param("tcn_kernel", "int", (2, 5)),
            Param("tcn_blocks", "int", (3, 5))),
    "transformer": (Param("transformer_layers", "int", (1, 3)),
                    Param("transformer_dim", "choice", (64, 128)),
                    Param("transformer_heads", "choice", (2, 4)),
                    Param("transformer_ff", "choice", (128, 256, 512)),
                    Param("attn_window", "choice", (0, 15, 30, 60))),
}
FILTER_SETTINGS = {"smooth": Param("smooth", "float", (1.0, 20.0), step=0.5),
                   "lowpass": Param("lowpass", "log", (0.002, 0.1))}
CALIBRATE = Param("calibrate", "bool")
# --ema's decay: its horizon 1 / (1 - decay) log-spaced from 10 to 1000 steps.
EMA = Param("ema", "choice", (0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999))
# Settings that say only which other settings a trial has (not flags), and values
# that mean a flag left out (--average_last 0: no averaging of predictions).
CHOOSERS = ("filter", "averaging")
OFF_VALUES = {"average_last": 0}

# The recommended recipe, in the search space's names: trial 0 of every new study
# whose search space holds it, so that trials.csv and best.json show what the search
# must beat, and the settings --select one_se stays close to. The lstm family at its
# default sizes, its weights averaged from the first epoch (--swa_start 1, the same
# for any --epochs) with ten times the default weight decay: chosen on five development
# copies of the unstable preset before seed 0 scored it (docs/averaging.md).
RECIPE = {"model": "lstm", "layers": 1, "bidirectional": False, "hidden_dim": 512,
          "dropout": 0.0, "lr": 1e-4, "weight_decay": 5e-3, "loss": "ccc", "label_delay": 0.0,
          "averaging": "swa", "swa_start": 1, "average_last": 0, "filter": "none",
          "calibrate": True}


def parse_families(text):
    """The model families of --models, each known; refuses an empty list."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if not names:
        raise ToolkitError("--models leaves the search space empty: give at least one family "
                           f"of {', '.join(families.FAMILIES)}")
    unknown = [name for name in names if name not in families.FAMILIES]
    if unknown:
        raise ToolkitError(f"--models: unknown model family {unknown[0]}: choose from "
                           f"{', '.join(families.FAMILIES)}")
    return sorted(set(names), key=names.index)


def family_sizes(family):
    """The searched sizes of `family` that are flags of it (none for a family added later)."""
    flags = {flag.dest for flag in families.family(family).flags}
    return tuple(param for param in FAMILY_SIZES.get(family, ()) if param.name in flags)


def averaging_space(epochs):
    """The averaging over epochs searched in a study of `epochs`: how the weights are
    averaged ("averaging": none, ema or swa), the Param of each way (--ema DECAY;
    --swa_start EPOCH from 1, the recipe's, to three quarters of --epochs), and
    --average_last K from 0 (off) to epochs // 4."""
    weights = {"ema": EMA, "swa": Param("swa_start", "int", (1, max(1, 3 * epochs // 4)))}
    return (Param("averaging", "choice", AVERAGING), weights,
            Param("average_last", "int", (0, epochs // 4)))


def search_space(family, epochs):
    """{name: Param} of everything a trial of `family` may sample."""
    averaging, weights, average_last = averaging_space(epochs)
    params = (*family_sizes(family), *TRAINING, averaging, *weights.values(), average_last,
              Param("filter", "choice", FILTERS), *FILTER_SETTINGS.values(), CALIBRATE)
    return {param.name: param for param in params}


def sample_training(trial, families, epochs):
    """The trial's model family, its sizes, the training settings and the averaging
    over epochs: {setting name: value}."""
    params = {"model": trial.suggest_categorical("model", list(families))}
    for param in family_sizes(params["model"]) + TRAINING:
        params[param.name] = param.sample(trial)
    averaging, weights, average_last = averaging_space(epochs)
    params["averaging"] = averaging.sample(trial)
    if params["averaging"] in weights:
        params[weights[params["averaging"]].name] = weights[params["averaging"]].sample(trial)
    params["average_last"] = average_last.sample(trial)
    return params


def sample_postprocessing(trial, label_delay):
    """The trial's post-processing of held-out predictions (after its folds trained)."""
    chosen = trial.suggest_categorical("filter", list(FILTERS))
    filters = {name: param.sample(trial) for name, param in FILTER_SETTINGS.items()
               if name == chosen}
    return Postprocessing(label_delay=label_delay, calibrate=CALIBRATE.sample(trial), **filters)


def model_options(params):
    """Constructor options of the params' family from its searched size flags."""
    return {flag.option: params[flag.dest] for flag in families.family(params["model"]).flags
            if flag.dest in params}


def postprocessing_of(params):
    return Postprocessing(label_delay=params.get("label_delay", 0.0),
                          smooth=params.get("smooth", 0.0), lowpass=params.get("lowpass", 0.0),
                          calibrate=params.get("calibrate", False))


def as_flags(params):
    """The train.py/crossval.py flags that give a trial's settings."""
    flags = []
    for name, value in params.items():
        left_out = value is False or (name in OFF_VALUES and value == OFF_VALUES[name])
        if name in CHOOSERS or left_out:
            continue
        flags.append(f"--{name}")
        if value is not True:  # floats in full: rounded, --lr would not repeat the trial
            flags.append(repr(value) if isinstance(value, float) else str(value))
    return flags


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class TuneConfig:
    """What every trial of a command shares: the fold training settings (with the
    searched ones at their defaults), where trials write, and the study."""
    base: options.RunOptions
    families: tuple
    objective: str
    out_dir: Path
    storage: str
    study_name: str
    trials: int
    ledger: Path = None
    command: str = ""
    train_dir: str = ""
    worker: str = ""  # tags the trials of this command (`worker_tag`), wherever they run
    served_as: str = None  # with --scheduler: the storage's name on the scheduler
    keep_weights: bool = False  # each completed fold keeps its final checkpoint

    @classmethod
    def from_args(cls, args, run, families, runner):
        """From tune.py's flags; paths as the trials of `runner` (parallel.Runner) get them."""
        ledger_file = ledger.ledger_path(args)
        return cls(run, tuple(families), args.objective, runner.path(args.out_dir),
                   args.storage or default_storage(args.out_dir), args.study_name, args.trials,
                   ledger_file and ledger_file.absolute(), " ".join(sys.argv), str(args.train_dir),
                   worker_tag(args.out_dir), keep_weights=args.keep_weights)

    def settings_for(self, params):
        """The TrainingSettings of a trial: its family, sizes, training settings and
        averaging; evaluated and saved only at the last epoch (no model is picked by
        epoch)."""
        epochs = self.base.settings.epochs
        return replace(self.base.settings, model=params["model"],
                       model_options=model_options(params), lr=params["lr"],
                       weight_decay=params["weight_decay"], loss=params["loss"],
                       ema=params.get("ema"), swa_start=params.get("swa_start"),
                       average_last=params.get("average_last") or None,
                       eval_freq=epochs, save_freq=epochs, patience=None, seeds=1)


# Flags whose values the search sets, and flags of training that tuning does not take.
SEARCHED = ("lr", "weight_decay", "loss", "label_delay", "smooth", "smooth_window", "lowpass",
            "calibrate", "ema", "swa_start", "average_last", "postprocessing_from")
NOT_TAKEN = ("resume", "patience", "tensorboard", "eval_freq", "save_freq")
MAX_LABEL_DELAY = max(param.values[1] for param in TRAINING if param.name == "label_delay")


def check_flags(args):
    """Refuse, in one line, flags that tune.py searches or does not take."""
    searched = [name for name in SEARCHED if getattr(args, name, None) is not None]
    if searched:
        raise ToolkitError(f"tune.py searches --{searched[0]}: leave it out (the search space "
                           "is in tuning.py; --models restricts the families)")
    not_taken = [name for name in NOT_TAKEN if getattr(args, name, None) not in (None, False)]
    if not_taken:
        raise ToolkitError(f"tune.py does not take --{not_taken[0]}: it evaluates each fold at "
                           "its last epoch, and running the same command resumes the study")
    if args.seeds != 1:
        raise ToolkitError(f"tune.py trains one seed per fold: leave out --seeds {args.seeds}")
    if args.scheduler:
        dask_storage_class()
    if args.objective not in OBJECTIVES:
        raise ToolkitError(f"--objective must be one of {', '.join(OBJECTIVES)}")
    if args.trials < 1:
        raise ToolkitError(f"--trials must be at least 1, got {args.trials}")
    if args.select == "one_se" and not args.final and args.trials < 2:
        raise ToolkitError(f"--select one_se needs at least 2 completed trials to compare: "
                           f"give --trials 2 or more, not {args.trials}")
    if args.ensemble is not None and not args.final:
        raise ToolkitError(f"--ensemble {args.ensemble} says how --final scores the chosen "
                           "settings: give it with --final")
    parse_families(args.models)


def load_training_stories(train_dir, mods, stories=None, subjects=None):
    """The training folder's videos (never the validation folder's), restricted to
    `stories` and `subjects`: the folds of the search."""
    return datasets.load_pool(train_dir, None, mods, stories, subjects)


def base_run(args):
    """The RunOptions every trial shares; the searched settings are set per trial."""
    settings = options.TrainingSettings(epochs=args.epochs, batch_size=args.batch_size,
                                        split=args.split, seed=args.seed,
                                        precision=args.precision, lr_schedule=args.lr_schedule)
    return options.RunOptions(settings, args.normalize, args.cuda, progress=False)


def default_storage(out_dir):
    return f"sqlite:///{Path(out_dir).absolute() / layout.STUDY_FILE}"


def study_attrs(args, train_set):
    """What defines the objective: a study is only continued with the same."""
    return {"train_dir": str(Path(args.train_dir).resolve()), "mods": list(train_set.mods),
            "stories": list(map(int, train_set.stories)), "subjects": args.subjects,
            "epochs": args.epochs, "batch_size": args.batch_size, "split": args.split,
            "normalize": args.normalize, "seed": args.seed, "objective": args.objective,
            "models": list(parse_families(args.models)), "precision": args.precision,
            "lr_schedule": args.lr_schedule}


# What a study made before an attribute existed had instead (check_study).
ATTR_DEFAULTS = {"lr_schedule": "constant"}


# ---------------------------------------------------------------- storage and study

def open_storage(url):
    """The RDB storage at `url`, or one `error:` line if it cannot be opened."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    except Exception as error:  # sqlalchemy's and the drivers' errors have no common base
        reason = str(error).splitlines()[0].strip() if str(error) else error.__class__.__name__
        if sqlite_file(url) is not None and sqlite_file(url).is_file():  # the file, not the URL
            raise ToolkitError(f"{shown_file(sqlite_file(url))} cannot be opened as an Optuna "
                               f"study ({reason}): another program or Optuna version may have "
                               "written it; restore it from a copy, or move it away to start a "
                               "new study there") from None
        raise ToolkitError(f"--storage {url} cannot be opened ({reason}): give an RDB URL such "
                           "as sqlite:///tune_AT/study.db or postgresql://user@host/db") from None


def shown_file(path):
    """A study file as messages name it: relative to the current folder where it is
    inside it (the default study file is named absolutely)."""
    with contextlib.suppress(ValueError):
        return Path(path).relative_to(Path.cwd())
    return Path(path)


def _engine_kwargs(url):
    # SQLite: wait for another process's write instead of failing at once (--jobs).
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None


def sqlite_file(url):
    """The file of a sqlite:/// URL (None for other URLs)."""
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def check_storage(url):
    """Refuse a --storage URL that cannot be opened, creating no SQLite file and
    writing nothing into one."""
    if in_memory(url):
        raise ToolkitError(f"--storage {url} is an SQLite database in memory, which each "
                           "connection and process sees empty and which ends with the command: "
                           "give a file, e.g. sqlite:///tune_AT/study.db, or leave out --storage")
    path = sqlite_file(url)
    if path is None or path.exists():
        check_study_file(url)
        open_storage(url)
    elif not path.parent.is_dir():
        raise ToolkitError(f"--storage {url} cannot be opened: the folder {path.parent} does "
                           "not exist")


def in_memory(url):
    """Whether an SQLite URL names a database in memory (sqlite://, sqlite:///:memory:)."""
    if not url.startswith("sqlite:"):
        return False
    path = url.split("://", 1)[-1].lstrip("/").split("?")[0]
    return path in ("", ":memory:") or "mode=memory" in url


# Tables of every Optuna RDB storage: a file without them is another program's.
OPTUNA_TABLES = {"studies", "study_directions", "trials", "trial_params", "trial_values",
                 "version_info"}


def check_study_file(url):
    """Refuse, reading it only, an SQLite study file that is damaged, truncated or
    not a file, or another program's database (Optuna would add its tables to it).
    An empty file is a new study."""
    path = sqlite_file(url)
    if path is None or not path.exists():
        return
    path = shown_file(path)
    if not path.is_file():
        raise ToolkitError(f"{path} is not a file (a folder or other special file): the study "
                           "is an SQLite file; move it away, or give another --out_dir or "
                           "--storage")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro",
                                                uri=True, timeout=60)) as database:
            tables = {row[0] for row in database.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            problem = database.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as error:
        problem = str(error)
    if problem != "ok":
        raise ToolkitError(f"{path} cannot be read as an Optuna study ({problem}): it is "
                           "damaged, truncated or not an SQLite file; restore it from a copy, "
                           "or move it away to start a new study there")
    if tables and not OPTUNA_TABLES <= tables:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise ToolkitError(f"{path} is another program's SQLite database (its tables: {shown}), "
                           "not an Optuna study: tune.py would add its tables to it; give tune.py "
                           "a file of its own (another --out_dir or --storage)")


def existing_study(url, name, must_exist=False):
    """The study `name` at `url` if the storage is there (a missing SQLite file is
    not created), else None."""
    if sqlite_file(url) is not None and not sqlite_file(url).exists():
        if must_exist:
            raise ToolkitError(f"no study at {url}: run tune.py without --final first")
        return None
    check_study_file(url)
    storage = open_storage(url)
    if name not in optuna.get_all_study_names(storage):
        if must_exist:
            raise ToolkitError(f"{url} holds no study {name}: run tune.py without --final first")
        return None
    return optuna.load_study(study_name=name, storage=storage)


def check_study(study, attrs, trials=None):
    """Refuse to continue a study made with other data or settings, or to ask for
    fewer trials than it has finished (`trials` None: no such check)."""
    if study is None:
        return
    saved = {**ATTR_DEFAULTS, **study.user_attrs}
    differing = [name for name in attrs if saved.get(name) != attrs[name]]
    if differing:
        name = differing[0]
        raise ToolkitError(f"the study {study.study_name} was made with {name} "
                           f"{_shown(saved.get(name))}, not {_shown(attrs[name])}: give the same "
                           "data and settings to continue it, or another --out_dir")
    finished = len(finished_trials(study))
    if trials is not None and trials < finished:
        raise ToolkitError(f"--trials {trials} is below the {finished} trials the study has "
                           f"finished: give --trials {finished} or more")


def _shown(value):
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def finished_trials(study, states=None):
    return study.get_trials(deepcopy=False, states=states or (TrialState.COMPLETE,
                                                             TrialState.PRUNED))


def create_study(url, name, attrs):
    """The study, created with `attrs` if new. A new study gets the recipe as its
    first trial (`enqueue_recipe`); a resumed one never gets it again."""
    study = optuna.create_study(storage=open_storage(url), study_name=name,
                                direction="maximize", load_if_exists=True)
    if not study.user_attrs:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        enqueue_recipe(study, attrs["models"], attrs["epochs"])
    return study


def recipe_outside(families, epochs):
    """Why RECIPE lies outside the search space of `families` and `epochs`, or None."""
    if RECIPE["model"] not in families:
        return f"--models {','.join(families)} leaves out its family, {RECIPE['model']}"
    space = search_space(RECIPE["model"], epochs)
    for name, value in RECIPE.items():
        if name != "model" and (name not in space or not space[name].contains(value)):
            return f"its {name} {value} is not searched with --epochs {epochs}"
    return None


def enqueue_recipe(study, families, epochs):
    """Make RECIPE the study's next trial, tagged "recipe" (trial 0 of a new study);
    or say in one line why not."""
    outside = recipe_outside(families, epochs)
    if outside:
        print(f"note: no trial of the recommended recipe: {outside}", file=sys.stderr)
        return
    study.enqueue_trial(RECIPE, user_attrs={"recipe": True})


def recipe_trial(study):
    """The study's trial of the recipe, or None (not searched, or an older study)."""
    return next((trial for trial in study.get_trials(deepcopy=False)
                 if trial.user_attrs.get("recipe")), None)


def worker_tag(out_dir):
    """Names the tune.py that runs a trial: this machine and output folder."""
    return f"{platform.node()}:{Path(out_dir).resolve()}"


def clear_unkept_weights(study, out_dir):
    """Delete the weights that trials in `out_dir` left behind when killed (SIGKILL, a
    power cut: a fold's best.save, last.save, epoch_<n>.save, or a half-written one),
    keeping those that --keep_weights recorded for a completed trial. Called while this
    process holds the output folder (layout.owned), so no trial there is alive."""
    # By trial_<n>/val_on_<story>/<name>: the recorded paths are where the folder was
    # when the trial ran, and it may have moved since.
    kept = {Path(path).parts[-3:]
            for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            for path in (trial.user_attrs.get("fold_weights") or {}).values()}
    cleared = 0
    for fold in [path for path in Path(out_dir).glob("trial_*/*") if path.is_dir()]:
        utils.remove_interrupted_writes(fold)
        for checkpoint in fold.glob("*.save"):
            if checkpoint.relative_to(out_dir).parts not in kept:
                checkpoint.unlink()
                cleared += 1
    if cleared:
        print(f"note: deleted {cleared} checkpoint(s) that stopped trials had left in "
              f"{out_dir} (trials keep no weights, but for those --keep_weights recorded)",
              file=sys.stderr)


# What tune.py writes into --out_dir, as (name, is a folder, what it is): an earlier
# thing of the other kind there is refused before the first trial.
SEARCH_OUTPUTS = ((layout.RUN_RECORD, False, "its flags"), (layout.STUDY_RECORD, False,
                  "where its study is"), (layout.TRIALS_TABLE, False, "the table of trials"),
                  (layout.BEST_RECORD, False, "the chosen trial"),
                  (layout.ASK_LOCK, False, "a lock of its processes"),
                  (layout.LOCK, False, "the lock of the folder"))
FINAL_OUTPUTS = {"retrain": ((layout.FINAL_DIR, True, "the final model"),
                             (layout.FINAL_RECORD, False, "the final score")),
                 "folds": ((FOLD_ENSEMBLE_DIR, True, "the fold ensemble's predictions"),
                           (FOLD_ENSEMBLE_RECORD, False, "the fold ensemble's score"))}


def check_outputs(out_dir, outputs):
    """Refuse, before anything is written, a folder where tune.py writes a file (or a
    file where it writes a folder) in `out_dir` (`outputs`, e.g. SEARCH_OUTPUTS):
    found only after a trial, or the whole search, otherwise."""
    for name, folder, what in outputs:
        path = Path(out_dir) / name
        if path.exists() and path.is_dir() != folder:  # a file is replaced whole, not a folder
            kind, wanted = ("a file", "folder") if folder else ("a folder", "file")
            raise ToolkitError(f"{path} is {kind}, but tune.py writes {what} there as a "
                               f"{wanted}: move it away, or give another --out_dir")


def fail_dead_trials(study, out_dir, own_storage):
    """Mark failed the trials left running by a killed tune.py. Called while this
    process holds the output folder (layout.owned), so no trial of its folder is alive:
    in the folder's own study file, every running trial is dead; in a shared
    --storage, those that a process of this folder on this machine started."""
    tag = worker_tag(out_dir)
    dead = [trial for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if own_storage or trial.user_attrs.get("worker") == tag]
    for trial in dead:
        study.tell(trial.number, state=TrialState.FAIL)
    if dead:
        print(f"note: marked {len(dead)} trial(s) left running by a stopped tune.py as failed: "
              f"{', '.join(str(trial.number) for trial in dead)}", file=sys.stderr)
    return [trial.number for trial in dead]


# ---------------------------------------------------------------- training and scoring

# What a stop request (Ctrl-C, SIGTERM) leaves to do: tune.py has no --resume, since a
# trial keeps no weights to go on from; the plain rerun goes on with the study.
RERUN = "run the same command again to go on with the study"
TRIAL_STOPPED = f"this trial is marked failed (a trial keeps no weights to resume from): {RERUN}"
FINAL_STOPPED = "run the same command again to train the chosen settings afresh"


def train_and_predict(train_set, eval_set, folder, settings, run, postprocessing,
                      on_epoch=None, when_stopped=TRIAL_STOPPED):
    """Train a model of `settings` on `train_set` into `folder` and return its
    per-second predictions of `eval_set` as the run reports them at its end (the
    averaged weights', or the mean of its last --average_last epochs') and the model;
    `on_epoch` and `when_stopped` as engine.Hooks'."""
    from . import engine
    device = run.device
    scaler = datasets.FeatureScaler.fit(train_set) if run.normalize else None
    engine.seed_everything(settings.seed)
    model = settings.new_model(train_set.input_dims, device)
    summary = engine.fit(model, engine.Training(train_set.with_scaler(scaler), settings, device),
                         engine.Validation(eval_set.with_scaler(scaler), postprocessing), folder,
                         engine.Hooks(progress=False, on_epoch=on_epoch, when_stopped=when_stopped))
    return summary["predictions"], model


def fold_weights(folder, settings):
    """The checkpoint that --keep_weights keeps of a fold: its last epoch's (with
    --ema or --swa_start, the averaged weights)."""
    return Path(folder) / layout.checkpoint_name(settings.epochs)


def run_fold(train_set, story, trial_dir, settings, run, label_delay, on_epoch=None,
             keep_weights=False):
    """Train the fold that holds out `story`; keep its per-second held-out predictions
    (held_out.npz) but not its weights (with `keep_weights`, only its last epoch's
    checkpoint once the fold has trained). Returns (training videos, held-out videos,
    predictions)."""
    fold_train, held_out = datasets.fold_sets(train_set, story)
    folder = layout.fold_dir(trial_dir, story)
    kept = None
    try:
        per_second, _ = train_and_predict(fold_train, held_out, folder, settings, run,
                                          Postprocessing(label_delay=label_delay), on_epoch)
        kept = fold_weights(folder, settings) if keep_weights else None
    finally:
        for checkpoint in folder.glob("*.save"):  # copies of the weights, per fold and trial
            if checkpoint != kept:
                checkpoint.unlink()
    with utils.atomic_path(folder / layout.HELD_OUT_PREDICTIONS) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **{video.name: rows for video, rows in zip(held_out.videos,
                                                                       per_second)})
    return fold_train, held_out, per_second


def rescore(folds, postprocessing):
    """{story: CCC} of the folds' saved held-out predictions under `postprocessing`;
    calibration takes the listener statistics of each fold's training videos."""
    scores = {}
    for story, (fold_train, held_out, per_second) in folds.items():
        fold_post = (postprocessing.with_listener_stats(fold_train.videos)
                     if postprocessing.calibrate else postprocessing)
        scores[story] = score_videos(held_out.videos, per_second, fold_post)["ccc"]
    return scores


def objective_value(scores, objective):
    spread = tables.spread(pd.Series(scores.values(), dtype=float))
    return float(spread.mean_minus_std if objective == "mean_minus_std" else spread.mean)


def run_trial(trial, train_set, config):
    """The objective of one trial: train its folds (pruned after any epoch where its
    running CCC falls behind), then sample and score its post-processing. With
    --keep_weights a completed trial records its folds' kept checkpoints
    ("fold_weights"); a trial that does not complete keeps none."""
    params = sample_training(trial, config.families, config.base.settings.epochs)
    # Held-out CCC every epoch, for the pruner only: the objective takes the last epoch's.
    settings = replace(config.settings_for(params), eval_freq=1)
    trial_dir = layout.trial_dir(config.out_dir, trial.number)
    folds, raw = {}, {}
    try:
        for fold, story in enumerate(train_set.stories):
            on_epoch = epoch_reporter(trial, list(raw.values()), fold, settings.epochs)
            folds[story] = run_fold(train_set, story, trial_dir, settings, config.base,
                                    params["label_delay"], on_epoch, config.keep_weights)
            raw.update(rescore({story: folds[story]}, Postprocessing(params["label_delay"])))
    except BaseException as error:
        for checkpoint in Path(trial_dir).glob("*/*.save"):
            checkpoint.unlink()
        if isinstance(error, optuna.TrialPruned):
            trial.set_user_attr("fold_ccc", {str(story): value for story, value in raw.items()})
        raise
    scores = rescore(folds, sample_postprocessing(trial, params["label_delay"]))
    spread = tables.spread(pd.Series(scores.values(), dtype=float))
    trial.set_user_attr("fold_ccc", {str(story): value for story, value in scores.items()})
    trial.set_user_attr("mean", float(spread.mean))
    trial.set_user_attr("std", float(spread.std))
    if config.keep_weights:
        trial.set_user_attr("fold_weights", {
            str(story): str(fold_weights(layout.fold_dir(trial_dir, story), settings).resolve())
            for story in folds})
    return objective_value(scores, config.objective)


# ---------------------------------------------------------------- pruning

def epoch_reporter(trial, finished, fold, epochs):
    """engine.Hooks' on_epoch for fold number `fold` of a trial: after each epoch it
    reports the trial's running CCC at step fold * epochs + epoch - 1, and stops the
    trial (optuna.TrialPruned) if the pruner says so.

    The running CCC is the mean of the `finished` folds' CCCs (at their last epoch,
    as the objective takes them) and of this fold's held-out CCC at this epoch: the
    objective as far as it is known. At a given step every trial has trained the
    same folds for the same epochs, so the pruner compares like with like; earlier
    folds steady the estimate, so a trial is not stopped by one noisy epoch alone.
    A fold's first half of epochs is reported but never judged: a model just started
    says little yet, and judged earlier the pruner would favour whatever learns
    fastest (the highest learning rates), not what ends best. Held-out CCC of the
    training stories only: the validation folder plays no part in it."""
    unjudged = epochs // 2

    def on_epoch(row):
        trial.report(float(np.mean([*finished, row["val_ccc"]])), fold * epochs + row["epoch"] - 1)
        if row["epoch"] > unjudged and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at fold {fold + 1}, epoch {row['epoch']}")
    return on_epoch


class LatestMedianPruner(optuna.pruners.BasePruner):
    """Prunes a trial whose value at the step just reported is below the median of
    the completed trials' values at that step, once `startup_trials` of them have
    one. Optuna's MedianPruner judges a trial by its best value over all its steps
    instead: over folds of unequal difficulty that is mostly its best epoch of an
    easy first fold, and it would rarely prune in later folds."""

    def __init__(self, startup_trials=5):
        self.startup_trials = startup_trials

    def prune(self, study, trial):
        step = trial.last_step
        if step is None:
            return False
        others = [other.intermediate_values[step] for other in
                  study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if step in other.intermediate_values]
        if len(others) < self.startup_trials:
            return False
        return trial.intermediate_values[step] < float(np.median(others))


# ---------------------------------------------------------------- running trials

@contextlib.contextmanager
def _ask_lock(config):
    """Held while a process counts the trials and starts one, so that processes of
    one command together start exactly the trials that --trials asks for: a lock
    file in --out_dir, or on a cluster the scheduler's lock of the study's name."""
    if config.served_as:
        from distributed import Lock
        with Lock(config.served_as):
            yield
        return
    with open(Path(config.out_dir) / layout.ASK_LOCK, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def next_trial(study, config, stop=None):
    """A new trial, tagged with this process, or None once finished and running
    trials reach --trials. After a stop request (`stop`, parallel.StopRequests), no
    new trial starts: KeyboardInterrupt."""
    if stop is not None and stop.requested:
        print(f"stopped between trials: {RERUN}", file=sys.stderr)
        raise KeyboardInterrupt
    with _ask_lock(config):
        counted = finished_trials(study, (TrialState.COMPLETE, TrialState.PRUNED,
                                          TrialState.RUNNING))
        if len(counted) >= config.trials:
            return None
        trial = study.ask()
        trial.set_user_attr("worker", config.worker)
        return trial


def load_worker_study(config, worker):
    """The study, with a TPE sampler seeded by --seed, this process and the study's
    length (a resumed study does not draw its first trials again) and the pruner."""
    storage = scheduler_storage(config.served_as) if config.served_as else open_storage(
        config.storage)
    started = len(optuna.load_study(study_name=config.study_name, storage=storage).trials)
    seed = config.base.settings.seed + 1000 * worker + started
    return optuna.load_study(study_name=config.study_name, storage=storage,
                             sampler=optuna.samplers.TPESampler(seed=seed),
                             pruner=LatestMedianPruner())


def run_trials(runner, train_set, config, jobs):
    """Run trials until the study has --trials finished ones: `jobs` loops of
    `run_worker` in processes here (--jobs), or with --scheduler one per thread of the
    cluster's workers, each worker loading the training videos itself."""
    if not runner.scheduler:
        tasks = [dict(train_set=train_set, config=config, worker=worker)
                 for worker in range(jobs)]
        with reporting_progress(open_storage(config.storage), config):
            return runner.run(run_worker, tasks, "tuning processes", RERUN)
    train_data = runner.data(train_set, datasets.load_pool, train_dir=Path(config.train_dir),
                             test_dir=None, mods=train_set.mods, stories=train_set.stories,
                             subjects=train_set.subjects)
    with served_by_scheduler(runner.scheduler, config.storage) as (name, threads, served):
        config = replace(config, served_as=name)
        tasks = [dict(train_set=train_data, config=config, worker=worker)
                 for worker in range(min(threads, config.trials))]
        with reporting_progress(served, config):
            return runner.run(run_worker, tasks, "trial loops", RERUN)


# ---------------------------------------------------------------- progress

def progress_line(trial, folds, best, objective, finished, trials, elapsed, left):
    """The line printed when `trial` ends: its number and state; the mean +- std of
    its CCC over the folds it finished, of `folds`; `best`, the best completed trial
    so far (None: none), by the `objective`; `finished` of `trials` trials (--trials);
    seconds `elapsed` in this command and `left` at its pace."""
    values = list(trial.user_attrs.get("fold_ccc", {}).values())
    if trial.state == TrialState.FAIL:
        result = trial.user_attrs.get("error", "see the message above")
    elif values:
        result = (f"CCC {np.mean(values):.4f} +- {np.std(values):.4f} over "
                  f"{len(values)}/{folds} folds")
    else:
        result = f"no fold of {folds} finished"
    best_text = (f"best {objective} {best.value:.4f} (trial {best.number})" if best is not None
                 else "none completed yet")
    return (f"trial {trial.number} {trial.state.name}: {result} | {best_text} | "
            f"{finished}/{trials} trials, {_duration(elapsed)} elapsed, about "
            f"{_duration(left)} left at this pace")


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrialProgress:
    """A line per trial that ends (`progress_line`) and a bar over --trials, printed
    by this process wherever the trials run (here, --jobs processes, a cluster):
    `report` reads the study and prints the trials that ended since it last looked."""

    def __init__(self, study, trials):
        self.study, self.trials = study, trials
        self.folds = len(study.user_attrs["stories"])
        self.objective = study.user_attrs["objective"]
        # Optuna stamps a trial's end with the local datetime.now(): the same clock.
        self.start, self.ended = datetime.datetime.now(), 0
        self.seen = {trial.number for trial in study.get_trials(deepcopy=False)
                     if trial.state.is_finished()}
        self.bar = tqdm(total=trials, initial=len(finished_trials(study)), desc="trials",
                        unit="trial", dynamic_ncols=True, disable=None)

    def report(self):
        trials = self.study.get_trials(deepcopy=False)
        for trial in sorted((trial for trial in trials if trial.state.is_finished()
                             and trial.number not in self.seen), key=lambda t: t.number):
            self.seen.add(trial.number)
            self.ended += 1
            seen = [other for other in trials if other.number in self.seen]
            completed = [other for other in seen if other.state == TrialState.COMPLETE]
            best = max(completed, key=lambda other: other.value, default=None)
            finished = sum(other.state in (TrialState.COMPLETE, TrialState.PRUNED)
                           for other in seen)
            ended_at = trial.datetime_complete or datetime.datetime.now()
            elapsed = max(0.0, (ended_at - self.start).total_seconds())
            left = elapsed / self.ended * max(0, self.trials - finished)
            tqdm.write(progress_line(trial, self.folds, best, self.objective, finished,
                                     self.trials, elapsed, left))
            if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                self.bar.update(1)


@contextlib.contextmanager
def reporting_progress(storage, config):
    """`TrialProgress` of the study in `storage` while the block runs: it looks every
    PROGRESS_EVERY_S seconds in a thread, and once more when the block ends."""
    progress = TrialProgress(optuna.load_study(study_name=config.study_name, storage=storage),
                             config.trials)
    stop = threading.Event()

    def watch():
        while not stop.wait(PROGRESS_EVERY_S):
            with contextlib.suppress(Exception):  # a busy storage: look again next time
                progress.report()

    watcher = threading.Thread(target=watch, name="trial progress", daemon=True)
    watcher.start()
    try:
        yield progress
        stop.set()
        watcher.join()
        progress.report()
    finally:  # the watcher stopped before the bar closes, whatever ended the block
        stop.set()
        watcher.join()
        progress.bar.close()


# ---------------------------------------------------------------- on a Dask cluster

@contextlib.contextmanager
def served_by_scheduler(address, url):
    """The study's storage `url` served by the Dask scheduler at `address` while the
    block runs (optuna-integration's DaskStorage): the trials on the workers read and
    write it through the scheduler, the one process that opens it, so workers need
    no database driver and no SQLite locking over a network file system. Yields the
    name it is served under, the threads of the cluster's workers, and the served
    storage for this process (the progress lines read it)."""
    name = f"tune-{uuid.uuid4().hex}"
    client = parallel.connect_scheduler(address)
    try:
        with _experimental_allowed():
            served = dask_storage_class()(url, name=name, client=client)
        yield name, max(1, sum(client.nthreads().values())), served
    finally:
        with contextlib.suppress(OSError, TimeoutError):  # a lost scheduler has nothing to stop
            client.run_on_scheduler(_stop_serving, name=name)
        client.close()


def scheduler_storage(name):
    """In a cluster worker: the storage that `served_by_scheduler` serves as `name`."""
    with _experimental_allowed():
        return dask_storage_class()(name=name, register=False)


def dask_storage_class():
    """optuna-integration's DaskStorage, or one `error:` line if it is not installed."""
    try:
        from optuna_integration.dask import DaskStorage
    except ImportError:
        raise ToolkitError("tune.py --scheduler needs optuna-integration: pip install "
                           "-r requirements.txt") from None
    return DaskStorage


def _stop_serving(dask_scheduler, name):
    dask_scheduler.extensions["optuna"].storages.pop(name, None)


@contextlib.contextmanager
def _experimental_allowed():
    # DaskStorage warns that it is experimental each time one is made: once in the README.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def run_worker(train_set, config, worker=0):
    """Run trials until the study has --trials finished ones (one tune.py process
    of --jobs); a trial that fails (e.g. diverges) is marked failed and the next
    starts. Returns the numbers of the trials it finished."""
    study = load_worker_study(config, worker)
    done, failed_in_a_row = [], 0
    with parallel.StopRequests("the end of the epoch in progress; no new trial starts") as stop:
        while (trial := next_trial(study, config, stop)) is not None:
            state, error = tell(study, trial, train_set, config)
            if error is None:
                done.append(trial.number)
                failed_in_a_row = 0
                continue
            failed_in_a_row += 1
            print(f"note: trial {trial.number} failed: {error}", file=sys.stderr)
            if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                raise ToolkitError(f"{failed_in_a_row} trials in a row failed (the last: "
                                   f"{error}): check the data and flags with crossval.py")
    return done


def tell(study, trial, train_set, config):
    """Run one trial and record its end in the study (and the ledger): (state, error)."""
    start = time.perf_counter()
    try:
        value = run_trial(trial, train_set, config)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED, None
    except ToolkitError as error:
        trial.set_user_attr("error", str(error))
        study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL, str(error)
    except BaseException:  # a bug, or Ctrl-C: the trial is lost, not left running
        study.tell(trial, state=TrialState.FAIL)
        raise
    study.tell(trial, value)
    record_trial(config, study.get_trials(deepcopy=False)[trial.number],
                 time.perf_counter() - start)
    return TrialState.COMPLETE, None


def record_trial(config, trial, seconds):
    """The ledger row of a finished trial (runs.py's columns)."""
    if config.ledger is None:
        return
    attrs = trial.user_attrs
    ledger.append_row(config.ledger, {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "script": "tune.py",
        "command": f"{config.command} # trial {trial.number}",
        "out_dir": str(layout.trial_dir(config.out_dir, trial.number)),
        "settings": json_text({"trial": trial.number, **trial.params}),
        "train_dir": config.train_dir, "test_dir": "",
        "mean_ccc": attrs["mean"], "std_ccc": attrs["std"],
        "mean_minus_std": attrs["mean"] - attrs["std"], "train_ccc": "", "best_epoch": "",
        "wall_s": round(seconds, 2), "versions": ledger.versions(), "commit": ledger.toolkit_commit()})


def json_text(data):
    return json.dumps(data, sort_keys=True, default=str)


# ---------------------------------------------------------------- what a study leaves

def trials_table(study):
    """trials.csv: one row per finished trial: its number, state, whether it is the
    recipe, its settings, fold CCCs, mean, std and objective value."""
    rows, params, folds = [], {}, {}
    for trial in finished_trials(study):
        params.update(dict.fromkeys(trial.params))
        scores = {f"ccc_story_{story}": value
                  for story, value in trial.user_attrs.get("fold_ccc", {}).items()}
        folds.update(dict.fromkeys(scores))
        rows.append({"number": trial.number, "state": trial.state.name,
                     "recipe": bool(trial.user_attrs.get("recipe")), **trial.params, **scores,
                     "mean": trial.user_attrs.get("mean", math.nan),
                     "std": trial.user_attrs.get("std", math.nan), "value": trial.value})
    columns = ["number", "state", "recipe", *params, *folds, "mean", "std", "value"]
    return pd.DataFrame(rows, columns=columns).convert_dtypes()


# ---------------------------------------------------------------- choosing a trial

def distance_to_recipe(params):
    """How many of a trial's settings (trials.csv's columns) differ from RECIPE's: set
    to another value, or set in only one of the two."""
    return sum(params.get(name) != RECIPE.get(name) for name in set(params) | set(RECIPE))


@dataclass(frozen=True)
class Selection:
    """The trial that --select `rule` chose among the completed ones, and the best
    one (by the objective); for one_se, the best's standard error (std over folds /
    sqrt(folds)) and the numbers of the trials whose mean CCC is within it."""
    rule: str
    chosen: optuna.trial.FrozenTrial
    best: optuna.trial.FrozenTrial
    standard_error: float = None
    within: tuple = ()

    def describe(self):
        """One line: which rule chose which trial, and why."""
        chosen, best = self.chosen, self.best
        if self.rule == "best":
            return f"--select best chose trial {chosen.number}, the best ({best.value:.4f})"
        differing = distance_to_recipe(chosen.params)
        return (f"--select one_se chose trial {chosen.number} ({differing} settings differ "
                f"from the recipe), the closest to the recipe of the "
                f"{len(self.within)} trial(s) whose mean CCC is within one standard error "
                f"({self.standard_error:.4f}) of the best trial {best.number}'s "
                f"{best.user_attrs['mean']:.4f}")


def select_trial(completed, rule):
    """The Selection by `rule` among the `completed` trials (each with user attributes
    mean, std and fold_ccc). best: the highest objective value (the earliest of equals).
    one_se: among the trials whose mean CCC is at least the best's minus its standard
    error, the one with the fewest settings differing from the recipe, then the
    highest mean."""
    best = max(completed, key=lambda trial: (trial.value, -trial.number))
    if rule == "best":
        return Selection(rule, best, best)
    attrs = best.user_attrs
    standard_error = attrs["std"] / math.sqrt(len(attrs["fold_ccc"]))
    within = [trial for trial in completed
              if trial.user_attrs["mean"] >= attrs["mean"] - standard_error]
    chosen = min(within, key=lambda trial: (distance_to_recipe(trial.params),
                                            -trial.user_attrs["mean"], trial.number))
    return Selection(rule, chosen, best, standard_error,
                     tuple(trial.number for trial in within))


def check_selectable(study, rule):
    """Refuse --select one_se on a study with fewer than 2 completed trials."""
    completed = len(finished_trials(study, (TrialState.COMPLETE,)))
    if rule == "one_se" and completed < 2:
        raise ToolkitError(f"--select one_se needs at least 2 completed trials to compare, the "
                           f"study {study.study_name} has {completed}: run more trials (tune.py "
                           "without --final), or give --select best")


def recipe_record(study, chosen):
    """best.json's "recipe": the recipe trial's state and CV scores, and by how much the
    `chosen` trial's exceed them ("chosen_minus_recipe"; None where either has none)."""
    recipe = recipe_trial(study)
    if recipe is None:
        return None
    record = {"trial": recipe.number, "state": recipe.state.name,
              "mean": recipe.user_attrs.get("mean"), "std": recipe.user_attrs.get("std"),
              "value": recipe.value, "chosen_minus_recipe": None}
    if recipe.state == TrialState.COMPLETE:
        mine, theirs = chosen.user_attrs, recipe.user_attrs
        record["chosen_minus_recipe"] = {
            "mean": mine["mean"] - theirs["mean"],
            "mean_minus_std": (mine["mean"] - mine["std"]) - (theirs["mean"] - theirs["std"])}
    return record


def against_recipe(best):
    """One line from best.json's record: by how much the chosen settings beat the
    recipe in CV (mean over folds, and mean minus std), or that they did not."""
    recipe, number = best["recipe"], best["trial"]
    if recipe is None:
        return ("no trial of the recommended recipe in this study (its --models leave out the "
                "recipe's family, or it was made before tune.py added one): nothing to compare")
    if recipe["chosen_minus_recipe"] is None:
        return (f"the recipe's trial {recipe['trial']} ({recipe['state']}) has no CV score to "
                "compare")
    if recipe["trial"] == number:
        return (f"the chosen trial {number} is the recipe itself (CV {recipe['mean']:.4f} +- "
                f"{recipe['std']:.4f}): no searched settings beat it")
    gain = recipe["chosen_minus_recipe"]
    if min(gain.values()) > 0:
        verdict = "beat"
    elif max(gain.values()) <= 0:
        verdict = "did not beat"
    else:
        verdict = f"beat, in {'mean' if gain['mean'] > 0 else 'mean minus std'} only,"
    return (f"the chosen trial {number} (CV {best['mean']:.4f} +- {best['std']:.4f}) {verdict} "
            f"the recipe's trial {recipe['trial']} ({recipe['mean']:.4f} +- "
            f"{recipe['std']:.4f}) by {gain['mean']:+.4f} in mean CCC and "
            f"{gain['mean_minus_std']:+.4f} in mean minus std over folds")


def best_record(study, rule="best"):
    """best.json: the trial that --select `rule` chose, its settings as
    train.py/crossval.py flags and its scores, the rule and why it chose it, and the
    recipe's scores beside; None before a trial completes."""
    completed = finished_trials(study, (TrialState.COMPLETE,))
    if not completed:
        return None
    selection = select_trial(completed, rule)
    chosen = selection.chosen
    attrs, mods = chosen.user_attrs, study.user_attrs["mods"]
    schedule = study.user_attrs.get("lr_schedule", "constant")
    flags = ["--mods", ",".join(mods), "--epochs", str(study.user_attrs["epochs"]),
             *(["--lr_schedule", schedule] if schedule != "constant" else []),
             *as_flags(chosen.params)]
    return {"trial": chosen.number, "flags": flags, "params": chosen.params,
            "value": chosen.value, "objective": study.user_attrs["objective"],
            "mean": attrs.get("mean"), "std": attrs.get("std"), "fold_ccc": attrs.get("fold_ccc"),
            "select": rule, "chosen_by": selection.describe(), "best_trial": selection.best.number,
            "standard_error": selection.standard_error, "within_one_se": list(selection.within),
            "distance_to_recipe": distance_to_recipe(chosen.params),
            "fold_weights": attrs.get("fold_weights"), "recipe": recipe_record(study, chosen)}


def write_outputs(study, out_dir, rule="best"):
    """trials.csv and best.json (once a trial has completed; --select one_se falls back
    to best, saying so, while fewer than 2 have); returns (table, best)."""
    if rule == "one_se" and len(finished_trials(study, (TrialState.COMPLETE,))) < 2:
        print("note: --select one_se needs at least 2 completed trials: best.json holds the "
              "best trial", file=sys.stderr)
        rule = "best"
    table, best = trials_table(study), best_record(study, rule)
    utils.write_csv(table, Path(out_dir) / layout.TRIALS_TABLE)
    if best is not None:
        utils.write_json(best, Path(out_dir) / layout.BEST_RECORD)
    return table, best


def write_study_record(out_dir, storage, name):
    """study.json: --storage (None: the folder's own study.db, wherever it moves) and the name."""
    utils.write_json({"storage": storage, "study_name": name}, Path(out_dir) / layout.STUDY_RECORD)


def study_of(out_dir):
    """The study of a tune.py output folder (plot.py tune, --final)."""
    record = Path(out_dir) / layout.STUDY_RECORD
    if not record.is_file():
        raise ToolkitError(f"{out_dir} holds no study ({layout.STUDY_RECORD} is missing): give the "
                           "--out_dir of a tune.py run")
    saved = json.loads(record.read_text())
    return existing_study(saved["storage"] or default_storage(out_dir), saved["study_name"],
                          must_exist=True)


# ---------------------------------------------------------------- --final

def final_settings(study, base, rule="best"):
    """(TrainingSettings, Postprocessing, best.json's record) of the trial that --select
    `rule` chooses; `base`: the RunOptions of the command."""
    check_selectable(study, rule)
    best = best_record(study, rule)
    if best is None:
        raise ToolkitError(f"the study {study.study_name} has no completed trial yet: run "
                           "tune.py without --final first")
    params = best["params"]
    config = TuneConfig(base, (), "", Path("."), "", "", 0)
    return config.settings_for(params), postprocessing_of(params), best


def run_final(train_set, test_set, out_dir, settings, run, postprocessing):
    """Train the chosen settings on every training video, and score the validation
    videos once, at the last epoch; returns the validation result."""
    folder = Path(out_dir) / layout.FINAL_DIR
    per_second, _ = train_and_predict(train_set, test_set, folder, settings, run,
                                      postprocessing, when_stopped=FINAL_STOPPED)
    result = score_videos(test_set.videos, per_second, calibrated(postprocessing, train_set))
    utils.write_predictions(layout.predictions_dir(folder, "test"), test_set.videos,
                            result["frames"])
    return result


def calibrated(postprocessing, train_set):
    """`postprocessing`, with --calibrate the listener statistics of `train_set`."""
    return (postprocessing.with_listener_stats(train_set.videos) if postprocessing.calibrate
            else postprocessing)


def kept_fold_weights(best):
    """The kept fold checkpoints of the chosen trial (best.json's record), for
    --ensemble folds; one `error:` line if they were not kept or are gone."""
    paths = best.get("fold_weights")
    if not paths:
        raise ToolkitError(f"--ensemble folds needs the fold weights of trial {best['trial']}, "
                           "which were not kept: search with --keep_weights (trials from then "
                           "on keep theirs), or give --ensemble retrain")
    missing = [path for path in paths.values() if not Path(path).is_file()]
    if missing:
        raise ToolkitError(f"--ensemble folds: {missing[0]}, one of trial {best['trial']}'s "
                           "kept fold weights, is gone: give --ensemble retrain, or search "
                           "again with --keep_weights")
    return [Path(path) for path in paths.values()]


def run_fold_ensemble(train_set, test_set, out_dir, paths, run, postprocessing):
    """--ensemble folds: the mean of the fold models' (`paths`) per-second predictions
    of the validation videos, post-processed (calibrated with the listener statistics
    of every training story) and scored once, its 25 fps predictions written to
    final_folds/pred_test/; returns engine.evaluate_seeds's result ("seed_ccc": each
    fold model's own CCC)."""
    from . import checkpoints, engine
    if run.settings.average_last:
        print(f"note: each fold model predicts with its last weights: the mean of its last "
              f"{run.settings.average_last} epochs' predictions (--average_last), which its "
              "trial scored, needs those epochs' weights, which are not kept", file=sys.stderr)
    trained = checkpoints.load_trained(paths, train_set, run.normalize, run.device)
    result = engine.evaluate_seeds(trained, test_set, run.device,
                                   calibrated(postprocessing, train_set),
                                   run.settings.precision)
    utils.write_predictions(layout.predictions_dir(Path(out_dir) / FOLD_ENSEMBLE_DIR, "test"),
                            test_set.videos, result["frames"])
    return result
