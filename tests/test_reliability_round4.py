"""Issue 36, the cases outside tune.py and the stop window: each ends in one `error:`
line before anything is written (a NaN dropout, a size flag of another family, an
anchor dropped without --inner_cv, flags that contradict the evaluated checkpoint,
an unwritable --tensorboard folder)."""
import shutil

import pytest

from conftest import run_in_process
from test_reliability_runs import assert_one_line_error

MODEL = ["--mods", "audio", "--epochs", "1", "--ledger", "none"]


def files_under(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.fixture(scope="module")
def trained(tiny_data_master, tmp_path_factory):
    """A folder holding data/, an lstm model m_lstm/ and a tcn model m_tcn/ (one epoch),
    and the crossval.py folds cv/ of an lstm."""
    root = tmp_path_factory.mktemp("round4")
    shutil.copytree(tiny_data_master, root / "data")
    for family in ("lstm", "tcn"):
        assert run_in_process("train.py", *MODEL, "--model", family, "--model_dir",
                              f"m_{family}", cwd=root).returncode == 0
    assert run_in_process("crossval.py", *MODEL, "--stories", "1", "2", "--out_dir", "cv",
                          cwd=root).returncode == 0
    return root


@pytest.fixture
def workspace(trained, tmp_path, monkeypatch):
    """A private copy of `trained`, as the current folder."""
    shutil.copytree(trained, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    return tmp_path / "w"


@pytest.mark.parametrize("flags, message", [
    (["--dropout", "nan"], "--dropout must be a number from 0.0 to 0.9, got nan"),
    (["--dropout", "inf"], "--dropout must be at most 0.9, got inf"),
    (["--model", "tcn", "--hidden_dim", "64", "--bidirectional"],
     "--hidden_dim 64 sizes --model lstm or gru, not tcn: leave it out, or give --model lstm"),
    (["--model", "tcn", "--bidirectional"], "--bidirectional sizes --model lstm or gru, not tcn"),
    (["--tcn_blocks", "3"], "--tcn_blocks 3 sizes --model tcn, not lstm"),
    (["--model", "gru", "--transformer_heads", "2"], "--transformer_heads 2 sizes --model "
                                                     "transformer, not gru"),
])
@pytest.mark.parametrize("script", ["train.py", "crossval.py"])
def test_model_flags_that_would_be_ignored_or_break_training_are_refused(workspace, script,
                                                                         flags, message):
    out = "--model_dir" if script == "train.py" else "--out_dir"
    result = run_in_process(script, *MODEL, "--stories", "1", "2", out, "new", *flags) \
        if script == "crossval.py" else run_in_process(script, *MODEL, out, "new", *flags)
    assert_one_line_error(result, message)
    assert not (workspace / "new").exists()


@pytest.mark.parametrize("model_dir, flags, message", [
    ("m_lstm", ["--model", "tcn"], "--model tcn contradicts m_lstm/best.save, which was trained "
                                   "with --model lstm: a saved model is evaluated as it was "
                                   "trained; leave out --model"),
    ("m_lstm", ["--hidden_dim", "64"], "--hidden_dim 64 contradicts m_lstm/best.save, whose "
                                       "model was trained with --hidden_dim 512"),
    ("m_lstm", ["--bidirectional"], "--bidirectional contradicts m_lstm/best.save, whose model "
                                    "was trained with no --bidirectional"),
    ("m_tcn", ["--layers", "2"], "--layers 2 sizes --model lstm, but m_tcn/best.save was "
                                 "trained with --model tcn"),
    ("m_tcn", ["--model", "tcn", "--tcn_channels", "32"],
     "--tcn_channels 32 contradicts m_tcn/best.save, whose model was trained with "
     "--tcn_channels 128"),
])
def test_test_refuses_model_flags_that_contradict_the_checkpoint(workspace, model_dir, flags,
                                                                  message):
    for extra in ([], ["--features", "--feat_dir", "f"]):
        result = run_in_process("train.py", *MODEL, "--model_dir", model_dir, "--test",
                                "--pred_dir", "p", *extra, *flags)
        assert_one_line_error(result, message)
        assert not (workspace / "p").exists() and not (workspace / "f").exists()
    # The same flags, agreeing with the checkpoint, or none: evaluated.
    family = "tcn" if model_dir == "m_tcn" else "lstm"
    result = run_in_process("train.py", *MODEL, "--model_dir", model_dir, "--model", family,
                            "--test", "--pred_dir", "p")
    assert result.returncode == 0, result.stderr


def test_crossval_test_refuses_another_family_than_its_folds(workspace):
    before = files_under(workspace / "cv")
    result = run_in_process("crossval.py", *MODEL, "--stories", "1", "2", "--out_dir", "cv",
                            "--test", "--model", "transformer")
    assert_one_line_error(result, "--model transformer contradicts cv/val_on_1/best.save, "
                                  "which was trained with --model lstm")
    assert files_under(workspace / "cv") == before


@pytest.mark.parametrize("flags, message", [
    (["--finetune", "adapter", "--anchor", "0", "0.1"],
     "--anchor 0.1 pulls the weights that fine-tuning updates toward init.save's: it applies "
     "to --finetune all and head, not adapter"),
    (["--finetune", "adapter", "--anchor", "0", "0.1", "--inner_cv"], "not adapter"),
    (["--finetune", "all", "adapter", "--anchor", "0.1"],
     "2 fine-tuning methods (all_anchor0.1, adapter): give one value per --finetune, --anchor, "
     "--mix, --mix_weighting, --ema and --swa_start, or add --inner_cv"),
    (["--anchor", "0", "0.1"], "2 fine-tuning methods (all, all_anchor0.1)"),
])
def test_several_fine_tuning_values_without_inner_cv_are_refused(workspace, flags, message):
    (workspace / "p").mkdir()
    shutil.copy(workspace / "m_lstm" / "best.save", workspace / "p" / "init.save")
    result = run_in_process("personalize.py", *MODEL, "--out_dir", "p", *flags)
    assert_one_line_error(result, message)
    assert files_under(workspace / "p") == ["init.save"]


def test_an_adapter_beside_anchored_methods_is_tried_without_an_anchor():
    import argparse
    from empathy import finetuning
    parser = argparse.ArgumentParser(parents=[finetuning.get_args_parser()])
    methods = finetuning.methods_from_args(parser.parse_args(
        ["--finetune", "all", "adapter", "--anchor", "0.1", "--inner_cv"]))
    assert [method.name for method in methods] == ["all_anchor0.1", "adapter"]


@pytest.mark.parametrize("script, out", [("train.py", "--model_dir"), ("crossval.py", "--out_dir"),
                                         ("train.py", "--tensorboard")])
def test_an_unwritable_folder_leaves_no_other_output_folder_behind(workspace, script, out):
    (workspace / "a_file").write_text("not a folder")
    bad, good = ("a_file/tb", "new") if out != "--tensorboard" else ("tb", "a_file/m")
    flags = ["--tensorboard", bad, out, good] if out != "--tensorboard" else \
        ["--tensorboard", bad, "--model_dir", good]
    before = files_under(workspace)
    result = run_in_process(script, *MODEL, "--stories", "1", "2", *flags) \
        if script == "crossval.py" else run_in_process(script, *MODEL, *flags)
    assert_one_line_error(result, "(Not a directory): choose a folder you can write to")
    assert files_under(workspace) == before  # neither folder was made


def test_a_nan_dropout_never_reaches_training():
    from empathy import families
    from empathy.utils import ToolkitError
    with pytest.raises(ToolkitError, match="--dropout must be a number from 0.0 to 0.9"):
        families.check_options("gru", {"dropout": float("nan")})


def test_a_lock_that_is_a_folder_is_one_line(workspace):
    (workspace / "new" / ".lock").mkdir(parents=True)
    result = run_in_process("train.py", *MODEL, "--model_dir", "new")
    assert_one_line_error(result, "new/.lock is a folder: runs keep their lock of new in a file "
                                  "there; move it away")
    assert files_under(workspace / "new") == [".lock"]
