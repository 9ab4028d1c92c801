"""Shared helpers without torch: the CCC metric and the training losses (written for
tensors, so importing them loads no torch), result tables, the command-line wrapper
and atomic file writers.

Every script scores with `ccc` and writes results through `atomic_path`, so these
conventions live here only. Post-processing is in postprocessing.py, checkpoints
in checkpoints.py, training and prediction in engine.py.
"""
import contextlib
import errno
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

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


def mse_loss(prediction, target):
    """Mean squared error of two torch tensors (`--loss mse`), over all the steps given."""
    return ((prediction - target) ** 2).mean()


LOSSES = {"mse": mse_loss, "ccc": ccc_loss}  # --loss: written for tensors, without torch


def _concordance_terms(x, y):
    """cov(x, y) and var(x) + var(y) + (mean(x) - mean(y))^2, population moments;
    written for NumPy arrays and torch tensors alike, so CCC has one formula."""
    mean_x, mean_y = x.mean(), y.mean()
    centred_x, centred_y = x - mean_x, y - mean_y
    covariance = (centred_x * centred_y).mean()
    return covariance, (centred_x ** 2).mean() + (centred_y ** 2).mean() + (mean_x - mean_y) ** 2


def to_length(frames, n_frames):
    """`frames` cut, or padded by repeating the last value, to `n_frames` (how a
    prediction a few frames off its annotation is scored)."""
    frames = np.asarray(frames)[:n_frames]
    if frames.size < n_frames:
        frames = np.concatenate([frames, np.full(n_frames - frames.size, frames[-1], frames.dtype)])
    return frames


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
    """The CCC of each set of written predictions and the test CCC per story; a set
    without a CCC (see postprocessing.unscored) is said to have none, and why."""
    labelled = {name: result for name, result in results.items() if not math.isnan(result["ccc"])}
    for name, result in labelled.items():
        print(f"{name} CCC: {seed_summary(result)} over {len(result['records'])} videos")
    if "test" not in labelled:
        test = results.get("test", {})
        reason = test.get("unscored", "have no annotations" if not test else
                          "score NaN (their predictions hold NaN or inf)")
        print(f"the test videos {reason}: predictions written, no CCC")
        return
    _, by_story, _ = summarize_ccc(results["test"]["records"])
    print("test CCC per story (mean over subjects):")
    print(format_table(by_story))


def format_table(table):
    return table.to_string(index=False, float_format=lambda value: f"{value:.4f}")


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


def check_writable(directory, create=True):
    """Fail early, before hours of work, if results cannot be written to `directory`.
    Without `create`, a folder not there yet is not made: its nearest existing parent
    must be a folder this process can write into (so that a command with several
    output folders checks them all before making any)."""
    directory = Path(directory)
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        existing = next(folder for folder in [directory, *directory.absolute().parents]
                        if folder.exists())
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.TemporaryFile(dir=existing):  # nameless where it can be: nothing to leave
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


