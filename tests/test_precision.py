"""--precision: fp32 exactly as before, bf16 autocast with float32 weights, fp16 only
on a GPU. This CPU may lack fast bfloat16, where the flag refuses bf16; the tests that
train in bf16 stand in a CPU that has it (precision.fast_bf16_cpu), and run slowly but
correctly on any CPU (see precision.autocast)."""
import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import crossval
import cv_epochs
import personalize
import train
from empathy import datasets, engine, models, options, precision, utils
from empathy.utils import ToolkitError

# bf16 keeps 8 bits of mantissa (relative error up to 2^-9 per rounding). Through the
# embeddings, the LSTM's 30 steps and the decoder, the tiny model's predictions (of
# order 0.1) differ from float32's by about 6e-4; the tolerance leaves 8x room.
BF16_ATOL = 5e-3


def run_train(*argv):
    return train.main(train.get_args_parser().parse_args(list(argv)))


@pytest.fixture
def fast_bf16(monkeypatch):
    monkeypatch.setattr(precision, "fast_bf16_cpu", lambda: True)


def old_train_one_epoch(model, optimizer, train_set, segments, batch_size, generator, device):
    """engine.train_one_epoch as it was before --precision, for the bit-for-bit check."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    for batch_indices in torch.randperm(len(segments), generator=generator).split(batch_size):
        batch = train_set.gather([segments[i] for i in batch_indices.tolist()], device)
        embedded = model.embed(batch.inputs)
        batch.inputs = None
        loss = utils.mse_loss(model.forward_embedded(embedded, batch.lengths), batch.targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_fp32_trains_and_predicts_bit_for_bit_as_before(tiny_data):
    train_set, val_set = datasets.load_train_test(tiny_data / "Training", tiny_data / "Validation",
                                               ["audio", "text"])
    segments = train_set.training_segments(5)
    # as old_train_one_epoch is called below: 5 pieces a video, 25 a batch, seed 1, mse
    training = engine.Training(train_set, options.TrainingSettings(lr=1e-3), "cpu")
    weights = []
    for current in (False, True):
        engine.seed_everything(1)
        model = models.create("lstm", train_set.input_dims)
        if current:
            engine.train_one_epoch(engine.TrainingRun(model, training))
        else:
            old_train_one_epoch(model, engine.build_optimizer(model, 1e-3, 5e-4), train_set,
                                segments, 25, torch.Generator().manual_seed(1), "cpu")
        weights.append(model.state_dict())
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0)

    with torch.no_grad():
        model.eval()
        lengths = torch.tensor([video.n_seconds for video in val_set.videos])
        inputs = val_set.gather(val_set.video_segments(), "cpu", with_targets=False).inputs
        before = model.forward_embedded(model.embed(inputs), lengths).numpy()
    now = np.concatenate(engine.predict(model, val_set, "cpu", precision="fp32"))
    np.testing.assert_array_equal(before, now)
    assert isinstance(precision.autocast("fp32", "cpu"), type(contextlib.nullcontext()))


def test_bf16_run_records_its_precision_and_its_float32_checkpoint_predicts_in_fp32(
        in_tmp, fast_bf16):
    run_train("--mods", "audio,text", "--epochs", "1", "--lr", "1e-3", "--model_dir", "m",
              "--precision", "bf16")
    assert json.loads(Path("m/args.json").read_text())["precision"] == "bf16"
    last = torch.load("m/last.save", weights_only=True)
    assert last["training"]["precision"] == "bf16"
    assert all(value.dtype == torch.float32 for value in last["model"].values())
    assert all(value.dtype == torch.float32 for state in last["optimizer"]["state"].values()
               for name, value in state.items() if name != "step")

    for name in ("fp32", "bf16"):
        run_train("--mods", "audio,text", "--model_dir", "m", "--test", "--pred_dir", name,
                  "--precision", name)
    written = {name: np.concatenate([np.loadtxt(path, skiprows=1) for path in
                                     sorted(Path(name, "pred_test").iterdir())])
               for name in ("fp32", "bf16")}
    assert not np.array_equal(written["fp32"], written["bf16"])  # bf16 did run in bf16
    np.testing.assert_allclose(written["bf16"], written["fp32"], rtol=0, atol=BF16_ATOL)


def test_fp16_on_the_cpu_is_refused_in_one_line(in_tmp, capsys):
    for argv in ([], ["--cuda"]):  # --cuda without a GPU falls back to the CPU
        if argv and torch.cuda.is_available():
            continue
        with pytest.raises(ToolkitError) as refusal:
            run_train("--mods", "audio,text", "--epochs", "1", "--precision", "fp16", *argv)
        assert "\n" not in str(refusal.value) and "--cuda" in str(refusal.value)
    assert not Path("models").exists()


def test_bf16_is_refused_in_one_line_on_a_cpu_without_fast_bfloat16(monkeypatch):
    monkeypatch.setattr(precision, "fast_bf16_cpu", lambda: False)
    with pytest.raises(ToolkitError) as refusal:
        precision.check_precision("bf16", "cpu")
    assert "\n" not in str(refusal.value) and "AVX512-BF16 or AMX" in str(refusal.value)
    precision.check_precision("fp32", "cpu")
    monkeypatch.setattr(precision, "fast_bf16_cpu", lambda: True)
    precision.check_precision("bf16", "cpu")


def test_fast_bfloat16_is_read_from_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set(cpuinfo.read_text().split())
    assert precision.fast_bf16_cpu() == bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("script", [crossval, cv_epochs, personalize])
def test_every_training_script_takes_the_flag_into_its_settings(script):
    parser = script.get_args_parser()
    assert parser.get_default("precision") == "fp32"
    args, _ = parser.parse_known_args(["--precision", "bf16"])
    assert options.TrainingSettings.from_args(args).precision == "bf16"
