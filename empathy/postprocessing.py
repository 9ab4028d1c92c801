"""Post-processing: how per-second predictions become the 25 fps predictions that are
written and scored (label delay, smoothing or low-pass, calibration), its flags, and
scoring a set of videos with it.

The same `Postprocessing` serves evaluation during training, written prediction
files and fusion; checkpoints store it, so a saved model is evaluated as it was
trained. It can also be chosen on the training stories: crossval.py
--choose_postprocessing re-scores its folds' held-out predictions under the
`candidates` and writes the best (`choice_record`), which --postprocessing_from
reads (`take_choice`). Imports no torch.
"""
import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

from . import layout
from .utils import FPS, ToolkitError, ccc, to_length


def expand_to_frames(per_second, n_frames):
    """Repeat each per-second value FPS times, then cut or pad (repeating the last
    value) to the annotation's frame count."""
    return to_length(np.repeat(np.asarray(per_second, dtype=np.float32), FPS), n_frames)


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
    def resolve(cls, saved=None, source=None, **overrides):
        """The post-processing `saved` in a checkpoint (defaults if none), with the
        flags given on the command line (not None) taking precedence. A saved setting
        that the flags do not replace and that is not valid is refused as the
        checkpoint's (named by `source`), not as a flag the user gave. The flags'
        CHOICE entry (--postprocessing_from, see `flags_given`) refuses a label delay
        other than the one its choice was made with."""
        choice = overrides.pop(CHOICE, None)
        settings = dict(saved or {})
        unknown = sorted(set(settings) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ToolkitError(f"the model's post-processing has unknown setting "
                               f"{', '.join(unknown)}: it was saved by a newer version of this "
                               "toolkit; update the toolkit")
        overrides = {name: value for name, value in overrides.items() if value is not None}
        kept = {name: value for name, value in settings.items() if name not in overrides}
        _check_saved(cls, kept, source or "the model")
        resolved = cls(**{**settings, **overrides})
        if choice is not None:
            _check_choice_delay(choice, resolved.label_delay,
                                "given" if "label_delay" in overrides else
                                "saved" if saved is not None else "default", source)
        return resolved


def _check_saved(cls, saved, source):
    """Each saved post-processing setting (of `source`, a checkpoint or model file)
    is valid on its own, and the listener statistics have their shape."""
    for name, value in saved.items():
        if name == "listener_stats":
            if value is not None and not _listener_stats_shaped(value):
                raise ToolkitError(f"{source} holds damaged listener statistics (for "
                                   "--calibrate): use another checkpoint, or retrain")
            continue
        try:
            cls(**{name: value})
        except (ToolkitError, TypeError):
            raise ToolkitError(f"{source} holds a damaged post-processing setting, {name} "
                               f"{value!r}: use another checkpoint, or retrain (--{name} "
                               "given on the command line replaces it)") from None


def _listener_stats_shaped(stats):
    """{"pooled": [mean, std], "subjects": {"<s>": [mean, std]}}, finite numbers."""
    def pair(value):
        return (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(x, (int, float)) and math.isfinite(x) for x in value))
    return (isinstance(stats, dict) and pair(stats.get("pooled"))
            and isinstance(stats.get("subjects"), dict)
            and all(pair(value) for value in stats["subjects"].values()))


def get_args_parser(with_label_delay=True):
    """Flags of the post-processing of predictions (see Postprocessing);
    fusion.py takes them all but --label_delay, which concerns training targets, and
    --postprocessing_from, a choice made for the training scripts' models."""
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
    if with_label_delay:
        group.add_argument("--postprocessing_from", metavar="CV_DIR",
                           help="post-process as crossval.py --choose_postprocessing chose in "
                                "CV_DIR (its postprocessing.json, chosen on the training "
                                "stories' folds): its --smooth/--lowpass/--calibrate are used as "
                                "if given, and recorded in args.json and the checkpoint; giving "
                                "one of them with another value is refused, and so is a command "
                                "whose --mods, --normalize or label delay differ from the "
                                "cross-validation's (default: none)")
    return parser



# The flags of the fields a user sets; listener_stats comes from training videos.
FLAGS = tuple(field.name for field in dataclasses.fields(Postprocessing)
              if field.name != "listener_stats")


# The entry of `flags_given` that asks `Postprocessing.resolve` to check the label
# delay of the model it serves against --postprocessing_from's choice.
CHOICE = "postprocessing_from"


def flags_given(args):
    """The post-processing flags as given (None where not given or not taken), for
    `Postprocessing.resolve`. With --postprocessing_from, its choice is first set on
    `args` as if given (see `take_choice`), and the CHOICE entry carries the label
    delay it was made with: the model's label delay (given, saved or the default)
    is only known where `resolve` meets the checkpoint."""
    choice = take_choice(args)
    flags = {name: getattr(args, name, None) for name in FLAGS}
    if choice is not None:
        flags[CHOICE] = {"folder": str(args.postprocessing_from),
                         "label_delay": choice["label_delay"]}
    return flags


def report_unseen_listeners(postprocessing, videos):
    """Say which listeners of `videos` calibration maps to the pooled statistics."""
    unseen = postprocessing.unseen_listeners([video.subject for video in videos])
    if unseen:
        mean, std = postprocessing.listener_stats["pooled"]
        print(f"note: --calibrate: listener(s) {', '.join(map(str, unseen))} had no training "
              f"videos; their predictions take the pooled statistics (mean {mean:.3f}, "
              f"sd {std:.3f})", file=sys.stderr)


def constant_listeners(listener_stats):
    """The listeners (as named in `listener_stats`) whose training annotations are
    constant: --calibrate gives their predictions that constant."""
    return {subject for subject, (_, std) in listener_stats["subjects"].items() if std == 0}


def flattened_listeners(postprocessing):
    """The listeners whose predictions `postprocessing` calibrates to a constant."""
    if not postprocessing.calibrate or postprocessing.listener_stats is None:
        return set()
    return constant_listeners(postprocessing.listener_stats)


def report_constant_listeners(subjects):
    """One note naming the listeners (their names, as strings) that calibration flattens."""
    if subjects:
        print(f"note: --calibrate: the training annotations of listener(s) "
              f"{', '.join(sorted(subjects, key=int))} are constant, so their calibrated "
              "predictions are that constant (CCC 0)", file=sys.stderr)


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


def unscored(result, videos):
    """`result` of `score_videos` for written predictions, its CCC left out (NaN, with
    the reason in "unscored") where no video has annotations or every annotation is
    constant: a test split's dummy values score 0 for any prediction, which is no
    score."""
    if any(video.annotation is None for video in videos):
        reason = "have no annotations"
    elif all(np.ptp(video.annotation) == 0 for video in videos):
        reason = "have constant annotations (a test split's dummy values)"
    else:
        return result
    return {**result, "ccc": math.nan, "unscored": reason}


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


# ---------------------------------------------------------------- chosen on the training stories

CANDIDATE_SMOOTH = (2.0, 5.0, 10.0, 20.0)  # seconds of --smooth (a moving average)
CANDIDATE_LOWPASS = (0.002, 0.004, 0.01, 0.02, 0.05)  # Hz of --lowpass
CHOSEN = ("smooth", "smooth_window", "lowpass", "calibrate")  # what a choice sets


def candidates(label_delay=0.0):
    """The post-processing that crossval.py --choose_postprocessing compares, the
    simplest first (so that it wins a tie): none, each --smooth window, each
    --lowpass cutoff, each without and then with --calibrate; all with the models'
    `label_delay`, a training setting that is not chosen here."""
    filters = ([{}] + [{"smooth": window} for window in CANDIDATE_SMOOTH]
               + [{"lowpass": cutoff} for cutoff in CANDIDATE_LOWPASS])
    return [Postprocessing(label_delay, calibrate=calibrate, **chosen_filter)
            for chosen_filter in filters for calibrate in (False, True)]


def rescore(folds, postprocessing):
    """{story: CCC} of folds' held-out per-second predictions under `postprocessing`.
    `folds` maps a held-out story to (its fold's training videos, the held-out
    videos, their per-second predictions); calibration takes the listener statistics
    of each fold's training videos, as that fold's model would (tuning.rescore's
    rule)."""
    scores = {}
    for story, (train_videos, held_out, per_second) in folds.items():
        fold_postprocessing = (postprocessing.with_listener_stats(train_videos)
                               if postprocessing.calibrate else postprocessing)
        scores[story] = score_videos(held_out, per_second, fold_postprocessing)["ccc"]
    return scores


def compare_candidates(folds, label_delay=0.0):
    """Every candidate's CCC per fold (`rescore`), and the index of the one with the
    best mean over folds (the first of equals): ([(candidate, {story: CCC})], best)."""
    scored = [(candidate, rescore(folds, candidate)) for candidate in candidates(label_delay)]
    means = np.array([np.mean(list(scores.values())) for _, scores in scored])
    if np.isnan(means).all():
        raise ToolkitError("--choose_postprocessing: every candidate scores NaN on the folds' "
                           "held-out videos (their predictions hold NaN or inf)")
    return scored, int(np.nanargmax(means))


def as_flags(postprocessing):
    """The filter and calibration flags of `postprocessing`: '--lowpass 0.004
    --calibrate', or 'none'."""
    flags = []
    if postprocessing.smooth:
        flags.append(f"--smooth {postprocessing.smooth:g}")
        if postprocessing.smooth_window != "moving":
            flags.append(f"--smooth_window {postprocessing.smooth_window}")
    if postprocessing.lowpass:
        flags.append(f"--lowpass {postprocessing.lowpass:g}")
    if postprocessing.calibrate:
        flags.append("--calibrate")
    return " ".join(flags) or "none"


def choice_record(chosen, scores, mods, normalize, stories, subjects):
    """What --postprocessing_from reads: the `chosen` post-processing, its CCC per
    fold (`scores`) and what it was chosen for (the models' modalities,
    normalization and label delay; the folds' stories and subjects)."""
    values = list(scores.values())
    return {"postprocessing": {name: getattr(chosen, name) for name in CHOSEN},
            "flags": as_flags(chosen), "label_delay": chosen.label_delay,
            "mods": list(mods), "normalize": bool(normalize),
            "cv_mean": float(np.mean(values)), "cv_std": float(np.std(values)),
            "fold_ccc": {str(story): float(value) for story, value in scores.items()},
            "chosen_on": "the held-out predictions of each fold's last.save: the best mean "
                         "CCC over folds among the candidates of postprocessing_candidates.csv",
            "stories": [int(story) for story in stories],
            "subjects": [int(subject) for subject in subjects]}


def read_choice(folder):
    """The record that crossval.py --choose_postprocessing wrote in `folder`
    (--postprocessing_from), checked."""
    path = Path(folder) / layout.POSTPROCESSING_CHOICE
    if not Path(folder).is_dir():
        raise ToolkitError(f"--postprocessing_from {folder} does not exist: give the --out_dir "
                           "of a crossval.py --choose_postprocessing run")
    if not path.is_file():
        raise ToolkitError(f"--postprocessing_from {folder} holds no {path.name}: choose "
                           f"post-processing there first with crossval.py --out_dir {folder} "
                           "--choose_postprocessing (with --test to re-score folds already "
                           "trained)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        chosen = Postprocessing(record["label_delay"], **{name: record["postprocessing"][name]
                                                          for name in CHOSEN})
        mods, normalize = list(record["mods"]), record["normalize"]
        valid = (isinstance(chosen.calibrate, bool) and isinstance(normalize, bool)
                 and isinstance(record["flags"], str) and len(mods) > 0
                 and all(isinstance(mod, str) for mod in mods))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, ToolkitError):
        valid = False
    if not valid:
        raise ToolkitError(f"--postprocessing_from {folder}: {path} is damaged: choose again "
                           f"with crossval.py --out_dir {folder} --choose_postprocessing --test")
    return record


def take_choice(args):
    """The choice of --postprocessing_from (None without it), its flags set on
    `args` as if given, so that the run uses and records them. Refused: a
    post-processing flag given with another value than the choice's, and --mods or
    --normalize other than those of the models it was chosen for."""
    folder = getattr(args, CHOICE, None)
    if folder is None:
        return None
    choice = read_choice(folder)
    mods = [mod.strip() for mod in str(getattr(args, "mods", "")).split(",") if mod.strip()]
    if sorted(mods) != sorted(choice["mods"]):
        raise ToolkitError(f"--postprocessing_from {folder} was chosen for --mods "
                           f"{','.join(choice['mods'])}, not {','.join(mods)}: choose on a "
                           "cross-validation of these modalities (crossval.py "
                           f"--mods {','.join(mods)} --choose_postprocessing)")
    if bool(getattr(args, "normalize", False)) != choice["normalize"]:
        raise ToolkitError(f"--postprocessing_from {folder} was chosen for models trained "
                           + ("with --normalize: give --normalize (a saved model's own "
                              "normalization is used either way)" if choice["normalize"] else
                              "without --normalize: leave out --normalize, or choose on a "
                              "cross-validation trained with it"))
    for name, value in choice["postprocessing"].items():
        given = getattr(args, name, None)
        if given is not None and given != value:
            raise ToolkitError(f"--postprocessing_from {folder} chose {choice['flags']}, and "
                               f"this command gives {_given_flag(name, given)}: leave out "
                               f"one of them")
        setattr(args, name, value)
    return choice


def _given_flag(name, value):
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {value:g}" if isinstance(value, (int, float)) else f"--{name} {value}"


def _check_choice_delay(choice, label_delay, origin, source):
    """Refuse a model whose label delay (`origin`: "given" on the command line,
    "saved" in the checkpoint `source`, or the "default") is not the one the
    --postprocessing_from choice was made with."""
    wanted = choice["label_delay"]
    if label_delay == wanted:
        return
    has = {"given": f"this command gives --label_delay {label_delay:g}",
           "saved": f"{source or 'the model'} was trained with --label_delay {label_delay:g}",
           "default": f"this command trains with --label_delay {label_delay:g}"}[origin]
    advice = ("evaluate a model trained with that delay, or choose on a cross-validation of "
              "models like this one" if origin == "saved" else
              f"give --label_delay {wanted:g}, or choose on a cross-validation with this delay")
    raise ToolkitError(f"--postprocessing_from {choice['folder']} was chosen for models trained "
                       f"with --label_delay {wanted:g}, but {has}: {advice}")
