"""The shape of the code (issue 24): the library apart from the scripts, small
functions, and a model family that is one class plus one registry entry."""
import ast
import json

import pytest
import torch
from torch import nn

from empathy import checkpoints, families, models
import train
from conftest import ROOT
from empathy.utils import ToolkitError

SCRIPTS = {"train", "crossval", "cv_epochs", "personalize", "fusion", "cv_fusion"}
DRIVERS = {"compare_options.py", "make_notebook.py"}  # they run scripts by design
PROJECT_FILES = sorted(ROOT.glob("*.py"))


def imported_modules(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", PROJECT_FILES, ids=lambda path: path.name)
def test_no_module_imports_a_script(path):
    if path.name in DRIVERS:
        return
    assert not imported_modules(path) & SCRIPTS, f"{path.name} imports a script"


@pytest.mark.parametrize("path", PROJECT_FILES, ids=lambda path: path.name)
def test_no_function_is_longer_than_a_screen(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert not long, f"{path.name}: {', '.join(long)}"


def test_thin_train_and_a_small_utils():
    assert len((ROOT / "train.py").read_text().splitlines()) <= 350
    assert len((ROOT / "utils.py").read_text().splitlines()) <= 420


# ---------------------------------------------------------------- a new model family

class MeanOverTime(nn.Module):
    """A family made for this test: embeddings averaged over a centred window, then a
    linear read-out. It offers exactly the interface of models.FusionLSTM."""

    def __init__(self, input_dims, window=3, width=8):
        super().__init__()
        self.input_dims, self.mods = dict(input_dims), list(input_dims)
        for mod, dim in self.input_dims.items():
            self.add_module(f"embed_{mod}", nn.Linear(dim, width))
        self.pool = nn.AvgPool1d(window, stride=1, padding=window // 2, count_include_pad=False)
        self.hidden = nn.Linear(width * len(self.mods), width)
        self.out = nn.Linear(width, 1)
        self.config = {"family": "mean", "mods": self.mods, "input_dims": self.input_dims,
                       "window": window, "width": width}

    @classmethod
    def from_config(cls, config):
        return cls(config["input_dims"], config["window"], config["width"])

    def embed(self, inputs):
        return torch.cat([getattr(self, f"embed_{mod}")(inputs[mod]) for mod in self.mods], -1)

    def forward_embedded(self, embedded, lengths, with_features=False):
        pieces = embedded.split(lengths.tolist())
        pooled = torch.cat([self.pool(piece.T[None])[0].T[:len(piece)] for piece in pieces])
        hidden = self.hidden(pooled)
        predictions = self.out(torch.relu(hidden)).squeeze(-1)
        return (predictions, hidden) if with_features else predictions

    def forward(self, inputs, lengths):
        return self.forward_embedded(self.embed(inputs), lengths)


@pytest.fixture
def mean_family(monkeypatch):
    """The registry with one more entry, which names the class and declares its flag: all
    that adding a family takes (here the class lives in this module, not models.py)."""
    window = families.ModelFlag("--window", "window", dict(type=int, default=3), minimum=1)
    monkeypatch.setitem(families.FAMILIES, "mean",
                        families.Family("MeanOverTime", (window,), module=__name__))


def run_train(*argv):
    """train.py's main in this process; a refusal raises its ToolkitError."""
    argv = ["--mods", "audio,text", "--lr", "1e-3", "--ledger", "none", *map(str, argv)]
    return train.main(train.get_args_parser().parse_args(argv))


def test_a_family_is_one_class_and_one_registry_entry(in_tmp, mean_family):
    run_train("--model", "mean", "--window", 5, "--epochs", 2, "--model_dir", "m")
    saved = torch.load(in_tmp / "m" / "best.save", weights_only=True)
    assert saved["config"]["family"] == "mean" and saved["config"]["window"] == 5
    assert json.loads((in_tmp / "m" / "args.json").read_text())["model"] == "mean"

    run_train("--model", "mean", "--window", 5, "--epochs", 3, "--model_dir", "m", "--resume")
    assert checkpoints.load_checkpoint(in_tmp / "m" / "last.save")["epoch"] == 3
    run_train("--model_dir", "m", "--test", "--pred_dir", "p", "--features", "--feat_dir", "f")
    assert len(list((in_tmp / "p" / "pred_test").glob("*.csv"))) == 3
    features = sorted((in_tmp / "f" / "feat_test").glob("*.npy"))
    assert len(features) == 3

    loaded, _ = checkpoints.load_model(in_tmp / "m" / "best.save", ["audio", "text"],
                                       {"audio": 24, "text": 16})
    assert isinstance(loaded, MeanOverTime) and loaded.config["window"] == 5


def test_resume_compares_the_saved_family_and_sizes(in_tmp, mean_family):
    run_train("--model", "mean", "--window", 5, "--epochs", 1, "--model_dir", "m")
    with pytest.raises(ToolkitError, match="was trained with --window 5, not 3"):
        run_train("--model", "mean", "--window", 3, "--epochs", 2, "--model_dir", "m", "--resume")
    with pytest.raises(ToolkitError, match="was trained with --model mean, not lstm"):
        run_train("--epochs", 2, "--model_dir", "m", "--resume")
    with pytest.raises(ToolkitError, match="--window must be at least 1, got 0"):
        run_train("--model", "mean", "--window", 0, "--model_dir", "n")
    assert not (in_tmp / "n").exists()


def test_a_checkpoint_of_an_unknown_family_is_refused_by_name(tmp_path):
    model = models.create("lstm", {"audio": 4}, hidden_dim=8)
    checkpoints.save_checkpoint(tmp_path / "x.save", {"model": model.state_dict(),
                                                      "config": {**model.config,
                                                                 "family": "mamba"}})
    with pytest.raises(ToolkitError, match="model family 'mamba' is not one this toolkit knows"):
        checkpoints.load_model(tmp_path / "x.save", ["audio"], {"audio": 4})


def test_checkpoints_that_name_no_family_hold_the_lstm(tmp_path):
    """Checkpoints of before the registry, and the original release's plain state_dicts."""
    model = models.create("lstm", {"audio": 4, "text": 3}, hidden_dim=8, num_layers=2)
    config = {key: value for key, value in model.config.items() if key != "family"}
    checkpoints.save_checkpoint(tmp_path / "old.save", {"model": model.state_dict(),
                                                        "config": config})
    torch.save(model.state_dict(), tmp_path / "release.save")
    for name in ("old.save", "release.save"):
        loaded, _ = checkpoints.load_model(tmp_path / name, ["audio", "text"],
                                           {"audio": 4, "text": 3})
        assert loaded.config == model.config


@pytest.mark.parametrize("flag, value, message", [
    ("--tcn_blocks", 64, "--tcn_blocks must be at most 12, got 64"),
    ("--transformer_dim", 100000, "--transformer_dim must be at most 2048, got 100000"),
    ("--layers", 1000, "--layers must be at most 16, got 1000"),
    ("--tcn_kernel", 1, "--tcn_kernel must be at least 2, got 1"),
])
def test_size_flags_are_bounded_before_anything_is_written(in_tmp, flag, value, message):
    """A typo such as --tcn_blocks 64 (dilation 2^63) must not reach the allocator."""
    model = {"--tcn_blocks": "tcn", "--tcn_kernel": "tcn", "--transformer_dim": "transformer",
             "--layers": "lstm"}[flag]
    with pytest.raises(ToolkitError, match=message):
        run_train("--model", model, flag, value, "--model_dir", "n")
    assert not (in_tmp / "n").exists()
