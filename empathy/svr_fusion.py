"""The decision-level fusion engine of fusion.py and cv_fusion.py: an RBF support
vector regressor over the per-second features of several models.

Here are the flags and settings of the regressor, finding each model's feature
folder, loading the videos with every input's features side by side, fitting (with
C chosen by leave-one-story-out cross-validation over the training stories),
predicting and scoring, and saving and loading a fitted model; the scripts wire
them. Output names come from runs.py.

A saved model is a joblib pickle (see `model_record`), and loading a pickle can run
arbitrary code: `load_model` is only ever called on a path the user named.
"""
import argparse
import contextlib
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import sklearn
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline
from sklearn.svm import SVR

from . import datasets, layout, postprocessing, utils
from .postprocessing import (Postprocessing, flattened_listeners, report_constant_listeners,
                             report_unseen_listeners, score_videos, unscored)
from .utils import ToolkitError

# Imported on first use (--normalize's scaler): fusion.py and cv_fusion.py start
# without it.

MODEL_KIND = "omg-empathy decision-level fusion SVR"
SVR_CACHE_MB = 500  # libsvm kernel cache; 200 to 1000 MB fit 10,000 rows equally fast


# ---------------------------------------------------------------- flags and settings

def get_args_parser():
    """Flags of the fusion model, taken by fusion.py and cv_fusion.py."""
    parser = argparse.ArgumentParser(add_help=False, parents=[
        datasets.get_split_args_parser(), postprocessing.get_args_parser(with_label_delay=False)])
    group = parser.add_argument_group("fusion model")
    group.add_argument("--in_names", nargs="+", metavar="NAME",
                       help="a name for each input folder, in order, stored with the model "
                            "(default: the folder names)")
    group.add_argument("--normalize", action="store_true",
                       help="rescale every feature dimension to [-1, 1] by the training "
                            "rows' min and max, as train.py --normalize does (stored with "
                            "the model)")
    group.add_argument("--C", type=float, nargs="+", default=[0.01], metavar="C",
                       help="SVR penalty; with several values, the one with the best "
                            "leave-one-story-out CCC over the training stories is used "
                            "(default: %(default)s)")
    group.add_argument("--epsilon", type=float, default=0.1,
                       help="SVR epsilon-tube width (default: %(default)s)")
    group.add_argument("--gamma", default="auto",
                       help="RBF kernel gamma: 'auto' (1 / features), 'scale' or a number "
                            "(default: %(default)s)")
    return parser


@dataclass(frozen=True)
class SVRSettings:
    """The regressor's hyper-parameters (C may be a grid to choose from) and the
    post-processing of its predictions (listener statistics are added per fit)."""
    c_values: tuple = (0.01,)
    epsilon: float = 0.1
    gamma: object = "auto"
    normalize: bool = False
    postprocessing: Postprocessing = field(default_factory=Postprocessing)

    @classmethod
    def from_args(cls, args):
        settings = cls(tuple(args.C), args.epsilon, parse_gamma(args.gamma), args.normalize,
                       Postprocessing.resolve(**postprocessing.flags_given(args)))
        if not all(0 < c < math.inf for c in settings.c_values):
            raise ToolkitError(f"--C must be positive numbers, got {' '.join(map(str, args.C))}")
        if not 0 <= settings.epsilon < math.inf:
            raise ToolkitError(f"--epsilon must be a number >= 0, got {args.epsilon}")
        return settings


def parse_gamma(text):
    if text in ("auto", "scale"):
        return text
    try:
        gamma = float(text)
    except ValueError:
        gamma = -1.0
    if not 0 < gamma < math.inf:
        raise ToolkitError(f"--gamma must be 'auto', 'scale' or a positive number, got {text}")
    return gamma


def input_names(folders, in_names):
    """--in_names, or the folder names, one per input folder."""
    if in_names is None:
        in_names = [Path(folder).name or Path(folder).resolve().name for folder in folders]
    elif len(in_names) != len(folders):
        raise ToolkitError(f"--in_names has {len(in_names)} names for {len(folders)} input "
                           f"folders ({' '.join(map(str, folders))}): give one name per folder")
    if len(set(in_names)) != len(in_names):
        raise ToolkitError(f"input names {' '.join(in_names)} repeat a name: give each input "
                           "its own name with --in_names")
    return list(in_names)


# ---------------------------------------------------------------- finding the features

def _has_videos(folder):
    return folder.is_dir() and any(datasets.VIDEO_FILE.match(path.name)
                                   for path in folder.iterdir())


def find_feature_folder(feat_dir, split_dir, side):
    """The folder of `side` ("train" or "test") features named by FEAT_DIR.

    The guide's copy `<split_dir>/<feat_dir>` comes first (or the nested
    `<split_dir>/<feat_dir>/feat_<side>` that `cp -r` makes when the destination
    exists), then train.py's own `<feat_dir>/feat_<side>` (layout.features_dir).
    """
    copied, written = Path(split_dir) / feat_dir, layout.features_dir(feat_dir, side)
    if copied.is_dir():
        nested = layout.features_dir(copied, side)
        if _has_videos(copied) and _has_videos(nested):
            raise ToolkitError(f"{copied} holds features and also a {nested.name} folder of "
                               "features (left by a second `cp -r`): keep one of them")
        return nested if _has_videos(nested) else copied
    if written.is_dir():
        return written
    raise ToolkitError(f"feature folder {feat_dir} not found: looked for {copied} (the guide's "
                       f"copy step) and {written} (train.py --features --feat_dir {feat_dir})")


# ---------------------------------------------------------------- loading

@dataclass
class FusedVideo:
    """One video: every input's per-second features side by side, and its annotation."""
    subject: int
    story: int
    inputs: np.ndarray      # (seconds, total feature dim) float32
    annotation: np.ndarray  # valence at 25 fps

    @property
    def name(self):
        return datasets.video_name(self.subject, self.story)

    @property
    def n_frames(self):
        return self.annotation.size

    def training_rows(self):
        """Seconds that have both features and a target, with that target."""
        target = datasets.per_second(self.annotation)
        length = min(len(self.inputs), target.size)
        return self.inputs[:length], target[:length]


def load_fused_videos(input_folders, annotations, in_names):
    """The videos of the input folders (every input must hold the same ones), as
    FusedVideos sorted by name.

    `input_folders` holds one list of folders (pooled) per input. Returns
    (videos, dims): dims is each input's feature width.
    """
    inputs = [datasets.list_pooled(folders, "feature") for folders in input_folders]
    described = [f"{name} ({', '.join(map(str, folders))})"
                 for name, folders in zip(in_names, input_folders)]
    _check_same_videos(inputs, described)
    missing = sorted(inputs[0].keys() - annotations.keys())
    if missing:
        raise ToolkitError(f"{described[0]} has {datasets.video_name(*missing[0])}, which has no "
                           f"annotation ({len(missing)} such videos): check --train_dir/--test_dir")
    dims = [None] * len(inputs)
    videos = []
    for key in sorted(inputs[0]):
        annotation = datasets.read_annotation(annotations[key])
        arrays = [_read_input(files[key], annotation.size) for files in inputs]
        for index, array in enumerate(arrays):
            dims[index] = dims[index] or array.shape[1]
            if array.shape[1] != dims[index]:
                raise ToolkitError(f"{inputs[index][key]} has {array.shape[1]} columns but other "
                                   f"{in_names[index]} files have {dims[index]}: re-extract "
                                   "them with one model")
        length = min(len(array) for array in arrays)
        videos.append(FusedVideo(key[0], key[1],
                                 np.concatenate([array[:length] for array in arrays], axis=1),
                                 annotation))
    return videos, dims


def _check_same_videos(inputs, described):
    for files, name in zip(inputs[1:], described[1:]):
        missing = sorted(inputs[0].keys() - files.keys())
        extra = sorted(files.keys() - inputs[0].keys())
        if missing or extra:
            what = (f"lacks {datasets.video_name(*missing[0])}" if missing
                    else f"has {datasets.video_name(*extra[0])}")
            raise ToolkitError(f"{name} {what}, unlike {described[0]} ({len(missing)} missing, "
                               f"{len(extra)} extra): extract every input's features from the "
                               "same videos")


def _read_input(path, n_frames):
    """One feature file as float32, checked against its annotation's length."""
    array = np.asarray(datasets.open_features(path), dtype=np.float32)
    datasets.check_rows(path, len(array), n_frames, "its annotation")
    if not np.isfinite(array).all():
        raise ToolkitError(f"{path} contains NaN or inf values: re-extract the features")
    return array


def load_split(feat_dirs, in_names, train_dir, test_dir, test_stories=None, with_train=True):
    """Training and test videos for fusion.py (training ones only if `with_train`)."""
    if test_stories:
        folders = [[find_feature_folder(name, train_dir, "train"),
                    find_feature_folder(name, test_dir, "test")] for name in feat_dirs]
        pooled, dims = load_fused_videos(
            folders, datasets.annotation_files([train_dir, test_dir]), in_names)
        datasets.check_known("story", test_stories, sorted({v.story for v in pooled}), "--test_set")
        train_videos = [video for video in pooled if video.story not in test_stories]
        test_videos = [video for video in pooled if video.story in test_stories]
    else:
        folders = [[find_feature_folder(name, test_dir, "test")] for name in feat_dirs]
        test_videos, dims = load_fused_videos(
            folders, datasets.annotation_files([test_dir]), in_names)
        train_videos = []
        if with_train:
            train_folders = [[find_feature_folder(name, train_dir, "train")] for name in feat_dirs]
            train_videos, train_dims = load_fused_videos(
                train_folders, datasets.annotation_files([train_dir]), in_names)
            check_same_dims(train_dims, dims, in_names)
            folders = [a + b for a, b in zip(train_folders, folders)]
    if (with_train and not train_videos) or not test_videos:
        raise ToolkitError("--test_set leaves no training videos: keep at least one story "
                           "for training")
    for name, input_folders in zip(in_names, folders):
        print(f"{name}: features from {', '.join(map(str, input_folders))}")
    return train_videos, test_videos, dims


def check_same_dims(train_dims, test_dims, in_names):
    for name, train_dim, test_dim in zip(in_names, train_dims, test_dims):
        if train_dim != test_dim:
            raise ToolkitError(f"{name}: training features have {train_dim} columns but test "
                               f"features {test_dim}: extract both with the same model")


# ---------------------------------------------------------------- the regressor

class FeatureScaling(TransformerMixin, BaseEstimator):
    """--normalize as a step of the fusion Pipeline: datasets.FeatureScaler, the
    toolkit's one [-1, 1] min-max scaler, over the fused rows; the model file keeps
    its state_dict, as checkpoints do.

    Why FeatureScaler and not scikit-learn's MinMaxScaler(-1, 1), which fusion used
    before: only FeatureScaler's arithmetic ((x - centre) * inverse half range, in
    float32) keeps the LSTM's checkpoints and numbers bit for bit, and it is the more
    accurate of the two. Fusion pays a float32 rounding: its scaled rows move by at
    most 2.4e-7, which on the built-in data moved its predictions by at most 1e-6 at
    C 0.01 and 7e-4 at C 1, and its CCCs by at most 5e-5. A dimension constant in
    training maps to 0, as in the LSTM (MinMaxScaler gave test rows its raw offset).
    Models saved with a MinMaxScaler load and predict with it, unchanged.
    """
    MOD = "fused"  # FeatureScaler keeps statistics per modality: the fused rows are one

    def fit(self, rows, targets=None):
        import torch
        rows = torch.tensor(np.asarray(rows, dtype=np.float32))
        self.state_ = datasets.FeatureScaler.fit_rows({self.MOD: [rows]}).state_dict()
        return self

    def transform(self, rows):
        import torch
        scaler = datasets.FeatureScaler.from_state_dict(self.state_)
        copy = torch.tensor(np.asarray(rows, dtype=np.float32))  # scale_ works in place
        return scaler.scale_(self.MOD, copy).numpy()


def fit_model(videos, c, settings):
    """An SVR (behind FeatureScaling with --normalize) fitted on every labelled
    second of `videos`."""
    rows, targets = zip(*(video.training_rows() for video in videos))
    steps = [("scale", FeatureScaling())] if settings.normalize else []
    steps.append(("svr", SVR(kernel="rbf", C=c, epsilon=settings.epsilon,
                             gamma=settings.gamma, cache_size=SVR_CACHE_MB)))
    return Pipeline(steps).fit(np.concatenate(rows), np.concatenate(targets))


def predict(model, videos):
    """Per-second predictions of every video (one predict call for all rows)."""
    predictions = model.predict(np.concatenate([video.inputs for video in videos]))
    bounds = np.cumsum([len(video.inputs) for video in videos])[:-1]
    return [part.astype(np.float32) for part in np.split(predictions, bounds)]


def evaluate(model, videos, postprocessing=None):
    """CCC of every video at 25 fps, and their mean; as engine.evaluate returns."""
    return score_videos(videos, predict(model, videos), postprocessing)


def fitted_postprocessing(settings, train_videos):
    """The post-processing of a model fitted on `train_videos` (their listener
    statistics calibrate its predictions)."""
    return settings.postprocessing.with_listener_stats(train_videos)


def saved_postprocessing(record, flags, source):
    """A saved model's post-processing, overridden by the `flags` given."""
    postprocessing = Postprocessing.resolve(record.get("postprocessing"), source, **flags)
    if postprocessing.calibrate and postprocessing.listener_stats is None:
        raise ToolkitError(f"{source} was saved without listener statistics, so --calibrate "
                           "cannot use them: fit the model again with this version")
    return postprocessing


def choose_c(videos, settings):
    """The C with the best leave-one-story-out CCC among `videos` (the training
    videos only: the evaluated story never takes part).

    Returns (best C, table of the mean held-out CCC per C and story).
    """
    stories = sorted({video.story for video in videos})
    if len(stories) < 2:
        raise ToolkitError(f"choosing among --C values needs two or more training stories, "
                           f"but there is only story {stories[0]}: give one --C value")
    rows = []
    for c in settings.c_values:
        row, held_out_cccs = {"C": c}, []
        for story in stories:
            train_videos = [v for v in videos if v.story != story]
            model = fit_model(train_videos, c, settings)
            result = evaluate(model, [v for v in videos if v.story == story],
                              fitted_postprocessing(settings, train_videos))
            row[f"story {story}"] = result["ccc"]
            held_out_cccs += [record["ccc"] for record in result["records"]]
        row["mean"] = float(np.mean(held_out_cccs))  # over videos, as the challenge scores
        rows.append(row)
    table = pd.DataFrame(rows)
    return float(table.loc[table["mean"].idxmax(), "C"]), table


def fit_with_c_choice(videos, settings, verbose=True):
    """fit_model with the one --C value, or with the best of several. Returns (model, C)."""
    c = settings.c_values[0]
    if len(settings.c_values) > 1:
        c, table = choose_c(videos, settings)
        if verbose:
            print("leave-one-story-out CCC over the training stories per C:")
            print(utils.format_table(table))
            print(f"chosen C: {c:g}")
    return fit_model(videos, c, settings), c


# ---------------------------------------------------------------- saving and loading

def model_record(model, c, settings, in_names, dims, videos):
    """What a saved fusion model holds: the fitted pipeline and how it was made."""
    return {"kind": MODEL_KIND, "model": model, "in_names": list(in_names),
            "input_dims": [int(dim) for dim in dims], "C": c, "epsilon": settings.epsilon,
            "gamma": settings.gamma, "normalize": settings.normalize,
            "postprocessing": asdict(fitted_postprocessing(settings, videos)),
            "train_videos": [video.name for video in videos],
            "sklearn_version": sklearn.__version__}


def save_model(path, record):
    with utils.atomic_path(path) as temporary:
        joblib.dump(record, temporary)


# Models saved before the library moved into the package pickled its classes by their
# old top-level module paths; unpickling finds them here.
FORMER_MODULE_PATHS = {"svr_fusion": __name__}


@contextlib.contextmanager
def former_module_paths():
    """While loading: the former module names resolve to the package's modules."""
    added = [name for name in FORMER_MODULE_PATHS if name not in sys.modules]
    for name in added:
        sys.modules[name] = sys.modules[FORMER_MODULE_PATHS[name]]
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


def load_model(path):
    """A model saved by save_model (by today's code or before the package). joblib
    unpickles, which can run code: callers load only a path the user named."""
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"fusion model {path} does not exist: fit one with fusion.py "
                           f"(it writes <pred_dir>/{layout.FUSION_MODEL}) or fix the path")
    try:
        with former_module_paths():
            record = joblib.load(path)
    except Exception as error:  # unpickling raises many types for files of other kinds
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ToolkitError(f"cannot read fusion model {path} ({reason[:120]}): give a "
                           f"{layout.FUSION_MODEL} written by fusion.py or cv_fusion.py") from None
    if not isinstance(record, dict) or record.get("kind") != MODEL_KIND:
        raise ToolkitError(f"{path} is not a fusion model: give a {layout.FUSION_MODEL} written "
                           "by fusion.py or cv_fusion.py")
    problem = _record_problem(record)
    if problem:
        raise ToolkitError(f"{path} is not a usable fusion model ({problem}): it is damaged or "
                           f"was not written by fusion.py; fit it again")
    return record


def _record_problem(record):
    """What a loaded record lacks to predict as `model_record` describes, or None."""
    names, dims = record.get("in_names"), record.get("input_dims")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        return "no list of input names"
    if not (isinstance(dims, list) and len(dims) == len(names)
            and all(isinstance(d, int) and d > 0 for d in dims)):
        return "no feature width per input"
    if not callable(getattr(record.get("model"), "predict", None)):
        return f"its model, of type {type(record.get('model')).__name__}, cannot predict"
    fitted_on = getattr(record["model"], "n_features_in_", sum(dims))
    if fitted_on != sum(dims):
        return f"its regressor takes {fitted_on} features, not the {sum(dims)} it describes"
    if not isinstance(record.get("C"), (int, float)):
        return "no C"
    if not isinstance(record.get("postprocessing"), (dict, type(None))):
        return "no post-processing settings"
    return None


def check_compatible(record, in_names, dims, source):
    """A saved model applies only to inputs of the same names, order and widths."""
    if list(in_names) != record["in_names"]:
        raise ToolkitError(f"{source} was fitted on inputs {' '.join(record['in_names'])} but "
                           f"got {' '.join(in_names)}: give the same folders in the same order, "
                           "with the same --in_names")
    if [int(dim) for dim in dims] != record["input_dims"]:
        raise ToolkitError(f"{source} expects feature widths {record['input_dims']} but the "
                           f"inputs have {list(dims)}: use the features it was fitted on")


def check_model_path(path):
    """A fitted model may replace only an earlier fusion model, not another file."""
    if path.is_dir() or (path.exists() and path.suffix != ".joblib"):
        raise ToolkitError(f"--model_path {path} exists and is not a fusion model (.joblib): "
                           "choose a new path ending in .joblib")
    layout.check_output_folder(path.parent, "--model_path")
    utils.check_writable(path.parent)


# ---------------------------------------------------------------- a run's outputs

def fit_and_save(videos, settings, in_names, dims, model_path, verbose=True):
    """Fit on `videos` (choosing C among several) and save the model to `model_path`.
    Returns (model, C, its post-processing)."""
    model, c = fit_with_c_choice(videos, settings, verbose)
    save_model(model_path, model_record(model, c, settings, in_names, dims, videos))
    return model, c, fitted_postprocessing(settings, videos)


def predict_and_write(model, videos, postprocessing, folder):
    """Score `videos` (see evaluate) and write their 25 fps predictions into `folder`."""
    result = evaluate(model, videos, postprocessing)
    utils.write_predictions(folder, videos, result["frames"])
    return result


def fit_and_predict(settings, in_names, dims, train_videos, test_videos, pred_dir, model_path):
    """fusion.py: fit on the training videos, save the model, and write the
    predictions of both sides into <pred_dir>/pred_train and pred_test."""
    model, _, postprocessing = fit_and_save(train_videos, settings, in_names, dims, model_path)
    results = {"train": predict_and_write(model, train_videos, postprocessing,
                                          layout.predictions_dir(pred_dir, "train"))}
    return {**results, **predict_saved(model, postprocessing, test_videos, pred_dir)}


def predict_saved(model, postprocessing, test_videos, pred_dir):
    """fusion.py: write a model's predictions of the test videos into <pred_dir>/pred_test."""
    report_unseen_listeners(postprocessing, test_videos)
    report_constant_listeners(flattened_listeners(postprocessing))
    return {"test": unscored(predict_and_write(model, test_videos, postprocessing,
                                               layout.predictions_dir(pred_dir, "test")),
                             test_videos)}
