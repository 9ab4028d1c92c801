"""Moving the library into the package empathy/ (issue 35) must not change a single
number. This test runs the same short commands in this working tree and in the
toolkit as it was at commit 58ca14c, before the move, and asserts that every metrics
table, prediction and feature file is byte for byte the same. (It compared against
eed6c09, before the refactor of issue 24, until 58ca14c, where it still passed: the
chain holds back to that commit, crossval.csv's columns added by issue 33 aside.)

Everything runs on one thread (OMP_NUM_THREADS, MKL_NUM_THREADS, and --threads 1
where a script sets its own): floating-point sums depend on how work is split among
threads, so only then are the two trees' numbers identical on any CPU.

Checkpoints (.save) and args.json are not compared: a checkpoint's stored record and
the recorded arguments may legitimately gain keys. None of the compared files holds a
time or anything else that varies from run to run."""
import io
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, write_tiny_data

BASELINE = "58ca14c"
RUN_TIMEOUT_S = 300  # one script run; a hang fails the test instead of stalling the suite
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
COMPARED = ("*.csv", "*.npy")  # tables, predictions and features; never .save or args.json
GROWING_TABLES = set()  # tables that gained columns since BASELINE: the old ones must not change


def extract_baseline(destination):
    """The toolkit at BASELINE, from `git archive`, in `destination`; skips the test
    where this is no git checkout holding that commit (a shallow clone, a tarball)."""
    if shutil.which("git") is None or shutil.which("tar") is None:
        pytest.skip(f"git and tar are needed to extract the toolkit at {BASELINE}")
    found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{BASELINE}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout holding commit {BASELINE} (a shallow "
                    f"clone?): {found.stderr.strip()}")
    destination.mkdir()
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", BASELINE],
                               stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(destination)], stdin=archive.stdout, check=True)
    archive.stdout.close()
    assert archive.wait() == 0, f"git archive {BASELINE} failed"
    return destination


def run_guide(tree, data, out):
    """The commands compared, run with `tree`'s scripts from `tree`, writing to `out`:
    a training run with the options that touch post-processing and checkpoints, its
    predictions and features, a two-fold cross-validation with features, and
    fine-tuning from one fold's model."""
    environment = {**os.environ, **SINGLE_THREAD,
                   "OMG_CACHE_DIR": str(out / "cache")}  # no cache shared between trees
    split = ["--train_dir", str(data / "Training"), "--test_dir", str(data / "Validation"),
             "--mods", "audio,text", "--ledger", "none"]

    def run(script, *argv):
        finished = subprocess.run([sys.executable, str(tree / script), *split, *map(str, argv)],
                                  cwd=tree, env=environment, capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT_S)
        assert finished.returncode == 0, (f"{script} {' '.join(map(str, argv))} failed in "
                                          f"{tree}:\n{finished.stderr[-3000:]}")

    run("train.py", "--model_dir", out / "model", "--epochs", 3, "--save_freq", 1,
        "--loss", "ccc", "--calibrate", "--label_delay", 1, "--normalize")
    run("train.py", "--model_dir", out / "model", "--test", "--features",
        "--pred_dir", out / "pred", "--feat_dir", out / "feat")
    run("crossval.py", "--out_dir", out / "cv", "--stories", 1, 2, "--epochs", 2,
        "--jobs", 1, "--threads", 1, "--features")
    (out / "personal").mkdir()
    shutil.copy(out / "cv" / "val_on_1" / "best.save", out / "personal" / "init.save")
    run("personalize.py", "--out_dir", out / "personal", "--epochs", 2, "--calibrate",
        "--jobs", 1, "--threads", 1)
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{"baseline": its output folder, "current": this tree's}, each run once."""
    root = tmp_path_factory.mktemp("unchanged")
    baseline_tree = extract_baseline(root / "baseline_tree")
    data = write_tiny_data(root / "data")
    trees = {"baseline": baseline_tree, "current": ROOT}
    for name in trees:
        (root / f"{name}_out").mkdir()
    # Both trees side by side: each process has one thread, so this only saves time.
    with ThreadPoolExecutor(len(trees)) as pool:
        running = {name: pool.submit(run_guide, tree, data, root / f"{name}_out")
                   for name, tree in trees.items()}
        return {name: future.result() for name, future in running.items()}


def compared_files(folder):
    return sorted(str(path.relative_to(folder)) for pattern in COMPARED
                  for path in folder.rglob(pattern))


def first_difference(name, baseline, current):
    """Where two files part, for the failure message: the first differing element of
    a NumPy array, or the first differing line of a table."""
    if name.endswith(".npy"):
        old, new = (np.load(io.BytesIO(content)) for content in (baseline, current))
        if old.shape != new.shape or old.dtype != new.dtype:
            return f"{old.dtype}{list(old.shape)} at {BASELINE}, {new.dtype}{list(new.shape)} now"
        differing = np.argwhere(old != new)
        if len(differing):
            index = tuple(differing[0].tolist())
            return (f"{len(differing)} values, first at {list(index)}: {old[index].item()!r} "
                    f"at {BASELINE}, {new[index].item()!r} now")
        return "same values, other bytes (the .npy header)"
    baseline, current = baseline.decode(errors="replace"), current.decode(errors="replace")
    for number, (old, new) in enumerate(zip(baseline.splitlines(), current.splitlines()), 1):
        if old != new:
            return f"line {number}: {old[:80]!r} at {BASELINE}, {new[:80]!r} now"
    return (f"{len(baseline.splitlines())} lines at {BASELINE}, "
            f"{len(current.splitlines())} now")


def assert_same_columns(old_table, new_table):
    """A table that has gained columns since the baseline (crossval.csv: the last
    epoch beside the best) holds the baseline's columns, their text unchanged."""
    old = pd.read_csv(old_table, dtype=str, keep_default_na=False)
    new = pd.read_csv(new_table, dtype=str, keep_default_na=False)
    assert set(old.columns) <= set(new.columns), f"{new_table}: columns of {BASELINE} missing"
    pd.testing.assert_frame_equal(old, new[list(old.columns)])


def assert_same_outputs(outputs, stage, expected):
    """Every table, prediction and feature file under `stage` is the baseline's, byte
    for byte, and the same files exist in both; `expected` must be among them."""
    baseline, current = outputs["baseline"] / stage, outputs["current"] / stage
    names = compared_files(baseline)
    assert compared_files(current) == names, f"{stage}: not the files written at {BASELINE}"
    assert set(expected) <= set(names), f"{stage}: {set(expected) - set(names)} missing"
    for name in names:
        if Path(name).name in GROWING_TABLES:
            assert_same_columns(baseline / name, current / name)
            continue
        old, new = (baseline / name).read_bytes(), (current / name).read_bytes()
        assert old == new, (f"{stage}/{name} differs from {BASELINE}'s: "
                            f"{first_difference(name, old, new)}")


def test_training_metrics_are_unchanged(outputs):
    assert_same_outputs(outputs, "model", ["metrics.csv"])


def test_predictions_are_unchanged(outputs):
    assert_same_outputs(outputs, "pred", ["pred_train/Subject_1_Story_2.csv",
                                          "pred_test/Subject_1_Story_1.csv"])


def test_features_are_unchanged(outputs):
    assert_same_outputs(outputs, "feat", ["feat_train/Subject_1_Story_2.npy",
                                          "feat_test/Subject_1_Story_1.npy"])


def test_crossval_is_unchanged(outputs):
    assert_same_outputs(outputs, "cv", ["crossval.csv", "cv_pred/Subject_1_Story_1.csv",
                                        "val_on_1/metrics.csv",
                                        "val_on_2/feat_test/Subject_1_Story_2.npy"])


def test_personalize_is_unchanged(outputs):
    assert_same_outputs(outputs, "personal", ["personalize.csv",
                                              "pred_test/Subject_1_Story_1.csv",
                                              "subject_1/metrics.csv"])
