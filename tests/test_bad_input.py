"""Bad input, generated: damaged data files and out-of-range flag values, fed through
the scripts' real entry points (their `__main__` path, in-process). Whatever the
damage, a script must stop with exit status 1 and one line `error: ...` naming the
file or flag, print no traceback, and leave every file as it found it.

Hypothesis draws the damages and values; the examples are fixed (`derandomize`) so
that the suite stays reproducible, and few, so that it stays fast."""
import contextlib
import importlib
import io
import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from empathy import checkpoints, datasets, ledger, models, postprocessing, utils
from conftest import write_tiny_data

FEATURE = "CombinedAudio/Subject_1_Story_2.npy"
ANNOTATION = "Annotations/Subject_1_Story_2.csv"

def examples(count):
    """Hypothesis settings: `count` fixed examples, however long each takes."""
    return settings(max_examples=count, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


# ---------------------------------------------------------------- the workspace

@pytest.fixture(scope="module")
def master(tmp_path_factory):
    """A folder as the guide expects it: ./data (tiny), decision-level features in
    ./feat_A, predictions in ./preds and an unlabelled test folder data/Test."""
    root = tmp_path_factory.mktemp("bad_input")
    data = write_tiny_data(root / "data", subjects=2, seconds=12)
    shutil.copytree(data / "Validation", data / "Test")
    shutil.rmtree(data / "Test" / "Annotations")
    shutil.copytree(data / "Validation" / "Annotations", root / "preds")
    for split, side in (("Training", "feat_train"), ("Validation", "feat_test")):
        (root / "feat_A" / side).mkdir(parents=True)
        for annotation in sorted((data / split / "Annotations").iterdir()):
            seconds = -(-(len(annotation.read_text().splitlines()) - 1) // utils.FPS)
            np.save(root / "feat_A" / side / f"{annotation.stem}.npy",
                    np.random.default_rng(0).standard_normal((seconds, 4)).astype(np.float32))
    return root


@contextlib.contextmanager
def workspace(master):
    """A private copy of the master folder, as the current folder."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(shutil.copytree(master, Path(folder) / "w", symlinks=True))
        with contextlib.chdir(root):
            yield root


def snapshot(root):
    """Every entry under `root` with its kind, size and modification time."""
    entries = {}
    for folder, names, files in os.walk(root):
        for name in names + files:
            path = Path(folder) / name
            status = path.lstat()
            entries[str(path.relative_to(root))] = (status.st_mode, status.st_size,
                                                    status.st_mtime_ns)
    return entries


def _timeout(signum, frame):
    raise TimeoutError("the script blocked (reading a FIFO?)")


def run_script(script, argv):
    """The script's command line, as its __main__ runs it; returns (exit status, stderr)."""
    module = importlib.import_module(script)
    stderr = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(60)  # a regression that blocks fails the test instead of hanging the suite
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            if hasattr(module, "ledger_results"):
                ledger.run_cli(module.main, module.get_args_parser(), module.ledger_results, argv)
            else:
                utils.run_cli(module.main, module.get_args_parser(), argv)
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return status, stderr.getvalue()


def shown_lines(stderr):
    """The lines a terminal shows: a progress bar's carriage returns overwrite it."""
    return [shown for line in stderr.split("\n") if (shown := line.split("\r")[-1].strip())]


def assert_refused(root, script, argv, named):
    """The script refuses with one line naming `named`, and changes nothing."""
    before = snapshot(root)
    status, stderr = run_script(script, argv)
    lines = shown_lines(stderr)
    assert status == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert named in lines[0], stderr
    assert snapshot(root) == before, f"{script} {argv} changed files"


# ---------------------------------------------------------------- damaged files

def as_csv(path):
    """The same file as .csv (feature files may be either), the .npy removed."""
    if path.suffix == ".npy":
        path.unlink()
        path = path.with_suffix(".csv")
    return path


def replace_with(kind):
    def damage(path, draw):
        path.unlink()
        if path.suffix == ".npy" and draw(st.booleans()):
            path = path.with_suffix(".csv")
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "folder":
            path.mkdir()
        else:
            path.symlink_to(path.parent / "nowhere")
    damage.__name__ = kind
    return damage


def garbage(path, draw):
    path = as_csv(path) if draw(st.booleans()) else path
    path.write_bytes(draw(st.binary(max_size=200)))


def latin1_text(path, draw):
    """A table with a word in latin-1 (not UTF-8) in a cell."""
    columns = draw(st.integers(1, 5))
    rows = [",".join(["0.5"] * columns)] * draw(st.integers(0, 20))
    word = draw(st.sampled_from(["café", "Müller", "£3", "naïve"]))
    rows.insert(draw(st.integers(0, len(rows))), ",".join([word] * columns))
    header = "valence" if path.parent.name == datasets.ANNOTATION_FOLDER else "a"
    as_csv(path).write_bytes("\n".join([header, *rows]).encode("latin-1"))


def extra_fields(path, draw):
    """Rows with more fields than the header (a comma too many)."""
    table = (pd.read_csv(path) if path.suffix == ".csv"
             else pd.DataFrame(np.load(path)))
    text = table.to_csv(index=False).splitlines()
    row = draw(st.integers(1, len(text) - 1))
    text[row] += "," * draw(st.integers(1, 3)) + draw(st.sampled_from(["", "1", "x"]))
    as_csv(path).write_text("\n".join(text) + "\n")


def bad_array(path, draw):
    rows = np.load(path).shape[0]
    array = draw(st.sampled_from([
        np.float32(draw(st.floats(allow_nan=False))),            # 0-d
        np.zeros((rows, 0), np.float32),                          # no columns
        np.zeros((0, 24), np.float32),                            # no rows
        np.full((rows, 24), "x"),                                 # text
        np.ones((rows, 24), np.complex64),                        # complex
        np.zeros(rows, dtype=[("a", "f4"), ("b", "f4")]),         # structured
    ]))
    np.save(path, array)


def nonfinite_feature(path, draw):
    array = np.load(path)
    array[draw(st.integers(0, len(array) - 1)), draw(st.integers(0, array.shape[1] - 1))] = \
        draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    np.save(path, array)


def rows_off(path, draw):
    """A feature file far longer or shorter than its video (another video's, or
    another rate's)."""
    array = np.load(path)
    rows = draw(st.one_of(st.integers(1, len(array) - 3),
                          st.integers(len(array) + 3, 10 * len(array))))
    np.save(path, np.resize(array, (rows, array.shape[1])))


def annotation_values(path, draw):
    """A value out of [-1, 1] beyond the tolerance, or not a finite number."""
    lines = path.read_text().splitlines()
    far = st.floats(1 + datasets.VALENCE_TOLERANCE + 1e-3, 1e30)
    value = draw(st.one_of(far.map(str), far.map(lambda v: str(-v)),
                           st.sampled_from(["nan", "inf", "-inf", "", "x", "1,2"])))
    lines[draw(st.integers(1, len(lines) - 1))] = value
    path.write_text("\n".join(lines) + "\n")


def annotation_length(path, draw):
    """An annotation many seconds longer or shorter than its features."""
    lines = path.read_text().splitlines()
    frames = lines[1:]
    if draw(st.booleans()):
        frames = frames * draw(st.integers(2, 10))
    else:
        frames = frames[:draw(st.integers(1, len(frames) - 4 * utils.FPS))]
    path.write_text("\n".join([lines[0], *frames]) + "\n")


TRAIN = ["--mods", "audio,text", "--epochs", "1", "--model_dir", "out"]
# (script, its arguments, the file to damage), by the kind of file damaged
FEATURE_CASES = [
    ("train", TRAIN, f"data/Training/{FEATURE}"),
    ("fusion", ["feat_A", "--pred_dir", "fused"], "feat_A/feat_train/Subject_1_Story_2.npy"),
]
ANNOTATION_CASES = [
    ("train", TRAIN, f"data/Training/{ANNOTATION}"),
    ("train", TRAIN, "data/Validation/Annotations/Subject_2_Story_1.csv"),
    ("score", ["data/Validation/Annotations", "preds", "--out_dir", "scores"],
     "data/Validation/Annotations/Subject_1_Story_1.csv"),
]
PREDICTION_CASES = [("score", ["data/Validation/Annotations", "preds"],
                     "preds/Subject_1_Story_1.csv")]
ANY_CASES = FEATURE_CASES + ANNOTATION_CASES + PREDICTION_CASES
DAMAGES = [(replace_with("fifo"), ANY_CASES), (replace_with("folder"), ANY_CASES),
           (replace_with("dangling"), ANY_CASES), (garbage, ANY_CASES),
           (latin1_text, ANY_CASES), (extra_fields, FEATURE_CASES),
           (bad_array, FEATURE_CASES), (nonfinite_feature, FEATURE_CASES),
           (rows_off, FEATURE_CASES), (annotation_values, ANNOTATION_CASES),
           (annotation_length, ANNOTATION_CASES)]


@pytest.mark.parametrize("damage, cases", DAMAGES, ids=[damage.__name__ for damage, _ in DAMAGES])
def test_damaged_files_are_refused_by_name(master, damage, cases):
    @examples(2)
    @given(st.data())
    def check(data):
        script, argv, target = data.draw(st.sampled_from(cases), label="case")
        with workspace(master) as root:
            damage(root / target, data.draw)
            assert_refused(root, script, argv, Path(target).stem)
    check()


# ---------------------------------------------------------------- flags

def flag(name, values):
    return values.map(lambda value: f"--{name}={value}")


NOT_FINITE = st.sampled_from(["nan", "inf", "-inf"])
NEGATIVE = st.floats(max_value=-1e-300, allow_infinity=False)
TRAIN_FLAGS = st.one_of(
    flag("lr", st.one_of(NOT_FINITE, NEGATIVE, st.just(0.0))),
    flag("weight_decay", st.one_of(NOT_FINITE, NEGATIVE)),
    flag("seed", st.one_of(st.integers(max_value=-1), st.integers(min_value=2 ** 32))),
    flag("smooth", st.one_of(NOT_FINITE, NEGATIVE, st.floats(postprocessing.MAX_SMOOTH * 1.001, 1e300))),
)
PLOT = ["stories", "scores.csv"]
FLAGS = {   # flag: (script, other arguments, bad values)
    "lr": ("train", TRAIN, st.one_of(NOT_FINITE, NEGATIVE, st.just(0.0))),
    "weight_decay": ("train", TRAIN, st.one_of(NOT_FINITE, NEGATIVE)),
    "seed": ("train", TRAIN, st.one_of(st.integers(max_value=-1), st.integers(min_value=2 ** 32))),
    "smooth": ("train", TRAIN, st.one_of(NOT_FINITE, NEGATIVE,
                                         st.floats(postprocessing.MAX_SMOOTH * 1.001, 1e300))),
    "augment": ("train", TRAIN + ["--subjects", "1"], st.integers(max_value=0)),
    "gamma": ("fusion", ["feat_A"], st.one_of(NOT_FINITE, NEGATIVE, st.just(0.0))),
    "epsilon": ("fusion", ["feat_A"], st.one_of(NOT_FINITE, NEGATIVE)),
    "C": ("fusion", ["feat_A"], st.one_of(NOT_FINITE, NEGATIVE, st.just(0.0))),
    "dpi": ("plot", PLOT + ["--out", "plots/p.png"],
            st.one_of(st.integers(max_value=9), st.integers(min_value=1001))),
    "out": ("plot", PLOT, st.sampled_from(["data/Training/Annotations/Subject_1_Story_2.csv/p.png",
                                           "figure.png", "preds", "plots/p.pdf"])),
}


@pytest.mark.parametrize("name", FLAGS)
def test_bad_flag_values_are_refused_by_name(master, name):
    script, argv, values = FLAGS[name]

    @examples(2)
    @given(values)
    def check(value):
        with workspace(master) as root:
            (root / "figure.png").mkdir()
            assert_refused(root, script, [*argv, f"--{name}={value}"], f"--{name}")
    check()


@examples(4)
@given(st.integers(min_value=1, max_value=10 ** 30))
def test_frame_counts_far_from_the_features_are_refused(master, frames):
    """--frame_counts of a test folder without annotations: a count more than
    ROW_TOLERANCE seconds off a video's features (a typo, another rate) is refused."""
    with workspace(master) as root:
        names = sorted(path.stem for path in (root / "data/Test/CombinedAudio").iterdir())
        rows = np.load(root / "data/Test/CombinedAudio" / f"{names[0]}.npy").shape[0]
        if abs(frames - rows * utils.FPS) <= (datasets.ROW_TOLERANCE + 1) * utils.FPS:
            frames += 10 * utils.FPS
        pd.DataFrame({"video": names, "frames": [
            frames if index == 0 else np.load(root / "data/Test/CombinedAudio" / f"{name}.npy"
                                               ).shape[0] * utils.FPS
            for index, name in enumerate(names)]}).to_csv(root / "counts.csv", index=False)
        assert_refused(root, "train", ["--mods", "audio", "--model_dir", "m", "--test",
                                       "--test_dir", "data/Test", "--frame_counts", "counts.csv"],
                       names[0])


# ---------------------------------------------------------------- silently wrong, now said

def untrained_checkpoint(path, normalization=None, poison=False):
    """A checkpoint of an untrained audio model for the tiny data (24-d audio)."""
    model = models.FusionLSTM({"audio": 24})
    if poison:
        with torch.no_grad():
            model.lstm.weight_hh_l0[3, 5] = float("nan")
    checkpoints.save_checkpoint(path, checkpoints.make_checkpoint(model, normalization, 1, 0.0, 1))


@pytest.mark.parametrize("poison, flags, named", [
    (True, [], "m/best.save holds NaN or inf weights"),
    (False, ["--normalize"], "m/best.save was trained without --normalize"),
])
def test_checkpoints_that_would_predict_wrong_are_refused(master, poison, flags, named):
    with workspace(master) as root:
        untrained_checkpoint(root / "m" / "best.save", poison=poison)
        assert_refused(root, "train", ["--mods", "audio", "--model_dir", "m", "--test",
                                       "--pred_dir", "p", *flags], named)


def test_diverging_training_stops_with_the_epoch_and_the_fix(master):
    with workspace(master) as root:
        for path in (root / "data" / "Training" / "CombinedAudio").iterdir():
            np.save(path, np.full(np.load(path).shape, 3e38, np.float32))
        status, stderr = run_script("train", ["--mods", "audio", "--epochs", "1",
                                              "--model_dir", "out"])
        lines = shown_lines(stderr)
        assert status == 1 and "Traceback" not in stderr and len(lines) == 1, stderr
        assert lines[0].startswith("error: out: training diverged in epoch 1"), stderr
        assert "lower --lr" in lines[0] and "--normalize" in lines[0]
        assert not any((root / "out").glob("*.save"))


def test_scores_are_those_of_float64_reading(tmp_path):
    """score.py reads both files as float64, as the challenge's scorer does."""
    rng = np.random.default_rng(3)
    for folder in ("annotations", "predictions"):
        (tmp_path / folder).mkdir()
        values = rng.uniform(-1, 1, 500)
        np.savetxt(tmp_path / folder / "Subject_1_Story_1.csv", values, fmt="%.17g",
                   header="valence", comments="")
    import score
    record, = score.score_folders(tmp_path / "annotations", tmp_path / "predictions")
    reference = utils.ccc(*(pd.read_csv(tmp_path / folder / "Subject_1_Story_1.csv")["valence"]
                            for folder in ("predictions", "annotations")))
    assert record["ccc"] == reference
