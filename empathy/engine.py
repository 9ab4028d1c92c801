"""The training engine: training, evaluation, prediction, seeds and devices.

Scripts call `fit` with three named objects: a `Training` (the videos, device,
options.TrainingSettings and fine-tuning method), a `Validation` (the videos and
their post-processing) and the `Hooks` they add (progress bar, TensorBoard,
per-epoch callback); `fit_seeds` builds them from options.RunOptions. It reads
and writes checkpoints through checkpoints.py and output names through layout.py.
One `train_one_epoch`, one `evaluate`, one `fit`.
"""
import contextlib
import ctypes
import math
import random
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import checkpoints, layout, parallel, utils
from .postprocessing import Postprocessing, report_unseen_listeners, score_videos, unscored
from .precision import autocast, check_precision, grad_scaler
from .utils import ToolkitError

if TYPE_CHECKING:  # the annotations only
    from . import datasets, options

EMBED_CHUNK_ROWS = 2048  # rows embedded at once in evaluation: bounds memory, not speed


# ---------------------------------------------------------------- runtime

def seed_everything(seed):
    """Seed every generator a run draws from (Python, NumPy, torch CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_MMAP_MAX, _GLIBC_TRIM_THRESHOLD = 65536, 128 * 1024  # glibc's defaults


@contextlib.contextmanager
def reused_heap():
    """Serve every allocation from glibc's heap, and keep the heap, while training.

    By default glibc maps blocks over 32 MiB (oneDNN's LSTM workspace) fresh from the
    kernel each time and hands the top of its heap back early, so every batch page-
    faults the same memory in again: 0.2 s of system time per ATV epoch on 2 cores,
    5-10% of its wall time on bench.py's data. Peak memory changes little (within 30
    MiB there): each batch reuses what the last one freed. On leaving, the heap's free
    memory goes back to the system. Without glibc this does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 2**30)
    try:
        yield
    finally:
        mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
        mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
        malloc_trim(0)


# ---------------------------------------------------------------- steps

def build_optimizer(model, lr, weight_decay):
    # foreach: one kernel launch per operation for all parameters, 2x faster than the
    # CPU default's loop over parameters, with bit-identical results.
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)


class WeightAverage:
    """The averaged weights of --ema DECAY (updated after every optimizer step) or
    --swa_start EPOCH (an equal average of the weights at the end of that epoch and
    every later one), kept beside the trained model in an
    `torch.optim.swa_utils.AveragedModel`.

    Validation, checkpoints' "model", predictions and features use `network`: the
    average once it has taken in a model, the trained model before that (SWA's first
    epochs). The model has no batch norm, so no statistics need recomputing."""

    def __init__(self, model, ema=None, swa_start=None):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        self.per_step, self.start = ema is not None, swa_start or 1
        average = get_ema_multi_avg_fn(ema) if ema is not None else None
        self.averaged = AveragedModel(model, multi_avg_fn=average, use_buffers=True)

    @classmethod
    def of(cls, model, settings):
        """The average that `settings` ask for, or None."""
        if settings.ema is None and settings.swa_start is None:
            return None
        return cls(model, settings.ema, settings.swa_start)

    @property
    def n_averaged(self):
        return int(self.averaged.n_averaged)

    def after_step(self, model):
        if self.per_step:
            self.averaged.update_parameters(model)

    def after_epoch(self, model, epoch):
        if not self.per_step and epoch >= self.start:
            self.averaged.update_parameters(model)

    def network(self, model):
        return self.averaged.module if self.n_averaged else model

    def state_dict(self):
        return {"n_averaged": self.n_averaged}

    def load(self, weights, state):
        """Continue from a checkpoint's averaged weights and count: bit for bit."""
        self.averaged.module.load_state_dict(weights)
        self.averaged.n_averaged.fill_(state["n_averaged"])


class PredictionAverage:
    """--average_last K: the running sum of the validation videos' per-second
    predictions over the last K epochs of --epochs (every one of them is evaluated),
    so the run's held-out prediction is their mean. One copy of the predictions,
    kept in last.save so that --resume goes on exactly."""

    def __init__(self, epochs, last_k):
        self.first_epoch, self.sums, self.count, self.names = epochs - last_k + 1, None, 0, []

    @classmethod
    def of(cls, settings):
        return cls(settings.epochs, settings.average_last) if settings.average_last else None

    def covers(self, epoch):
        return epoch >= self.first_epoch

    def add(self, per_second, names):
        self.names = list(names)
        if self.sums is None:
            self.sums = [rows.astype(np.float64) for rows in per_second]
        else:
            for total, rows in zip(self.sums, per_second):
                total += rows
        self.count += 1

    def mean(self):
        """The per-second mean predictions so far (float32), or None before the window."""
        return None if not self.count else [(total / self.count).astype(np.float32)
                                            for total in self.sums]

    def state_dict(self):
        return {"count": self.count, "first_epoch": self.first_epoch, "videos": self.names,
                "sums": [torch.from_numpy(total) for total in self.sums or []]}

    def load(self, state):
        self.count, self.first_epoch = state["count"], state["first_epoch"]
        self.names = list(state["videos"])
        self.sums = [total.numpy().copy() for total in state["sums"]] or None


def shuffled_batches(segments, batch_size, generator):
    """An epoch's batches: every training piece once, in a fresh random order."""
    order = torch.randperm(len(segments), generator=generator)
    return [[segments[i] for i in batch_indices.tolist()]
            for batch_indices in order.split(batch_size)]


def train_one_epoch(run):
    """One pass over the training pieces of `run` (a TrainingRun) in a fresh random
    order, or over the batches that its fine-tuning method draws (--mix).

    The loss (`utils.LOSSES[settings.loss]`) is computed in float32 over each batch's
    valid steps; the forward pass runs in `settings.precision` (see precision.autocast),
    with the run's gradient scaler for fp16. The fine-tuning method's penalty
    (--anchor) is added to the loss that is minimized (not to the one reported);
    --ema's average takes in the weights after every optimizer step.
    Returns {"loss": its mean over batches, weighted by their steps}.
    """
    model, optimizer, scaler = run.model, run.optimizer, run.grad_scaler
    settings, device, penalty = run.settings, run.device, run.penalty
    model.train()
    loss_function = utils.LOSSES[settings.loss]
    total_loss, total_steps = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    for batch_segments in run.epoch_batches():
        batch = run.training.train_set.gather(batch_segments, device)
        with autocast(settings.precision, device):
            embedded = model.embed(batch.inputs)
            batch.inputs = None  # dropout copied the rows it needs: free the gathered ones early
            predictions = model.forward_embedded(embedded, batch.lengths)
        loss = loss_function(predictions.float(), batch.targets)  # .float(): no-op in fp32
        objective = loss if penalty is None else loss + penalty(model)
        if scaler is None:
            objective.backward()
            optimizer.step()
        else:
            scaler.scale(objective).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)  # gradients freed before the next batch
        if run.weight_average is not None:
            run.weight_average.after_step(model)
        total_loss += loss.item() * batch.targets.numel()
        total_steps += batch.targets.numel()
    return {"loss": total_loss / total_steps}


@torch.no_grad()
def predict(model, video_set, device, with_features=False, precision="fp32"):
    """Per-second predictions (and features) of every video, as float32 NumPy arrays;
    the model runs in `precision` (see precision.autocast).

    All videos run through the LSTM as one padded batch; only the per-step
    embeddings are computed in chunks, which bounds memory on large splits.
    """
    model.eval()
    segments = video_set.video_segments()
    lengths = torch.tensor([length for _, length in segments])
    with autocast(precision, device):
        embedded = [model.embed(video_set.gather(chunk, device, with_targets=False).inputs)
                    for chunk in _chunks(segments, EMBED_CHUNK_ROWS)]
        predictions, features = model.forward_embedded(torch.cat(embedded), lengths,
                                                       with_features=True)
    sizes = lengths.tolist()
    predictions = [p.cpu().numpy() for p in predictions.float().split(sizes)]
    if with_features:
        return predictions, [f.cpu().numpy() for f in features.float().split(sizes)]
    return predictions


def _chunks(segments, max_rows):
    chunk, rows = [], 0
    for segment in segments:
        if chunk and rows + segment[1] > max_rows:
            yield chunk
            chunk, rows = [], 0
        chunk.append(segment)
        rows += segment[1]
    yield chunk


def evaluate(model, video_set, device, postprocessing=None, precision="fp32"):
    """CCC of every video at 25 fps, and their mean.

    Returns {"ccc": mean CCC, "records": [{subject, story, ccc}], "frames": [25 fps
    predictions per video]}; see postprocessing.score_videos.
    """
    return score_videos(video_set.videos, predict(model, video_set, device, precision=precision),
                        postprocessing)


# ---------------------------------------------------------------- saved models

def load_for_evaluation(paths, train_set, normalize, flags, device, evaluated=()):
    """The models saved at `paths` (one per seed) and the post-processing to evaluate
    them with (see `saved_postprocessing`): (trained, postprocessing)."""
    trained = checkpoints.load_trained(paths, train_set, normalize, device)
    return trained, saved_postprocessing(trained, flags or {}, train_set, evaluated)


def saved_postprocessing(trained, flags, train_set, evaluated=()):
    """The post-processing the models were trained with, overridden by `flags`. A
    model saved without listener statistics calibrates with those of `train_set`
    (its training videos, as the caller knows them), and says so; so does
    calibration of listeners in the `evaluated` sets that training never saw."""
    postprocessing = Postprocessing.resolve(trained[0].checkpoint.get("postprocessing"),
                                            trained[0].path, **flags)
    if postprocessing.calibrate and postprocessing.listener_stats is None:
        print(f"note: the model was saved without listener statistics: --calibrate uses "
              f"those of its {len(train_set)} training videos as loaded now", file=sys.stderr)
        postprocessing = postprocessing.with_listener_stats(train_set.videos)
    report_unseen_listeners(postprocessing, [video for video_set in evaluated
                                             for video in video_set.videos])
    return postprocessing


def evaluate_seeds(trained, video_set, device, postprocessing, precision="fp32"):
    """`evaluate` for the models of several seeds: the videos are scored on the
    average of their per-second predictions; "seed_ccc" lists each model's own CCC
    and "seed_frames" its 25 fps predictions."""
    return score_seed_predictions([predict(t.network, video_set.with_scaler(t.scaler), device,
                                           precision=precision) for t in trained],
                                  video_set, postprocessing)


def kept_averages(trained, video_set):
    """The mean over seeds of the --average_last predictions of `video_set` that the
    seeds' last.save models (`trained`) keep (checkpoints.averaged_predictions), or
    None where one keeps none of those videos."""
    kept = [checkpoints.averaged_predictions(model.checkpoint, video_set) for model in trained]
    if any(predictions is None for predictions in kept):
        return None
    return [np.mean(rows, axis=0) for rows in zip(*kept)]


def score_seed_predictions(per_seed, video_set, postprocessing):
    """`evaluate_seeds`'s result from each seed's per-second predictions of `video_set`."""
    average = [np.mean(predictions, axis=0) for predictions in zip(*per_seed)]
    result = score_videos(video_set.videos, average, postprocessing)
    own = ([score_videos(video_set.videos, predictions, postprocessing)
            for predictions in per_seed] if len(per_seed) > 1 else [result])
    result["seed_ccc"] = [seed_result["ccc"] for seed_result in own]
    result["seed_frames"] = [seed_result["frames"] for seed_result in own]
    return result


# ---------------------------------------------------------------- training

@dataclass(frozen=True)
class Training:
    """What `fit` trains on, where and how: the training videos, the device, one
    seed's hyper-parameters (options.TrainingSettings, --precision among them) and
    personalize.py's method (finetuning.SubjectFineTuning: its weight decay, the
    penalty it adds to the loss, how it draws batches, and its record in every
    checkpoint; None trains as everything else does)."""
    train_set: "datasets.VideoSet"
    settings: "options.TrainingSettings"
    device: torch.device
    finetuning: object = None


@dataclass(frozen=True)
class Validation:
    """What `fit` validates on and how: the videos, and the post-processing
    (postprocessing.Postprocessing; None: the defaults) that scores their predictions.
    Its label delay also shifts the training targets, so that the model learns
    what it is scored on."""
    val_set: "datasets.VideoSet"
    postprocessing: Postprocessing = None


@dataclass(frozen=True)
class Hooks:
    """What a script adds to `fit`'s epochs: a progress bar; every epoch's scalars
    in TensorBoard under `tensorboard_dir` (see `curves`); `on_epoch(row)`, called
    with each epoch's metrics row once it is recorded (tune.py's pruner; an
    exception it raises ends training there); and `when_stopped`, for a run that is
    never resumed (a tune.py trial): what to do after a stop request instead of
    --resume, so that no last.save is saved then."""
    progress: bool = True
    tensorboard_dir: Path = None
    on_epoch: Callable = None
    when_stopped: str = None

    @classmethod
    def of(cls, run):
        """The hooks that a command's flags ask for (options.RunOptions)."""
        return cls(progress=run.progress, tensorboard_dir=run.tensorboard_dir)


class TrainingRun:
    """One model's training in one folder: the model with its optimizer, gradient
    scaler and shuffling generator, and the progress that checkpoints save and
    --resume restores (epoch, best score, metrics history, --patience count).
    Without `validation` and `model_dir` it only trains (train_one_epoch: bench.py)."""

    def __init__(self, model, training, validation=None, model_dir=None):
        self.model, self.training, self.validation = model, training, validation
        self.model_dir = Path(model_dir) if model_dir is not None else None
        settings, finetuning, train_set = training.settings, training.finetuning, training.train_set
        self.settings, self.device = settings, training.device  # read at every step
        self.optimizer = build_optimizer(model, settings.lr, settings.weight_decay
                                         if finetuning is None else finetuning.weight_decay)
        self.grad_scaler = grad_scaler(settings.precision, self.device)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.segments = train_set.training_segments(settings.split)
        self.draw_batches = finetuning.batches(train_set) if finetuning is not None else None
        self.penalty = finetuning.penalty if finetuning is not None else None  # --anchor's
        self.weight_average = WeightAverage.of(model, settings)  # --ema, --swa_start
        self.prediction_average = PredictionAverage.of(settings)  # --average_last
        self.predictions = None  # the last evaluation's per-second predictions
        self.epoch, self.best_ccc, self.best_epoch, self.history = 0, -math.inf, 0, []
        self.stale_evaluations, self.stopped_early = 0, False  # evaluations since the best

    @property
    def network(self):
        """The model that is validated, saved as "model" and predicts: the averaged
        weights with --ema or --swa_start, else the trained ones."""
        return (self.weight_average.network(self.model) if self.weight_average is not None
                else self.model)

    def epoch_batches(self):
        """The next epoch's batches (lists of pieces): every training piece once, or
        those that the fine-tuning method draws."""
        if self.draw_batches is not None:
            return self.draw_batches(self.generator)
        return shuffled_batches(self.segments, self.settings.batch_size, self.generator)

    def resume(self):
        """Continue from last.save: weights (trained and averaged), optimizer,
        generators, progress and the --average_last sums."""
        state = checkpoints.load_checkpoint(self.model_dir / layout.LAST, self.device)
        if "optimizer" not in state:
            raise ToolkitError(f"{self.model_dir / layout.LAST} has no optimizer state: it cannot "
                               "be resumed; train again with --overwrite")
        # With averaging, "model" holds the average and "trained_model" what the optimizer moves.
        self.model.load_state_dict(state.get("trained_model", state["model"]))
        if self.weight_average is not None:
            self.weight_average.load(state["model"], state["weight_average"])
        if self.prediction_average is not None:
            self.prediction_average.load(state["prediction_average"])
        self.optimizer.load_state_dict(state["optimizer"])
        checkpoints.restore_rng_state(state["rng"], self.generator)
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.epoch, self.best_ccc, self.best_epoch = (state["epoch"], state["best_ccc"],
                                                      state["best_epoch"])
        self.stopped_early = bool(state.get("stopped_early"))
        self.history = checkpoints.read_history(self.model_dir / layout.METRICS, self.epoch)
        self.stale_evaluations = sum(1 for row in self.history if row["epoch"] > self.best_epoch
                                     and not math.isnan(row["val_ccc"]))

    def save(self, name, with_optimizer=False):
        finetuning = self.training.finetuning
        record = {"training": asdict(self.settings),
                  "postprocessing": asdict(self.validation.postprocessing),
                  "stopped_early": self.stopped_early}
        if finetuning is not None:
            record["finetuning"] = finetuning.record
        if with_optimizer and self.grad_scaler is not None:  # fp16: its loss scale, for --resume
            record["grad_scaler"] = self.grad_scaler.state_dict()
        if self.weight_average is not None:
            record["weight_average"] = self.weight_average.state_dict()
            if with_optimizer:  # the weights the optimizer goes on from
                record["trained_model"] = self.model.state_dict()
        if with_optimizer and self.prediction_average is not None:
            record["prediction_average"] = self.prediction_average.state_dict()
        scaler = self.training.train_set.scaler  # --normalize's, saved with the weights
        checkpoints.save_checkpoint(self.model_dir / name, checkpoints.make_checkpoint(
            self.network, scaler, self.epoch, self.best_ccc, self.best_epoch,
            self.optimizer if with_optimizer else None,
            checkpoints.rng_state(self.generator) if with_optimizer else None, record))

    def train_epoch(self):
        """Train one epoch, evaluate if it is time, save best.save on a new best;
        returns the epoch's metrics row."""
        self.epoch += 1
        settings = self.settings
        val_set, postprocessing = self.validation.val_set, self.validation.postprocessing
        for group in self.optimizer.param_groups:  # --lr_schedule's rate for this epoch
            group["lr"] = settings.epoch_lr(self.epoch)
        stats = train_one_epoch(self)
        if self.weight_average is not None:
            self.weight_average.after_epoch(self.model, self.epoch)
        self.check_converging(stats["loss"], "training loss")
        row = {"epoch": self.epoch, "train_loss": stats["loss"], "val_ccc": math.nan}
        averaging_predictions = (self.prediction_average is not None
                                 and self.prediction_average.covers(self.epoch))
        if averaging_predictions:
            row["val_ccc_average"] = math.nan
        if (self.epoch % settings.eval_freq == 0 or self.epoch == settings.epochs
                or averaging_predictions):
            self.predictions = predict(self.network, val_set, self.device,
                                       precision=settings.precision)
            row["val_ccc"] = score_videos(val_set.videos, self.predictions, postprocessing)["ccc"]
            self.check_converging(row["val_ccc"], "validation CCC")
            if averaging_predictions:
                self.prediction_average.add(self.predictions,
                                            [video.name for video in val_set.videos])
                row["val_ccc_average"] = score_videos(
                    val_set.videos, self.prediction_average.mean(), postprocessing)["ccc"]
            self.stale_evaluations += 1
            if row["val_ccc"] > self.best_ccc:
                self.best_ccc, self.best_epoch, self.stale_evaluations = row["val_ccc"], self.epoch, 0
                self.save(layout.BEST)
        self.stopped_early = (settings.patience is not None
                              and self.stale_evaluations >= settings.patience)
        return row

    def record(self, row):
        """Log the epoch: metrics.csv, then (every --save_freq) its checkpoints. In this
        order: a kill between the two writes then costs no row for good (--resume
        drops the rows after last.save's epoch and trains them again)."""
        self.history.append(row)
        utils.write_csv(pd.DataFrame(self.history), self.model_dir / layout.METRICS)
        if self.epoch % self.settings.save_freq == 0:
            self.save(layout.checkpoint_name(self.epoch))
            self.save(layout.LAST, with_optimizer=True)

    def check_converging(self, value, what):
        """Stop a run whose loss (or validation CCC) became NaN or inf: its weights are
        lost, and every later epoch would only write NaN. Nothing of the epoch is saved."""
        if not math.isfinite(value):
            raise ToolkitError(f"{self.model_dir}: training diverged in epoch {self.epoch} (the "
                               f"{what} is {value}): lower --lr (now {self.settings.lr:g}) or "
                               "pass --normalize if the features are large")

    def held_out_predictions(self):
        """The run's per-second predictions of the validation videos as it reports them
        at its end: the mean of the last --average_last epochs', else the last model's."""
        if self.prediction_average is not None and self.prediction_average.count:
            return self.prediction_average.mean()
        if self.predictions is None:  # nothing trained in this process: a finished run
            self.predictions = predict(self.network, self.validation.val_set, self.device,
                                       precision=self.settings.precision)
        return self.predictions

    def summary(self):
        """fit's summary: the best epoch (picked on the validation videos), and what
        can be reported: the last epoch's validation CCC and per-second predictions
        ("last_ccc", "predictions"; with --average_last, of the average)."""
        predictions = self.held_out_predictions()
        averaged = self.prediction_average.count if self.prediction_average is not None else 0
        last_ccc = score_videos(self.validation.val_set.videos, predictions,
                                self.validation.postprocessing)["ccc"]
        return {"best_ccc": self.best_ccc, "best_epoch": self.best_epoch, "epoch": self.epoch,
                "stopped_early": self.stopped_early, "predictions": predictions,
                "averaged_epochs": averaged, "last_ccc": last_ccc}


def fit(model, training, validation, model_dir, hooks=Hooks(), resume=False):
    """Train `model` as `training` says (a Training) into `model_dir`, checking
    `validation` (a Validation) every --eval_freq epochs; with `resume`, go on from
    its last.save. `hooks` (a Hooks): what the script adds to every epoch.

    Writes into `model_dir`: best.save (best validation CCC), epoch_<N>.save every
    `save_freq` epochs, last.save (with optimizer state, for --resume) every
    `save_freq` epochs, at the end, and when Ctrl-C or SIGTERM stops the run at the
    end of the epoch in progress; and metrics.csv after every epoch. With
    `settings.patience`, training ends once that many evaluations in a row have not
    beaten the best. With --ema or --swa_start (`settings`), the averaged weights
    are validated and saved; with --average_last K, the last K epochs' predictions
    are averaged too.
    Returns {"best_ccc", "best_epoch" (picked on the validation videos), "epoch",
    "stopped_early", "last_ccc", "predictions" (what can be reported: see
    TrainingRun.summary)}.
    """
    model_dir = Path(model_dir)
    utils.check_writable(model_dir)
    # A run killed mid-write (a lost cluster worker) left temporaries; this run owns the folder.
    utils.remove_interrupted_writes(model_dir)
    training.settings.check()
    check_precision(training.settings.precision, training.device)
    # Calibration maps predictions to the statistics of the training videos: saved in
    # every checkpoint, so that a model evaluated later calibrates as it was trained.
    postprocessing = ((validation.postprocessing or Postprocessing())
                      .with_listener_stats(training.train_set.videos))
    if not resume:
        report_unseen_listeners(postprocessing, validation.val_set.videos)
    if postprocessing.delay_frames:
        delayed = training.train_set.with_label_delay(postprocessing.delay_frames)
        training = replace(training, train_set=delayed)
    run = TrainingRun(model, training, replace(validation, postprocessing=postprocessing),
                      model_dir)
    if resume:
        run.resume()
    if not run.stopped_early:
        _train_epochs(run, hooks)
    return run.summary()


def _train_epochs(run, hooks):
    """Train from the run's epoch to --epochs, or until --patience or a stop request."""
    start_epoch, settings = run.epoch, run.settings
    with tqdm(range(start_epoch + 1, settings.epochs + 1), desc=run.model_dir.name, unit="epoch",
              disable=not hooks.progress, leave=False, dynamic_ncols=True) as bar, \
            parallel.StopRequests() as stop, reused_heap(), \
            curves(hooks.tensorboard_dir, run.model_dir) as log_epoch:
        for _ in bar:
            row = run.train_epoch()
            run.record(row)
            log_epoch(row, run.optimizer.param_groups[0]["lr"])
            if hooks.on_epoch is not None:
                hooks.on_epoch(row)
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_ccc=f"{row['val_ccc']:.3f}",
                            best=f"{run.best_ccc:.3f}@{run.best_epoch}")
            if run.stopped_early:
                tqdm.write(f"{run.model_dir}: stopped at epoch {run.epoch}, the validation CCC "
                           f"has not improved for {settings.patience} evaluations (--patience)")
                break
            if stop.requested and hooks.when_stopped:
                print(f"stopped after epoch {run.epoch} of {run.model_dir}: {hooks.when_stopped}",
                      file=sys.stderr)
                raise KeyboardInterrupt
            if stop.requested:
                run.save(layout.LAST, with_optimizer=True)
                print(f"stopped after epoch {run.epoch}; {run.model_dir / layout.LAST} holds it: "
                      "run the same command with --resume to continue", file=sys.stderr)
                raise KeyboardInterrupt
    if run.epoch > start_epoch:
        run.save(layout.LAST, with_optimizer=True)


@contextlib.contextmanager
def curves(tensorboard_dir, model_dir):
    """A function that logs an epoch's metrics row (and the learning rate) to
    TensorBoard under <tensorboard_dir>/<model_dir> (its path without a leading
    root, so that folds, seeds and subjects are separate runs); one that does
    nothing without `tensorboard_dir`."""
    if not tensorboard_dir:
        yield lambda row, lr: None
        return
    from torch.utils.tensorboard import SummaryWriter  # imported only when asked for
    run_name = Path(model_dir).relative_to(Path(model_dir).anchor)
    writer = SummaryWriter(log_dir=str(Path(tensorboard_dir) / run_name))

    def log_epoch(row, lr):
        writer.add_scalar("loss/train", row["train_loss"], row["epoch"])
        writer.add_scalar("learning_rate", lr, row["epoch"])
        if not math.isnan(row["val_ccc"]):
            writer.add_scalar("ccc/validation", row["val_ccc"], row["epoch"])
    try:
        yield log_epoch
    finally:
        writer.close()


def fit_seeds(make_model, train_set, val_set, model_dir, run, device, postprocessing=None,
              finetuning=None):
    """`fit` once per seed of `run.settings` (options.RunOptions; see
    `TrainingSettings.seed_runs`), each seeded before `make_model()` builds its
    starting model, with the run's post-processing unless `postprocessing` is given
    (and `finetuning`, see `Training`). Returns fit's summary per seed, with "seed"."""
    summaries = []
    for seed_settings, folder in run.settings.seed_runs(model_dir):
        seed_everything(seed_settings.seed)
        summary = fit(make_model(), Training(train_set, seed_settings, device, finetuning),
                      Validation(val_set, postprocessing or run.postprocessing), folder,
                      Hooks.of(run), resume=run.resumes_run(folder))
        summaries.append({"seed": seed_settings.seed, **summary})
    return summaries


# ---------------------------------------------------------------- outputs

def write_features(folder, video_set, features):
    """One (seconds, 128) .npy of decision-level features per video."""
    utils.remove_interrupted_writes(folder, {f"{video.name}.npy" for video in video_set.videos})
    for video, rows in zip(video_set.videos, features):
        utils.save_array(Path(folder) / f"{video.name}.npy", rows.astype(np.float32))


def write_test_predictions(trained, train_set, test_set, pred_dir, device, postprocessing,
                           precision="fp32"):
    """Write the predictions for both sets (of the seed average, and of each seed
    under seed_<s>/ when there are several) and return their evaluations."""
    results = {}
    for name, video_set in (("train", train_set), ("test", test_set)):
        per_seed = [kept_or_predicted(t, video_set, device, precision) for t in trained]
        results[name] = unscored(score_seed_predictions(per_seed, video_set, postprocessing),
                                 video_set.videos)
        utils.write_predictions(layout.predictions_dir(pred_dir, name), video_set.videos,
                                results[name]["frames"])
        if len(trained) > 1:
            for model, frames in zip(trained, results[name]["seed_frames"]):
                seed = model.checkpoint["training"]["seed"]
                utils.write_predictions(layout.predictions_dir(layout.seed_dir(pred_dir, seed), name),
                                        video_set.videos, frames)
    return results


def kept_or_predicted(trained, video_set, device, precision="fp32"):
    """The per-second predictions of `video_set` by a saved model (checkpoints.
    TrainedModel): the --average_last mean that its last.save keeps when these are
    the videos it validated on (and says so), else the model's own."""
    kept = checkpoints.averaged_predictions(trained.checkpoint, video_set)
    if kept is not None:
        print(f"note: {trained.path} keeps the mean of its last "
              f"{trained.checkpoint['training']['average_last']} epochs' predictions of these "
              f"{len(video_set)} videos (--average_last): they are what is written and scored",
              file=sys.stderr)
        return kept
    return predict(trained.network, video_set.with_scaler(trained.scaler), device,
                   precision=precision)


def extract_features(trained, train_set, test_set, feat_dir, device, label_delay=0.0,
                     precision="fp32"):
    """Decision-level features of both sets; several seeds' side by side (N x 128
    columns). A --label_delay run's features are shifted back by the delay in whole
    seconds, like its predictions, so that row t stays second t of the video."""
    shift = round(label_delay)
    for name, video_set in (("train", train_set), ("test", test_set)):
        per_seed = [predict(t.network, video_set.with_scaler(t.scaler), device,
                            with_features=True, precision=precision)[1] for t in trained]
        features = [np.concatenate(video_features, axis=1) for video_features in zip(*per_seed)]
        write_features(layout.features_dir(feat_dir, name), video_set,
                       [_delayed_rows(rows, shift) for rows in features])


def _delayed_rows(rows, seconds):
    """Rows shifted `seconds` later, the first row repeated in front."""
    if seconds <= 0:
        return rows
    seconds = min(seconds, len(rows) - 1)
    return np.concatenate([np.repeat(rows[:1], seconds, axis=0), rows[:len(rows) - seconds]])
