"""The shape of the code (issues 24 and 35): the scripts at the top level, the library
in the package empathy/ under them with no import cycle, small functions, and a model
family that is one class plus one registry entry."""
import ast
import graphlib
import json

import pytest
import torch
from torch import nn

import train
from conftest import ROOT
from empathy import checkpoints, families, models
from empathy.utils import ToolkitError

PACKAGE = "empathy"
TOP_LEVEL_FILES = sorted(ROOT.glob("*.py"))
PACKAGE_FILES = sorted((ROOT / PACKAGE).glob("*.py"))
PUBLIC_FACES = {"datasets", "models", "utils"}  # the design card's names, kept at the top
DRIVERS = {"compare_options", "make_notebook", "bench"}  # they run scripts by design
SCRIPTS = {path.stem for path in TOP_LEVEL_FILES if path.stem not in PUBLIC_FACES}


def imports(path, level=None):
    """The import statements of `path`, outside `if TYPE_CHECKING:` blocks (those load
    nothing); `level` keeps only absolute (0) or relative (1) ones."""
    tree = ast.parse(path.read_text())
    checked_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                    and ast.unparse(block.test) == "TYPE_CHECKING" for node in ast.walk(block)}
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
            and id(node) not in checked_only
            and (level is None or getattr(node, "level", 0) == level)]


def imported_modules(path):
    """Top-level names of the modules that `path` imports absolutely."""
    names = set()
    for node in imports(path, level=0):
        names |= ({alias.name.split(".")[0] for alias in node.names}
                  if isinstance(node, ast.Import) else {node.module.split(".")[0]})
    return names


def package_dependencies(path):
    """The package modules that the package module `path` imports, anywhere in it."""
    found = set()
    for node in imports(path):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or node.module == PACKAGE):
            found |= ({alias.name for alias in node.names} if node.module in (None, PACKAGE)
                      else {node.module.split(".")[0]})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE + "."):
            found.add(node.module.split(".")[1])
    return found - {"thread_policy"} if path.stem == "__init__" else found


def test_the_top_level_holds_the_scripts_and_the_design_cards_names():
    for path in TOP_LEVEL_FILES:
        text = path.read_text()
        if path.stem in PUBLIC_FACES:  # the package's public face, nothing of its own
            assert [ast.unparse(node) for node in imports(path)] == \
                [f"from {PACKAGE}.{path.stem} import *"], path.name
        else:
            assert 'if __name__ == "__main__":' in text, f"{path.name} is library: move it " \
                f"into {PACKAGE}/"
    assert {"train", "crossval", "cv_epochs", "personalize", "fusion", "cv_fusion"} <= SCRIPTS


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda path: path.name)
def test_the_package_imports_no_script_nor_anything_of_the_top_level(path):
    assert not imported_modules(path) & (SCRIPTS | PUBLIC_FACES), \
        f"{path.name} imports from the top level"


@pytest.mark.parametrize("path", [path for path in TOP_LEVEL_FILES if path.stem in SCRIPTS],
                         ids=lambda path: path.name)
def test_scripts_import_the_package_not_each_other(path):
    if path.stem in DRIVERS:
        return
    assert not imported_modules(path) & (SCRIPTS | PUBLIC_FACES), \
        f"{path.name} imports a script or a public face instead of {PACKAGE}"


def test_the_package_has_no_import_cycle():
    """Not even through an import inside a function: each module sits on a layer and
    imports only from the layers below it."""
    graph = {path.stem: package_dependencies(path) for path in PACKAGE_FILES}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as cycle:
        pytest.fail(f"import cycle: {' -> '.join(cycle.args[1])}")
    assert set(order) >= {path.stem for path in PACKAGE_FILES}


@pytest.mark.parametrize("path", TOP_LEVEL_FILES + PACKAGE_FILES,
                         ids=lambda path: str(path.relative_to(ROOT)))
def test_no_function_is_longer_than_a_screen(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert not long, f"{path.name}: {', '.join(long)}"


def test_thin_train_and_a_small_utils():
    assert len((ROOT / "train.py").read_text().splitlines()) <= 350
    assert len((ROOT / PACKAGE / "utils.py").read_text().splitlines()) <= 420


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
