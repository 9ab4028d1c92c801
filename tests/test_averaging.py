"""Averaging over epochs (issue 33): --ema, --swa_start and --average_last. The
arithmetic (EMA with decay 0 is the last weights, SWA the mean of the epochs'
weights, --average_last the mean of the epochs' predictions), what uses the
averaged weights, exact resumption, and the refusals."""
import numpy as np
import pandas as pd
import pytest
import torch

from empathy import checkpoints, datasets, engine, models
import train
from conftest import killed_after_epoch, run_in_process
from empathy.utils import ToolkitError

DIMS = {"audio": 24, "text": 16}
SIZES = {"lstm": [], "gru": ["--hidden_dim", "16"], "tcn": ["--tcn_channels", "16"],
         "transformer": ["--transformer_dim", "16", "--transformer_heads", "2",
                         "--transformer_ff", "32"]}


def run_train(*argv):
    argv = ["--mods", "audio,text", "--ledger", "none", "--lr", "1e-3", *map(str, argv)]
    return train.main(train.get_args_parser().parse_args(argv))


def weights(path, key="model"):
    return torch.load(path, weights_only=True)[key]


def assert_same_weights(first, second, atol=0.0):
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=atol)


def held_out_predictions(path, data_dir):
    """Per-second predictions of the validation videos by the model saved at `path`."""
    train_set, val_set = datasets.load_train_test(data_dir / "Training", data_dir / "Validation",
                                                  ["audio", "text"])
    trained = checkpoints.load_trained([path], train_set, False, "cpu")[0]
    return engine.predict(trained.network, val_set, "cpu"), val_set, trained


# ---------------------------------------------------------------- the arithmetic

def test_ema_updates_after_every_step_by_its_formula():
    model = torch.nn.Linear(3, 1)
    average = engine.WeightAverage(model, ema=0.75)
    steps = []
    for value in (1.0, 2.0, -4.0):
        with torch.no_grad():
            model.weight.fill_(value)
        average.after_step(model)
        steps.append(value)
    expected = steps[0]  # the first update copies, then average = 0.75 average + 0.25 weights
    for value in steps[1:]:
        expected = 0.75 * expected + 0.25 * value
    torch.testing.assert_close(average.network(model).weight, torch.full((1, 3), expected))
    assert average.n_averaged == 3
    average.after_epoch(model, 1)  # EMA is updated per step, not per epoch
    assert average.n_averaged == 3


def test_ema_with_decay_zero_is_the_last_weights(in_tmp):
    run_train("--epochs", 3, "--model_dir", "plain")
    run_train("--epochs", 3, "--model_dir", "ema0", "--ema", 0)
    for name in ("last.save", "best.save"):
        assert_same_weights(weights(in_tmp / "ema0" / name), weights(in_tmp / "plain" / name))
    pd.testing.assert_frame_equal(pd.read_csv(in_tmp / "plain" / "metrics.csv"),
                                  pd.read_csv(in_tmp / "ema0" / "metrics.csv"))


def test_swa_is_the_mean_of_the_epochs_weights(in_tmp):
    # Averaging never changes what is trained: the plain run's epochs are the SWA run's.
    run_train("--epochs", 4, "--model_dir", "plain", "--save_freq", 1)
    run_train("--epochs", 4, "--model_dir", "swa", "--swa_start", 2)
    epochs = [weights(in_tmp / "plain" / f"epoch_{epoch}.save") for epoch in (2, 3, 4)]
    mean = {name: torch.stack([epoch[name] for epoch in epochs]).mean(0) for name in epochs[0]}
    last = torch.load(in_tmp / "swa" / "last.save", weights_only=True)
    assert_same_weights(last["model"], mean, atol=1e-6)
    assert last["weight_average"] == {"n_averaged": 3}
    # last.save also holds the trained weights, from which --resume goes on
    assert_same_weights(last["trained_model"], weights(in_tmp / "plain" / "last.save"))
    pd.testing.assert_series_equal(pd.read_csv(in_tmp / "plain" / "metrics.csv")["train_loss"],
                                   pd.read_csv(in_tmp / "swa" / "metrics.csv")["train_loss"])


def test_average_last_is_the_mean_of_the_last_epochs_predictions(in_tmp):
    run_train("--epochs", 4, "--model_dir", "plain", "--save_freq", 1)
    summary = run_train("--epochs", 4, "--model_dir", "avg", "--average_last", 3,
                        "--eval_freq", 4, "--calibrate")[0]
    per_epoch = [held_out_predictions(in_tmp / "plain" / f"epoch_{epoch}.save", in_tmp / "data")
                 for epoch in (2, 3, 4)]
    mean = [np.mean(videos, axis=0) for videos in zip(*(p for p, _, _ in per_epoch))]
    for got, expected in zip(summary["predictions"], mean):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    _, val_set, trained = per_epoch[0]
    saved = engine.saved_postprocessing([trained], {"calibrate": True}, None)
    expected_ccc = engine.score_videos(val_set.videos, mean, saved)["ccc"]
    metrics = pd.read_csv(in_tmp / "avg" / "metrics.csv")
    # every epoch of the window is evaluated, whatever --eval_freq says
    assert metrics["val_ccc"].notna().tolist() == [False, True, True, True]
    assert metrics["val_ccc_average"].iloc[-1] == pytest.approx(expected_ccc, abs=1e-6)
    assert summary["last_ccc"] == pytest.approx(expected_ccc, abs=1e-6)
    assert summary["averaged_epochs"] == 3


# ---------------------------------------------------------------- what uses the average

@pytest.mark.parametrize("family", list(SIZES))
def test_every_family_validates_saves_and_predicts_with_the_average(in_tmp, family):
    run_train("--model", family, *SIZES[family], "--epochs", 2, "--model_dir", "m", "--ema", 0.5)
    last = torch.load(in_tmp / "m" / "last.save", weights_only=True)
    assert any(not torch.equal(last["model"][name], last["trained_model"][name])
               for name in last["model"])
    averaged, val_set, trained = held_out_predictions(in_tmp / "m" / "last.save", in_tmp / "data")
    # the validation CCC of metrics.csv is the averaged weights'
    ccc = engine.score_videos(val_set.videos, averaged)["ccc"]
    assert pd.read_csv(in_tmp / "m" / "metrics.csv")["val_ccc"].iloc[-1] == pytest.approx(ccc)
    network = models.from_config(last["config"])
    network.load_state_dict(last["trained_model"])
    assert not np.allclose(engine.predict(network, val_set, "cpu")[0], averaged[0])
    # --test and --features read "model": the average
    run_train("--model_dir", "m", "--load", "m/last.save", "--test", "--pred_dir", "p",
              "--features", "--feat_dir", "f")
    video = val_set.videos[0]
    written = pd.read_csv(in_tmp / "p" / "pred_test" / f"{video.name}.csv")["valence"]
    expected = engine.score_videos([video], averaged[:1])["frames"][0]
    np.testing.assert_allclose(written, expected, atol=1e-5)


# ---------------------------------------------------------------- resuming

def test_a_killed_run_resumes_exactly_with_its_averages(in_tmp, monkeypatch):
    flags = ["--epochs", 5, "--save_freq", 1, "--average_last", 3]
    run_train(*flags, "--ema", 0.8, "--model_dir", "whole")
    with killed_after_epoch(monkeypatch, 3):
        run_train(*flags, "--ema", 0.8, "--model_dir", "cut")
    with pytest.raises(ToolkitError, match=r"was trained with --ema 0.8, not --ema 0.9"):
        run_train(*flags, "--ema", 0.9, "--model_dir", "cut", "--resume")
    with pytest.raises(ToolkitError, match=r"was trained with --average_last 3, not no "):
        run_train("--epochs", 5, "--ema", 0.8, "--model_dir", "cut", "--resume")
    run_train(*flags, "--ema", 0.8, "--model_dir", "cut", "--resume")

    for name in ("metrics.csv", "epoch_5.save", "last.save", "best.save"):
        if name.endswith(".csv"):
            assert (in_tmp / "cut" / name).read_bytes() == (in_tmp / "whole" / name).read_bytes()
            continue
        cut = torch.load(in_tmp / "cut" / name, weights_only=True)
        whole = torch.load(in_tmp / "whole" / name, weights_only=True)
        for key in ("model", "trained_model"):
            if key in whole:
                assert_same_weights(cut[key], whole[key])
        assert cut.get("weight_average") == whole.get("weight_average")
        if "prediction_average" in whole:
            assert cut["prediction_average"]["count"] == whole["prediction_average"]["count"] == 3
            for a, b in zip(cut["prediction_average"]["sums"], whole["prediction_average"]["sums"]):
                assert torch.equal(a, b)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("flags, message", [
    (["--ema", "1"], "--ema must be at least 0 and below 1"),
    (["--ema", "nan"], "--ema must be at least 0 and below 1"),
    (["--ema", "-0.1"], "--ema must be at least 0 and below 1"),
    (["--swa_start", "0"], "--swa_start must be from 1 to --epochs (3)"),
    (["--swa_start", "4"], "--swa_start must be from 1 to --epochs (3)"),
    (["--average_last", "0"], "--average_last must be from 1 to --epochs (3)"),
    (["--average_last", "9"], "--average_last must be from 1 to --epochs (3)"),
    (["--ema", "0.9", "--swa_start", "2"], "--ema and --swa_start are two ways"),
    (["--average_last", "2", "--patience", "2"], "--average_last averages the last epochs"),
])
@pytest.mark.parametrize("script", ["train.py", "crossval.py"])
def test_bad_averaging_flags_are_one_line_before_any_write(in_tmp, flags, message, script):
    out = ["--model_dir", "m"] if script == "train.py" else ["--out_dir", "m"]
    result = run_in_process(script, "--mods", "audio", "--epochs", "3", "--ledger", "none",
                            *out, *flags)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {result.stderr.strip()[7:]}"
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not (in_tmp / "m").exists()


def test_test_of_last_save_writes_the_kept_average_for_its_validation_videos(in_tmp, capsys):
    summary = run_train("--epochs", 3, "--model_dir", "m", "--average_last", 2)[0]
    results = run_train("--model_dir", "m", "--load", "m/last.save", "--test", "--pred_dir", "p")
    assert "keeps the mean of its last 2 epochs' predictions" in capsys.readouterr().err
    assert results["test"]["ccc"] == pytest.approx(summary["last_ccc"], abs=1e-6)
    _, val_set, _ = held_out_predictions(in_tmp / "m" / "last.save", in_tmp / "data")
    video = val_set.videos[0]
    written = pd.read_csv(in_tmp / "p" / "pred_test" / f"{video.name}.csv")["valence"]
    expected = engine.score_videos([video], summary["predictions"][:1])["frames"][0]
    np.testing.assert_allclose(written, expected, atol=1e-5)
    # best.save keeps no average: it is the model of one epoch
    assert "prediction_average" not in torch.load(in_tmp / "m" / "best.save", weights_only=True)


def test_personalize_scores_the_average_of_its_last_epochs(tmp_path, monkeypatch):
    import personalize
    from conftest import write_tiny_data
    write_tiny_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    run_train("--epochs", 1, "--model_dir", "shared")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "init.save").write_bytes((tmp_path / "shared" / "best.save").read_bytes())
    fits = []
    fit = engine.fit

    def recorded_fit(*args, **kwargs):
        fits.append(fit(*args, **kwargs))
        return fits[-1]
    monkeypatch.setattr(engine, "fit", recorded_fit)
    argv = ["--mods", "audio,text", "--ledger", "none", "--out_dir", "p", "--lr", "1e-3",
            "--subjects", "1", "--epochs", "3", "--average_last", "2", "--ema", "0.5"]
    table = personalize.main(personalize.get_args_parser().parse_args(argv))
    after = table.set_index("subject").loc[1, "after_ccc"]
    # the subject's test videos scored on the mean of epochs 2-3's predictions
    assert fits[-1]["averaged_epochs"] == 2
    assert after == pytest.approx(fits[-1]["last_ccc"], abs=1e-6)
    last = torch.load(tmp_path / "p" / "subject_1" / "last.save", weights_only=True)
    assert last["training"]["ema"] == 0.5 and "trained_model" in last
