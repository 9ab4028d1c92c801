"""Shared helpers: the CCC metric, seeding, devices, checkpoints and file writers.

Every script scores with `ccc` and reads and writes checkpoints with
`save_checkpoint` / `load_checkpoint`, so these conventions live here only.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import functools
import importlib
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

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
    per_second = np.asarray(per_second, dtype=np.float32)
    frames = np.repeat(per_second, FPS)[:n_frames]
    if frames.size < n_frames:
        frames = np.concatenate([frames, np.full(n_frames - frames.size, frames[-1], np.float32)])
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
        from scipy.ndimage import gaussian_filter1d, uniform_filter1d
        width = self.smooth * FPS
        if width < 1:
            return frames
        if self.smooth_window == "moving":
            odd_width = 2 * round(width / 2) + 1  # an odd width keeps the window centred
            return uniform_filter1d(frames.astype(np.float64), odd_width, mode="nearest").astype(np.float32)
        return gaussian_filter1d(frames.astype(np.float64), width / 4, mode="nearest",
                                 truncate=2.0).astype(np.float32)

    def _low_passed(self, frames):
        from scipy.signal import butter, sosfiltfilt
        if not self.lowpass or frames.size < 2:
            return frames
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


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run_parallel(function, tasks, jobs, description, scheduler=None):
    """`[function(**task) for task in tasks]`, in `jobs` processes (joblib) with a fair
    share of the cores each, and a progress bar over finished tasks.

    Each task must seed itself, so that results do not depend on `jobs`. Large
    arrays in the arguments are memory-mapped (copy-on-write) into the workers
    rather than copied, so data loaded once is shared by every process.

    With `scheduler` (a Dask scheduler's address, --scheduler) the tasks run on that
    cluster's workers instead and `jobs` is ignored; see `_run_on_cluster`.
    """
    from joblib import Parallel, delayed
    if scheduler:
        return _run_on_cluster(function, tasks, scheduler, description)
    if jobs < 1:
        raise ToolkitError(f"--jobs must be at least 1, got {jobs}")
    if jobs == 1 or len(tasks) <= 1:
        return [_call(function, task) for task in tqdm(tasks, desc=description, unit="task",
                                                       dynamic_ncols=True)]
    jobs = min(jobs, len(tasks))
    threads = max(1, available_cores() // jobs)
    parallel = Parallel(n_jobs=jobs, mmap_mode="c", return_as="generator")
    results = parallel(delayed(_call_with_threads)(function, threads, task) for task in tasks)
    return list(tqdm(results, total=len(tasks), desc=description, unit="task",
                     dynamic_ncols=True))


def _call_with_threads(function, threads, task):
    torch.set_num_threads(threads)
    return _call(function, task)


def _call(function, task):
    task = {name: value.load() if isinstance(value, LoadedOnWorkers) else value
            for name, value in task.items()}
    return function(**task)


def get_parallel_args_parser(what):
    """--jobs and --scheduler, the flags of `run_parallel`, for a script that can
    `what` (e.g. "run folds") side by side."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("parallel runs")
    group.add_argument("--jobs", type=int, default=1, metavar="N",
                       help=f"{what} in N parallel processes (default: %(default)s)")
    group.add_argument("--scheduler", metavar="ADDRESS",
                       help=f"{what} on the workers of the Dask scheduler at ADDRESS (e.g. "
                            "tcp://host:8786) instead; data and outputs must be in folders "
                            "the workers share, at the same paths")
    return parser


# ---------------------------------------------------------------- cluster

def task_path(path, scheduler):
    """A path as tasks get it: absolute on a cluster, whose workers run in other
    folders (of the same shared file system), as given otherwise."""
    return Path(path).absolute() if scheduler else Path(path)


@dataclasses.dataclass(frozen=True)
class LoadedOnWorkers:
    """A task argument that each cluster worker loads itself, `loader(**arguments)`,
    instead of receiving the data through the scheduler (see `load_on_workers`)."""
    loader: object
    arguments: tuple
    run: str
    part: int = None  # for a loader that returns a tuple: the item this argument is

    def parts(self, count):
        """One task argument per item of the loader's tuple; they are loaded once."""
        return [dataclasses.replace(self, part=index) for index in range(count)]

    def load(self):
        if self.part is None:
            return _load(self)
        return _load(dataclasses.replace(self, part=None))[self.part]


def load_on_workers(loader, **arguments):
    """A task argument standing for `loader(**arguments)` (e.g. the pooled videos),
    for runs on a cluster: workers read the data from paths they share with this
    machine (make relative paths absolute first), once per worker process and run.
    A new run reads again, so files changed between runs are never served stale."""
    arguments = {name: tuple(value) if isinstance(value, list) else value
                 for name, value in arguments.items()}  # hashable, for the cache
    return LoadedOnWorkers(_importable(loader), tuple(sorted(arguments.items())),
                           uuid.uuid4().hex)


@functools.lru_cache(maxsize=2)  # the data of this run and of at most one other
def _load(data):
    return data.loader(**dict(data.arguments))


def _importable(function):
    """`function` as an attribute of its module. `python crossval.py` defines its
    functions in __main__, which Dask would ship as copies (so `_load`'s cache would
    miss every time); workers import the script's module instead."""
    script = getattr(sys.modules["__main__"], "__file__", None)
    if getattr(function, "__module__", None) != "__main__" or script is None:
        return function
    return getattr(importlib.import_module(Path(script).stem), function.__qualname__)


def connect_scheduler(address):
    """A Dask client of the scheduler at `address`, or a one-line error after Dask's
    connect timeout (distributed.comm.timeouts.connect, 30 s unless configured)."""
    try:
        from distributed import Client
    except ImportError:
        raise ToolkitError("--scheduler needs Dask: pip install 'dask[distributed]'") from None
    try:
        return Client(address, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError):
        raise ToolkitError(f"cannot reach the Dask scheduler at {address}: start one with "
                           "'dask scheduler' or check the address") from None


def check_scheduler(address):
    """Fail before anything is written if --scheduler names no reachable scheduler."""
    if address:
        connect_scheduler(address).close()


def _run_on_cluster(function, tasks, scheduler, description):
    """Each task as a Dask future on the cluster's workers.

    A worker that dies costs only the tasks it was running: the scheduler runs them
    again on another worker (tasks must therefore be idempotent), and gives up on a
    task that has taken down `distributed.scheduler.allowed-failures` + 1 workers.
    The first task that fails stops the run with its error.
    """
    from concurrent.futures import CancelledError
    from distributed import KilledWorker, as_completed
    function = _importable(function)
    client = connect_scheduler(scheduler)
    try:
        futures = [client.submit(_call, function, task, pure=False) for task in tasks]
        for future in tqdm(as_completed(futures, loop=client.loop), total=len(futures),
                           desc=description, unit="task", dynamic_ncols=True):
            future.result()  # the first error stops the run, not the last task
        return [future.result() for future in futures]
    except KilledWorker:
        raise ToolkitError(f"a {description} task took down every Dask worker that ran it "
                           "(see the workers' logs, e.g. for running out of memory); what "
                           "finished is saved: run again, with --resume where the script "
                           "has it") from None
    except CancelledError:
        raise ToolkitError(f"lost the Dask scheduler at {scheduler}, and with it the running "
                           "tasks; what finished is saved: restart the scheduler and workers "
                           "and run again, with --resume where the script has it") from None
    except Exception as error:
        missing = _missing_module(error)
        if missing is None:
            raise
        raise ToolkitError(f"the Dask scheduler or workers cannot import {missing}: start "
                           "them with PYTHONPATH set to the toolkit's folder (README: "
                           "Running on a cluster)") from None
    finally:
        client.close()


def _missing_module(error):
    """The module a remote unpickling failed to import, if that is what `error` is
    (the scheduler wraps it in a RuntimeError)."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError):
            return error.name
        error = error.__cause__
    return None


class StopRequests:
    """Turns Ctrl-C and SIGTERM into a request that training honours at the end of
    the epoch in progress, so that nothing but that epoch is lost. A second signal
    stops at once. Outside the main thread (where signals cannot be caught) it
    does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this epoch "
              "(send it again to stop now)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


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


# ---------------------------------------------------------------- files

_UMASK = os.umask(0)
os.umask(_UMASK)


# mkstemp's names for atomic_path: "." + the file's name + "." + 8 random characters + ".tmp"
_TEMPORARY_NAME = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the
    block succeeds, so a killed run never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
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


def save_array(path, array):
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.save(handle, array)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path, checkpoint):
    """Write a checkpoint dict (tensors and plain values only, so that it loads with
    `torch.load(weights_only=True)`) under a temporary name, then rename it."""
    with atomic_path(path) as temporary:
        torch.save(checkpoint, temporary)


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
