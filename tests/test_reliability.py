"""Reliability: the catalogue of bad inputs, each through the real command (one line,
exit 1, no traceback, nothing half-written), interrupted runs that resume exactly,
and identical reruns."""
import contextlib
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train
from empathy import engine, utils
from conftest import ROOT, assert_same_checkpoints, run_script, wait_until
from test_datasets import bad_input_cases


def run_train(*argv):
    return train.main(train.get_args_parser().parse_args(list(argv)))


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


class Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


@pytest.fixture
def command(capsys):
    """Run a script's command line in-process, exactly as its __main__ does
    (utils.run_cli), from the current folder; faster than a subprocess."""
    import importlib

    def run(script, *argv):
        module = importlib.import_module(script.removesuffix(".py"))
        capsys.readouterr()
        try:
            utils.run_cli(module.main, module.get_args_parser(), list(argv))
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
        return Result(code, capsys.readouterr().err)
    return run


def assert_one_line_error(result, message):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr


# ---------------------------------------------------------------- the catalogue

def write_features(root, name, drop=None):
    """A folder of fake decision-level features shaped like train.py --features output."""
    for split, part in (("Training", "feat_train"), ("Validation", "feat_test")):
        folder = root / name / part
        folder.mkdir(parents=True)
        for annotation in sorted((root / "data" / split / "Annotations").iterdir()):
            if annotation.stem == drop:
                continue
            rows = math.ceil((len(annotation.read_text().splitlines()) - 1) / 25)
            np.save(folder / f"{annotation.stem}.npy", np.random.default_rng(0).standard_normal(
                (rows, 4)).astype(np.float32))


@pytest.fixture
def trained(in_tmp):
    """A one-epoch audio model in ./m."""
    run_train("--epochs", "1", "--mods", "audio", "--model_dir", "m")
    return in_tmp


def checkpoint_cases():
    def other_dims(root):
        state = torch.load(root / "m" / "best.save", weights_only=True)
        state["model"]["embed_audio.1.weight"] = torch.zeros(128, 5)
        state["config"]["input_dims"]["audio"] = 5
        torch.save(state, root / "m" / "best.save")

    def truncated(root):
        data = (root / "m" / "best.save").read_bytes()
        (root / "m" / "best.save").write_bytes(data[:len(data) // 2])

    def pickled_code(root):
        torch.save({"model": os.system}, root / "m" / "best.save")

    base = ["train.py", "--model_dir", "m", "--test", "--pred_dir", "out"]
    return [
        ("checkpoint for other modalities", None, base + ["--mods", "audio,text"],
         "was trained on --mods audio, not audio,text: run with --mods audio"),
        ("checkpoint for other dimensions", other_dims, base + ["--mods", "audio"],
         "expects 5-d audio features but the data has 24"),
        ("truncated checkpoint", truncated, base + ["--mods", "audio"],
         "m/best.save (" ),
        ("checkpoint that would run pickled code", pickled_code, base + ["--mods", "audio"],
         "not a weights-only PyTorch file"),
    ]


@pytest.mark.parametrize("description,damage,message", bad_input_cases(),
                         ids=[case[0] for case in bad_input_cases()])
def test_bad_data_through_train_py(in_tmp, command, description, damage, message):
    damage(in_tmp / "data" / "Training")
    result = command("train.py", "--mods", "audio,text", "--epochs", "1", "--model_dir", "out")
    assert_one_line_error(result, message)
    assert not (in_tmp / "out").exists()


@pytest.mark.parametrize("description,damage,argv,message", checkpoint_cases(),
                         ids=[case[0] for case in checkpoint_cases()])
def test_bad_checkpoints(trained, command, description, damage, argv, message):
    if damage:
        damage(trained)
    result = command(*argv)
    assert_one_line_error(result, message)
    assert not (trained / "out").exists()


@pytest.mark.parametrize("argv,message", [
    (["train.py", "--mods", "audio,smell"], "unknown modality smell in --mods"),
    (["train.py", "--mods", "audio", "--test_set", "9"], "--test_set: story 9 is not in the data"),
    (["train.py", "--mods", "audio", "--subjects", "8"], "--subjects: subject 8 is not in the data"),
    (["train.py", "--mods", "audio", "--split", "100"], "--split 100 is larger than"),
    (["train.py", "--mods", "audio", "--epochs", "0"], "--epochs must be at least 1"),
    (["train.py", "--mods", "audio", "--model_dir", "/proc/version/out"], "cannot write to"),
    (["train.py", "--mods", "audio", "--model_dir", "data/Training/Annotations/"
      "Subject_1_Story_2.csv/out"], "is inside a split folder's Annotations"),
    (["crossval.py", "--mods", "audio", "--epochs", "0", "--out_dir", "out"],
     "--epochs must be at least 1"),
    (["personalize.py", "--mods", "audio", "--out_dir", "out"], "out/init.save does not exist"),
    (["make_data.py", "--dims", "1,2", "--out_dir", "out"], "--dims 1,2: give four positive sizes"),
    (["score.py", "data/Validation/Annotations", "nowhere"], "folder nowhere does not exist"),
])
def test_bad_flags(in_tmp, command, argv, message):
    before = files_under(in_tmp)
    result = command(*argv)
    assert_one_line_error(result, message)
    assert files_under(in_tmp) == before  # no output folder, no args.json, nothing


def test_unsaved_test_epoch(in_tmp, command):
    command("crossval.py", "--mods", "audio", "--epochs", "2", "--save_freq", "2",
            "--stories", "1", "2", "--out_dir", "cv")
    before = files_under(in_tmp / "cv")
    result = command("crossval.py", "--mods", "audio", "--stories", "1", "2", "--out_dir", "cv",
                     "--test", "--test_epoch", "7")
    assert_one_line_error(result, "cv/val_on_1/epoch_7.save does not exist (saved epochs: 2)")
    assert files_under(in_tmp / "cv") == before


def test_fusion_folders_with_different_videos(in_tmp, command):
    write_features(in_tmp, "feat_A")
    write_features(in_tmp, "feat_B", drop="Subject_2_Story_4")
    result = command("fusion.py", "feat_A", "feat_B", "--pred_dir", "out")
    assert_one_line_error(result, "Subject_2_Story_4")
    assert not (in_tmp / "out").exists()


def test_cv_fusion_folds_missing_features(in_tmp, command):
    for story in (1, 2):
        (in_tmp / "cv" / f"val_on_{story}").mkdir(parents=True)
    result = command("cv_fusion.py", "cv", "--out_dir", "out")
    assert_one_line_error(result, "feat_train")
    assert not (in_tmp / "out").exists()


# ---------------------------------------------------------------- interruption

def start_training(root, model_dir, epochs):
    """train.py in a process of its own, on one intra-op thread (see one_thread)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--mods", "audio", "--model_dir", model_dir,
         "--epochs", str(epochs), "--save_freq", "1000", "--lr", "1e-3"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


@contextlib.contextmanager
def one_thread():
    """Float sums depend on how a product is split among threads, and a math library
    may use fewer threads than asked on a busy machine; with one thread nothing can
    vary, so runs compare bit for bit on any CPU, loaded or quiet."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def wait_for_epochs(root, model_dir, count, process):
    """Until `process` has written more than `count` epochs to <model_dir>/metrics.csv."""
    metrics = root / model_dir / "metrics.csv"

    def reached():
        assert process.poll() is None, f"training ended early: {process.communicate()[1][-2000:]}"
        return metrics.is_file() and len(metrics.read_text().splitlines()) > count
    wait_until(reached, root)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_killed_run_resumes_as_if_never_interrupted(in_tmp, signum):
    process = start_training(in_tmp, "cut", 500)
    wait_for_epochs(in_tmp, "cut", 3, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "run the same command with --resume" in stderr and "Traceback" not in stderr
    saved = torch.load(in_tmp / "cut" / "last.save", weights_only=True)
    stopped_at = saved["epoch"]
    assert pd.read_csv(in_tmp / "cut" / "metrics.csv")["epoch"].max() == stopped_at
    assert not list((in_tmp / "cut").glob(".*.tmp"))   # no half-written file left

    total = stopped_at + 3
    with one_thread():
        run_train("--mods", "audio", "--model_dir", "cut", "--epochs", str(total),
                  "--save_freq", "1000", "--lr", "1e-3", "--resume")
        run_train("--mods", "audio", "--model_dir", "whole", "--epochs", str(total),
                  "--save_freq", "1000", "--lr", "1e-3")
    pd.testing.assert_frame_equal(pd.read_csv(in_tmp / "cut" / "metrics.csv"),
                                  pd.read_csv(in_tmp / "whole" / "metrics.csv"))
    assert_same_checkpoints(in_tmp / "cut", in_tmp / "whole", ["last.save", "best.save"])


def test_a_real_command_prints_one_line_without_traceback(in_tmp):
    (in_tmp / "data" / "Training" / "CombinedText" / "Subject_3_Story_5.npy").unlink()
    result = run_script("crossval.py", "--mods", "audio,text", "--out_dir", "out", cwd=in_tmp)
    assert result.stderr.count("\n") == 1
    assert_one_line_error(result, "CombinedText lacks Subject_3_Story_5")
    assert not (in_tmp / "out").exists()


def test_same_arguments_give_byte_identical_predictions(in_tmp):
    for name in ("a", "b"):
        run_train("--epochs", "2", "--mods", "audio,text", "--model_dir", name)
        run_train("--mods", "audio,text", "--model_dir", name, "--pred_dir", f"p{name}", "--test")
    for path in sorted((in_tmp / "pa" / "pred_test").iterdir()):
        assert path.read_bytes() == (in_tmp / "pb" / "pred_test" / path.name).read_bytes()


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "result.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with utils.atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_training_clears_what_a_killed_write_left(in_tmp):
    # SIGKILL skips atomic_path's cleanup, as when a cluster worker is lost mid-save.
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys, utils\n"
         "with utils.atomic_path(sys.argv[1]) as temporary:\n"
         "    temporary.write_bytes(b'half')\n"
         "    os.kill(os.getpid(), signal.SIGKILL)", "run/best.save"],
        cwd=in_tmp, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -signal.SIGKILL
    leftover, = (in_tmp / "run").glob(".best.save.*.tmp")
    (in_tmp / "run" / ".notes.tmp").write_text("the user's own")

    run_train("--epochs", "2", "--mods", "audio", "--model_dir", "run")
    assert not leftover.exists() and (in_tmp / "run" / ".notes.tmp").is_file()
    assert (in_tmp / "run" / "best.save").is_file()


def test_only_the_named_files_temporaries_are_removed(tmp_path):
    names = [".a.csv.k3x_9q0z.tmp", ".b.csv.0123abcd.tmp", ".a.csv.tmp", "a.csv.k3x_9q0z.tmp"]
    for name in names:
        (tmp_path / name).write_text("")
    utils.remove_interrupted_writes(tmp_path, {"a.csv"})  # b.csv may be another fold's
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names[1:])
    utils.remove_interrupted_writes(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names[2:])


def test_written_files_get_ordinary_permissions(tmp_path):
    """As open() would make them: 0666 less the umask in force when they are written."""
    for umask, expected in ((0o022, 0o644), (0o027, 0o640)):
        previous = os.umask(umask)
        try:
            utils.write_json({"a": 1}, tmp_path / f"args_{umask:o}.json")
        finally:
            os.umask(previous)
        assert (tmp_path / f"args_{umask:o}.json").stat().st_mode & 0o777 == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_reused_heap_stops_page_faults_and_gives_memory_back():
    import resource

    def faults_per_big_block(repeats=20):
        faults = []
        for _ in range(repeats):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.ones(48 * 2**20 // 4)  # 48 MiB, above glibc's largest mmap threshold
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return faults

    def resident_mib():
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    pages = 48 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert all(faults > 0.9 * pages for faults in faults_per_big_block())  # mapped afresh each time
    with engine.reused_heap():
        reused = [faults < 0.1 * pages for faults in faults_per_big_block()]
        held = resident_mib()
    assert sum(reused) >= 10  # mostly served again from the heap, no page faults
    assert resident_mib() < held - 40  # the free heap went back to the system
