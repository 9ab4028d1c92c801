"""The model families of `--model` beside the guide's LSTM (issue 25): gru, tcn and
transformer. Each trains, resumes, predicts, extracts features and loads through the
scripts; none lets padding change a valid step; each runs in bfloat16 autocast."""
import json
import shutil

import numpy as np
import pytest
import torch

import crossval
import cv_epochs
import personalize
from empathy import checkpoints, families, models, precision
import train
from empathy.utils import ToolkitError

DIMS = {"audio": 5, "text": 3}
# Small sizes through each family's own flags, and the flag a --resume must keep.
SIZES = {
    "gru": (["--hidden_dim", 16, "--dropout", 0.2], ("--dropout", 0.3)),
    "tcn": (["--tcn_channels", 16, "--tcn_blocks", 2], ("--tcn_channels", 8)),
    "transformer": (["--transformer_dim", 16, "--transformer_heads", 2, "--transformer_ff", 32,
                     "--attn_window", 5], ("--attn_window", 0)),
}
SMALL = {  # the same sizes as constructor options
    "gru": dict(hidden_dim=16, dropout=0.2),
    "tcn": dict(channels=16, num_blocks=2),
    "transformer": dict(model_dim=16, num_heads=2, ff_dim=32, attn_window=5),
}
FAMILIES = list(SIZES)


def run(module, *argv):
    """A script's main in this process; a refusal raises its ToolkitError."""
    argv = ["--mods", "audio,text", "--ledger", "none", *map(str, argv)]
    return module.main(module.get_args_parser().parse_args(argv))


def random_inputs(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {mod: torch.randn(sum(lengths), dim, generator=generator) for mod, dim in DIMS.items()}


def test_every_family_is_registered_with_its_flags():
    assert list(families.FAMILIES) == ["lstm", "gru", "tcn", "transformer"]
    assert [families.family(name).network for name in families.FAMILIES] == [
        models.FusionLSTM, models.FusionGRU, models.TemporalConvNet, models.FusionTransformer]
    args = train.get_args_parser().parse_args(["--model", "tcn", "--tcn_kernel", "5"])
    assert families.options_from_args("tcn", args) == {"channels": 128, "kernel": 5, "num_blocks": 4}
    # --layers, --hidden_dim, --dropout and --bidirectional are the LSTM's and the GRU's,
    # declared once; their defaults build the guide's model.
    assert families.family("gru").flags == families.family("lstm").flags
    defaults = train.get_args_parser().parse_args([])
    assert families.options_from_args("lstm", defaults) == {
        "num_layers": 1, "hidden_dim": 512, "dropout": 0.0, "bidirectional": False}


def test_recurrent_dropout_acts_in_training_only_and_old_checkpoints_load_without_it():
    torch.manual_seed(0)
    plain = models.create("lstm", DIMS, hidden_dim=16)
    model = models.from_config({**plain.config, "dropout": 0.5})
    model.load_state_dict(plain.state_dict())
    lengths, inputs = torch.tensor([9]), random_inputs([9])
    outputs = []
    for network in (plain, model):  # the same input dropout masks: only the states' differ
        torch.manual_seed(1)
        outputs.append(network.train()(inputs, lengths))
    assert not torch.equal(*outputs)
    assert torch.equal(plain.eval()(inputs, lengths), model.eval()(inputs, lengths))
    assert model.config["dropout"] == 0.5
    # A configuration saved before --dropout existed has no key: it loads without dropout.
    old = {key: value for key, value in model.config.items() if key != "dropout"}
    assert models.from_config(old).config["dropout"] == 0.0
    with pytest.raises(ToolkitError, match="--dropout must be at most 0.9, got 1.0"):
        families.check_options("gru", {"dropout": 1.0})
    with pytest.raises(ToolkitError, match="--hidden_dim must be at least 1, got 0"):
        families.check_options("lstm", {"hidden_dim": 0})


@pytest.mark.parametrize("family", FAMILIES)
def test_train_resume_test_features_and_load(in_tmp, family):
    sizes, (other_flag, other_value) = SIZES[family]
    run(train, "--model", family, *sizes, "--epochs", 2, "--model_dir", "m")
    saved = torch.load(in_tmp / "m" / "best.save", weights_only=True)
    assert saved["config"]["family"] == family
    assert json.loads((in_tmp / "m" / "args.json").read_text())["model"] == family

    run(train, "--model", family, *sizes, "--epochs", 3, "--model_dir", "m", "--resume")
    assert checkpoints.load_checkpoint(in_tmp / "m" / "last.save")["epoch"] == 3
    changed = [*sizes, other_flag, other_value]
    with pytest.raises(ToolkitError, match=f"was trained with {other_flag} "):
        run(train, "--model", family, *changed, "--epochs", 4, "--model_dir", "m", "--resume")

    run(train, "--model_dir", "m", "--test", "--pred_dir", "p", "--features", "--feat_dir", "f")
    assert len(list((in_tmp / "p" / "pred_test").glob("*.csv"))) == 3
    features = sorted((in_tmp / "f" / "feat_test").glob("*.npy"))
    assert len(features) == 3 and all(np.load(path).shape[1] == 128 for path in features)

    loaded, _ = checkpoints.load_model(in_tmp / "m" / "best.save", ["audio", "text"],
                                       {"audio": 24, "text": 16})
    assert type(loaded) is families.family(family).network and loaded.config == saved["config"]


@pytest.mark.parametrize("family, options", [
    *SMALL.items(), ("gru", dict(hidden_dim=16, bidirectional=True)),
    ("transformer", dict(SMALL["transformer"], attn_window=0))])
def test_padding_never_changes_a_valid_step(family, options):
    """A video predicts the same alone and batched with a longer one."""
    torch.manual_seed(0)
    model = models.create(family, DIMS, **options).eval()
    lengths = torch.tensor([7, 12])
    inputs = random_inputs(lengths.tolist())
    with torch.no_grad():
        together, features = model.forward_embedded(model.embed(inputs), lengths,
                                                    with_features=True)
        alone = [model.forward_embedded(model.embed({mod: rows[start:end] for mod, rows
                                                     in inputs.items()}),
                                        torch.tensor([end - start]), with_features=True)
                 for start, end in ((0, 7), (7, 19))]
    torch.testing.assert_close(together, torch.cat([piece[0] for piece in alone]),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(features, torch.cat([piece[1] for piece in alone]),
                               rtol=0, atol=1e-5)
    assert features.shape == (19, 128)


@pytest.mark.parametrize("family", FAMILIES)
def test_configuration_round_trip_and_bf16_autocast(family):
    torch.manual_seed(0)
    model = models.create(family, DIMS, **SMALL[family])
    rebuilt = models.from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config == model.config and type(rebuilt) is type(model)

    lengths = torch.tensor([9, 4])
    inputs = random_inputs(lengths.tolist())
    with precision.autocast("bf16", "cpu"):
        predictions = model(inputs, lengths)
    predictions.float().sum().backward()
    assert predictions.shape == (13,) and torch.isfinite(predictions.float()).all()
    assert all(torch.isfinite(parameter.grad).all() for parameter in model.parameters()
               if parameter.grad is not None)


def steps_reached(model, steps=80):
    """The last step whose prediction a change of the first step's inputs moves."""
    inputs = random_inputs([steps])
    changed = {mod: rows.clone() for mod, rows in inputs.items()}
    changed["audio"][0] += 1.0
    with torch.no_grad():
        moved = model.eval()(inputs, torch.tensor([steps])) != model(changed, torch.tensor([steps]))
    return int(moved.nonzero().max())


def test_tcn_sees_30_seconds_each_way():
    model = models.create("tcn", DIMS)  # the default sizes
    assert model.receptive_field == 61
    assert steps_reached(model) == 30


def test_transformer_attends_within_its_window():
    window = dict(model_dim=16, num_heads=2, ff_dim=32, num_layers=1)
    assert steps_reached(models.create("transformer", DIMS, **window, attn_window=4)) == 4
    assert steps_reached(models.create("transformer", DIMS, **window, attn_window=0)) == 79


def test_sizes_that_do_not_fit_are_refused_before_writing(in_tmp):
    with pytest.raises(ToolkitError, match=r"--transformer_dim \(30\) must be a multiple of "
                                           r"--transformer_heads \(4\)"):
        run(train, "--model", "transformer", "--transformer_dim", 30, "--model_dir", "m")
    with pytest.raises(ToolkitError, match="--tcn_kernel must be at least 2, got 1"):
        run(train, "--model", "tcn", "--tcn_kernel", 1, "--model_dir", "m")
    assert not (in_tmp / "m").exists()


def test_crossval_cv_epochs_and_personalize_from_a_tcn(in_tmp):
    sizes = SIZES["tcn"][0]
    table = run(crossval, "--model", "tcn", *sizes, "--epochs", 1, "--save_freq", 1,
                "--stories", 1, 2, "--jobs", 2, "--out_dir", "cv")
    assert [str(story) for story in table["story"][:2]] == ["1", "2"]
    assert table["val_ccc"].notna().all()
    _, best_epoch = run(cv_epochs, "--out_dir", "cv", "--epoch_min", 1, "--epoch_max", 1,
                        "--stories", 1, 2)
    assert best_epoch == 1

    (in_tmp / "p").mkdir()
    shutil.copy(in_tmp / "cv" / "val_on_1" / "best.save", in_tmp / "p" / "init.save")
    table = run(personalize, "--out_dir", "p", "--epochs", 1, "--subjects", 1)
    assert table["subject"].tolist() == [1, "Mean"]
    tuned = torch.load(in_tmp / "p" / "subject_1" / "last.save", weights_only=True)
    assert tuned["config"]["family"] == "tcn" and tuned["config"]["channels"] == 16


def test_seeds_of_a_transformer_average(in_tmp, capsys):
    run(train, "--model", "transformer", *SIZES["transformer"][0], "--epochs", 1, "--seeds", 2,
        "--model_dir", "m")
    for seed in (1, 2):
        assert torch.load(in_tmp / "m" / f"seed_{seed}" / "best.save",
                          weights_only=True)["config"]["family"] == "transformer"
    run(train, "--model_dir", "m", "--test", "--pred_dir", "p")
    assert "over 2 seeds" in capsys.readouterr().out
    assert len(list((in_tmp / "p" / "pred_test").glob("*.csv"))) == 3
