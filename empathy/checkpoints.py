"""Checkpoints: writing and reading them, the models and normalization they hold,
and the checks that a --resume may continue one; which checkpoint of a run (one
per seed, last.save for a run stopped early) stands for a name.

A checkpoint describes itself: the weights, the model's configuration (its family,
modalities, input dimensions and sizes; see models.py), the normalization
statistics, the epoch and best score, the training settings and post-processing,
and, for resuming, the optimizer and random-generator states. Only tensors and
plain values, so that it loads with `torch.load(weights_only=True)`. The original
release's plain state_dicts load too.
"""
import io
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from . import datasets, families, layout, models, utils
from .postprocessing import FLAGS, Postprocessing
from .utils import ToolkitError


# ---------------------------------------------------------------- files

def save_checkpoint(path, checkpoint):
    """Write a checkpoint dict (tensors and plain values only, so that it loads with
    `torch.load(weights_only=True)`) under a temporary name, then rename it."""
    serialized = io.BytesIO()
    torch.save(checkpoint, serialized)
    # Written by Python, not by torch: a full disk is then an OSError that names itself.
    with utils.atomic_path(path) as temporary:
        temporary.write_bytes(serialized.getbuffer())


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint as a dict with at least `model` (a state_dict).

    Accepts the toolkit's own self-describing checkpoints and the original
    release's plain state_dicts, which are wrapped as {"model": state_dict}.
    Loading is weights-only: a file that would run pickled code is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"checkpoint {path} does not exist: train a model first "
                           "or point --load at a saved .save file")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ToolkitError(f"cannot read checkpoint {path} ({reason[:200]}): it is corrupt, "
                           "truncated or not a weights-only PyTorch file; retrain or "
                           "use another checkpoint") from None
    if not isinstance(checkpoint, dict):
        raise ToolkitError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a "
                           "state_dict: use a checkpoint written by this toolkit")
    if "model" not in checkpoint:
        checkpoint = {"model": checkpoint}
    _check_finite_weights(checkpoint["model"], path)
    _check_finite_normalization(checkpoint.get("normalization"), path)
    return checkpoint


def _check_finite_weights(state_dict, path):
    """A model whose weights hold NaN or inf predicts NaN: refuse it by name."""
    if not isinstance(state_dict, dict):
        return  # not a state_dict: load_model says so
    for name, value in state_dict.items():
        if (isinstance(value, torch.Tensor) and value.is_floating_point()
                and not torch.isfinite(value).all()):
            raise ToolkitError(f"checkpoint {path} holds NaN or inf weights ({name}): the run "
                               "that wrote it diverged; use an earlier checkpoint, or retrain "
                               "with a lower --lr or with --normalize")


def _check_finite_normalization(state, path):
    """Normalization statistics with NaN or inf turn every input into NaN, and every
    prediction with it: refuse them by name."""
    if not isinstance(state, dict):
        return
    try:
        for bound in ("min", "max"):
            for mod, value in state[bound].items():
                if not torch.isfinite(torch.as_tensor(value, dtype=torch.float32)).all():
                    raise ToolkitError(f"checkpoint {path} holds NaN or inf normalization "
                                       f"statistics ({bound} of {mod}): it is damaged; use "
                                       "another checkpoint or retrain")
    except (KeyError, AttributeError, TypeError, ValueError, RuntimeError):
        raise ToolkitError(f"checkpoint {path} holds damaged normalization statistics: use "
                           "another checkpoint or retrain") from None


def load_model(path, mods, input_dims, device="cpu"):
    """The model saved at `path`, checked against the data it is about to see.

    Returns (model, checkpoint). The checkpoint's own modality order wins (it fixes
    the layout of the fused layers); the set of modalities and every input
    dimension must match `mods` and `input_dims`.
    """
    checkpoint = load_checkpoint(path, device)
    state_dict = checkpoint["model"]
    try:
        config = checkpoint.get("config") or models.config_from_state_dict(state_dict)
        model = models.from_config(config)
        model.load_state_dict(state_dict)
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError):
        raise ToolkitError(f"checkpoint {path} is not a fusion-LSTM checkpoint (its "
                           "parameters do not match the model it describes): use a "
                           "checkpoint written by train.py or by the original release") from None
    if set(model.mods) != set(mods):
        raise ToolkitError(f"checkpoint {path} was trained on --mods {','.join(model.mods)}, "
                           f"not {','.join(mods)}: run with --mods {','.join(model.mods)}")
    for mod in model.mods:
        if model.input_dims[mod] != input_dims[mod]:
            raise ToolkitError(f"checkpoint {path} expects {model.input_dims[mod]}-d {mod} "
                               f"features but the data has {input_dims[mod]}: use the data "
                               "it was trained on, or retrain")
    return model.to(device), checkpoint


# ---------------------------------------------------------------- a run's checkpoints

def run_checkpoints(run_dir, name=layout.BEST):
    """The checkpoints `name` of the run in `run_dir`: its own, or one per seed_<s>/
    folder of a --seeds run. A run that --patience stopped before the epoch of
    `epoch_<N>.save` stands for it with its last.save (training ended there)."""
    run_dir = Path(run_dir)
    folders = ([run_dir] if (run_dir / layout.LAST).exists() or (run_dir / name).exists()
               else sorted((path for path in run_dir.glob("seed_*") if path.is_dir()),
                           key=lambda path: path.name) or [run_dir])
    return [_checkpoint_or_stop(folder, name) for folder in folders]


def _checkpoint_or_stop(folder, name):
    path = folder / name
    epoch = layout.EPOCH_CHECKPOINT.fullmatch(name)
    if path.is_file() or not epoch or not (folder / layout.LAST).is_file():
        return path
    last = load_checkpoint(folder / layout.LAST)
    if last.get("stopped_early") and last["epoch"] < int(epoch.group(1)):
        return folder / layout.LAST
    return path


def check_fold_checkpoints(out_dir, stories, epochs=(None,), epoch_flags="--test_epoch"):
    """Every fold must hold every checkpoint asked for, before any work starts;
    `epoch_flags` are the flags that chose the epochs, which the error advises on."""
    for story in stories:
        for epoch in epochs:
            for path in run_checkpoints(layout.fold_dir(out_dir, story),
                                        layout.checkpoint_name(epoch)):
                if not path.is_file():
                    raise ToolkitError(f"{path} does not exist"
                                       f"{_saved_advice(path.parent, epoch, epoch_flags)}")


def _saved_advice(folder, epoch, epoch_flags):
    """' (saved epochs: 10-50 every 10): choose ...' for a missing checkpoint in `folder`."""
    saved = layout.saved_epochs(folder)
    if not saved:
        return (" (run crossval.py without --test first)" if epoch is None or
                not (Path(folder) / layout.METRICS).is_file() else
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


# ---------------------------------------------------------------- contents

def make_checkpoint(model, scaler, epoch, best_ccc, best_epoch, optimizer=None, rng=None,
                    run_record=None):
    """A self-describing checkpoint: weights, the model's configuration and
    normalization, `run_record` (training settings, post-processing, whether
    --patience stopped the run), and (only for resuming) optimizer and
    random-generator state."""
    checkpoint = {"model": model.state_dict(), "config": model.config, "epoch": epoch,
                  "best_ccc": best_ccc, "best_epoch": best_epoch,
                  "normalization": scaler.state_dict() if scaler else None, **(run_record or {})}
    if optimizer is not None:
        checkpoint["optimizer"] = optimizer.state_dict()
        checkpoint["rng"] = rng
    return checkpoint


def rng_state(generator):
    state = {"torch": torch.get_rng_state(), "shuffle": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    generator.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- trained models

@dataclass
class TrainedModel:
    """A saved model ready to predict: the network, the normalization of its
    inputs, and its checkpoint (epoch, post-processing, ...)."""
    network: torch.nn.Module  # a model of one of the families in families.FAMILIES
    scaler: datasets.FeatureScaler
    checkpoint: dict
    path: Path = None  # where it was read, for messages


def load_trained(paths, train_set, normalize, device):
    """The models saved at `paths` (one per seed), for data shaped like `train_set`."""
    trained = []
    for path in paths:
        network, checkpoint = load_model(path, train_set.mods, train_set.input_dims, device)
        trained.append(TrainedModel(network, resolve_scaler(checkpoint, normalize, train_set, path),
                                    checkpoint, Path(path)))
    return trained


def resolve_scaler(checkpoint, normalize, train_set, source):
    """The checkpoint's normalization if it has one; else, with --normalize, statistics
    of the training videos (as the original release did); else none. A checkpoint of
    this toolkit records that it was trained without: --normalize would feed its
    weights inputs they never saw, so it is refused."""
    state = checkpoint.get("normalization") if checkpoint else None
    if state is not None:
        scaler = datasets.FeatureScaler.from_state_dict(state)
        scaler.check_mods(train_set.mods, source)
        return scaler
    if normalize and checkpoint and "normalization" in checkpoint:
        raise ToolkitError(f"{source} was trained without --normalize: leave out --normalize "
                           "(it would rescale the inputs of a model that learnt them as they are)")
    return datasets.FeatureScaler.fit(train_set) if normalize else None


def averaged_predictions(checkpoint, video_set):
    """The mean of the last --average_last epochs' per-second predictions that a
    run's last.save (`checkpoint`, a loaded dict) keeps of the videos it validated
    on, when `video_set` holds exactly those videos; else None."""
    state = checkpoint.get("prediction_average")
    if not state or not state["count"]:
        return None
    means = [(total / state["count"]).numpy().astype("float32") for total in state["sums"]]
    if (list(state["videos"]) != [video.name for video in video_set.videos]
            or [len(rows) for rows in means] != [video.n_seconds for video in video_set.videos]):
        return None
    return means


# ---------------------------------------------------------------- resuming

# Training settings that change what a resumed run computes: --resume must keep them.
# (--epochs and --patience may change: they say how long to go on; --save_freq and
# --eval_freq only when files are written and the best is checked.) The model's own
# sizes are compared through its saved configuration.
RESUME_KEEPS = ("lr", "weight_decay", "batch_size", "split", "loss", "seed")
# The averages go on from last.save: another one would mix two kinds (a checkpoint
# from before they existed has none). --average_last's window is counted back from
# --epochs, so that stays too.
RESUME_KEEPS_AVERAGING = ("ema", "swa_start", "average_last")


def check_resumable(folder, settings, mods, input_dims, normalize, postprocessing):
    """Refuse, before anything is written, a --resume whose last.save in `folder`
    does not fit the data or was trained with other settings than the flags give
    (the saved optimizer and weights would silently go on with the old ones):
    `settings` (options.TrainingSettings), `normalize` and `postprocessing` (each
    of its flags: label delay, smoothing, low-pass, calibration)."""
    path = Path(folder) / layout.LAST
    network, state = load_model(path, mods, input_dims)
    if "optimizer" not in state:
        raise ToolkitError(f"{path} has no optimizer state: it cannot be resumed; train "
                           "again with --overwrite")
    rng = state.get("rng")
    has_rng = isinstance(rng, dict) and {"torch", "shuffle"} <= rng.keys()
    has_progress = {"epoch", "best_ccc", "best_epoch"} <= state.keys()
    lacking = [what for what, present in (("its random-generator state (rng)", has_rng),
                                          ("its progress (epoch, best score)", has_progress))
               if not present]
    if lacking:  # found here, not after args.json was rewritten
        raise ToolkitError(f"{path} lacks {' and '.join(lacking)}: it cannot be resumed "
                           "exactly; train again with --overwrite, or restore the run's "
                           f"{layout.LAST}")
    if settings.model_options is not None:  # None: fine-tuning, whose model is init.save's
        _check_same_model(path, network.config, settings)
    saved = state.get("training", {})
    for name in RESUME_KEEPS:
        if name in saved and saved[name] != getattr(settings, name):
            _refuse_resume(path, f"--{name} {saved[name]}", getattr(settings, name))
    for name in RESUME_KEEPS_AVERAGING:
        if saved.get(name) != getattr(settings, name):
            _refuse_resume(path, _averaging_flag(name, saved.get(name)),
                           _averaging_flag(name, getattr(settings, name)))
    saved_schedule = saved.get("lr_schedule", "constant")  # none saved: from before it existed
    if saved_schedule != settings.lr_schedule:
        _refuse_resume(path, f"--lr_schedule {saved_schedule}",
                       f"--lr_schedule {settings.lr_schedule}")
    if settings.lr_schedule != "constant" and saved.get("epochs") != settings.epochs:
        _refuse_resume(path, f"--epochs {saved.get('epochs')} and --lr_schedule "
                       f"{settings.lr_schedule}", f"--epochs {settings.epochs}")
    if settings.average_last is not None and saved.get("epochs") != settings.epochs:
        _refuse_resume(path, f"--epochs {saved.get('epochs')} and --average_last "
                       f"{settings.average_last}", f"--epochs {settings.epochs}")
    if (state.get("normalization") is not None) != normalize:
        trained = "with" if state.get("normalization") is not None else "without"
        raise ToolkitError(f"--resume: {path} was trained {trained} --normalize: resume "
                           f"{trained} it, or start afresh with --overwrite")
    _check_same_postprocessing(path, state, postprocessing)
    read_history(Path(folder) / layout.METRICS, state["epoch"])  # refuses a corrupt one


def _check_same_postprocessing(path, state, postprocessing):
    """The validation CCC of every epoch, and so best.save, is scored with the run's
    post-processing: another one mid-run would compare epochs scored two ways."""
    saved = Postprocessing.resolve(state.get("postprocessing"), source=path)
    for name in FLAGS:
        if name == "smooth_window" and not (saved.smooth or postprocessing.smooth):
            continue  # no smoothing either way: the window's shape does not matter
        if getattr(saved, name) != getattr(postprocessing, name):
            _refuse_resume(path, _as_flag(name, getattr(saved, name)),
                           _as_flag(name, getattr(postprocessing, name), alone=False))


def _averaging_flag(name, value):
    return f"--{name} {value:g}" if value is not None else f"no --{name}"


def _as_flag(name, value, alone=True):
    """--calibrate / --no-calibrate; '--smooth 2.0' (or '2.0' where not `alone`)."""
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{name}"
    return f"--{name} {value}" if alone else str(value)


def _check_same_model(path, saved_config, settings):
    """The saved model is of the family and sizes that the flags build."""
    saved_family = saved_config.get("family", families.DEFAULT_MODEL)
    if saved_family != settings.model:
        _refuse_resume(path, f"--model {saved_family}", settings.model)
    wanted = models.create(settings.model, saved_config["input_dims"],
                           **settings.model_options).config
    for key, value in wanted.items():
        if saved_config.get(key) != value:
            flag = families.option_flag(settings.model, key)
            _refuse_resume(path, f"{flag} {saved_config.get(key)}", value)


def check_evaluated_model(path, config, settings):
    """A saved model is evaluated as it was trained (its family and sizes, `config`):
    --model or a size flag given with another value than its default (`settings`,
    options.TrainingSettings) that contradicts the checkpoint at `path` is refused,
    naming both, rather than silently ignored."""
    if settings.model_options is None:  # a script without model flags
        return
    saved_family = config.get("family", families.DEFAULT_MODEL)
    if settings.model != families.DEFAULT_MODEL and settings.model != saved_family:
        raise ToolkitError(f"--model {settings.model} contradicts {path}, which was trained "
                           f"with --model {saved_family}: a saved model is evaluated as it was "
                           "trained; leave out --model")
    for flag in families.family(settings.model).flags:
        value = settings.model_options.get(flag.option, families.default(flag))
        if value == families.default(flag):
            continue
        if saved_family != settings.model:
            raise ToolkitError(f"{_given(flag.flag, value)} sizes --model {settings.model}, but "
                               f"{path} was trained with --model {saved_family}: a saved model "
                               f"is evaluated as it was trained; leave out {flag.flag}")
        if config.get(flag.option) != value:
            raise ToolkitError(f"{_given(flag.flag, value)} contradicts {path}, whose model was "
                               f"trained with {_given(flag.flag, config.get(flag.option))}: a "
                               f"saved model is evaluated as it was trained; leave out "
                               f"{flag.flag}")


def _given(flag, value):
    """'--hidden_dim 64', '--bidirectional' or 'no --bidirectional'."""
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


def _refuse_resume(path, saved, given):
    raise ToolkitError(f"--resume: {path} was trained with {saved}, not {given}: resume "
                       "with the run's own settings (its args.json), or start afresh with "
                       "--overwrite")


def read_history(path, last_epoch):
    """The metrics.csv rows up to `last_epoch` (later ones, written after the last
    last.save, are trained again)."""
    if not path.is_file():
        return []
    try:
        history = pd.read_csv(path)
        if not {"epoch", "train_loss", "val_ccc"} <= set(history.columns):
            raise ValueError("columns epoch,train_loss,val_ccc missing")
        history = history[history["epoch"] <= last_epoch]
    except (ValueError, TypeError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise ToolkitError(f"--resume: {path} cannot be read ({str(error).splitlines()[0][:120]}): "
                           "restore it or start afresh with --overwrite") from None
    return history.to_dict("records")
