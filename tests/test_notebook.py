"""README.ipynb: it runs top to bottom in a real kernel, and it is README.md's guide."""
import ast
import os
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import make_notebook
from conftest import ROOT

# A tiny run: every section still runs (2 subjects, 4 cross-validation folds), but
# with one epoch each command takes seconds, most of them starting Python and torch.
# It runs on the realistic preset; test_crossval.py runs the guide's commands on the
# easy one, so the guide is checked verbatim on both.
TINY_PARAMETERS = """\
MAKE_DATA = "--preset realistic --subjects 2 --stories 5 --seconds 12 --dims 24,16,32,32"
EPOCHS = 1
SAVE_FREQ = 1
TEST_EPOCH_AT = 1
TEST_EPOCH_ATV = 1
EPOCH_RANGE = "--epoch_min 1 --epoch_max 1 --epoch_step 1"
PERSONAL_EPOCHS = 1"""

# What a run of the guide leaves behind, by the section that makes it; the data and
# the models in the notebook's own folders (DATA, MODELS), not the quick start's.
EXPECTED_FILES = [
    "data_notebook/Training/Annotations", "notebook_models_AT/best.save",
    "notebook_models_ATV/best.save",
    "preds_AT/pred_test/Subject_1_Story_1.csv", "preds_ATV/pred_train", "pred_test",
    "cv_AT/crossval.csv", "cv_ATV/crossval.csv", "cv_AT/cv_epochs.csv", "cv_ATV/cv_epochs.csv",
    "cv_AT/val_on_1/feat_train", "personal_AT/personalize.csv", "personal_ATV/personalize.csv",
    "personal_AT/pred_test/Subject_2_Story_1.csv", "personal_ATV/pred_test",
    "feat_AT/feat_train", "data_notebook/Training/feat_ATV",
    "fusion_preds/pred_test/Subject_1_Story_1.csv", "fusion_preds/fusion_model.joblib", "fusion_test/pred_test/Subject_1_Story_3.csv",
    "cv_fusion_out/crossval.csv", "scores_AT/by_story.csv",
    "plots/predictions.png", "plots/cv_epochs.png", "plots/personalize.png", "plots/crossval.png",
    "runs.csv", "plots/runs.png",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def notebook_commands(notebook, tag):
    """The `!` lines of the code cells tagged `tag`, without the `!`."""
    return [line.strip()[1:] for cell in notebook.cells
            if cell.cell_type == "code" and tag in cell.metadata.get("tags", [])
            for line in cell.source.splitlines() if line.strip().startswith("!")]


def readme_commands(text):
    """One string per command line of README.md's ```shell blocks."""
    blocks = re.findall(r"^```shell\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    return [line for block in blocks for line in re.sub(r"\\\n\s*", " ", block).splitlines()
            if line.strip()]


def guide_values(notebook):
    """The parameters cell's `(guide: VALUE)` comments, as {NAME: VALUE}."""
    source = next(cell.source for cell in notebook.cells
                  if "parameters" in cell.metadata.get("tags", []))
    pairs = re.findall(r"\(guide: (.*)\)\n(\w+) = ", source)
    # The setup cell leaves DATA_ARGS empty when DATA is the guide's ./data.
    return {name: ast.literal_eval(value) for value, name in pairs} | {"DATA_ARGS": ""}


def normalized(command):
    return " ".join(re.sub(r"(?<![\w/.])\./data/", "data/", command).split())


def test_notebook_carries_the_readme_commands_with_its_parameters():
    notebook = nbformat.read(ROOT / "README.ipynb", as_version=4)
    values = guide_values(notebook)
    assert {"EPOCHS", "CUDA", "DATA", "TEST_EPOCH_ATV"} <= values.keys()
    rendered = [re.sub(r"\{(\w+)\}", lambda match: str(values[match.group(1)]), command)
                for command in notebook_commands(notebook, "readme-command")]
    readme = readme_commands((ROOT / "README.md").read_text())
    assert len(readme) > 20 and any("plot.py" in command for command in readme)
    assert [normalized(command) for command in rendered] == [normalized(c) for c in readme]


def test_notebook_follows_the_readme_section_by_section():
    notebook = nbformat.read(ROOT / "README.ipynb", as_version=4)
    headings = re.findall(r"^## .*$", (ROOT / "README.md").read_text(), flags=re.MULTILINE)
    in_notebook = [line for cell in notebook.cells if cell.cell_type == "markdown"
                   for line in cell.source.splitlines() if line.startswith("## ")]
    assert in_notebook == headings


def test_committed_notebook_is_what_make_notebook_writes():
    expected = make_notebook.build_notebook((ROOT / "README.md").read_text())
    assert (ROOT / "README.ipynb").read_text() == expected, \
        "README.ipynb is out of date: run python make_notebook.py"


def test_make_notebook_check_flags_a_stale_notebook(tmp_path, capsys):
    out = tmp_path / "README.ipynb"
    args = ["--out", str(out)]
    make_notebook.main(make_notebook.get_args_parser().parse_args(args))
    make_notebook.main(make_notebook.get_args_parser().parse_args(args + ["--check"]))
    out.write_text(out.read_text().replace("EPOCHS = 20", "EPOCHS = 3"))
    with pytest.raises(make_notebook.utils.ToolkitError, match="out of date"):
        make_notebook.main(make_notebook.get_args_parser().parse_args(args + ["--check"]))


def copy_scripts(folder):
    """The notebook's working folder: the toolkit's scripts, its package and
    README.ipynb, no data."""
    folder.mkdir()
    for path in [*ROOT.glob("*.py"), ROOT / "README.ipynb"]:
        shutil.copy(path, folder)
    shutil.copytree(ROOT / "empathy", folder / "empathy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def with_tiny_parameters(notebook):
    """Papermill's way: a cell right after the parameters cell overrides them."""
    index = next(i for i, cell in enumerate(notebook.cells)
                 if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
        TINY_PARAMETERS, metadata={"tags": ["injected-parameters"]}))
    return notebook


def cell_text(cell):
    return "".join(output.get("text", "") for output in cell.get("outputs", [])
                   if output.output_type == "stream")


def test_notebook_runs_top_to_bottom_on_tiny_data(tmp_path, monkeypatch):
    workdir = copy_scripts(tmp_path / "repo")
    # A quick start ran here before: the notebook must neither use nor touch its outputs.
    (workdir / "data" / "Training").mkdir(parents=True)
    (workdir / "models_AT").mkdir()
    (workdir / "models_AT" / "best.save").write_bytes(b"the quick start's model")
    # `!python` in the cells must be this interpreter, the one with the requirements.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    notebook = with_tiny_parameters(nbformat.read(workdir / "README.ipynb", as_version=4))
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute()

    # A failing `!` command does not stop a notebook, so look at what each one said.
    for cell in notebook.cells:
        text = cell_text(cell)
        assert "error:" not in text and "Traceback" not in text, f"{cell.source}\n{text}"
    missing = [name for name in EXPECTED_FILES if not (workdir / name).exists()]
    assert not missing, f"the notebook did not write {missing}"
    assert list((workdir / "data").rglob("*")) == [workdir / "data" / "Training"], \
        "the notebook wrote into the quick start's ./data"
    assert [path.name for path in (workdir / "models_AT").iterdir()] == ["best.save"]
    assert (workdir / "models_AT" / "best.save").read_bytes() == b"the quick start's model"
    for name in ("personal_AT/pred_test", "fusion_preds/pred_train", "cv_fusion_out/cv_pred"):
        assert any((workdir / name).iterdir()), f"{name} is empty"
    shown = [output for cell in notebook.cells for output in cell.get("outputs", [])
             if "image/png" in output.get("data", {})]
    assert len(shown) == 5
    for png in (workdir / "plots").glob("*.png"):
        assert png.read_bytes().startswith(PNG_SIGNATURE)
    # The skipped cells stayed skipped: no install, no test suite, no extraction.
    skipped = [cell for cell in notebook.cells if "if RUN_" in cell.source]
    assert len(skipped) == 3 and not any(cell_text(cell) for cell in skipped)
