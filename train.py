"""Train, test, or extract decision-level features from the fusion LSTM.

    python train.py --epochs 2000 --mods audio,text --model_dir models_AT
    python train.py --mods audio,text --model_dir models_AT --pred_dir preds_AT --test
    python train.py --mods audio,text --model_dir models_AT --feat_dir feat_AT --features

Other scripts (crossval.py, cv_epochs.py, personalize.py) reuse the parsers and
functions below with explicit arguments.
"""
import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import datasets
import models
import utils
from utils import ToolkitError

EMBED_CHUNK_ROWS = 2048  # rows embedded at once in evaluation: bounds memory, not speed


# ---------------------------------------------------------------- flags

def get_split_args_parser():
    """The split folders, shared by every script that reads data."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("split folders")
    group.add_argument("--train_dir", default="./data/Training",
                       help="training split folder (default: %(default)s)")
    group.add_argument("--test_dir", default="./data/Validation",
                       help="validation or test split folder (default: %(default)s)")
    return parser


def get_data_args_parser():
    """Flags of every script that loads data and builds models."""
    parser = argparse.ArgumentParser(add_help=False, parents=[get_split_args_parser()])
    group = parser.add_argument_group("data and device")
    group.add_argument("--mods", default="audio,text,v_sub,v_act",
                       help="comma-separated modalities from audio,text,v_sub,v_act "
                            "(default: %(default)s)")
    group.add_argument("--normalize", action="store_true",
                       help="rescale every feature dimension to [-1, 1] by the training "
                            "data's min and max (stored in the checkpoint)")
    group.add_argument("--cuda", action="store_true",
                       help="run on the GPU (falls back to the CPU with a warning)")
    group.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
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
    return parser


def get_args_parser():
    parser = argparse.ArgumentParser(
        "train.py", parents=[get_data_args_parser(), get_training_args_parser()],
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
    return parser


@dataclass(frozen=True)
class TrainingSettings:
    """The hyper-parameters of one training run."""
    epochs: int = 1000
    batch_size: int = 25
    split: int = 5
    lr: float = 1e-5
    weight_decay: float = 5e-4
    eval_freq: int = 1
    save_freq: int = 100
    seed: int = 1

    @classmethod
    def from_args(cls, args):
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})

    def check(self):
        for name in ("epochs", "batch_size", "split", "eval_freq", "save_freq"):
            if getattr(self, name) < 1:
                raise ToolkitError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ToolkitError(f"--lr must be positive, got {self.lr}")


# ---------------------------------------------------------------- data

def load_train_test(train_dir, test_dir, mods, test_stories=None, subjects=None, augment=None):
    """The training and test videos a run uses.

    `test_stories` pools both folders and tests on those stories; `subjects` keeps
    those subjects (with `augment`, training keeps every video and repeats theirs).
    """
    if test_stories:
        pooled = datasets.load_videos([train_dir, test_dir], mods)
        check_known("story", test_stories, pooled.stories, "--test_set")
        train_set = pooled.select(exclude_stories=test_stories)
        test_set = pooled.select(stories=test_stories)
    else:
        train_set = datasets.load_videos(train_dir, mods)
        test_set = datasets.load_videos(test_dir, mods)
    if subjects:
        check_known("subject", subjects, sorted(set(train_set.subjects) | set(test_set.subjects)),
                    "--subjects")
        test_set = test_set.select(subjects=subjects)
        train_set = (train_set.repeat_subjects(subjects, augment) if augment
                     else train_set.select(subjects=subjects))
    for name, video_set in (("training", train_set), ("test", test_set)):
        if not len(video_set):
            raise ToolkitError(f"the {name} set is empty after --test_set/--subjects: "
                               "choose stories and subjects that leave videos in both sets")
    return train_set, test_set


def check_known(kind, requested, available, flag):
    unknown = sorted(set(requested) - set(available))
    if unknown:
        raise ToolkitError(f"{flag}: {kind} {', '.join(map(str, unknown))} is not in the data "
                           f"(it has {', '.join(map(str, available))})")


def resolve_scaler(checkpoint, normalize, train_set, source):
    """The checkpoint's normalization if it has one; else, with --normalize, statistics
    of the training videos (as the original release did); else none."""
    state = checkpoint.get("normalization") if checkpoint else None
    if state is not None:
        scaler = datasets.FeatureScaler.from_state_dict(state)
        scaler.check_mods(train_set.mods, source)
        return scaler
    return datasets.FeatureScaler.fit(train_set) if normalize else None


# ---------------------------------------------------------------- steps

def build_model(input_dims, device):
    return models.FusionLSTM(input_dims).to(device)


def build_optimizer(model, lr, weight_decay):
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def train_one_epoch(model, optimizer, train_set, segments, batch_size, generator, device):
    """One pass over the training pieces in a fresh random order.

    The loss is the squared error summed over a batch's valid steps divided by
    their number. Returns {"loss": mean squared error over all steps}.
    """
    model.train()
    total_loss, total_steps = 0.0, 0
    for batch_indices in torch.randperm(len(segments), generator=generator).split(batch_size):
        batch = train_set.gather([segments[i] for i in batch_indices.tolist()], device)
        loss = torch.mean((model(batch.inputs, batch.lengths) - batch.targets) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * batch.targets.numel()
        total_steps += batch.targets.numel()
    return {"loss": total_loss / total_steps}


@torch.no_grad()
def predict(model, video_set, device, with_features=False):
    """Per-second predictions (and features) of every video, as NumPy arrays.

    All videos run through the LSTM as one padded batch; only the per-step
    embeddings are computed in chunks, which bounds memory on large splits.
    """
    model.eval()
    segments = video_set.video_segments()
    embedded = [model.embed(video_set.gather(chunk, device, with_targets=False).inputs)
                for chunk in _chunks(segments, EMBED_CHUNK_ROWS)]
    lengths = torch.tensor([length for _, length in segments])
    predictions, features = model.forward_embedded(torch.cat(embedded), lengths, with_features=True)
    sizes = lengths.tolist()
    predictions = [p.cpu().numpy() for p in predictions.split(sizes)]
    if with_features:
        return predictions, [f.cpu().numpy() for f in features.split(sizes)]
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


def evaluate(model, video_set, device):
    """CCC of every video at 25 fps, and their mean.

    Returns {"ccc": mean CCC, "records": [{subject, story, ccc}], "frames": [25 fps
    predictions per video]}.
    """
    return utils.score_videos(video_set.videos, predict(model, video_set, device))


# ---------------------------------------------------------------- checkpoints

def make_checkpoint(model, scaler, epoch, best_ccc, best_epoch, optimizer=None, rng=None):
    """A self-describing checkpoint: weights, the model's configuration and
    normalization, and (only for resuming) optimizer and random-generator state."""
    checkpoint = {"model": model.state_dict(), "config": model.config, "epoch": epoch,
                  "best_ccc": best_ccc, "best_epoch": best_epoch,
                  "normalization": scaler.state_dict() if scaler else None}
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


def check_fresh_model_dir(model_dir, resume, overwrite):
    """Refuse to train over an earlier run unless asked to resume or overwrite it."""
    if resume:
        if not (model_dir / "last.save").is_file():
            raise ToolkitError(f"--resume: {model_dir / 'last.save'} does not exist: train "
                               "without --resume first")
    elif (model_dir / "last.save").exists() and not overwrite:
        raise ToolkitError(f"{model_dir} already holds a run: pass --resume to continue it, "
                           "--overwrite to replace it, or choose another --model_dir")


# ---------------------------------------------------------------- training

def fit(model, train_set, val_set, model_dir, settings, device, resume=False, progress=True):
    """Train `model` on `train_set`, checking `val_set` every `eval_freq` epochs.

    Writes into `model_dir`: best.save (best validation CCC), epoch_<N>.save every
    `save_freq` epochs, last.save (with optimizer state, for --resume) every
    `save_freq` epochs, at the end, and when Ctrl-C or SIGTERM stops the run at the
    end of the epoch in progress; and metrics.csv after every epoch. Returns
    {"best_ccc", "best_epoch", "epoch"}.
    """
    model_dir = Path(model_dir)
    utils.check_writable(model_dir)
    settings.check()
    optimizer = build_optimizer(model, settings.lr, settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    segments = train_set.training_segments(settings.split)
    scaler = train_set.scaler
    start_epoch, best_ccc, best_epoch, history = 0, -math.inf, 0, []
    if resume:
        state = utils.load_checkpoint(model_dir / "last.save", device)
        if "optimizer" not in state:
            raise ToolkitError(f"{model_dir / 'last.save'} has no optimizer state: it cannot "
                               "be resumed; train again with --overwrite")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"], generator)
        start_epoch, best_ccc, best_epoch = state["epoch"], state["best_ccc"], state["best_epoch"]
        history = _read_history(model_dir / "metrics.csv", start_epoch)

    def save(name, with_optimizer=False):
        utils.save_checkpoint(model_dir / name, make_checkpoint(
            model, scaler, epoch, best_ccc, best_epoch,
            optimizer if with_optimizer else None,
            rng_state(generator) if with_optimizer else None))

    epoch = start_epoch
    bar = tqdm(range(start_epoch + 1, settings.epochs + 1), desc=model_dir.name, unit="epoch",
               disable=not progress, leave=False, dynamic_ncols=True)
    with utils.StopRequests() as stop:
        for epoch in bar:
            stats = train_one_epoch(model, optimizer, train_set, segments, settings.batch_size,
                                    generator, device)
            row = {"epoch": epoch, "train_loss": stats["loss"], "val_ccc": math.nan}
            if epoch % settings.eval_freq == 0 or epoch == settings.epochs:
                row["val_ccc"] = evaluate(model, val_set, device)["ccc"]
                if row["val_ccc"] > best_ccc:
                    best_ccc, best_epoch = row["val_ccc"], epoch
                    save("best.save")
            if epoch % settings.save_freq == 0:
                save(f"epoch_{epoch}.save")
                save("last.save", with_optimizer=True)
            history.append(row)
            utils.write_csv(pd.DataFrame(history), model_dir / "metrics.csv")
            bar.set_postfix(loss=f"{stats['loss']:.4f}", val_ccc=f"{row['val_ccc']:.3f}",
                            best=f"{best_ccc:.3f}@{best_epoch}")
            if stop.requested:
                save("last.save", with_optimizer=True)
                print(f"stopped after epoch {epoch}; {model_dir / 'last.save'} holds it: "
                      "run the same command with --resume to continue", file=sys.stderr)
                raise KeyboardInterrupt
    if epoch > start_epoch:
        save("last.save", with_optimizer=True)
    return {"best_ccc": best_ccc, "best_epoch": best_epoch, "epoch": epoch}


def _read_history(path, last_epoch):
    if not path.is_file():
        return []
    history = pd.read_csv(path)
    return history[history["epoch"] <= last_epoch].to_dict("records")


# ---------------------------------------------------------------- outputs

def write_predictions(folder, video_set, frames):
    """One 25 fps CSV (header `valence`) per video."""
    for video, prediction in zip(video_set.videos, frames):
        utils.write_valence(Path(folder) / f"{video.name}.csv", prediction)


def write_features(folder, video_set, features):
    """One (seconds, 128) .npy of decision-level features per video."""
    for video, rows in zip(video_set.videos, features):
        utils.save_array(Path(folder) / f"{video.name}.npy", rows.astype(np.float32))


def test(model, train_set, test_set, pred_dir, device):
    """Write predictions for both sets and return their evaluations."""
    results = {}
    for name, video_set in (("train", train_set), ("test", test_set)):
        results[name] = evaluate(model, video_set, device)
        write_predictions(Path(pred_dir) / f"pred_{name}", video_set, results[name]["frames"])
    return results


def extract_features(model, train_set, test_set, feat_dir, device):
    for name, video_set in (("train", train_set), ("test", test_set)):
        _, features = predict(model, video_set, device, with_features=True)
        write_features(Path(feat_dir) / f"feat_{name}", video_set, features)


def print_results(results):
    for name, result in results.items():
        print(f"{name} CCC: {result['ccc']:.4f} over {len(result['records'])} videos")
    _, by_story, _ = utils.summarize_ccc(results["test"]["records"])
    print("test CCC per story (mean over subjects):")
    print(utils.format_table(by_story))


# ---------------------------------------------------------------- main

def main(args):
    mods = datasets.parse_mods(args.mods)
    if args.augment is not None and not args.subjects:
        raise ToolkitError("--augment needs --subjects: name the subjects whose videos to repeat")
    device = utils.get_device(args.cuda)
    utils.seed_everything(args.seed)
    model_dir = Path(args.model_dir)
    if not (args.test or args.features):
        check_fresh_model_dir(model_dir, args.resume, args.overwrite)
    train_set, test_set = load_train_test(args.train_dir, args.test_dir, mods, args.test_set,
                                          args.subjects, args.augment)

    if args.test or args.features:
        checkpoint_path = Path(args.load) if args.load else model_dir / "best.save"
        model, checkpoint = models.load_model(checkpoint_path, mods, train_set.input_dims, device)
        scaler = resolve_scaler(checkpoint, args.normalize, train_set, checkpoint_path)
        train_set, test_set = train_set.with_scaler(scaler), test_set.with_scaler(scaler)
        if args.test:
            utils.check_writable(args.pred_dir)
            print_results(test(model, train_set, test_set, args.pred_dir, device))
        if args.features:
            utils.check_writable(args.feat_dir)
            extract_features(model, train_set, test_set, args.feat_dir, device)
            print(f"features written to {Path(args.feat_dir) / 'feat_train'} and "
                  f"{Path(args.feat_dir) / 'feat_test'}")
        return None

    scaler = datasets.FeatureScaler.fit(train_set) if args.normalize else None
    train_set, test_set = train_set.with_scaler(scaler), test_set.with_scaler(scaler)
    utils.check_writable(model_dir)
    utils.write_json({**vars(args), "command": " ".join(sys.argv)}, model_dir / "args.json")
    model = build_model(train_set.input_dims, device)
    summary = fit(model, train_set, test_set, model_dir, TrainingSettings.from_args(args),
                  device, resume=args.resume)
    print(f"best validation CCC {summary['best_ccc']:.4f} at epoch {summary['best_epoch']} "
          f"(checkpoints in {model_dir})")
    return summary


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
