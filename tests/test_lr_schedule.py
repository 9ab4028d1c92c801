"""--lr_schedule cosine: the rate of each epoch by its formula, the rate training
actually uses, an exact --resume, and the refusals (issue 33: a curve that does not
drift after its best epoch)."""
import json
import math

import pandas as pd
import pytest
import torch

from empathy import engine, options
from empathy.utils import ToolkitError
import train
from conftest import assert_same_checkpoints, killed_after_epoch, run_in_process


def run_train(*argv):
    argv = ["--mods", "audio", "--ledger", "none", "--lr", "1e-3", *map(str, argv)]
    return train.main(train.get_args_parser().parse_args(argv))


def test_cosine_falls_from_lr_by_half_a_cosine_and_constant_stays():
    cosine = options.TrainingSettings(epochs=4, lr=0.1, lr_schedule="cosine")
    rates = [cosine.epoch_lr(epoch) for epoch in range(1, 5)]
    expected = [0.1 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[0] == 0.1 and rates[2] == pytest.approx(0.05)  # half way: half the rate
    assert rates[-1] == pytest.approx(0.1 * (1 - math.sqrt(0.5)) / 2) and rates[-1] > 0
    constant = options.TrainingSettings(epochs=4, lr=0.1)
    assert [constant.epoch_lr(epoch) for epoch in range(1, 5)] == [0.1] * 4


def test_each_epoch_trains_at_its_scheduled_rate(in_tmp, monkeypatch):
    used = []
    train_one_epoch = engine.train_one_epoch

    def recording(run):
        used.append([group["lr"] for group in run.optimizer.param_groups])
        return train_one_epoch(run)
    monkeypatch.setattr(engine, "train_one_epoch", recording)
    run_train("--epochs", 3, "--lr_schedule", "cosine", "--model_dir", "cos")
    expected = [1e-3 * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(3)]
    assert [rates[0] for rates in used] == pytest.approx(expected, rel=1e-12)
    run_train("--epochs", 3, "--model_dir", "flat")
    assert [rates[0] for rates in used[3:]] == [1e-3] * 3
    # the rates change what is learnt: epoch 1 is the same, the later ones are not
    cosine = pd.read_csv(in_tmp / "cos" / "metrics.csv")
    flat = pd.read_csv(in_tmp / "flat" / "metrics.csv")
    assert cosine["train_loss"][0] == flat["train_loss"][0]
    assert cosine["val_ccc"].iloc[-1] != flat["val_ccc"].iloc[-1]
    assert json.loads((in_tmp / "cos" / "args.json").read_text())["lr_schedule"] == "cosine"
    saved = torch.load(in_tmp / "cos" / "last.save", weights_only=True)["training"]
    assert saved["lr_schedule"] == "cosine" and saved["epochs"] == 3


def test_a_killed_cosine_run_resumes_exactly_and_keeps_its_schedule(in_tmp, monkeypatch):
    flags = ["--epochs", 5, "--save_freq", 1, "--lr_schedule", "cosine", "--swa_start", 1]
    run_train(*flags, "--model_dir", "whole")
    with killed_after_epoch(monkeypatch, 2):
        run_train(*flags, "--model_dir", "cut")
    before = (in_tmp / "cut" / "last.save").read_bytes()
    with pytest.raises(ToolkitError, match=r"was trained with --lr_schedule cosine, not "
                                           r"--lr_schedule constant"):
        run_train("--epochs", 5, "--save_freq", 1, "--swa_start", 1, "--model_dir", "cut",
                  "--resume")
    # the rates of the epochs already trained follow from --epochs: it cannot change
    with pytest.raises(ToolkitError, match=r"was trained with --epochs 5 and --lr_schedule "
                                           r"cosine, not --epochs 8"):
        run_train(*flags, "--epochs", 8, "--model_dir", "cut", "--resume")
    assert (in_tmp / "cut" / "last.save").read_bytes() == before
    run_train(*flags, "--model_dir", "cut", "--resume")
    assert ((in_tmp / "cut" / "metrics.csv").read_bytes()
            == (in_tmp / "whole" / "metrics.csv").read_bytes())
    assert_same_checkpoints(in_tmp / "whole", in_tmp / "cut",
                            ["last.save", "epoch_5.save", "best.save"])


def test_a_run_from_before_the_flag_resumes_as_constant(in_tmp):
    run_train("--epochs", 2, "--save_freq", 1, "--model_dir", "old")
    path = in_tmp / "old" / "last.save"
    state = torch.load(path, weights_only=True)
    del state["training"]["lr_schedule"]  # a checkpoint saved before --lr_schedule existed
    torch.save(state, path)
    with pytest.raises(ToolkitError, match=r"--lr_schedule constant, not --lr_schedule cosine"):
        run_train("--epochs", 3, "--lr_schedule", "cosine", "--model_dir", "old", "--resume")
    run_train("--epochs", 3, "--model_dir", "old", "--resume")
    assert pd.read_csv(in_tmp / "old" / "metrics.csv")["epoch"].tolist() == [1, 2, 3]


@pytest.mark.parametrize("script", ["train.py", "crossval.py", "personalize.py", "tune.py"])
def test_an_unknown_schedule_is_one_line_before_any_write(in_tmp, script):
    out = {"train.py": ["--model_dir", "m"], "personalize.py": ["--out_dir", "m"],
           "crossval.py": ["--out_dir", "m"], "tune.py": ["--out_dir", "m"]}[script]
    result = run_in_process(script, "--mods", "audio", "--epochs", "3", "--ledger", "none",
                            *out, "--lr_schedule", "linear")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"{script}: error: argument --lr_schedule: invalid choice: 'linear' (choose from "
        "'constant', 'cosine')")
    assert not (in_tmp / "m").exists()
