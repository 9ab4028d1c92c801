"""Reliability of runs and training (issue 27): each case of the catalogue through the
real command, in this process. A refusal is one `error:` line, exit 1, no traceback,
and the workspace (checkpoints, records, ledger, data) byte for byte as it was; a
legitimate but surprising run says so in one warning or note line."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from empathy import ledger, parallel, tables, utils
from conftest import write_tiny_data

DATA = ["--mods", "audio"]
SAVED = ["--epochs", "1", "--save_freq", "1"]
CV = ["--out_dir", "cv", "--stories", "1", "2"]
NEW_CV = ["--out_dir", "new", "--stories", "1", "2"]
EPOCHS_1_2 = ["--epoch_min", "1", "--epoch_max", "2", "--epoch_step", "1"]
SCRIPT_RESULTS = {"crossval.py": tables.crossval_results}  # the others: their ledger_results


# ---------------------------------------------------------------- the workspace

@pytest.fixture(scope="module")
def workspace_master(tmp_path_factory):
    """Tiny data (with a test split of dummy annotations), and a finished run of each
    script to resume, evaluate or fine-tune: m/ (train.py), cv/ (crossval.py, two
    saved epochs), p/ (personalize.py), featA/ and fz/ (features and a fusion model),
    and a ledger runs.csv."""
    import crossval
    import fusion
    import personalize
    import train
    root = tmp_path_factory.mktemp("runs_workspace")
    write_tiny_data(root / "data")
    with contextlib.chdir(root):
        def run(module, *argv):
            module.main(module.get_args_parser().parse_args([*argv, "--ledger", "none"]))
        run(train, *DATA, *SAVED, "--model_dir", "m")
        run(train, *DATA, "--model_dir", "m", "--features", "--feat_dir", "featA")
        run(crossval, *DATA, "--epochs", "2", "--save_freq", "1", *CV)
        os.mkdir("p")
        shutil.copy("cv/val_on_1/best.save", "p/init.save")
        run(personalize, *DATA, *SAVED, "--out_dir", "p")
        run(fusion, "featA", "--pred_dir", "fz")
        for out_dir in ("m", "cv"):
            ledger.append_row("runs.csv", {"script": "train.py", "out_dir": out_dir,
                                           "settings": '{"epochs": 1}', "mean_ccc": 0.25,
                                           "std_ccc": 0.05, "wall_s": 3.5})
    return root


def link_checkpoints(source, destination):
    """Copy a file, but link a checkpoint (megabytes each): the code under test replaces
    checkpoints (atomic writes), never writes into one, and so do the damages below."""
    if source.endswith(".save"):
        os.link(source, destination)
    else:
        shutil.copy2(source, destination)


@pytest.fixture
def workspace(workspace_master, tmp_path, monkeypatch):
    root = Path(shutil.copytree(workspace_master, tmp_path / "w", symlinks=True,
                                copy_function=link_checkpoints))
    monkeypatch.chdir(root)
    return root


def snapshot(root):
    """Every folder, and every file: its bytes, or for a large one its size, inode and
    modification time (a write changes one of them): a refusal may change none."""
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_dir():
            state[str(path.relative_to(root))] = "folder"
        elif info.st_size > 2**20:
            state[str(path.relative_to(root))] = (info.st_size, info.st_ino, info.st_mtime_ns)
        else:
            state[str(path.relative_to(root))] = path.read_bytes()
    return state


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def command(capfd):
    """A script's command line run in this process as its __main__ runs it (with its
    ledger, through ledger.run_cli, where the script keeps one); stdout and stderr
    captured at the file descriptors, so that worker processes' output counts too."""
    import importlib

    def run(script, *argv):
        module = importlib.import_module(script.removesuffix(".py"))
        parser = module.get_args_parser()
        results_of = SCRIPT_RESULTS.get(script, getattr(module, "ledger_results", None))
        capfd.readouterr()
        try:
            if results_of is None:
                utils.run_cli(module.main, parser, list(argv))
            else:
                ledger.run_cli(module.main, parser, results_of, list(argv))
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
        out, err = capfd.readouterr()
        return Result(code, out, err)
    return run


def assert_one_line_error(result, message):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
        result.stderr


# ---------------------------------------------------------------- damage

def edit_checkpoint(path, change):
    """Change a checkpoint by writing a new file over it (it may be linked: see
    `link_checkpoints`)."""
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, f"{path}.new")
    os.replace(f"{path}.new", path)


def nan_normalization(path):
    def change(state):
        dims = state["config"]["input_dims"]["audio"]
        state["normalization"] = {"min": {"audio": torch.full((dims,), float("nan"))},
                                  "max": {"audio": torch.ones(dims)}}
    return lambda root: edit_checkpoint(root / path, change)


def postprocessing_setting(path, **settings):
    return lambda root: edit_checkpoint(
        root / path, lambda state: state["postprocessing"].update(settings))


def without_rng(path):
    return lambda root: edit_checkpoint(root / path, lambda state: state.pop("rng"))


def fusion_file(content):
    def write(root):
        import joblib
        joblib.dump(content(), root / "bad.joblib")
    return write


def fusion_record(**fields):
    from empathy import svr_fusion
    return lambda: {"kind": svr_fusion.MODEL_KIND, **fields}


def ledger_line(line, encoding="utf-8"):
    def append(root):
        with open(root / "runs.csv", "ab") as file:
            file.write(line.encode(encoding, errors="surrogateescape") + b"\n")
    return append


def ledger_row(**fields):
    """A ledger line: a good row with `fields` changed (as CSV text)."""
    row = {"time": "2024-01-01T10:00:00", "script": "train.py", "out_dir": "m",
           "settings": '{"epochs": 1}', "mean_ccc": "0.2", "wall_s": "1.0", **fields}
    return ",".join(_csv_field(row.get(name, "")) for name in ledger.COLUMNS)


def _csv_field(text):
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def symlinked_training(root):
    (root / "link").symlink_to(root / "data" / "Training", target_is_directory=True)


def unwritable_ledger(root):
    """runs.csv that this process cannot write: read-only, and (as root, whom
    permissions do not stop) immutable, undone after the test (see `undo_immutable`)."""
    path = root / "runs.csv"
    path.chmod(0o444)
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if os.access(path, os.W_OK):
        pytest.skip("as root, a file cannot be made unwritable here (no chattr +i)")


@pytest.fixture(autouse=True)
def undo_immutable(tmp_path):
    yield
    ledger = tmp_path / "w" / "runs.csv"
    if os.geteuid() == 0 and ledger.exists() and shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(ledger)], capture_output=True)


# ---------------------------------------------------------------- refusals

MOST_THREADS = parallel.most_local_threads()
REFUSED = [  # (case, damage, command, the error's words)
    # Crashes
    ("--threads 0", None, ["crossval.py", *DATA, *NEW_CV, *SAVED, "--threads", "0"],
     "--threads must be at least 1, got 0"),
    ("--threads 100000", None, ["crossval.py", *DATA, *NEW_CV, *SAVED, "--threads", "100000"],
     "--threads 100000 is more than 4 per core of this machine's"),
    ("--jobs 100000", None, ["personalize.py", *DATA, *SAVED, "--out_dir", "p", "--overwrite",
                             "--jobs", "100000"], "--jobs 100000 is more than 4 per core"),
    ("--jobs x --threads beyond the cores", None,
     ["cv_epochs.py", *DATA, *CV, *EPOCHS_1_2, "--jobs", "2", "--threads", str(MOST_THREADS)],
     f"--jobs 2 with --threads {MOST_THREADS} start {2 * MOST_THREADS} threads"),
    ("--threads beyond any cluster worker", None,
     ["crossval.py", *DATA, *NEW_CV, *SAVED, "--scheduler", "tcp://127.0.0.1:1", "--threads",
      "5000"], "--threads 5000 is more than any worker machine has cores"),
    ("ledger that cannot be written", unwritable_ledger,
     ["train.py", *DATA, *SAVED, "--model_dir", "new", "--ledger", "runs.csv"],
     "--ledger runs.csv cannot be written"),
    ("ledger in a new folder, run refused", None,
     ["train.py", *DATA, "--epochs", "0", "--model_dir", "new", "--ledger", "logs/runs.csv"],
     "--epochs must be at least 1"),
    ("ledger row with too many fields", ledger_line(ledger_row() + ",x,y"),
     ["runs.py", "runs.csv"], "runs.csv, line 4: a damaged row (17 fields, not 15)"),
    ("ledger row cut short", ledger_line('2024-01-01T10:00:00,train.py,"python tr'),
     ["runs.py", "runs.csv"], "runs.csv, line 4: a damaged row (3 fields, not 15)"),
    ("ledger row with a stray quote", ledger_line(ledger_row(script='tr"ain.py')[:-4] + '"'),
     ["runs.py", "runs.csv"], "runs.csv, line 4: a damaged row"),
    ("ledger row with a CCC that is no number", ledger_line(ledger_row(mean_ccc="0.3x")),
     ["runs.py", "runs.csv"], "runs.csv, line 4: a damaged row (mean_ccc '0.3x' is not a number)"),
    ("ledger row with settings that are no JSON", ledger_line(ledger_row(settings="{epochs")),
     ["runs.py", "runs.csv", "--where", "epochs=1"],
     "runs.csv, line 4: a damaged row (its settings are not a JSON object)"),
    ("ledger row that is not UTF-8", ledger_line("2024,\udcff\udcfe,x"),
     ["runs.py", "runs.csv"], "runs.csv, line 4: a damaged row (not UTF-8 text)"),
    ("ledger plot of a damaged ledger", ledger_line(ledger_row() + ",x,y"),
     ["plot.py", "runs", "runs.csv", "--out", "plots/runs.png"],
     "runs.csv, line 4: a damaged row (17 fields, not 15)"),
    ("--resume of a last.save without its random state", without_rng("m/last.save"),
     ["train.py", *DATA, "--model_dir", "m", "--resume", "--epochs", "2"],
     "m/last.save lacks its random-generator state (rng): it cannot be resumed exactly"),
    ("crossval --resume of a fold without its random state",
     without_rng("cv/val_on_2/last.save"), ["crossval.py", *DATA, *CV, "--resume", "--epochs", "3"],
     "cv/val_on_2/last.save lacks its random-generator state"),
    ("fusion model file of another dict", fusion_file(lambda: {"weights": [1, 2]}),
     ["fusion.py", "featA", "--test", "bad.joblib", "--pred_dir", "out"],
     "bad.joblib is not a fusion model"),
    ("fusion model file of a list", fusion_file(lambda: [1, 2]),
     ["fusion.py", "featA", "--test", "bad.joblib", "--pred_dir", "out"],
     "bad.joblib is not a fusion model"),
    ("fusion model record without its fields", fusion_file(fusion_record(model=None)),
     ["fusion.py", "featA", "--test", "bad.joblib", "--pred_dir", "out"],
     "bad.joblib is not a usable fusion model (no list of input names)"),
    ("fusion model record of another object", fusion_file(fusion_record(
        model=3, in_names=["featA"], input_dims=[128], C=0.01, postprocessing=None)),
     ["fusion.py", "featA", "--test", "bad.joblib", "--pred_dir", "out"],
     "bad.joblib is not a usable fusion model (its model, of type int, cannot predict)"),
    # Silently wrong
    ("--test_dir the --train_dir", None,
     ["train.py", *DATA, *SAVED, "--model_dir", "new", "--test_dir", "data/Training"],
     "--test_dir data/Training is the same folder as --train_dir ./data/Training"),
    ("--test_dir the --train_dir by a link", symlinked_training,
     ["train.py", *DATA, *SAVED, "--model_dir", "new", "--test_dir", "link"],
     "--test_dir link is the same folder as --train_dir"),
    ("--test_dir the --train_dir by another path", None,
     ["train.py", *DATA, *SAVED, "--model_dir", "new", "--train_dir", "data/../data/Training",
      "--test_dir", "./data/Training/"], "is the same folder as --train_dir data/../data/Training"),
    ("personalize --test_dir the --train_dir", None,
     ["personalize.py", *DATA, *SAVED, "--out_dir", "p", "--overwrite", "--test_dir",
      "data/Training"], "--test_dir data/Training is the same folder as --train_dir"),
    ("crossval --test_dir the --train_dir", None,
     ["crossval.py", *DATA, *NEW_CV, *SAVED, "--test_dir", "data/Training"],
     "is in data/Training and in an earlier split folder"),
    ("--resume with --calibrate", None,
     ["train.py", *DATA, "--model_dir", "m", "--resume", "--epochs", "2", "--calibrate"],
     "m/last.save was trained with --no-calibrate, not --calibrate"),
    ("--resume with --smooth", None,
     ["crossval.py", *DATA, *CV, "--resume", "--epochs", "3", "--smooth", "2"],
     "cv/val_on_1/last.save was trained with --smooth 0.0, not 2.0"),
    ("--resume with --lowpass", None,
     ["train.py", *DATA, "--model_dir", "m", "--resume", "--epochs", "2", "--lowpass", "0.01"],
     "m/last.save was trained with --lowpass 0.0, not 0.01"),
    ("--resume with --smooth_window", postprocessing_setting("m/last.save", smooth=2.0),
     ["train.py", *DATA, "--model_dir", "m", "--resume", "--epochs", "2", "--smooth", "2",
      "--smooth_window", "gaussian"], "m/last.save was trained with --smooth_window moving, "
                                      "not gaussian"),
    ("personalize --resume with --calibrate", None,
     ["personalize.py", *DATA, "--out_dir", "p", "--resume", "--epochs", "2", "--calibrate"],
     "p/subject_1/last.save was trained with --no-calibrate, not --calibrate"),
    ("checkpoint with NaN normalization", nan_normalization("m/best.save"),
     ["train.py", *DATA, "--model_dir", "m", "--test", "--pred_dir", "out"],
     "checkpoint m/best.save holds NaN or inf normalization statistics (min of audio)"),
    ("init.save with NaN normalization", nan_normalization("p/init.save"),
     ["personalize.py", *DATA, *SAVED, "--out_dir", "p", "--overwrite"],
     "checkpoint p/init.save holds NaN or inf normalization statistics"),
    ("checkpoint with a negative label delay", postprocessing_setting("m/best.save",
                                                                       label_delay=-3.0),
     ["train.py", *DATA, "--model_dir", "m", "--test", "--pred_dir", "out"],
     "m/best.save holds a damaged post-processing setting, label_delay -3.0"),
    ("init.save with a label delay that is no number",
     postprocessing_setting("p/init.save", label_delay="soon"),
     ["personalize.py", *DATA, *SAVED, "--out_dir", "p", "--overwrite"],
     "p/init.save holds a damaged post-processing setting, label_delay 'soon'"),
    ("init.save with a label delay longer than the videos",
     postprocessing_setting("p/init.save", label_delay=100.0),
     ["personalize.py", *DATA, *SAVED, "--out_dir", "p", "--overwrite"],
     "p/init.save was trained with --label_delay 100, which fine-tuning keeps"),
    # Rough edges
    ("cv_epochs' default epochs after a short run", None, ["cv_epochs.py", *DATA, *CV],
     "cv/val_on_1/epoch_100.save does not exist (saved epochs: 1, 2): choose "
     "--epoch_min/--epoch_max/--epoch_step among them, e.g. --epoch_min 1 --epoch_max 2 "
     "--epoch_step 1"),
]


@pytest.mark.parametrize("case,damage,argv,message", REFUSED, ids=[case[0] for case in REFUSED])
def test_refused_in_one_line_before_any_write(workspace, command, case, damage, argv, message):
    if damage:
        damage(workspace)
    before = snapshot(workspace)
    result = command(*argv)
    assert_one_line_error(result, message)
    assert snapshot(workspace) == before, f"{argv[0]} wrote before refusing ({case})"


# ---------------------------------------------------------------- Ctrl-C while workers start

def loky_workers():
    """This process's joblib worker processes (children whose command is loky's)."""
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
            if parent == os.getpid() and b"popen_loky_posix" in command:
                workers.append(int(stat.parent.name))
    return workers


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds workers in /proc")
@pytest.mark.parametrize("worker_signal", [signal.SIGINT, signal.SIGKILL],
                         ids=["workers signalled too", "workers killed"])
def test_ctrl_c_while_workers_start_is_an_interruption_that_resumes(workspace, command,
                                                                    monkeypatch, worker_signal):
    """Ctrl-C reaches the terminal's whole process group: the parent and its workers,
    still importing. Sent here at one fixed point, when the workers have just been
    started and before any task result is awaited."""
    from joblib.externals.loky import get_reusable_executor
    get_reusable_executor().shutdown(wait=True)  # workers that start now, not warm ones
    start_progress = parallel._progress

    def interrupted(results, total, description):
        os.kill(os.getpid(), signal.SIGINT)
        for pid in loky_workers():
            os.kill(pid, worker_signal)
        return start_progress(results, total, description)

    monkeypatch.setattr(parallel, "_progress", interrupted)
    argv = ["crossval.py", *DATA, "--epochs", "1", "--stories", "1", "2", "--out_dir", "cvj",
            "--jobs", "2", "--ledger", "none"]
    result = command(*argv)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and "TerminatedWorkerError" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "interrupted"
    assert "run the same command again, with --resume" in result.stderr
    assert not list((workspace / "cvj").glob("val_on_*/last.save"))  # nothing trained yet
    if worker_signal == signal.SIGKILL:
        return  # the same resume as below: once is enough
    monkeypatch.setattr(parallel, "_progress", start_progress)
    resumed = command(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "note: --resume: no run in cvj had saved a last.save yet" in resumed.stderr
    assert len(pd.read_csv(workspace / "cvj" / "crossval.csv")) == 2 + 3  # folds, summaries


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds workers in /proc")
def test_a_worker_killed_without_a_stop_request_is_one_line(workspace, command, monkeypatch):
    """As when the machine runs out of memory and the kernel kills a worker."""
    from joblib.externals.loky import get_reusable_executor
    get_reusable_executor().shutdown(wait=True)
    start_progress = parallel._progress

    def killed(results, total, description):
        for pid in loky_workers():
            os.kill(pid, signal.SIGKILL)
        return start_progress(results, total, description)

    monkeypatch.setattr(parallel, "_progress", killed)
    result = command("crossval.py", *DATA, "--epochs", "1", "--stories", "1", "2", "--out_dir",
                     "cvk", "--jobs", "2", "--ledger", "none")
    assert_one_line_error(result, "a worker process of the folds died (exit codes {SIGKILL(-9)")


def test_resume_of_a_folder_that_never_ran_is_still_refused(workspace, command):
    result = command("crossval.py", *DATA, "--stories", "1", "2", "--out_dir", "typo",
                     "--resume", "--ledger", "none")
    assert_one_line_error(result, "--resume: typo/val_on_1/last.save does not exist")
    assert not (workspace / "typo").exists()


# ---------------------------------------------------------------- legitimate, with a line

def constant_annotations(root, subjects=None):
    for path in sorted((root / "data" / "Training" / "Annotations").iterdir()):
        if subjects is None or int(path.stem.split("_")[1]) in subjects:
            frames = len(path.read_text().splitlines()) - 1
            path.write_text("valence\n" + "0.25\n" * frames)


@pytest.mark.parametrize("argv", [["train.py", *DATA, *SAVED, "--model_dir", "new"],
                                  ["fusion.py", "featA", "--pred_dir", "new"]],
                         ids=["train.py", "fusion.py"])
def test_calibrating_a_listener_with_constant_annotations_is_noted(workspace, command, argv):
    constant_annotations(workspace, subjects={2})
    result = command(*argv, "--calibrate", "--ledger", "none")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: --calibrate: the training annotations of listener(s) 2 are "
                     "constant, so their calibrated predictions are that constant (CCC 0)"]
    assert "warning" not in result.stderr


def test_evaluating_with_such_a_listener_is_noted_too(workspace, command):
    edit_checkpoint(workspace / "m" / "best.save", lambda state: state["postprocessing"][
        "listener_stats"]["subjects"].__setitem__("3", [0.25, 0.0]))
    result = command("train.py", *DATA, "--model_dir", "m", "--test", "--pred_dir", "out",
                     "--calibrate", "--ledger", "none")
    assert result.returncode == 0, result.stderr
    assert "note: --calibrate: the training annotations of listener(s) 3 are constant" in \
        result.stderr


def test_training_on_constant_annotations_warns(workspace, command):
    constant_annotations(workspace)
    result = command("train.py", *DATA, *SAVED, "--model_dir", "new", "--ledger", "none")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == ["warning: every training annotation is constant (as a test split's "
                        "dummy values are): the model learns no change of valence over time, "
                        "and scores CCC 0; train on annotated videos"]


def test_dummy_test_annotations_are_not_reported_as_a_score(workspace, command):
    result = command("train.py", *DATA, "--model_dir", "m", "--test", "--test_dir",
                     "data/Testing", "--pred_dir", "out", "--ledger", "runs.csv")
    assert result.returncode == 0, result.stderr
    assert "test CCC" not in result.stdout
    assert "the test videos have constant annotations (a test split's dummy values): " \
           "predictions written, no CCC" in result.stdout
    assert list((workspace / "out" / "pred_test").iterdir())
    assert ledger.read_ledger("runs.csv")["mean_ccc"].isna().iloc[-1]  # no 0.0 as a score


# ---------------------------------------------------------------- rough edges

def test_personalize_table_shows_epochs_as_whole_numbers(workspace, command):
    result = command("personalize.py", *DATA, "--epochs", "1", "--out_dir", "p", "--overwrite",
                     "--inner_cv", "--subjects", "1", "--ledger", "none")
    assert result.returncode == 0, result.stderr
    table = (workspace / "p" / "personalize.csv").read_text().splitlines()
    assert table[0].endswith(",epochs,estimated_gain,measured_gain")
    assert [row.split(",")[-3] for row in table[1:]] in (["0", "0"], ["1", "1"])
    printed = result.stdout.splitlines()[-2:]  # the subject's row and the Mean row
    assert [row.split()[-3] for row in printed] in (["0", "0"], ["1", "1"]), printed


def test_cv_epochs_shows_progress_per_fold_and_epoch(workspace, command, monkeypatch):
    import cv_epochs
    shown = []

    def bar(epochs, **options):
        shown.append((options["desc"], list(epochs), options["disable"]))
        return epochs
    monkeypatch.setattr(cv_epochs, "tqdm", bar)
    result = command("cv_epochs.py", *DATA, *CV, "--epoch_min", "1", "--epoch_max", "2",
                     "--epoch_step", "1", "--ledger", "none")
    assert result.returncode == 0, result.stderr
    # On a terminal (disable=None: off where stderr is none, as the runner's bars are).
    assert shown == [("val_on_1", [1, 2], None), ("val_on_2", [1, 2], None)]


def test_plot_epochs_draws_a_half_epoch_where_it_is(tmp_path):
    import plot
    table = tmp_path / "cv" / "cv_epochs.csv"
    table.parent.mkdir()
    table.write_text("epoch,mean_ccc,std_ccc,val_on_1\n1,0.1,0,0.1\n1.5,0.3,0,0.3\n2,0.2,0,0.2\n")
    figure = plot.plot_epochs(plot.get_args_parser().parse_args(
        ["epochs", str(table), "--out", str(tmp_path / "e.png")]))
    mean = figure.axes[0].get_lines()[0]
    assert list(mean.get_xdata()) == [1, 1.5, 2]
    assert "cv: best epoch 1.5 (CCC 0.300)" in [text.get_text() for legend in figure.legends
                                               for text in legend.get_texts()]


# ---------------------------------------------------------------- plots with 1, 4 and 10

def plot_inputs(folder, count):
    """`count` runs of every table plot.py draws, each of `count` subjects or stories
    (and a ledger of `count` runs), with long names, as real runs have."""
    rng = np.random.default_rng(count)
    table_files = {"epochs": [], "subjects": [], "stories": []}
    for run in range(count):
        run_dir = folder / f"cv_audio_text_lr1e-4_run_{run}"
        run_dir.mkdir(parents=True)
        epochs = np.arange(10, 110, 10)
        folds = {f"val_on_{k}": rng.uniform(0, 0.5, epochs.size) for k in (1, 2, 4)}
        values = np.array(list(folds.values()))
        utils.write_csv(pd.DataFrame({"epoch": epochs, "mean_ccc": values.mean(0),
                                      "std_ccc": values.std(0), **folds}),
                        run_dir / "cv_epochs.csv")
        utils.write_csv(pd.DataFrame({"subject": range(1, count + 1),
                                      "before_ccc": rng.uniform(-0.1, 0.5, count),
                                      "after_ccc": rng.uniform(-0.1, 0.5, count)}),
                        run_dir / "personalize.csv")
        utils.write_csv(tables.crossval_table([{"story": story, "train_ccc": 0.5,
                                                "val_ccc": rng.uniform(-0.1, 0.5)}
                                               for story in range(1, count + 1)]),
                        run_dir / "crossval.csv")
        for kind, name in (("epochs", "cv_epochs.csv"), ("subjects", "personalize.csv"),
                           ("stories", "crossval.csv")):
            table_files[kind].append(str(run_dir / name))
        settings = {"mods": ["audio,text", "audio", "audio,text,v_sub,v_act"][run % 3],
                    "lr": [1e-5, 1e-4][run % 2], "hidden_size": 64 * (1 + run // 6)}
        ledger.append_row(folder / "a_ledger_kept_in_a_folder_with_a_long_name" / "runs.csv",
                          {"script": ["crossval.py", "train.py"][run % 2],
                           "out_dir": f"experiments/cv_{run}_with_a_descriptive_name",
                           "settings": json.dumps(settings), "mean_ccc": rng.uniform(0, 0.5),
                           "std_ccc": 0.05})
    return table_files, folder / "a_ledger_kept_in_a_folder_with_a_long_name" / "runs.csv"


def overrun(figure):
    """How far (inches: left, bottom, right, top) what the figure draws (titles,
    labels, tick labels, legends) reaches beyond its edges, which a saved PNG cuts off."""
    figure.canvas.draw()
    drawn = figure.get_tightbbox(figure.canvas.get_renderer())
    width, height = figure.get_size_inches()
    return [round(max(0.0, value), 2) for value in
            (-drawn.x0, -drawn.y0, drawn.x1 - width, drawn.y1 - height)]


@pytest.mark.parametrize("count", [1, 4, 10])
def test_no_plot_cuts_off_its_title_labels_or_legend(tmp_path, count):
    import plot
    tables, ledger = plot_inputs(tmp_path, count)
    labels = [f"run_{index}" for index in range(count)]
    commands = [["epochs", *tables["epochs"]],
                ["subjects", *tables["subjects"], "--labels", *labels],
                # The README's pair of runs: its legend was cut off with 4 subjects.
                ["subjects", tables["subjects"][0], tables["subjects"][0], "--labels", "AT",
                 "ATV"],
                ["stories", *tables["stories"], "--labels", *labels],
                ["runs", str(ledger)]]
    for argv in commands:
        args = plot.get_args_parser().parse_args([*argv, "--out", str(tmp_path / "p.png")])
        assert overrun(plot.PLOTS[args.kind](args)) == [0, 0, 0, 0], argv
