"""Shared helpers: the CCC metric, post-processing of predictions, seeding, devices,
checkpoints and file writers.

Every script scores with `ccc` and reads and writes checkpoints with
`save_checkpoint` / `load_checkpoint`, so these conventions live here only.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import errno
import io
import json
import math
import os
import random
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

FPS = 25  # annotation frames per second of video


class ToolkitError(Exception):
    """A problem with the user's input: printed as one line, exit status 1."""


# ---------------------------------------------------------------- metric

def ccc(prediction, annotation):
    """Concordance correlation coefficient of two series of equal length.

    CCC = 2 cov(x, y) / (var(x) + var(y) + (mean(x) - mean(y))^2), with population
    (biased) moments, computed in float64. The challenge scores each video
    separately and averages the per-video values (see `summarize_ccc`).
    A constant series has no covariance with anything, so it scores 0; when both
    series are the same constant the formula is 0/0 and we also return 0, never NaN.
    """
    x = np.asarray(prediction, dtype=np.float64).ravel()
    y = np.asarray(annotation, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"ccc needs series of equal length, got {x.size} and {y.size}")
    covariance, denominator = _concordance_terms(x, y)
    if denominator == 0:
        return 0.0
    return float(2 * covariance / denominator)


def ccc_loss(prediction, target):
    """1 - CCC of two torch tensors, differentiable (`--loss ccc`): the conventions
    of `ccc`, over all the steps given (a batch's valid steps), in their dtype. A
    tiny constant keeps the gradient finite when both are constant."""
    covariance, denominator = _concordance_terms(prediction, target)
    return 1 - 2 * covariance / (denominator + 1e-12)


def _concordance_terms(x, y):
    """cov(x, y) and var(x) + var(y) + (mean(x) - mean(y))^2, population moments;
    written for NumPy arrays and torch tensors alike, so CCC has one formula."""
    mean_x, mean_y = x.mean(), y.mean()
    centred_x, centred_y = x - mean_x, y - mean_y
    covariance = (centred_x * centred_y).mean()
    return covariance, (centred_x ** 2).mean() + (centred_y ** 2).mean() + (mean_x - mean_y) ** 2


def expand_to_frames(per_second, n_frames):
    """Repeat each per-second value FPS times, then cut or pad (repeating the last
    value) to the annotation's frame count."""
    return to_length(np.repeat(np.asarray(per_second, dtype=np.float32), FPS), n_frames)


def to_length(frames, n_frames):
    """`frames` cut, or padded by repeating the last value, to `n_frames` (how a
    prediction a few frames off its annotation is scored)."""
    frames = np.asarray(frames)[:n_frames]
    if frames.size < n_frames:
        frames = np.concatenate([frames, np.full(n_frames - frames.size, frames[-1], frames.dtype)])
    return frames


SMOOTHING_WINDOWS = ("moving", "gaussian")
MAX_SMOOTH = 600  # s: longer than any video; a Gaussian window's cost grows with its width
MIN_LOWPASS = 1e-4  # Hz: a period of 3 hours; lower cutoffs make Butterworth's design singular


@dataclasses.dataclass(frozen=True)
class Postprocessing:
    """How per-second predictions become the 25 fps predictions that are written and
    scored; the same for evaluation during training and for written files. The steps
    run in this order:

    `label_delay` (seconds, --label_delay): the model was trained so that features at
    second t predict the annotation at t + delay, so its 25 fps predictions are
    shifted that much later, the first frames repeating the first prediction.
    `smooth` (seconds, --smooth): a centred window of that length smooths the 25 fps
    predictions, flat (`moving` average) or Gaussian (standard deviation a quarter of
    the window, so the window spans +-2 sigma); edges repeat the end values.
    `lowpass` (Hz, --lowpass), instead of `smooth`: a zero-phase (forward and
    backward) second-order Butterworth low-pass filter; edges repeat the end values.
    `calibrate` (--calibrate): each video's prediction is standardized over the video,
    then given its listener's mean and standard deviation in `listener_stats` (see
    `listener_statistics`: the annotations of the model's training videos), or the
    pooled ones for a listener without training videos. A constant prediction
    becomes the listener's mean.
    """
    label_delay: float = 0.0
    smooth: float = 0.0
    smooth_window: str = "moving"
    lowpass: float = 0.0
    calibrate: bool = False
    listener_stats: dict = None

    def __post_init__(self):
        for name in ("label_delay", "smooth", "lowpass"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                unit = "Hz" if name == "lowpass" else "seconds"
                raise ToolkitError(f"--{name} must be a number of {unit} >= 0, got {value}")
        if self.smooth > MAX_SMOOTH:
            raise ToolkitError(f"--smooth {self.smooth:g} s is longer than {MAX_SMOOTH:g} s "
                               "(longer than any video: it would flatten every prediction): "
                               "give a shorter window, e.g. 2 to 10")
        if self.smooth_window not in SMOOTHING_WINDOWS:
            raise ToolkitError(f"--smooth_window must be one of {', '.join(SMOOTHING_WINDOWS)}, "
                               f"got {self.smooth_window}")
        if 0 < self.lowpass < MIN_LOWPASS:
            raise ToolkitError(f"--lowpass {self.lowpass:g} Hz is below {MIN_LOWPASS:g} Hz, where "
                               "the filter turns any video into a constant (and cannot be "
                               "designed): give 0 for no filter, or e.g. 0.004 to 0.01")
        if self.lowpass >= FPS / 2:
            raise ToolkitError(f"--lowpass {self.lowpass:g} Hz is not below the Nyquist "
                               f"frequency of 25 fps predictions ({FPS / 2:g} Hz): give a lower "
                               "cutoff, e.g. 0.01")
        if self.lowpass and self.smooth:
            raise ToolkitError("--lowpass and --smooth both filter the predictions: give one "
                               "(--smooth 0 or --lowpass 0 turns off the one a model was "
                               "saved with)")

    @property
    def delay_frames(self):
        return round(self.label_delay * FPS)

    def frames(self, per_second, n_frames, subject=None):
        """25 fps predictions of a video of `n_frames` frames, by listener `subject`."""
        delay = min(self.delay_frames, n_frames - 1)
        frames = expand_to_frames(per_second, n_frames - delay)
        frames = self._low_passed(self._smoothed(frames))
        frames = np.concatenate([np.full(delay, frames[0], np.float32), frames])
        return self._calibrated(frames, subject) if self.calibrate else frames

    def _smoothed(self, frames):
        width = self.smooth * FPS
        if width < 1:
            return frames
        from scipy.ndimage import gaussian_filter1d, uniform_filter1d  # only when asked: slow
        if self.smooth_window == "moving":
            odd_width = 2 * round(width / 2) + 1  # an odd width keeps the window centred
            return uniform_filter1d(frames.astype(np.float64), odd_width, mode="nearest").astype(np.float32)
        return gaussian_filter1d(frames.astype(np.float64), width / 4, mode="nearest",
                                 truncate=2.0).astype(np.float32)

    def _low_passed(self, frames):
        if not self.lowpass or frames.size < 2:
            return frames
        from scipy.signal import butter, sosfiltfilt  # only when asked: 1.5 s to import
        sections = butter(2, self.lowpass, fs=FPS, output="sos")
        # Constant padding starts the filter in its steady state at the edge value, so
        # even a cutoff whose response outlasts the video adds no edge transient.
        padding = min(frames.size - 1, math.ceil(FPS / self.lowpass))
        return sosfiltfilt(sections, frames.astype(np.float64), padtype="constant",
                           padlen=padding).astype(np.float32)

    def _calibrated(self, frames, subject):
        if self.listener_stats is None:
            raise ToolkitError("--calibrate needs the listeners' statistics of the model's "
                               "training videos, and none were given")
        mean, std = self.listener_stats["subjects"].get(str(subject),
                                                        self.listener_stats["pooled"])
        frames = frames.astype(np.float64)
        spread = frames.std()
        standardized = (frames - frames.mean()) / spread if spread > 0 else np.zeros_like(frames)
        return (mean + std * standardized).astype(np.float32)

    def with_listener_stats(self, videos):
        """This post-processing with the listener statistics of `videos` (the
        training videos of the model it serves)."""
        return dataclasses.replace(self, listener_stats=listener_statistics(videos))

    def unseen_listeners(self, subjects):
        """The listeners among `subjects` whom calibration maps to the pooled
        statistics (none unless --calibrate)."""
        if not self.calibrate or self.listener_stats is None:
            return []
        return sorted({s for s in subjects if str(s) not in self.listener_stats["subjects"]})

    @classmethod
    def resolve(cls, saved=None, **overrides):
        """The post-processing `saved` in a checkpoint (defaults if none), with the
        flags given on the command line (not None) taking precedence."""
        settings = dict(saved or {})
        unknown = sorted(set(settings) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ToolkitError(f"the model's post-processing has unknown setting "
                               f"{', '.join(unknown)}: it was saved by a newer version of this "
                               "toolkit; update the toolkit")
        settings.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**settings)


def get_postprocessing_args_parser(with_label_delay=True):
    """Flags of the post-processing of predictions (see utils.Postprocessing);
    fusion.py takes them all but --label_delay, which concerns training targets."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group(
        "predictions", "Post-processing of predictions, the same in evaluation and in written "
        "files, in this order: label delay, smoothing or low-pass, calibration. When a saved "
        "model is evaluated, it defaults to what the model was saved with.")
    if with_label_delay:
        group.add_argument("--label_delay", type=float, metavar="SECONDS",
                           help="train features at t to predict the annotation at t + SECONDS "
                                "(listeners annotate late); predictions are shifted back when "
                                "written and scored (default: 0)")
    group.add_argument("--smooth", type=float, metavar="SECONDS",
                       help="smooth predictions with a centred window this long (default: 0, none)")
    group.add_argument("--smooth_window", choices=SMOOTHING_WINDOWS,
                       help="shape of the --smooth window: moving average or Gaussian "
                            "(standard deviation a quarter of the window) (default: moving)")
    group.add_argument("--lowpass", type=float, metavar="HZ",
                       help="zero-phase Butterworth low-pass filter of the 25 fps predictions "
                            "with this cutoff, instead of --smooth; e.g. 0.01 (default: 0, none)")
    group.add_argument("--calibrate", action=argparse.BooleanOptionalAction,
                       help="give each video's prediction its listener's mean and standard "
                            "deviation over the model's training annotations (the pooled ones "
                            "for a listener without training videos); --no-calibrate turns "
                            "off a saved model's (default: off)")
    return parser


POSTPROCESSING_FLAGS = ("label_delay", "smooth", "smooth_window", "lowpass", "calibrate")


def postprocessing_flags(args):
    """The post-processing flags as given (None where not given or not taken), for
    `utils.Postprocessing.resolve`."""
    return {name: getattr(args, name, None) for name in POSTPROCESSING_FLAGS}


def report_unseen_listeners(postprocessing, videos):
    """Say which listeners of `videos` calibration maps to the pooled statistics."""
    unseen = postprocessing.unseen_listeners([video.subject for video in videos])
    if unseen:
        mean, std = postprocessing.listener_stats["pooled"]
        print(f"note: --calibrate: listener(s) {', '.join(map(str, unseen))} had no training "
              f"videos; their predictions take the pooled statistics (mean {mean:.3f}, "
              f"sd {std:.3f})", file=sys.stderr)


def listener_statistics(videos):
    """Mean and standard deviation of the 25 fps annotations of each listener's
    videos (each video once, however often a set repeats it) and of all of them:
    {"pooled": [mean, std], "subjects": {"<subject>": [mean, std]}}, plain values
    so that a checkpoint holding them loads with weights_only=True."""
    unique = {(video.subject, video.story): video.annotation for video in videos
              if video.annotation is not None}
    if not unique:
        raise ToolkitError("--calibrate needs annotated training videos")

    def moments(annotations):
        values = np.concatenate(annotations).astype(np.float64)
        return [float(values.mean()), float(values.std())]

    per_subject = {}
    for (subject, _), annotation in sorted(unique.items()):
        per_subject.setdefault(subject, []).append(annotation)
    return {"pooled": moments(list(unique.values())),
            "subjects": {str(subject): moments(own) for subject, own in per_subject.items()}}


def score_videos(videos, per_second_predictions, postprocessing=None):
    """Turn each video's per-second predictions into 25 fps predictions (see
    `Postprocessing`) and score them against its annotation.

    `videos` need `subject`, `story`, `n_frames` and `annotation` (25 fps, or None
    for a video without one, which is predicted but scores NaN). Returns {"ccc":
    mean CCC over videos, "records": [{subject, story, ccc}], "frames": [25 fps
    predictions per video]}.
    """
    postprocessing = postprocessing or Postprocessing()
    frames, records = [], []
    for video, per_second in zip(videos, per_second_predictions):
        prediction = postprocessing.frames(per_second, video.n_frames, video.subject)
        frames.append(prediction)
        score = ccc(prediction, video.annotation) if video.annotation is not None else math.nan
        records.append({"subject": video.subject, "story": video.story, "ccc": score})
    return {"ccc": float(np.mean([r["ccc"] for r in records])), "records": records,
            "frames": frames}


def summarize_ccc(records):
    """Tables of per-video CCC records (dicts with subject, story, ccc).

    Returns (per_video, by_story, by_subject) DataFrames: the challenge's
    "generalized track" is the mean per story over subjects, the "personalized
    track" the mean per subject over stories.
    """
    per_video = pd.DataFrame(records, columns=["subject", "story", "ccc"])
    per_video = per_video.sort_values(["subject", "story"]).reset_index(drop=True)
    by_story = per_video.groupby("story", as_index=False)["ccc"].mean()
    by_subject = per_video.groupby("subject", as_index=False)["ccc"].mean()
    return per_video, by_story, by_subject


def seed_summary(result):
    """'0.6123' or, for several seeds, '0.6123 (seeds: 0.5871 +- 0.0102)'."""
    text = f"{result['ccc']:.4f}"
    if len(result.get("seed_ccc", [])) > 1:
        text += f" (seeds: {np.mean(result['seed_ccc']):.4f} +- {np.std(result['seed_ccc']):.4f})"
    return text


def print_results(results):
    labelled = {name: result for name, result in results.items() if not math.isnan(result["ccc"])}
    for name, result in labelled.items():
        print(f"{name} CCC: {seed_summary(result)} over {len(result['records'])} videos")
    if "test" not in labelled:
        print("the test videos have no annotations: predictions written, no CCC")
        return
    _, by_story, _ = summarize_ccc(results["test"]["records"])
    print("test CCC per story (mean over subjects):")
    print(format_table(by_story))


SEED_COLUMNS = ("val_ccc_seed_mean", "val_ccc_seed_std")


def crossval_table(folds):
    """The cross-validation table of crossval.py, cv_epochs.py and cv_fusion.py.

    `folds` holds one dict per held-out story: {"story", "train_ccc", "val_ccc"},
    and for --seeds runs "val_ccc_seed_mean" and "val_ccc_seed_std" (of the seeds'
    own CCC). Rows follow for Mean, Std (population, as numpy's default) and
    Mean-Std, a conservative score that favours settings that do well on every story.
    """
    scores = ["train_ccc", "val_ccc"] + [name for name in SEED_COLUMNS if name in folds[0]]
    table = pd.DataFrame(folds, columns=["story", *scores])
    values = table[scores].astype(float)
    mean, std = values.mean(), values.std(ddof=0)
    summary = pd.DataFrame([mean, std, mean - std])
    summary.insert(0, "story", ["Mean", "Std", "Mean-Std"])
    return pd.concat([table.astype({"story": object}), summary], ignore_index=True)


def format_table(table):
    return table.to_string(index=False, float_format=lambda value: f"{value:.4f}")


# ---------------------------------------------------------------- runtime

def seed_everything(seed):
    """Seed every generator a run draws from (Python, NumPy, torch CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_warned_no_cuda = False


def get_device(cuda):
    """The device a script runs on: the GPU when `--cuda` is given and one exists.
    Asking for one without having it warns once and falls back to the CPU."""
    global _warned_no_cuda
    if not cuda:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not _warned_no_cuda:
        print("warning: --cuda given but no GPU is available; running on the CPU",
              file=sys.stderr)
        _warned_no_cuda = True
    return torch.device("cpu")


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


def run_cli(main, parser, argv=None):
    """Parse arguments and run `main`, turning a ToolkitError into one line on
    stderr and exit status 1 instead of a traceback."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except ToolkitError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as error:
        if error.errno not in _FULL:
            raise
        where = f" {error.filename}" if error.filename else ""
        print(f"error: cannot write{where}: {_full_disk_advice(error)}", file=sys.stderr)
        sys.exit(1)


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # no space, over quota, file too large


def _full_disk_advice(error):
    # Atomic writes leave the earlier file (or none) and no temporary behind.
    return (f"{error.strerror} (the disk or your quota is full, or a file size limit "
            "applies): free space and run again, with --resume where the script has it")


# ---------------------------------------------------------------- files

# mkstemp's names for atomic_path: "." + the file's name + "." + 8 random characters + ".tmp"
_TEMPORARY_NAME = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


def _umask():
    """The process's umask, read without changing it where Linux tells it
    (os.umask can only read it by setting it, which races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the
    block succeeds, so a killed run never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        if isinstance(error, OSError) and error.errno in _FULL:
            raise ToolkitError(f"cannot write {path}: {_full_disk_advice(error)}") from None
        raise


def remove_interrupted_writes(directory, names=None):
    """Delete the temporary files that atomic_path leaves in `directory` when its process
    is killed mid-write (SIGKILL, a lost cluster worker): nothing else removes them.
    Only those of the files `names`, or all where the caller alone writes into
    `directory`, since another process's write in progress looks the same."""
    for path in Path(directory).glob(".*.tmp"):
        match = _TEMPORARY_NAME.fullmatch(path.name)
        if match and (names is None or match.group(1) in names) and path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def check_writable(directory):
    """Fail early, before hours of work, if results cannot be written to `directory`."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):  # nameless where it can be: nothing to leave
            pass
    except OSError as error:
        raise ToolkitError(f"cannot write to {directory} ({error.strerror}): "
                           "choose a folder you can write to") from None


def write_csv(frame, path):
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


def write_json(data, path):
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_valence(path, frames):
    """One prediction file: header `valence`, one row per 25 fps frame."""
    with atomic_path(path) as temporary:
        np.savetxt(temporary, frames, fmt="%.6f", header="valence", comments="")


def write_predictions(folder, videos, frames):
    """One 25 fps prediction file per video (`write_valence`), <video name>.csv, after
    clearing what an interrupted write of these files left."""
    remove_interrupted_writes(folder, {f"{video.name}.csv" for video in videos})
    for video, prediction in zip(videos, frames):
        write_valence(Path(folder) / f"{video.name}.csv", prediction)


def save_array(path, array):
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.save(handle, array)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path, checkpoint):
    """Write a checkpoint dict (tensors and plain values only, so that it loads with
    `torch.load(weights_only=True)`) under a temporary name, then rename it."""
    serialized = io.BytesIO()
    torch.save(checkpoint, serialized)
    # Written by Python, not by torch: a full disk is then an OSError that names itself.
    with atomic_path(path) as temporary:
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
    return checkpoint


def _check_finite_weights(state_dict, path):
    """A model whose weights hold NaN or inf predicts NaN: refuse it by name."""
    if not isinstance(state_dict, dict):
        return  # not a state_dict: models.load_model says so
    for name, value in state_dict.items():
        if (isinstance(value, torch.Tensor) and value.is_floating_point()
                and not torch.isfinite(value).all()):
            raise ToolkitError(f"checkpoint {path} holds NaN or inf weights ({name}): the run "
                               "that wrote it diverged; use an earlier checkpoint, or retrain "
                               "with a lower --lr or with --normalize")
