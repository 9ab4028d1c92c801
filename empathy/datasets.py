"""Loading OMG-Empathy-style data: the only code that knows the folder layout.

A split folder (for example ``data/Training``) holds::

    Annotations/Subject_<s>_Story_<t>.csv     header ``valence``, one row per video
                                              frame at 25 fps, values in [-1, 1]
                                              (dummy values of the right length for
                                              a test split)
    CombinedAudio/Subject_<s>_Story_<t>.csv   audio features  (--mods audio)
    CombinedText/...                          transcript features  (text)
    CombinedVSub/...                          listener's face features  (v_sub)
    CombinedVAct/...                          speaker's face features  (v_act)

A test folder may lack ``Annotations``: ``train.py --test`` then predicts without
scoring, taking each video's frame count from a ``--frame_counts`` CSV (columns
``video,frames``) or, without one, from its feature rows at 25 frames per second.
With no annotations, the modality folders must hold the same videos.

Feature files have one row per second of video, as ``.csv`` with a header row (a
first line of numbers is refused: it would be skipped as the header) or as ``.npy``
(arrays of more than 2 dimensions are flattened per row). A file name
may carry a suffix after the story id (``Subject_1_Story_2_x.csv``). Every modality
folder must hold the same videos as ``Annotations``. Feature files may be a row or
two shorter or longer than the annotation in seconds: a video's input is cut to its
shortest modality, and training also cuts the per-second target to that length.
Feature dimensions are read from the data.

Loaded features are stored back to back, one ``(total_seconds, dim)`` tensor per
modality, so that subsets of videos (folds, subjects) share the same memory and a
batch is a single gather.

Parsed CSV features are cached as ``.npy`` (see `cache_dir`), so reading the same
CSV a second time costs what reading ``.npy`` costs.
"""
import argparse
import dataclasses
import hashlib
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from .utils import FPS, ToolkitError

if TYPE_CHECKING:  # the annotations only: loading this module loads no torch
    import torch

# Imported on first use: listing and reading files (score.py, plot.py, runs.py,
# data_stats.py) needs no torch, whose import takes 1-2 s, more on a shared CPU.

MODALITY_FOLDERS = {
    "audio": "CombinedAudio",
    "text": "CombinedText",
    "v_sub": "CombinedVSub",
    "v_act": "CombinedVAct",
}
ANNOTATION_FOLDER = "Annotations"
# Feature files may be this many rows (seconds) longer or shorter than their video's
# annotation (or --frame_counts); more, and they come from other data.
ROW_TOLERANCE = 2
# Valence lies in [-1, 1]; annotations that were filtered or resampled may overshoot
# a little, so values up to this far outside are accepted. Farther ones are on
# another scale (0..100, -10..10) and would train a model on the wrong targets.
VALENCE_TOLERANCE = 0.1
# A video's name, with an optional suffix that may not start with a digit (or
# Story_12 would read as Story_1 + "2"): the one pattern of every script's file names.
VIDEO_NAME = re.compile(r"Subject_(\d+)_Story_(\d+)(?:[^0-9][^/]*)?")
VIDEO_FILE = re.compile(rf"^{VIDEO_NAME.pattern}\.(csv|npy)$")


def get_split_args_parser():
    """The split folders, shared by every script that reads data."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("split folders")
    group.add_argument("--train_dir", default="./data/Training",
                       help="training split folder (default: %(default)s)")
    group.add_argument("--test_dir", default="./data/Validation",
                       help="validation or test split folder (default: %(default)s)")
    return parser


def video_name(subject, story):
    """The canonical name of a video, used for every file the toolkit writes."""
    return f"Subject_{subject}_Story_{story}"


def parse_video_name(text):
    """(subject, story) of a name such as Subject_1_Story_2 or Subject_1_Story_2_x (no
    extension), or None."""
    match = VIDEO_NAME.fullmatch(text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_mods(text):
    """'audio,text' -> ['audio', 'text'], rejecting unknown or repeated names."""
    mods = [mod.strip() for mod in text.split(",") if mod.strip()]
    unknown = [mod for mod in mods if mod not in MODALITY_FOLDERS]
    if unknown or not mods:
        raise ToolkitError(f"unknown modality {','.join(unknown) or repr(text)} in --mods: "
                           f"choose from {','.join(MODALITY_FOLDERS)}")
    if len(set(mods)) != len(mods):
        raise ToolkitError(f"--mods {text} names a modality twice: list each once")
    return mods


# ---------------------------------------------------------------- files

def list_videos(folder):
    """Map (subject, story) -> file path for the video files in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ToolkitError(f"folder {folder} {what}: check the split folder "
                           "(--train_dir/--test_dir) and --mods, or the folder given")
    files = {}
    for path in sorted(folder.iterdir()):
        match = VIDEO_FILE.match(path.name)
        if not match:
            continue
        key = (int(match.group(1)), int(match.group(2)))
        if key in files:
            raise ToolkitError(f"{folder} holds two files for {video_name(*key)} "
                               f"({files[key].name}, {path.name}): keep one")
        files[key] = path
    if not files:
        raise ToolkitError(f"no Subject_<s>_Story_<t>.csv or .npy files in {folder}: "
                           "put the features or annotations there")
    return files


def list_pooled(folders, what):
    """(subject, story) -> file over several folders, each video in one folder only
    (`what` names the files in the error: "annotation", "feature")."""
    files, origin = {}, {}
    for folder in folders:
        for key, path in list_videos(folder).items():
            if key in files:
                raise ToolkitError(f"{video_name(*key)} is in {origin[key]} and in "
                                   f"{folder}: each video may have one {what} file only")
            files[key], origin[key] = path, folder
    return files


def annotation_files(split_dirs):
    """(subject, story) -> annotation file of several split folders, pooled."""
    return list_pooled([Path(split_dir) / ANNOTATION_FOLDER for split_dir in split_dirs],
                       "annotation")


def check_known(kind, requested, available, flag):
    """Refuse `requested` stories or subjects (`kind`) that are not `available`."""
    unknown = sorted(set(requested) - set(available))
    if unknown:
        raise ToolkitError(f"{flag}: {kind} {', '.join(map(str, unknown))} is not in the data "
                           f"(it has {', '.join(map(str, available))})")


def cache_dir():
    """Where parsed CSV features are kept: $OMG_CACHE_DIR, else ~/.cache/omg_empathy."""
    return Path(os.environ.get("OMG_CACHE_DIR", Path.home() / ".cache" / "omg_empathy"))


def _cache_path(path):
    # Keyed by location, size and modification time: an edited file is parsed again.
    status = path.stat()
    key = f"{path.resolve()}|{status.st_size}|{status.st_mtime_ns}"
    return cache_dir() / (hashlib.sha1(key.encode()).hexdigest() + ".npy")


def check_regular_file(path, what):
    """Refuse anything but a regular file (or a link to one) before it is opened:
    reading a FIFO or a device named like a data file would block forever, and a
    folder or a dangling link would end in a traceback. `what` names the file in the
    fix ("feature", "annotation", ...)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ToolkitError(f"{path} is a link to nothing (or was removed): put the {what} "
                           "file itself there") from None
    except OSError as error:
        raise ToolkitError(f"cannot read {path} ({error.strerror}): make the {what} file "
                           "readable") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device")
        raise ToolkitError(f"{path} is {kind}, not a file: put the {what} file there, or move "
                           "it out of the folder")


def _not_a_table(path, reason):
    return ToolkitError(f"{path} is not a table of numbers ({reason}): feature CSVs need a "
                        "header row, then the same count of numbers in every row")


def _header_fields(path):
    """The fields of a CSV's first line (bytes), without the empty one after a comma
    ending the line (some exporters add one)."""
    with open(path, "rb") as handle:
        fields = handle.readline(1 << 24).rstrip(b"\r\n").split(b",")
    return fields[:-1] if len(fields) > 1 and not fields[-1].strip() else fields


def _check_header(path):
    """Refuse a feature CSV whose first line is numbers: it has no header, and the
    loader, which skips the first line, would lose its first row (within the row
    tolerance, so unnoticed). pandas' default header 0,1,2,... is a header."""
    fields = _header_fields(path)
    try:
        numbers = [float(field) for field in fields]
    except ValueError:
        return
    if numbers in ([float(i) for i in range(len(numbers))],
                   [float(i) for i in range(1, len(numbers) + 1)]):
        return  # column numbers, as pandas (0, 1, ...) or a spreadsheet (1, 2, ...) name them
    first = b",".join(fields)
    shown = first[:40].decode("ascii", "replace") + ("..." if len(first) > 40 else "")
    raise ToolkitError(f"{path}: its first line must be a header, but it is a row of numbers "
                       f"({shown}): add a header line (e.g. f0,f1,...), or the first row is lost")


def _parse_csv(path):
    # polars parses in parallel and about 4x faster than pandas' C parser; float32
    # columns are read directly (correctly rounded). The header row is skipped, not
    # used: feature CSVs may repeat or leave out column names.
    import polars  # here: only CSV data needs it, and its import takes 0.4 s
    if path.stat().st_size == 0:
        raise ToolkitError(f"{path} is empty: regenerate the feature file")
    with open(path, "rb") as handle:
        header = handle.readline().rstrip(b"\r\n")
    n_columns = header.count(b",") + 1
    try:
        frame = polars.read_csv(path, has_header=False, skip_rows=1,
                                schema={f"c{i}": polars.Float32 for i in range(n_columns)})
    except polars.exceptions.SchemaError:  # the first row is wider than the header
        raise _not_a_table(path, "a row has more fields than the header") from None
    except polars.exceptions.PolarsError as error:
        raise _not_a_table(path, str(error).splitlines()[0][:120]) from None
    if header.endswith(b",") and frame.height and frame[:, -1].null_count() == frame.height:
        frame = frame[:, :-1]  # a comma ending every line (some exporters add one)
    array = frame.to_numpy(order="c")
    if np.isnan(array).any():  # empty cells or blank lines: drop the blank lines, as pandas did
        array = frame.filter(~polars.all_horizontal(polars.all().is_null())).to_numpy(order="c")
    return array


def open_features(path):
    """A feature file as a 2-D float array (memory-mapped where possible)."""
    path = Path(path)
    check_regular_file(path, "feature")
    if path.suffix == ".npy":
        try:
            with open(path, "rb") as handle:
                if handle.read(6) != b"\x93NUMPY":
                    raise ValueError("empty" if handle.tell() == 0 else "no NumPy header: "
                                     "another kind of file named .npy")
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else "empty"
            raise ToolkitError(f"cannot read {path} ({reason}): "
                               "regenerate it as a numeric .npy array") from None
        if array.dtype.kind not in "biuf":
            raise ToolkitError(f"{path} holds {array.dtype} values, not real numbers: "
                               "regenerate it as a numeric .npy array")
        if array.ndim == 0:
            raise ToolkitError(f"{path} holds a single number (a 0-d array), not one row per "
                               "second: regenerate it as a (seconds, features) array")
    else:
        _check_header(path)  # also for a cached file: the cache may predate this check
        cached = _cache_path(path)
        try:
            array = np.load(cached, mmap_mode="r")
        except (OSError, ValueError):
            array = _parse_csv(path)
            _write_cache(cached, array)
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    elif array.ndim > 2:
        array = array.reshape(array.shape[0], -1)
    if array.shape[0] == 0:
        raise ToolkitError(f"{path} has no rows: regenerate the feature file")
    if array.shape[1] == 0:
        raise ToolkitError(f"{path} has {array.shape[0]} rows of 0 columns: regenerate the "
                           "feature file")
    return array


def feature_width(path):
    """The columns of a feature file, from its header alone (a .npy's array header, a
    CSV's first line): what extract_features.py compares before adding files."""
    path = Path(path)
    if path.suffix == ".npy":
        return open_features(path).shape[1]  # memory-mapped: the rows are not read
    check_regular_file(path, "feature")
    _check_header(path)
    fields = _header_fields(path)
    if fields == [b""]:
        raise ToolkitError(f"{path} is empty: regenerate the feature file")
    return len(fields)


def check_rows(path, rows, n_frames, source):
    """Refuse a feature file `path` of `rows` rows more than ROW_TOLERANCE seconds off
    its video's `n_frames` frames (whose length `source` gives: an annotation or
    --frame_counts). A row or two is usual; more means other data or another rate."""
    seconds = math.ceil(n_frames / FPS)
    if abs(rows - seconds) > ROW_TOLERANCE:
        raise ToolkitError(f"{path} has {rows} rows (seconds) but {source} gives the video "
                           f"{n_frames} frames ({seconds} s): features and annotation must come "
                           f"from the same video, one row per second (up to {ROW_TOLERANCE} "
                           "off); regenerate the wrong one")


def _write_cache(cached, array):
    # The cache is a convenience: a read-only home directory must not stop a run.
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        temporary = cached.with_suffix(f".{os.getpid()}.tmp")
        with open(temporary, "wb") as handle:
            np.save(handle, array)
        os.replace(temporary, cached)
    except OSError:
        pass


def read_annotation(path, dtype=np.float32):
    """The 25 fps valence annotation of one video (in [-1, 1], see VALENCE_TOLERANCE).
    float32 for training; score.py reads float64, as the challenge's scorer does."""
    values = _read_valence(path, "annotation", dtype)
    low, high = float(values.min()), float(values.max())
    if min(low, -high) < -1 - VALENCE_TOLERANCE:
        raise ToolkitError(f"annotation {path} has values from {low:g} to {high:g}, outside "
                           f"the valence range [-1, 1] (+-{VALENCE_TOLERANCE:g}): rescale it "
                           "to [-1, 1]")
    return values


def read_prediction(path, dtype=np.float32):
    """A 25 fps prediction file (header `valence`), as written by the scripts. Its
    values may lie outside [-1, 1]: a prediction is scored as it is."""
    return _read_valence(path, "prediction", dtype)


def _read_valence(path, what, dtype):
    check_regular_file(path, what)
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ToolkitError(f"{what} {path} is empty: it needs a `valence` header and "
                           "one row per frame") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        reason = str(error).strip().splitlines()[0][:120]
        raise ToolkitError(f"cannot read {what} {path} as a CSV ({reason}): it needs the "
                           "header `valence`, then one number per row (per frame)") from None
    if "valence" not in frame.columns:
        raise ToolkitError(f"{what} {path} has no `valence` column: its first line "
                           "must be the header `valence`")
    values = pd.to_numeric(frame["valence"], errors="coerce").to_numpy(dtype)
    if values.size == 0:
        raise ToolkitError(f"{what} {path} has no rows: it needs one row per frame")
    if not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values))[0]) + 2
        raise ToolkitError(f"{what} {path} has a missing, non-numeric or infinite value on "
                           f"line {row}: fix or regenerate the file")
    return values


def per_second(frames):
    """Average a 25 fps annotation over each second (the last one may be partial)."""
    n_seconds = math.ceil(frames.size / FPS)
    padded = np.full(n_seconds * FPS, np.nan, np.float32)
    padded[:frames.size] = frames
    return np.nanmean(padded.reshape(n_seconds, FPS), axis=1).astype(np.float32)


# ---------------------------------------------------------------- videos

@dataclass(frozen=True)
class Video:
    """One video: where its rows sit in the shared storage, and its annotation."""
    subject: int
    story: int
    start: int            # first row of this video in the feature storage
    n_seconds: int        # rows of input (its shortest modality)
    annotation: np.ndarray  # valence at 25 fps; None in a test folder without annotations
    n_frames: int         # frames of the video at 25 fps (the annotation's length if any)
    label_delay_frames: int = 0  # training targets start this many frames later

    @property
    def name(self):
        return video_name(self.subject, self.story)

    @property
    def labelled_seconds(self):
        """Seconds that have both features and a target: what training uses."""
        return min(self.n_seconds, math.ceil((self.n_frames - self.label_delay_frames) / FPS))


@dataclass
class Batch:
    """Sequences stored back to back: rows of `inputs` (and `targets`) are the
    steps of sequence 0, then of sequence 1, ...; `lengths` says how many each."""
    inputs: dict  # modality -> (steps, dim) tensor
    lengths: "torch.Tensor"
    targets: "torch.Tensor" = None


class FeatureScaler:
    """Rescales every feature dimension to [-1, 1] by the minimum and maximum seen
    in the training videos (`--normalize`). A constant dimension maps to 0. Its
    state travels in checkpoints so that test data is scaled identically."""

    def __init__(self, minimum, maximum):
        import torch
        self.minimum = {mod: value.float().cpu() for mod, value in minimum.items()}
        self.maximum = {mod: value.float().cpu() for mod, value in maximum.items()}
        self._center, self._inverse_half_range = {}, {}
        for mod in self.minimum:
            half_range = (self.maximum[mod] - self.minimum[mod]) / 2
            self._center[mod] = (self.maximum[mod] + self.minimum[mod]) / 2
            self._inverse_half_range[mod] = torch.where(
                half_range > 0, 1 / half_range.clamp_min(1e-30), torch.zeros_like(half_range))

    @classmethod
    def fit(cls, video_set):
        """The scaler of the rows of every video in `video_set`."""
        return cls.fit_rows({mod: [storage[video.start:video.start + video.n_seconds]
                                   for video in video_set.videos]
                             for mod, storage in video_set.features.items()})

    @classmethod
    def fit_rows(cls, rows):
        """The scaler of {mod: [(steps, dim) tensors]}: each dimension's minimum and
        maximum over all of them (fusion's SVR fits it on one modality of all inputs)."""
        import torch
        minimum = {mod: torch.stack([chunk.amin(0) for chunk in chunks]).amin(0)
                   for mod, chunks in rows.items()}
        maximum = {mod: torch.stack([chunk.amax(0) for chunk in chunks]).amax(0)
                   for mod, chunks in rows.items()}
        return cls(minimum, maximum)

    def scale_(self, mod, rows):
        """Scale a (steps, dim) tensor of modality `mod` in place."""
        center = self._center[mod].to(rows.device)
        inverse = self._inverse_half_range[mod].to(rows.device)
        return rows.sub_(center).mul_(inverse)

    def state_dict(self):
        return {"min": dict(self.minimum), "max": dict(self.maximum)}

    @classmethod
    def from_state_dict(cls, state):
        return cls(state["min"], state["max"])

    def check_mods(self, mods, source):
        missing = [mod for mod in mods if mod not in self.minimum]
        if missing:
            raise ToolkitError(f"{source} has no normalization statistics for "
                               f"{','.join(missing)}: retrain with these --mods")


class VideoSet:
    """A list of videos whose features live in shared back-to-back storage.

    Subsets (`select`, `repeat_subjects`) share the storage, so cross-validation
    folds cost no extra memory. `gather` builds a `Batch` for any list of
    (start_row, length) segments, scaling it if the set carries a `FeatureScaler`.
    """

    def __init__(self, features, targets, videos, scaler=None):
        self.features = features    # {mod: (total_seconds, dim) float32}
        self.targets = targets      # (total_seconds,) per-second valence
        self.videos = list(videos)
        self.scaler = scaler

    def __len__(self):
        return len(self.videos)

    # Pickled as NumPy arrays so that joblib memory-maps the storage into worker
    # processes (see parallel.py) instead of copying it.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["features"] = {mod: storage.numpy() for mod, storage in self.features.items()}
        state["targets"] = self.targets.numpy()
        return state

    def __setstate__(self, state):
        import torch
        state["features"] = {mod: torch.from_numpy(array) for mod, array in state["features"].items()}
        state["targets"] = torch.from_numpy(state["targets"])
        self.__dict__.update(state)

    @property
    def mods(self):
        return list(self.features)

    @property
    def input_dims(self):
        return {mod: storage.shape[1] for mod, storage in self.features.items()}

    @property
    def stories(self):
        return sorted({video.story for video in self.videos})

    @property
    def subjects(self):
        return sorted({video.subject for video in self.videos})

    def subset(self, videos):
        return VideoSet(self.features, self.targets, videos, self.scaler)

    def with_scaler(self, scaler):
        return VideoSet(self.features, self.targets, self.videos, scaler)

    def select(self, stories=None, subjects=None, exclude_stories=()):
        """The videos of the given stories and subjects (None keeps all)."""
        return self.subset([
            video for video in self.videos
            if (stories is None or video.story in stories)
            and (subjects is None or video.subject in subjects)
            and video.story not in exclude_stories])

    @property
    def labelled(self):
        return all(video.annotation is not None for video in self.videos)

    def with_label_delay(self, delay_frames):
        """The same videos with per-second targets taken `delay_frames` later in the
        annotation (--label_delay): features at second t learn the valence at t +
        delay. Targets get their own storage; features stay shared."""
        import torch
        targets = torch.zeros_like(self.targets)
        videos = []
        for video in self.videos:
            if delay_frames >= video.n_frames:
                raise ToolkitError(f"--label_delay of {delay_frames / FPS:g} s is longer than "
                                   f"{video.name} ({video.n_frames / FPS:g} s): use a shorter delay")
            target = per_second(video.annotation[delay_frames:])[:video.n_seconds]
            targets[video.start:video.start + target.size] = torch.from_numpy(target)
            videos.append(dataclasses.replace(video, label_delay_frames=delay_frames))
        return VideoSet(self.features, targets, videos, self.scaler)

    def repeat_subjects(self, subjects, times):
        """All videos, with those of `subjects` appearing `times` times (--augment)."""
        others = [video for video in self.videos if video.subject not in subjects]
        chosen = [video for video in self.videos if video.subject in subjects]
        return self.subset(others + chosen * times)

    def video_segments(self):
        """One (start, length) segment per video, covering all its input seconds."""
        return [(video.start, video.n_seconds) for video in self.videos]

    def training_segments(self, n_pieces):
        """Each video's labelled seconds cut into `n_pieces` contiguous pieces whose
        lengths differ by at most one (--split)."""
        segments = []
        for video in self.videos:
            length = video.labelled_seconds
            if n_pieces > length:
                raise ToolkitError(f"--split {n_pieces} is larger than {video.name}'s "
                                   f"{length} labelled seconds: use a smaller --split")
            bounds = np.linspace(0, length, n_pieces + 1).round().astype(int)
            segments += [(video.start + int(begin), int(end - begin))
                         for begin, end in zip(bounds[:-1], bounds[1:])]
        return segments

    def gather(self, segments, device="cpu", with_targets=True):
        """The rows of `segments`, back to back, as a Batch on `device`."""
        import torch
        index = torch.cat([torch.arange(start, start + length) for start, length in segments])
        inputs = {}
        for mod, storage in self.features.items():
            rows = storage.index_select(0, index).to(device, non_blocking=True)
            inputs[mod] = self.scaler.scale_(mod, rows) if self.scaler else rows
        lengths = torch.tensor([length for _, length in segments])
        targets = self.targets.index_select(0, index).to(device) if with_targets else None
        return Batch(inputs, lengths, targets)


def load_videos(split_dirs, mods, unlabelled=False, frame_counts=None):
    """Load the videos of one or more split folders (pooled) for modalities `mods`.

    With `unlabelled`, a folder without Annotations loads too (for prediction only);
    its videos' frame counts come from the `frame_counts` CSV if given, else from
    their feature rows at 25 fps.
    """
    import torch
    if isinstance(split_dirs, (str, Path)):
        split_dirs = [split_dirs]
    files = _match_files(split_dirs, mods, unlabelled)
    counts = {}
    if frame_counts:
        labelled = [paths["annotation"] for paths in files.values() if paths["annotation"]]
        if labelled:
            raise ToolkitError(f"--frame_counts is for test folders without Annotations, but "
                               f"{labelled[0].parent} exists: leave out --frame_counts")
        counts = read_frame_counts(frame_counts, files)
    # Two passes so that only one video's file is open at a time: the first reads
    # shapes (and parses CSVs into the cache), the second copies into the storage.
    shapes = {key: {mod: open_features(paths[mod]).shape for mod in mods}
              for key, paths in files.items()}
    dims = _check_widths(files, shapes, mods)

    n_seconds = {key: min(shapes[key][mod][0] for mod in mods) for key in files}
    total = sum(n_seconds.values())
    features = {mod: torch.empty(total, dims[mod]) for mod in mods}
    targets = torch.zeros(total)
    videos, start = [], 0
    for key, paths in files.items():
        length = n_seconds[key]
        for mod in mods:
            block = features[mod][start:start + length]
            with np.errstate(over="ignore", invalid="ignore"):  # refused just below, by name
                block.numpy()[:] = open_features(paths[mod])[:length]
            if not torch.isfinite(block).all():
                raise ToolkitError(f"{paths[mod]} contains NaN or inf values: "
                                   "fix or regenerate the feature file")
        annotation = read_annotation(paths["annotation"]) if paths["annotation"] else None
        if annotation is not None:
            target = per_second(annotation)[:length]
            targets[start:start + target.size] = torch.from_numpy(target)
        n_frames = annotation.size if annotation is not None else counts.get(key, length * FPS)
        if annotation is not None or counts:
            source = (f"its annotation {paths['annotation']}" if annotation is not None
                      else f"--frame_counts file {frame_counts}")
            for mod in mods:
                check_rows(paths[mod], shapes[key][mod][0], n_frames, source)
        videos.append(Video(key[0], key[1], start, length, annotation, n_frames))
        start += length
    return VideoSet(features, targets, videos)


def read_frame_counts(path, files):
    """{(subject, story): frames} from a CSV with columns `video` (a video name,
    with or without an extension) and `frames`, for every video in `files`."""
    if not Path(path).exists():
        raise ToolkitError(f"--frame_counts file {path} does not exist: pass a CSV with "
                           "columns video,frames")
    check_regular_file(path, "--frame_counts")
    try:
        table = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        raise ToolkitError(f"--frame_counts file {path} is not a CSV with columns "
                           "video,frames: fix it") from None
    if not {"video", "frames"} <= set(table.columns):
        raise ToolkitError(f"--frame_counts file {path} needs the header video,frames "
                           f"(it has {','.join(map(str, table.columns))})")
    counts, lines = {}, {}
    for row, (name, frames) in enumerate(zip(table["video"], table["frames"]), start=2):
        match = VIDEO_NAME.match(str(name))
        frames = pd.to_numeric(frames, errors="coerce")
        if not match or not (frames > 0 and float(frames).is_integer()):
            raise ToolkitError(f"--frame_counts file {path}, line {row}: expected a video name "
                               f"Subject_<s>_Story_<t> and a positive whole number of frames, "
                               f"got {name!r}, {frames!r}")
        key = int(match.group(1)), int(match.group(2))
        if key in counts:
            raise ToolkitError(f"--frame_counts file {path} lists {video_name(*key)} twice "
                               f"(lines {lines[key]} and {row}): keep one row per video")
        counts[key], lines[key] = int(frames), row
    missing = sorted(files.keys() - counts.keys())
    if missing:
        raise ToolkitError(f"--frame_counts file {path} has no row for {video_name(*missing[0])} "
                           f"({len(missing)} videos missing): add a row per video")
    return counts


def _match_files(split_dirs, mods, unlabelled=False):
    """{(subject, story): {"annotation": path or None, mod: path}} across split folders.
    A folder without Annotations is accepted if `unlabelled`; its first modality
    folder then lists the videos."""
    matched = {}
    for split_dir in map(Path, split_dirs):
        if not split_dir.is_dir():
            raise ToolkitError(f"split folder {split_dir} does not exist: pass the right "
                               "--train_dir/--test_dir, or make data with make_data.py")
        if unlabelled and not (split_dir / ANNOTATION_FOLDER).exists():
            reference_folder = MODALITY_FOLDERS[mods[0]]
            reference = dict.fromkeys(list_videos(split_dir / reference_folder))
        else:
            reference_folder = ANNOTATION_FOLDER
            reference = list_videos(split_dir / reference_folder)
        per_mod = {mod: list_videos(split_dir / MODALITY_FOLDERS[mod]) for mod in mods}
        for mod, found in per_mod.items():
            if found.keys() != reference.keys():
                missing = sorted(reference.keys() - found.keys())
                extra = sorted(found.keys() - reference.keys())
                lacking = ("has no annotation" if reference_folder == ANNOTATION_FOLDER
                           else f"is not in {reference_folder}")
                what = (f"lacks {video_name(*missing[0])}" if missing
                        else f"has {video_name(*extra[0])}, which {lacking}")
                raise ToolkitError(
                    f"{split_dir / MODALITY_FOLDERS[mod]} {what} ({len(missing)} missing, "
                    f"{len(extra)} extra): every modality folder needs the same videos as "
                    f"{split_dir / reference_folder}")
        for key in sorted(reference):
            if key in matched:
                raise ToolkitError(f"{video_name(*key)} is in {split_dir} and in an earlier "
                                   "split folder: each video may appear in one split only")
            matched[key] = {"annotation": reference[key], **{mod: per_mod[mod][key] for mod in mods}}
    return matched


def _check_widths(files, shapes, mods):
    """Every file of a modality must have the same number of columns; the odd one
    out (against the most common width) is the one named."""
    dims = {}
    for mod in mods:
        widths = {key: shapes[key][mod][1] for key in files}
        values, counts = np.unique(list(widths.values()), return_counts=True)
        dims[mod] = int(values[counts.argmax()])
        for key, width in widths.items():
            if width != dims[mod]:
                raise ToolkitError(f"{files[key][mod]} has {width} columns but the other {mod} "
                                   f"files have {dims[mod]}: all {mod} files need the same width")
    return dims


# ---------------------------------------------------------------- what a run uses

def load_train_test(train_dir, test_dir, mods, test_stories=None, subjects=None, augment=None,
                    unlabelled_test=False, frame_counts=None):
    """The training and test videos a run uses.

    `test_stories` pools both folders and tests on those stories; `subjects` keeps
    those subjects (with `augment`, training keeps every video and repeats theirs).
    With `unlabelled_test`, `test_dir` may lack annotations (see datasets.load_videos).
    """
    check_augment(augment)
    if test_stories:
        pooled = load_videos([train_dir, test_dir], mods)
        check_known("story", test_stories, pooled.stories, "--test_set")
        train_set = pooled.select(exclude_stories=test_stories)
        test_set = pooled.select(stories=test_stories)
    else:
        train_set = load_videos(train_dir, mods)
        test_set = load_videos(test_dir, mods, unlabelled_test, frame_counts)
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


def check_augment(augment):
    if augment is not None and augment < 1:
        raise ToolkitError(f"--augment must be at least 1 (how many times the subjects' videos "
                           f"appear in training), got {augment}")


def load_pool(train_dir, test_dir, mods, stories=None, subjects=None):
    """Training and validation videos pooled (the training folder's alone when
    `test_dir` is None), restricted to `stories`/`subjects`: the videos of
    cross-validation folds."""
    pooled = load_videos([train_dir] + ([test_dir] if test_dir is not None else []), mods)
    if stories:
        check_known("story", stories, pooled.stories, "--stories")
    if subjects:
        check_known("subject", subjects, pooled.subjects, "--subjects")
    pooled = pooled.select(stories=stories, subjects=subjects)
    if len(pooled.stories) < 2:
        raise ToolkitError("cross-validation needs at least two stories: widen --stories")
    return pooled


def pool_for_tasks(pooled, runner, train_dir, test_dir, stories=None, subjects=None):
    """The pooled videos of `load_pool` as the tasks of `runner` (parallel.Runner) get
    them: these, or a stand-in that each cluster worker loads itself."""
    return runner.data(pooled, load_pool, train_dir=Path(train_dir), test_dir=Path(test_dir),
                       mods=pooled.mods, stories=stories, subjects=subjects)


def fold_sets(pooled, story):
    """(training videos, held-out videos) of the fold that holds out `story`."""
    return pooled.select(exclude_stories=[story]), pooled.select(stories=[story])
