"""Reliability of the data commands (issue 27): outputs pointed into the data, splits
that would be written short, recordings that are not files, extraction into a split
of other widths, feature CSVs without a header, a video listed twice in
--frame_counts, and the notebook's own folders.

Each refusal runs through the script's real entry point (its `__main__` path,
in-process) in a private copy of one workspace, and must end in exit status 1 and
one line `error: ...` naming the file or flag, print no traceback, and leave every
file of the workspace byte for byte as it was."""
import contextlib
import io
import os
import re
import shutil
import stat
from pathlib import Path

import nbformat
import numpy as np
import pytest

import extract_features
import make_notebook
import train
from conftest import ROOT, write_tiny_data
from test_bad_input import run_script

FEATURE = "data/Training/CombinedAudio/Subject_1_Story_2.npy"
ANNOTATION = "data/Training/Annotations/Subject_1_Story_2.csv"


# ---------------------------------------------------------------- the workspace

@pytest.fixture(scope="module")
def master(tmp_path_factory):
    """./data (tiny, 24-d audio), an unlabelled test folder data/Test, a one-epoch
    audio model in ./m and an empty ./raw for recordings."""
    root = tmp_path_factory.mktemp("reliability_data")
    data = write_tiny_data(root / "data", subjects=2, seconds=12)
    shutil.copytree(data / "Validation", data / "Test")
    shutil.rmtree(data / "Test" / "Annotations")
    with contextlib.chdir(root), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        train.main(train.get_args_parser().parse_args(
            ["--mods", "audio", "--epochs", "1", "--model_dir", "m", "--ledger", "none"]))
    (root / "raw").mkdir()
    return root


@pytest.fixture
def workspace(master, tmp_path, monkeypatch):
    """A private copy of the master workspace, as the current folder."""
    root = Path(shutil.copytree(master, tmp_path / "w", symlinks=True))
    monkeypatch.chdir(root)
    return root


def snapshot(root):
    """Every entry under `root`: a file's bytes, a link's target, another kind's mode
    (a FIFO is never opened: reading it would block)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        entries[str(path.relative_to(root))] = (
            path.read_bytes() if stat.S_ISREG(mode) else
            os.readlink(path) if stat.S_ISLNK(mode) else stat.S_IFMT(mode))
    return entries


# ---------------------------------------------------------------- damages

def link(name, target):
    def damage(root):
        (root / name).symlink_to(target)
    return damage


def fake_video(name, kind="file"):
    """raw/<name>.mp4 as a file of no video (refused before decoding), a FIFO or a
    link to nothing."""
    def damage(root):
        path = root / "raw" / f"{name}.mp4"
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dangling":
            path.symlink_to(root / "raw" / "nowhere.mp4")
        else:
            path.write_bytes(b"not decoded: refused before")
    return damage


def audio_as_csv(root):
    """data/Training/CombinedAudio as CSVs with a header (24 columns)."""
    for path in (root / "data/Training/CombinedAudio").glob("*.npy"):
        array = np.load(path)
        header = ",".join(f"audio_{i}" for i in range(array.shape[1]))
        np.savetxt(path.with_suffix(".csv"), array, delimiter=",", header=header, comments="")
        path.unlink()


def without_header(trailing=""):
    """One feature file as a CSV of numbers only: its first row would be lost."""
    def damage(root):
        path = root / FEATURE
        rows = [",".join(f"{value:.6g}" for value in row) + trailing for row in np.load(path)]
        path.with_suffix(".csv").write_text("\n".join(rows) + "\n")
        path.unlink()
    return damage


def frame_counts_twice(root):
    """counts.csv for data/Test with its first video listed again, another count."""
    names = sorted(path.stem for path in (root / "data/Test/CombinedAudio").iterdir())
    rows = [f"{name},{np.load(root / 'data/Test/CombinedAudio' / f'{name}.npy').shape[0] * 25}"
            for name in names]
    (root / "counts.csv").write_text("\n".join(["video,frames", *rows, f"{names[0]},9999"]) + "\n")


def nothing(root):
    pass


TEST_WITH_COUNTS = ["--mods", "audio", "--model_dir", "m", "--test", "--test_dir", "data/Test",
                    "--pred_dir", "p", "--frame_counts", "counts.csv"]
EXTRACT = ["--videos", "raw", "--mods", "audio"]
MAKE = ["--subjects", "1", "--stories", "5", "--seconds", "12", "--out_dir"]

# (what, damage, script, arguments, what the error line says), by the classes
CASES = [
    # destroys data: an output pointed into a split folder's data
    ("data_stats --out an annotation file", nothing, "data_stats",
     ["data/Training", "--out", ANNOTATION],
     f"--out {ANNOTATION} is inside a split folder's Annotations"),
    ("data_stats --out a feature file", nothing, "data_stats",
     ["data/Training", "--out", FEATURE], "is inside a split folder's CombinedAudio"),
    ("data_stats --out through a link into Annotations", link("notes", "data/Training/Annotations"),
     "data_stats", ["data/Training", "--out", "notes/Subject_1_Story_2.csv"],
     "--out notes/Subject_1_Story_2.csv is inside a split folder's Annotations"),
    ("score --out_dir an Annotations folder", nothing, "score",
     ["data/Validation/Annotations", "data/Validation/Annotations", "--out_dir",
      "data/Validation/Annotations"],
     "--out_dir data/Validation/Annotations is inside a split folder's Annotations"),
    ("score --out_dir under an Annotations folder", nothing, "score",
     ["data/Validation/Annotations", "data/Validation/Annotations", "--out_dir",
      "data/Validation/Annotations/scores"], "is inside a split folder's Annotations"),
    # silently wrong: a split written short
    ("make_data validation story that does not exist", nothing, "make_data",
     [*MAKE, "new", "--val_stories", "9"], "--val_stories 9: there is no story 9"),
    ("make_data test story that does not exist", nothing, "make_data",
     [*MAKE, "new", "--test_stories", "3", "8"], "--test_stories 8: there is no story 8"),
    ("make_data same story for validation and test", nothing, "make_data",
     [*MAKE, "new", "--val_stories", "3", "--test_stories", "3", "4"],
     "story 3 is in both --val_stories and --test_stories"),
    ("make_data no story left to train", nothing, "make_data",
     [*MAKE, "new", "--val_stories", "1", "--test_stories", "2", "3", "4", "5"],
     "leave at least one for training"),
    ("make_data --overwrite of ./data with a bad split", nothing, "make_data",
     [*MAKE, "data", "--overwrite", "--val_stories", "7"], "there is no story 7"),
    # silently wrong: recordings that are not files
    ("extract a FIFO named like a video", fake_video("Subject_1_Story_1", "fifo"),
     "extract_features", [*EXTRACT, "--out_dir", "out"],
     "raw/Subject_1_Story_1.mp4 is a FIFO, not a file"),
    ("extract a dangling link named like a video", fake_video("Subject_1_Story_1", "dangling"),
     "extract_features", [*EXTRACT, "--out_dir", "out"],
     "raw/Subject_1_Story_1.mp4 is a link to nothing"),
    # rough edge: extraction into a split of other widths (the quick start's data)
    ("extract into a split of 24-d audio", fake_video("Subject_9_Story_9"), "extract_features",
     [*EXTRACT, "--out_dir", "data/Training"],
     "data/Training holds features of other widths than this extraction writes "
     "(CombinedAudio/Subject_1_Story_2.npy is 24 wide, not 988)"),
    ("extract into a split of 24-d audio CSVs, --skip_existing",
     lambda root: (fake_video("Subject_9_Story_9")(root), audio_as_csv(root)),
     "extract_features", [*EXTRACT, "--out_dir", "data/Training", "--skip_existing"],
     "(CombinedAudio/Subject_1_Story_2.csv is 24 wide, not 988)"),
    ("extract eGeMAPS and faces into a split of other widths", fake_video("Subject_9_Story_9"),
     "extract_features", ["--videos", "raw", "--mods", "audio,v_sub", "--face_features", "hog",
                          "--audio_features", "eGeMAPS", "--out_dir", "data/Training"],
     "is 24 wide, not 88; CombinedVSub/Subject_1_Story_2.npy is 32 wide, not 1927"),
    # silently wrong: a feature CSV without a header, a video listed twice
    ("feature CSV without a header", without_header(), "train",
     ["--mods", "audio", "--epochs", "1", "--model_dir", "out"],
     "Subject_1_Story_2.csv: its first line must be a header, but it is a row of numbers"),
    ("feature CSV without a header, a comma ending each line", without_header(","), "train",
     ["--mods", "audio", "--epochs", "1", "--model_dir", "out"],
     "its first line must be a header"),
    ("--frame_counts listing a video twice", frame_counts_twice, "train", TEST_WITH_COUNTS,
     "--frame_counts file counts.csv lists Subject_1_Story_1 twice (lines 2 and 4)"),
]


@pytest.mark.parametrize("what, damage, script, argv, message", CASES,
                         ids=[case[0] for case in CASES])
def test_refused_in_one_line_with_nothing_changed(workspace, what, damage, script, argv,
                                                  message):
    damage(workspace)
    before = snapshot(workspace)
    status, stderr = run_script(script, argv)
    lines = stderr.strip().splitlines()
    assert status == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0], stderr
    assert snapshot(workspace) == before, f"{script} {argv} changed the workspace"


# ---------------------------------------------------------------- what still runs

def test_pandas_default_header_and_outputs_beside_the_data_still_work(workspace):
    """Column numbers as pandas writes them (0,1,...) are a header; `..` out of the
    data folders is outside it."""
    path = workspace / FEATURE
    array = np.load(path)
    np.savetxt(path.with_suffix(".csv"), array, delimiter=",", comments="",
               header=",".join(map(str, range(array.shape[1]))))
    path.unlink()
    status, stderr = run_script("data_stats", ["data/Training", "--mods", "audio", "--out",
                                               "data/Training/Annotations/../stats.csv"])
    assert status == 0, stderr
    assert (workspace / "data/Training/stats.csv").is_file()


def test_extraction_shows_a_progress_bar_per_video(workspace, monkeypatch):
    """Over the frames of each video (and its audio seconds) when the videos run in
    this process; tqdm itself hides them where stderr is not a terminal."""
    import media
    media.write_recording(workspace / "raw" / "Subject_1_Story_1.mp4", 30, set(), set(),
                          media.soundtrack(30 / 25, 16000), 16000)
    bars = []

    class Recorder:
        def __init__(self, total=None, desc="", unit="", disable=False, **options):
            self.bar = {"desc": desc, "total": total, "unit": unit, "shown": not disable,
                        "count": 0}
            bars.append(self.bar)

        def update(self, count=1):
            self.bar["count"] += count

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return False

    monkeypatch.setattr(extract_features, "tqdm", Recorder)
    status, stderr = run_script("extract_features", [*EXTRACT, "--out_dir", "out"])
    assert status == 0, stderr
    assert [(bar["desc"], bar["unit"], bar["count"], bar["shown"]) for bar in bars] == [
        ("Subject_1_Story_1", "frame", 30, True), ("Subject_1_Story_1 audio", "second", 2, True)]
    assert bars[0]["total"] in (30, None)  # as the container tells


# ---------------------------------------------------------------- the notebook

def test_notebook_defaults_leave_the_quick_start_alone():
    """With its default parameters no command the notebook runs reads ./data or
    models_AT, the quick start's outputs (only the guarded quick start cell does)."""
    notebook = nbformat.reads(make_notebook.build_notebook((ROOT / "README.md").read_text()),
                              as_version=4)
    parameters = next(cell.source for cell in notebook.cells
                      if "parameters" in cell.metadata.get("tags", []))
    values = dict(re.findall(r"^(\w+) = \"(.*)\"$", parameters, flags=re.MULTILINE))
    assert values["DATA"] != "data" and values["MODELS"] != "models"
    commands = [line for cell in notebook.cells if cell.cell_type == "code"
                and "if RUN_" not in cell.source for line in cell.source.splitlines()
                if line.strip().startswith("!")]
    rendered = [re.sub(r"\{(\w+)\}", lambda match: values.get(match.group(1), ""), command)
                for command in commands]
    assert len(rendered) > 20
    for command in rendered:
        assert not re.search(r"(?<![\w/.])(\./)?data/|\bmodels_AT", command), command


def test_the_notebook_says_how_to_run_it_with_what_is_installed():
    """`jupyter execute` comes with nbclient (requirements-dev.txt): no nbconvert."""
    intro = make_notebook.INTRO
    assert "jupyter execute README.ipynb" in intro
    requirements = (ROOT / "requirements-dev.txt").read_text()
    assert re.search(r"^nbclient>=0\.1\d", requirements, flags=re.MULTILINE)
    from nbclient.cli import NbClientApp
    assert "output_base" in NbClientApp.class_trait_names()
