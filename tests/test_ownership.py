"""A run owns its output folder, never writes into the data, resumes only what it
can continue, loses no metrics row to a kill, and stops its workers on a signal."""
import shutil
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

import crossval
from empathy import checkpoints, layout
import train
from conftest import ROOT
from test_reliability import assert_one_line_error, command, files_under, wait_for_epochs  # noqa: F401

TRAIN = ["--mods", "audio", "--epochs", "2", "--save_freq", "1", "--model_dir", "m"]


def test_a_folder_in_use_by_another_run_is_refused_and_left_alone(in_tmp, command):
    (in_tmp / "m").mkdir()
    with layout.owned(in_tmp / "m"):  # as a run in progress holds it (flock is per open file)
        result = command("train.py", *TRAIN)
    assert_one_line_error(result, "m is in use by a run in progress (pid ")
    assert files_under(in_tmp / "m") == [".lock"]
    assert command("train.py", *TRAIN).returncode == 0  # released: the folder is free again


def test_outputs_never_go_into_the_data(in_tmp, command):
    annotations = in_tmp / "data" / "Validation" / "Annotations"
    before = {path.name: path.read_bytes() for path in annotations.iterdir()}
    command("train.py", "--mods", "audio", "--epochs", "1", "--model_dir", "m")
    command("train.py", "--mods", "audio", "--model_dir", "m", "--feat_dir", "f", "--features")
    result = command("fusion.py", "f", "--pred_dir", str(annotations))
    assert_one_line_error(result, "is inside a split folder's Annotations")
    result = command("fusion.py", "f", "--pred_dir", "out", "--model_path",
                     str(annotations / "Subject_1_Story_1.csv"))
    assert_one_line_error(result, "exists and is not a fusion model (.joblib)")
    result = command("train.py", "--mods", "audio", "--model_dir", "m", "--test",
                     "--pred_dir", str(annotations / "p"))
    assert_one_line_error(result, "--pred_dir")
    assert {path.name: path.read_bytes() for path in annotations.iterdir()} == before
    assert not (in_tmp / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0.5"], "was trained with --lr 1e-05, not 0.5"),
    (["--normalize"], "was trained without --normalize"),
    (["--label_delay", "2"], "was trained with --label_delay 0.0, not 2.0"),
    (["--mods", "audio,text"], "was trained on --mods audio, not audio,text"),
])
def test_resume_refuses_other_settings_before_writing(in_tmp, command, flags, message):
    assert command("train.py", *TRAIN).returncode == 0
    before = {name: (in_tmp / "m" / name).read_bytes() for name in files_under(in_tmp / "m")}
    result = command("train.py", *TRAIN, "--resume", "--epochs", "4", *flags)
    assert_one_line_error(result, message)
    assert {name: (in_tmp / "m" / name).read_bytes() for name in files_under(in_tmp / "m")} == before


def test_resume_refuses_a_corrupt_metrics_file(in_tmp, command):
    assert command("train.py", *TRAIN).returncode == 0
    (in_tmp / "m" / "metrics.csv").write_bytes(b"\x89PNG\x00\xff garbage")
    result = command("train.py", *TRAIN, "--resume", "--epochs", "4")
    assert_one_line_error(result, "m/metrics.csv cannot be read")


def test_crossval_resume_refuses_normalize_added_later(in_tmp, command):
    folds = ["--mods", "audio", "--stories", "1", "2", "--epochs", "1", "--save_freq", "1",
             "--out_dir", "cv"]
    assert command("crossval.py", *folds).returncode == 0
    args_json = (in_tmp / "cv" / "args.json").read_bytes()
    result = command("crossval.py", *folds, "--resume", "--epochs", "2", "--normalize")
    assert_one_line_error(result, "val_on_1/last.save was trained without --normalize")
    assert (in_tmp / "cv" / "args.json").read_bytes() == args_json


def test_a_kill_between_metrics_and_checkpoint_loses_no_row(in_tmp, monkeypatch):
    """metrics.csv is written before the epoch's checkpoints: a kill in between leaves
    a row that --resume drops and trains again, never a hole."""
    def run(*extra):
        train.main(train.get_args_parser().parse_args(
            ["--mods", "audio", "--epochs", "4", "--save_freq", "1", "--lr", "1e-3", *extra]))

    run("--model_dir", "whole")
    real_save = checkpoints.save_checkpoint

    def killed_at_epoch_3(path, checkpoint):
        if checkpoint["epoch"] == 3 and path.name == layout.LAST:
            raise KeyboardInterrupt  # as SIGKILL would, between the two writes
        real_save(path, checkpoint)
    monkeypatch.setattr(checkpoints, "save_checkpoint", killed_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run("--model_dir", "cut")
    assert pd.read_csv(in_tmp / "cut" / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    run("--model_dir", "cut", "--resume")
    pd.testing.assert_frame_equal(pd.read_csv(in_tmp / "cut" / "metrics.csv"),
                                  pd.read_csv(in_tmp / "whole" / "metrics.csv"))


def test_sigterm_to_the_parent_stops_every_worker_at_an_epoch_end(in_tmp):
    base = [sys.executable, str(ROOT / "crossval.py"), "--mods", "audio", "--stories", "1", "2",
            "--jobs", "2", "--out_dir", "cv"]
    process = subprocess.Popen([*base, "--epochs", "100000", "--save_freq", "100000"],
                               cwd=in_tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        for fold in ("val_on_1", "val_on_2"):
            wait_for_epochs(in_tmp, f"cv/{fold}", 2, process)
        process.send_signal(signal.SIGTERM)  # to the parent alone, as `kill PID` does
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.count("run the same command with --resume") == 2
    for fold in ("val_on_1", "val_on_2"):  # each worker saved the epoch it ended on
        saved = torch.load(in_tmp / "cv" / fold / "last.save", weights_only=True)["epoch"]
        assert pd.read_csv(in_tmp / "cv" / fold / "metrics.csv")["epoch"].max() == saved < 100000
    resumed = crossval.main(crossval.get_args_parser().parse_args(
        [*base[2:-4], "--out_dir", "cv", "--epochs", "3", "--save_freq", "100000", "--resume"]))
    assert list(resumed["story"][:2]) == [1, 2]  # both folds go on from where they stopped


def test_a_malformed_scheduler_address_is_one_line(in_tmp):
    result = subprocess.run([sys.executable, str(ROOT / "crossval.py"), "--mods", "audio",
                             "--out_dir", "cv", "--scheduler", "garbage"],
                            cwd=in_tmp, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == ("error: --scheduler garbage is not a scheduler address: give "
                             "PROTOCOL://HOST:PORT, e.g. tcp://10.0.0.5:8786\n")
    assert not (in_tmp / "cv").exists()


@pytest.mark.parametrize("script, flags, message", [
    ("train.py", ["--split", "500", "--model_dir", "out"], "--split 500 is larger than"),
    ("train.py", ["--label_delay", "400", "--model_dir", "out"], "--label_delay of 400 s"),
    ("crossval.py", ["--split", "500", "--out_dir", "out"], "--split 500 is larger than"),
    ("crossval.py", ["--jobs", "0", "--out_dir", "out"], "--jobs must be at least 1"),
    ("crossval.py", ["--smooth", "nan", "--out_dir", "out"], "--smooth must be a number"),
    ("personalize.py", ["--split", "500", "--out_dir", "out"], "--split 500 is larger than"),
    ("personalize.py", ["--out_dir", "out"], "was trained on --mods audio,text, not audio"),
])
def test_checks_that_need_the_data_run_before_anything_is_written(in_tmp, command, script,
                                                                   flags, message):
    (in_tmp / "out").mkdir()
    if script == "personalize.py":
        shutil.copy(make_init(in_tmp, "audio,text" if "--split" not in flags else "audio"),
                    in_tmp / "out" / "init.save")
    before = files_under(in_tmp / "out")
    result = command(script, "--mods", "audio", "--epochs", "1", *flags)
    assert_one_line_error(result, message)
    assert files_under(in_tmp / "out") == before


def make_init(root, mods):
    folder = root / f"init_{mods.replace(',', '_')}"
    train.main(train.get_args_parser().parse_args(
        ["--mods", mods, "--epochs", "1", "--model_dir", str(folder), "--ledger", "none"]))
    return folder / "best.save"


@pytest.mark.parametrize("script, argv", [
    ("make_data.py", ["--out_dir", "small"]),
    ("train.py", ["--mods", "audio", "--epochs", "1", "--model_dir", "m", "--ledger", "none"]),
])
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(in_tmp, script, argv):
    """As `ulimit -f` makes it: every write past 64 KiB fails (EFBIG), as on a full disk."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    result = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=in_tmp,
                            capture_output=True, text=True, timeout=120,
                            preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot write ")
    assert "Traceback" not in result.stderr and "free space" in result.stderr
    assert not list(in_tmp.rglob("*.tmp"))  # the atomic writes cleaned up after themselves


def test_a_run_that_died_before_its_first_last_save_is_not_trained_over(in_tmp, command):
    assert command("train.py", "--mods", "audio", "--epochs", "2", "--model_dir", "m").returncode == 0
    (in_tmp / "m" / "last.save").unlink()  # as when killed before --save_freq epochs
    result = command("train.py", "--mods", "audio", "--epochs", "2", "--model_dir", "m")
    assert_one_line_error(result, "m already holds a run")
    result = command("train.py", "--mods", "audio", "--epochs", "2", "--model_dir", "m",
                     "--resume")
    assert_one_line_error(result, "--resume: m/last.save does not exist")
    assert command("train.py", "--mods", "audio", "--epochs", "2", "--model_dir", "m",
                   "--overwrite").returncode == 0
