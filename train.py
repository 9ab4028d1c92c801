"""Train, test, or extract decision-level features from the fusion LSTM.

    python train.py --epochs 2000 --mods audio,text --model_dir models_AT
    python train.py --mods audio,text --model_dir models_AT --pred_dir preds_AT --test
    python train.py --mods audio,text --model_dir models_AT --feat_dir feat_AT --features

Other scripts (crossval.py, cv_epochs.py, personalize.py) reuse the parsers and
functions below with explicit arguments.
"""
import argparse
import contextlib
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import datasets
import models
import parallel
import runs
import utils
from utils import ToolkitError

EMBED_CHUNK_ROWS = 2048  # rows embedded at once in evaluation: bounds memory, not speed


def mse_loss(predictions, targets):
    return torch.mean((predictions - targets) ** 2)


LOSSES = {"mse": mse_loss, "ccc": utils.ccc_loss}


# ---------------------------------------------------------------- flags

def get_data_args_parser():
    """Flags of every script that loads data and builds models."""
    parser = argparse.ArgumentParser(add_help=False, parents=[datasets.get_split_args_parser(),
                                                             utils.get_postprocessing_args_parser()])
    group = parser.add_argument_group("data and device")
    group.add_argument("--mods", default="audio,text,v_sub,v_act",
                       help="comma-separated modalities from audio,text,v_sub,v_act "
                            "(default: %(default)s)")
    group.add_argument("--normalize", action="store_true",
                       help="rescale every feature dimension to [-1, 1] by the training "
                            "data's min and max (stored in the checkpoint)")
    group.add_argument("--cuda", action="store_true",
                       help="run on the GPU (falls back to the CPU with a warning)")
    group.add_argument("--precision", choices=models.PRECISIONS, default="fp32",
                       help="arithmetic of training and prediction: bf16 autocasts on CPUs with "
                            "AVX512-BF16 or AMX (refused on others, where it is many times "
                            "slower) and on GPUs; fp16 (with gradient scaling) only with --cuda; "
                            "weights and checkpoints stay float32 (default: %(default)s)")
    group.add_argument("--seed", type=int, default=1,
                       help="random seed; with --seeds N, the first of N (default: %(default)s)")
    return parser


def get_model_args_parser():
    """Flags of the scripts that build new models."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument("--layers", type=int, default=1, metavar="N",
                       help="stacked LSTM layers (default: %(default)s)")
    group.add_argument("--bidirectional", action="store_true",
                       help="run the LSTM forwards and backwards; the attention and the "
                            "decoder take both directions' states")
    return parser


def get_training_args_parser():
    """Flags of every script that trains."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=1000, help="epochs (default: %(default)s)")
    group.add_argument("--batch_size", type=int, default=25,
                       help="video pieces per batch (default: %(default)s)")
    group.add_argument("--split", type=int, default=5,
                       help="contiguous pieces each training video is cut into "
                            "(default: %(default)s)")
    group.add_argument("--lr", type=float, default=1e-5,
                       help="Adam learning rate (default: %(default)s)")
    group.add_argument("--weight_decay", type=float, default=5e-4,
                       help="Adam weight decay (default: %(default)s)")
    group.add_argument("--eval_freq", type=int, default=1,
                       help="evaluate on the validation set every N epochs; the best "
                            "is saved as best.save (default: %(default)s)")
    group.add_argument("--save_freq", type=int, default=100,
                       help="save epoch_<N>.save every N epochs (default: %(default)s)")
    group.add_argument("--resume", action="store_true",
                       help="continue the run in the model folder from its last.save")
    group.add_argument("--loss", choices=LOSSES, default="mse",
                       help="mse: squared error over a batch's valid steps; ccc: 1 - CCC over "
                            "them (default: %(default)s)")
    group.add_argument("--patience", type=int, metavar="N",
                       help="stop when the validation CCC has not improved for N evaluations "
                            "(default: train all --epochs)")
    group.add_argument("--tensorboard", metavar="DIR",
                       help="write each run's per-epoch training loss, validation CCC and "
                            "learning rate as TensorBoard events under DIR/<model folder> "
                            "(per fold, seed and subject); view with tensorboard --logdir DIR "
                            "(default: none)")
    group.add_argument("--seeds", type=int, default=1, metavar="N",
                       help="train N models, seeds --seed to --seed+N-1, in seed_<s>/ folders; "
                            "report mean +- std of their CCC and score and write the average "
                            "of their predictions (default: %(default)s)")
    return parser


def get_args_parser():
    parser = argparse.ArgumentParser(
        "train.py", parents=[get_data_args_parser(), get_training_args_parser(),
                             get_model_args_parser(), runs.get_ledger_args_parser()],
        description="Train, test, or extract features from the fusion LSTM.")
    group = parser.add_argument_group("what to run")
    group.add_argument("--model_dir", default="./models",
                       help="folder of checkpoints and run records (default: %(default)s)")
    group.add_argument("--test", action="store_true",
                       help="evaluate <model_dir>/best.save (or --load): write predictions "
                            "to <pred_dir>/pred_train and pred_test and print CCC")
    group.add_argument("--features", action="store_true",
                       help="write decision-level features to <feat_dir>/feat_train and feat_test")
    group.add_argument("--load", help="checkpoint for --test/--features (default: "
                                      "<model_dir>/best.save)")
    group.add_argument("--pred_dir", default="./", help="where --test writes (default: %(default)s)")
    group.add_argument("--feat_dir", default="./",
                       help="where --features writes (default: %(default)s)")
    group.add_argument("--test_set", type=int, nargs="+", metavar="STORY",
                       help="re-split: pool both folders and test on these stories")
    group.add_argument("--subjects", type=int, nargs="+", metavar="S",
                       help="train and test on these subjects only")
    group.add_argument("--augment", type=int, metavar="N",
                       help="with --subjects: train on all videos, repeating the chosen "
                            "subjects' videos N times")
    group.add_argument("--overwrite", action="store_true",
                       help="train into a --model_dir that already holds a run")
    group.add_argument("--frame_counts", metavar="CSV",
                       help="for --test/--features on a --test_dir without Annotations: "
                            "a CSV with columns video,frames giving each video's frame count "
                            "(default: its feature rows x 25)")
    return parser


@dataclass(frozen=True)
class TrainingSettings:
    """The hyper-parameters of one training run (one seed's, with `seed`)."""
    epochs: int = 1000
    batch_size: int = 25
    split: int = 5
    lr: float = 1e-5
    weight_decay: float = 5e-4
    eval_freq: int = 1
    save_freq: int = 100
    seed: int = 1
    loss: str = "mse"
    patience: int = None
    seeds: int = 1
    layers: int = 1
    bidirectional: bool = False
    precision: str = "fp32"

    @classmethod
    def from_args(cls, args):
        """From parsed flags; a script without some flag (personalize.py has no
        --layers) keeps that default."""
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__
                      if hasattr(args, name)})

    def check(self):
        for name in ("epochs", "batch_size", "split", "eval_freq", "save_freq", "seeds", "layers"):
            if getattr(self, name) < 1:
                raise ToolkitError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.patience is not None and self.patience < 1:
            raise ToolkitError(f"--patience must be at least 1, got {self.patience}")
        if not 0 < self.lr < math.inf:
            raise ToolkitError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ToolkitError(f"--weight_decay must be a number >= 0, got {self.weight_decay}")
        highest = 2 ** 32 - self.seeds  # every seed of --seeds in NumPy's range
        if not 0 <= self.seed <= highest:
            raise ToolkitError(f"--seed must be from 0 to {highest}, got {self.seed}")
        if self.loss not in LOSSES:
            raise ToolkitError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss}")

    def seed_runs(self, model_dir):
        """(settings of one seed, its folder) per seed: the folder itself for one
        seed, seed_<s>/ inside it for several."""
        if self.seeds == 1:
            return [(self, Path(model_dir))]
        return [(replace(self, seed=seed), runs.seed_dir(model_dir, seed))
                for seed in range(self.seed, self.seed + self.seeds)]


@dataclass(frozen=True)
class RunOptions:
    """What the training tasks of one command share besides the hyper-parameters
    (crossval.py's folds, personalize.py's subjects): `resumes` maps a run folder to
    whether it continues from its last.save; `progress` shows per-epoch bars."""
    settings: TrainingSettings
    normalize: bool = False
    cuda: bool = False
    postprocessing_flags: dict = None
    tensorboard_dir: Path = None
    resumes: dict = None
    progress: bool = True

    @classmethod
    def from_args(cls, args, settings, resumes, runner):
        """From parsed flags, with paths as the tasks of `runner` (parallel.Runner) get them."""
        return cls(settings, args.normalize, args.cuda, utils.postprocessing_flags(args),
                   runner.path(args.tensorboard),
                   {runner.path(folder): resume for folder, resume in resumes.items()},
                   runner.in_this_process)

    @property
    def postprocessing(self):
        return utils.Postprocessing.resolve(**(self.postprocessing_flags or {}))

    def check(self):
        """Refuse bad training, precision or post-processing flags before anything is
        written."""
        self.settings.check()
        models.check_precision(self.settings.precision, utils.get_device(self.cuda))
        utils.Postprocessing.resolve(**(self.postprocessing_flags or {}))

    def check_trainable(self, train_set):
        """Refuse, before anything is written, a --split or --label_delay that some
        training video is too short for (fit would stop on it after args.json)."""
        delay_frames = self.postprocessing.delay_frames
        delayed = train_set.with_label_delay(delay_frames) if delay_frames else train_set
        delayed.training_segments(self.settings.split)

    def resumes_run(self, folder):
        return (self.resumes or {}).get(folder, False)

    def resumed_runs(self, run_dir):
        """(folder, its seed's settings) of the runs under `run_dir` that --resume continues."""
        return [(folder, settings) for settings, folder in self.settings.seed_runs(run_dir)
                if self.resumes_run(folder)]


# ---------------------------------------------------------------- data

def load_train_test(train_dir, test_dir, mods, test_stories=None, subjects=None, augment=None,
                    unlabelled_test=False, frame_counts=None):
    """The training and test videos a run uses.

    `test_stories` pools both folders and tests on those stories; `subjects` keeps
    those subjects (with `augment`, training keeps every video and repeats theirs).
    With `unlabelled_test`, `test_dir` may lack annotations (see datasets.load_videos).
    """
    check_augment(augment)
    if test_stories:
        pooled = datasets.load_videos([train_dir, test_dir], mods)
        datasets.check_known("story", test_stories, pooled.stories, "--test_set")
        train_set = pooled.select(exclude_stories=test_stories)
        test_set = pooled.select(stories=test_stories)
    else:
        train_set = datasets.load_videos(train_dir, mods)
        test_set = datasets.load_videos(test_dir, mods, unlabelled_test, frame_counts)
    if subjects:
        datasets.check_known("subject", subjects, sorted(set(train_set.subjects) | set(test_set.subjects)),
                    "--subjects")
        test_set = test_set.select(subjects=subjects)
        train_set = (train_set.repeat_subjects(subjects, augment) if augment
                     else train_set.select(subjects=subjects))
    for name, video_set in (("training", train_set), ("test", test_set)):
        if not len(video_set):
            raise ToolkitError(f"the {name} set is empty after --test_set/--subjects: "
                               "choose stories and subjects that leave videos in both sets")
    return train_set, test_set


def check_augment(augment):
    if augment is not None and augment < 1:
        raise ToolkitError(f"--augment must be at least 1 (how many times the subjects' videos "
                           f"appear in training), got {augment}")


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


# ---------------------------------------------------------------- steps

def build_model(input_dims, device, num_layers=1, bidirectional=False):
    return models.FusionLSTM(input_dims, num_layers=num_layers,
                             bidirectional=bidirectional).to(device)


def build_optimizer(model, lr, weight_decay):
    # foreach: one kernel launch per operation for all parameters, 2x faster than the
    # CPU default's loop over parameters, with bit-identical results.
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)


def train_one_epoch(model, optimizer, train_set, segments, batch_size, generator, device,
                    loss_name="mse", precision="fp32", grad_scaler=None):
    """One pass over the training pieces in a fresh random order.

    The loss (`LOSSES[loss_name]`) is computed in float32 over each batch's valid
    steps; the forward pass runs in `precision` (see models.autocast), with
    `grad_scaler` (models.grad_scaler) for fp16.
    Returns {"loss": its mean over batches, weighted by their steps}.
    """
    model.train()
    loss_function = LOSSES[loss_name]
    total_loss, total_steps = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    for batch_indices in torch.randperm(len(segments), generator=generator).split(batch_size):
        batch = train_set.gather([segments[i] for i in batch_indices.tolist()], device)
        with models.autocast(precision, device):
            embedded = model.embed(batch.inputs)
            batch.inputs = None  # dropout copied the rows it needs: free the gathered ones early
            predictions = model.forward_embedded(embedded, batch.lengths)
        loss = loss_function(predictions.float(), batch.targets)  # .float(): no-op in fp32
        if grad_scaler is None:
            loss.backward()
            optimizer.step()
        else:
            grad_scaler.scale(loss).backward()
            grad_scaler.step(optimizer)
            grad_scaler.update()
        optimizer.zero_grad(set_to_none=True)  # gradients freed before the next batch
        total_loss += loss.item() * batch.targets.numel()
        total_steps += batch.targets.numel()
    return {"loss": total_loss / total_steps}


@torch.no_grad()
def predict(model, video_set, device, with_features=False, precision="fp32"):
    """Per-second predictions (and features) of every video, as float32 NumPy arrays;
    the model runs in `precision` (see models.autocast).

    All videos run through the LSTM as one padded batch; only the per-step
    embeddings are computed in chunks, which bounds memory on large splits.
    """
    model.eval()
    segments = video_set.video_segments()
    lengths = torch.tensor([length for _, length in segments])
    with models.autocast(precision, device):
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
    predictions per video]}; see `utils.score_videos` and `utils.Postprocessing`.
    """
    return utils.score_videos(video_set.videos,
                              predict(model, video_set, device, precision=precision),
                              postprocessing)


@dataclass
class TrainedModel:
    """A saved model ready to predict: the network, the normalization of its
    inputs, and its checkpoint (epoch, post-processing, ...)."""
    network: models.FusionLSTM
    scaler: datasets.FeatureScaler
    checkpoint: dict


def load_trained(paths, train_set, normalize, device):
    """The models saved at `paths` (one per seed), for data shaped like `train_set`."""
    trained = []
    for path in paths:
        network, checkpoint = models.load_model(path, train_set.mods, train_set.input_dims, device)
        trained.append(TrainedModel(network, resolve_scaler(checkpoint, normalize, train_set, path),
                                    checkpoint))
    return trained


def saved_postprocessing(trained, flags, train_set, evaluated=()):
    """The post-processing the models were trained with, overridden by `flags`. A
    model saved without listener statistics calibrates with those of `train_set`
    (its training videos, as the caller knows them), and says so; so does
    calibration of listeners in the `evaluated` sets that training never saw."""
    postprocessing = utils.Postprocessing.resolve(trained[0].checkpoint.get("postprocessing"),
                                                  **flags)
    if postprocessing.calibrate and postprocessing.listener_stats is None:
        print(f"note: the model was saved without listener statistics: --calibrate uses "
              f"those of its {len(train_set)} training videos as loaded now", file=sys.stderr)
        postprocessing = postprocessing.with_listener_stats(train_set.videos)
    utils.report_unseen_listeners(postprocessing, [video for video_set in evaluated
                                             for video in video_set.videos])
    return postprocessing


def evaluate_seeds(trained, video_set, device, postprocessing, precision="fp32"):
    """`evaluate` for the models of several seeds: the videos are scored on the
    average of their per-second predictions; "seed_ccc" lists each model's own CCC
    and "seed_frames" its 25 fps predictions."""
    per_seed = [predict(t.network, video_set.with_scaler(t.scaler), device, precision=precision)
                for t in trained]
    average = [np.mean(predictions, axis=0) for predictions in zip(*per_seed)]
    result = utils.score_videos(video_set.videos, average, postprocessing)
    own = ([utils.score_videos(video_set.videos, predictions, postprocessing)
            for predictions in per_seed] if len(per_seed) > 1 else [result])
    result["seed_ccc"] = [seed_result["ccc"] for seed_result in own]
    result["seed_frames"] = [seed_result["frames"] for seed_result in own]
    return result


# ---------------------------------------------------------------- checkpoints

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


# ---------------------------------------------------------------- training

def fit(model, train_set, val_set, model_dir, settings, device, resume=False, progress=True,
        postprocessing=None, tensorboard_dir=None):
    """Train `model` on `train_set`, checking `val_set` every `eval_freq` epochs.

    Writes into `model_dir`: best.save (best validation CCC), epoch_<N>.save every
    `save_freq` epochs, last.save (with optimizer state, for --resume) every
    `save_freq` epochs, at the end, and when Ctrl-C or SIGTERM stops the run at the
    end of the epoch in progress; and metrics.csv after every epoch. With
    `settings.patience`, training ends once that many evaluations in a row have not
    beaten the best. `postprocessing` (see utils.Postprocessing) sets the label
    delay of the training targets and how validation predictions are scored. With
    `tensorboard_dir`, every epoch's scalars also go to TensorBoard (see `curves`).
    Returns {"best_ccc", "best_epoch", "epoch", "stopped_early"}.
    """
    model_dir = Path(model_dir)
    utils.check_writable(model_dir)
    # A run killed mid-write (a lost cluster worker) left temporaries; this run owns the folder.
    utils.remove_interrupted_writes(model_dir)
    settings.check()
    models.check_precision(settings.precision, device)
    # Calibration maps predictions to the statistics of the training videos: saved in
    # every checkpoint, so that a model evaluated later calibrates as it was trained.
    postprocessing = (postprocessing or utils.Postprocessing()).with_listener_stats(
        train_set.videos)
    if not resume:
        utils.report_unseen_listeners(postprocessing, val_set.videos)
    if postprocessing.delay_frames:
        train_set = train_set.with_label_delay(postprocessing.delay_frames)
    optimizer = build_optimizer(model, settings.lr, settings.weight_decay)
    grad_scaler = models.grad_scaler(settings.precision, device)
    generator = torch.Generator().manual_seed(settings.seed)
    segments = train_set.training_segments(settings.split)
    scaler = train_set.scaler
    start_epoch, best_ccc, best_epoch, history = 0, -math.inf, 0, []
    stale_evaluations, stopped_early = 0, False  # evaluations since the best, for --patience
    if resume:
        state = utils.load_checkpoint(model_dir / runs.LAST, device)
        if "optimizer" not in state:
            raise ToolkitError(f"{model_dir / runs.LAST} has no optimizer state: it cannot "
                               "be resumed; train again with --overwrite")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"], generator)
        if grad_scaler is not None and "grad_scaler" in state:
            grad_scaler.load_state_dict(state["grad_scaler"])
        start_epoch, best_ccc, best_epoch = state["epoch"], state["best_ccc"], state["best_epoch"]
        stopped_early = bool(state.get("stopped_early"))
        history = _read_history(model_dir / runs.METRICS, start_epoch)
        stale_evaluations = sum(1 for row in history
                                if row["epoch"] > best_epoch and not math.isnan(row["val_ccc"]))
    if stopped_early:
        return {"best_ccc": best_ccc, "best_epoch": best_epoch, "epoch": start_epoch,
                "stopped_early": True}

    def save(name, with_optimizer=False):
        record = {"training": asdict(settings), "postprocessing": asdict(postprocessing),
                  "stopped_early": stopped_early}
        if with_optimizer and grad_scaler is not None:  # fp16: its loss scale, for --resume
            record["grad_scaler"] = grad_scaler.state_dict()
        utils.save_checkpoint(model_dir / name, make_checkpoint(
            model, scaler, epoch, best_ccc, best_epoch,
            optimizer if with_optimizer else None,
            rng_state(generator) if with_optimizer else None, record))

    epoch = start_epoch
    bar = tqdm(range(start_epoch + 1, settings.epochs + 1), desc=model_dir.name, unit="epoch",
               disable=not progress, leave=False, dynamic_ncols=True)
    with parallel.StopRequests() as stop, utils.reused_heap(), \
            curves(tensorboard_dir, model_dir) as log_epoch:
        for epoch in bar:
            stats = train_one_epoch(model, optimizer, train_set, segments, settings.batch_size,
                                    generator, device, settings.loss, settings.precision,
                                    grad_scaler)
            check_converging(stats["loss"], "training loss", epoch, model_dir, settings, bar)
            row = {"epoch": epoch, "train_loss": stats["loss"], "val_ccc": math.nan}
            if epoch % settings.eval_freq == 0 or epoch == settings.epochs:
                row["val_ccc"] = evaluate(model, val_set, device, postprocessing,
                                          settings.precision)["ccc"]
                check_converging(row["val_ccc"], "validation CCC", epoch, model_dir, settings,
                                 bar)
                stale_evaluations += 1
                if row["val_ccc"] > best_ccc:
                    best_ccc, best_epoch, stale_evaluations = row["val_ccc"], epoch, 0
                    save(runs.BEST)
            stopped_early = settings.patience is not None and stale_evaluations >= settings.patience
            # metrics.csv first: a kill between the two writes then costs no row for good
            # (--resume drops the rows after last.save's epoch and trains them again).
            history.append(row)
            utils.write_csv(pd.DataFrame(history), model_dir / runs.METRICS)
            if epoch % settings.save_freq == 0:
                save(runs.checkpoint_name(epoch))
                save(runs.LAST, with_optimizer=True)
            log_epoch(row, optimizer.param_groups[0]["lr"])
            bar.set_postfix(loss=f"{stats['loss']:.4f}", val_ccc=f"{row['val_ccc']:.3f}",
                            best=f"{best_ccc:.3f}@{best_epoch}")
            if stopped_early:
                tqdm.write(f"{model_dir}: stopped at epoch {epoch}, the validation CCC has not "
                           f"improved for {settings.patience} evaluations (--patience)")
                break
            if stop.requested:
                save(runs.LAST, with_optimizer=True)
                print(f"stopped after epoch {epoch}; {model_dir / runs.LAST} holds it: "
                      "run the same command with --resume to continue", file=sys.stderr)
                raise KeyboardInterrupt
    if epoch > start_epoch:
        save(runs.LAST, with_optimizer=True)
    return {"best_ccc": best_ccc, "best_epoch": best_epoch, "epoch": epoch,
            "stopped_early": stopped_early}


# Settings that change what a resumed run computes: --resume must keep them. (--epochs
# and --patience may change: they say how long to go on; --save_freq and --eval_freq
# only when files are written and the best is checked.)
RESUME_KEEPS = ("lr", "weight_decay", "batch_size", "split", "loss", "seed", "layers",
                "bidirectional")


def check_resumable(folder, settings, mods, input_dims, normalize=None, postprocessing=None):
    """Refuse, before anything is written, a --resume whose last.save in `folder`
    does not fit the data or was trained with other settings than the flags give
    (the saved optimizer and weights would silently go on with the old ones)."""
    path = Path(folder) / runs.LAST
    network, state = models.load_model(path, mods, input_dims)
    if "optimizer" not in state:
        raise ToolkitError(f"{path} has no optimizer state: it cannot be resumed; train "
                           "again with --overwrite")
    saved = {**state.get("training", {}), "layers": network.lstm.num_layers,
             "bidirectional": network.lstm.bidirectional}
    for name in RESUME_KEEPS:
        if name in saved and saved[name] != getattr(settings, name):
            raise ToolkitError(f"--resume: {path} was trained with --{name} {saved[name]}, not "
                               f"{getattr(settings, name)}: resume with the run's own settings "
                               "(its args.json), or start afresh with --overwrite")
    if normalize is not None and (state.get("normalization") is not None) != normalize:
        trained = "with" if state.get("normalization") is not None else "without"
        raise ToolkitError(f"--resume: {path} was trained {trained} --normalize: resume "
                           f"{trained} it, or start afresh with --overwrite")
    saved_delay = state.get("postprocessing", {}).get("label_delay", 0.0)
    if postprocessing is not None and saved_delay != postprocessing.label_delay:
        raise ToolkitError(f"--resume: {path} was trained with --label_delay {saved_delay}, "
                           f"not {postprocessing.label_delay}: resume with the run's own "
                           "settings, or start afresh with --overwrite")
    _read_history(Path(folder) / runs.METRICS, state["epoch"])  # refuses a corrupt one


def check_converging(value, what, epoch, model_dir, settings, bar):
    """Stop a run whose loss (or validation CCC) became NaN or inf: its weights are
    lost, and every later epoch would only write NaN. Nothing of the epoch is saved."""
    if not math.isfinite(value):
        bar.close()
        raise ToolkitError(f"{model_dir}: training diverged in epoch {epoch} (the {what} is "
                           f"{value}): lower --lr (now {settings.lr:g}) or pass --normalize "
                           "if the features are large")


def check_tensorboard_dir(tensorboard_dir):
    """--tensorboard must name a folder that can be written, checked before training."""
    if tensorboard_dir:
        if Path(tensorboard_dir).exists() and not Path(tensorboard_dir).is_dir():
            raise ToolkitError(f"--tensorboard {tensorboard_dir} is a file: give a folder for the "
                               "event files, e.g. tb")
        utils.check_writable(tensorboard_dir)


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


def fit_seeds(make_model, train_set, val_set, model_dir, options, device, postprocessing=None):
    """`fit` once per seed of `options.settings` (see `TrainingSettings.seed_runs`),
    each seeded before `make_model()` builds its starting model, with the options'
    post-processing unless `postprocessing` is given. Returns fit's summary per
    seed, with "seed"."""
    summaries = []
    for seed_settings, folder in options.settings.seed_runs(model_dir):
        utils.seed_everything(seed_settings.seed)
        summary = fit(make_model(), train_set, val_set, folder, seed_settings, device,
                      resume=options.resumes_run(folder), progress=options.progress,
                      postprocessing=postprocessing or options.postprocessing,
                      tensorboard_dir=options.tensorboard_dir)
        summaries.append({"seed": seed_settings.seed, **summary})
    return summaries


def _read_history(path, last_epoch):
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


# ---------------------------------------------------------------- outputs

def write_features(folder, video_set, features):
    """One (seconds, 128) .npy of decision-level features per video."""
    utils.remove_interrupted_writes(folder, {f"{video.name}.npy" for video in video_set.videos})
    for video, rows in zip(video_set.videos, features):
        utils.save_array(Path(folder) / f"{video.name}.npy", rows.astype(np.float32))


def test(trained, train_set, test_set, pred_dir, device, postprocessing, precision="fp32"):
    """Write the predictions for both sets (of the seed average, and of each seed
    under seed_<s>/ when there are several) and return their evaluations."""
    results = {}
    for name, video_set in (("train", train_set), ("test", test_set)):
        results[name] = evaluate_seeds(trained, video_set, device, postprocessing, precision)
        utils.write_predictions(Path(pred_dir) / f"pred_{name}", video_set.videos,
                                results[name]["frames"])
        if len(trained) > 1:
            for model, frames in zip(trained, results[name]["seed_frames"]):
                seed = model.checkpoint["training"]["seed"]
                utils.write_predictions(runs.seed_dir(pred_dir, seed) / f"pred_{name}",
                                        video_set.videos, frames)
    return results


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
        write_features(Path(feat_dir) / f"feat_{name}", video_set,
                       [_delayed_rows(rows, shift) for rows in features])


def _delayed_rows(rows, seconds):
    """Rows shifted `seconds` later, the first row repeated in front."""
    if seconds <= 0:
        return rows
    seconds = min(seconds, len(rows) - 1)
    return np.concatenate([np.repeat(rows[:1], seconds, axis=0), rows[:len(rows) - seconds]])


# ---------------------------------------------------------------- main

def main(args):
    mods = datasets.parse_mods(args.mods)
    if args.augment is not None and not args.subjects:
        raise ToolkitError("--augment needs --subjects: name the subjects whose videos to repeat")
    predicting = args.test or args.features
    if args.frame_counts and not predicting:
        raise ToolkitError("--frame_counts is for --test/--features on a --test_dir without "
                           "Annotations: leave it out when training")
    device = utils.get_device(args.cuda)
    models.check_precision(args.precision, device)
    model_dir = Path(args.model_dir)
    train_set, test_set = load_train_test(args.train_dir, args.test_dir, mods, args.test_set,
                                          args.subjects, args.augment, unlabelled_test=predicting,
                                          frame_counts=args.frame_counts)
    if predicting:
        return predict_saved(args, model_dir, train_set, test_set, device)
    if not test_set.labelled:
        raise ToolkitError(f"{Path(args.test_dir) / datasets.ANNOTATION_FOLDER} does not exist: "
                           "training validates on --test_dir, which needs annotations")

    return train_new_model(args, model_dir, train_set, test_set, device)


def train_new_model(args, model_dir, train_set, test_set, device):
    """Training: every check before the first write, then one model per seed."""
    settings = TrainingSettings.from_args(args)
    settings.check()
    resumes = runs.check_fresh_runs([folder for _, folder in settings.seed_runs(model_dir)],
                                    args.resume, args.overwrite)
    options = RunOptions(settings, args.normalize, args.cuda, utils.postprocessing_flags(args),
                         args.tensorboard, resumes)
    options.check()
    options.check_trainable(train_set)
    for folder, seed_settings in options.resumed_runs(model_dir):
        check_resumable(folder, seed_settings, train_set.mods, train_set.input_dims,
                        args.normalize, options.postprocessing)
    check_tensorboard_dir(args.tensorboard)
    runs.check_output_folder(model_dir, "--model_dir")
    utils.check_writable(model_dir)
    scaler = datasets.FeatureScaler.fit(train_set) if args.normalize else None
    train_set, test_set = train_set.with_scaler(scaler), test_set.with_scaler(scaler)
    with runs.owned(model_dir):
        # Again, now that no other run can start here: one may have finished meanwhile.
        runs.check_fresh_runs(list(resumes), args.resume, args.overwrite)
        runs.write_run_record(args, model_dir)
        summaries = fit_seeds(
            lambda: build_model(train_set.input_dims, device, settings.layers,
                                settings.bidirectional),
            train_set, test_set, model_dir, options, device)
    print_training_summaries(summaries, model_dir)
    if settings.seeds > 1:
        trained = load_trained(runs.run_checkpoints(model_dir), train_set, args.normalize, device)
        average = evaluate_seeds(trained, test_set, device,
                                 saved_postprocessing(trained, {}, train_set), settings.precision)
        best = [summary["best_ccc"] for summary in summaries]
        print(f"best validation CCC over {settings.seeds} seeds: {np.mean(best):.4f} +- "
              f"{np.std(best):.4f}; their average prediction: CCC {average['ccc']:.4f}")
    return summaries


def print_training_summaries(summaries, model_dir):
    for summary in summaries:
        stop = " (stopped by --patience)" if summary["stopped_early"] else ""
        where = runs.seed_dir(model_dir, summary["seed"]) if len(summaries) > 1 else model_dir
        print(f"best validation CCC {summary['best_ccc']:.4f} at epoch {summary['best_epoch']}"
              f"{stop} (checkpoints in {where})")


def ledger_results(returned):
    """The ledger's results of a run: the seeds' best validation CCC (training), or
    the test and training CCC (--test)."""
    if isinstance(returned, list):
        return runs.spread_results([summary["best_ccc"] for summary in returned],
                                   best_epoch=" ".join(str(s["best_epoch"]) for s in returned))
    return {"mean_ccc": returned["test"]["ccc"], "train_ccc": returned["train"]["ccc"]}


def predict_saved(args, model_dir, train_set, test_set, device):
    """--test and --features: evaluate a saved model (every seed's, for a --seeds run);
    returns the evaluations of --test (None for --features alone)."""
    paths = [Path(args.load)] if args.load else runs.run_checkpoints(model_dir)
    trained = load_trained(paths, train_set, args.normalize, device)
    postprocessing = saved_postprocessing(trained, utils.postprocessing_flags(args), train_set,
                                          [test_set])
    results = None
    for flag, folder in (("--pred_dir", args.pred_dir), ("--feat_dir", args.feat_dir)):
        runs.check_output_folder(folder, flag)
    if args.test:
        utils.check_writable(args.pred_dir)
        results = test(trained, train_set, test_set, args.pred_dir, device, postprocessing,
                       args.precision)
        utils.print_results(results)
    if args.features:
        utils.check_writable(args.feat_dir)
        extract_features(trained, train_set, test_set, args.feat_dir, device,
                         postprocessing.label_delay, args.precision)
        print(f"features written to {Path(args.feat_dir) / 'feat_train'} and "
              f"{Path(args.feat_dir) / 'feat_test'}")
    return results


if __name__ == "__main__":
    runs.run_cli(main, get_args_parser(), ledger_results)
