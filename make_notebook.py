"""Write README.ipynb from README.md, so that the notebook never drifts from the guide.

    python make_notebook.py                   # rewrites ./README.ipynb
    python make_notebook.py --check           # exit 1 if README.ipynb is out of date

Prose becomes markdown cells and every ```shell block a code cell that runs the
block's commands with `!`; other blocks (```bash, ```python, plain ```) stay text,
for commands the notebook must not run (a cluster's, say). A first parameters cell
(data and model folders, data size, --cuda, epochs, the saved epochs the guide names)
makes the whole notebook a short run on its own built-in synthetic data by default;
its comments give the guide's values for the full run. The guide's numbers in the commands are
replaced by those parameters (see SUBSTITUTIONS); with the guide's values every
command reads exactly as in README.md, which tests/test_notebook.py checks.
Commands that install packages, run the test suite or need raw recordings are kept
verbatim but only run when their flag in the parameters cell is set. Rerun this
script whenever README.md changes.
"""
import argparse
import re
import textwrap
from pathlib import Path

import nbformat

from empathy import utils

ROOT = Path(__file__).resolve().parent
SHELL_FENCE = "```shell"

# (name, quick value as code, value in the guide's full run as code, what it is).
# The guide's values turn the notebook's commands back into README.md's.
PARAMETERS = [
    ("DATA", '"data_notebook"', '"data"',
     "folder holding Training/, Validation/ and Testing/ (not the quick start's ./data)"),
    ("MODELS", '"notebook_models"', '"models"',
     "the models are trained into MODELS_AT and MODELS_ATV (not the quick start's models_AT)"),
    ("MAKE_DATA", '"--subjects 10 --stories 5 --seconds 120"', '""',
     "make_data.py size options, used only when DATA has no Training/ folder"),
    ("CUDA", '""', '"--cuda"', '"--cuda" trains on the GPU'),
    ("EPOCHS", "20", "2000", "training epochs of train.py and crossval.py"),
    ("TRAIN_ARGS", '"--lr 1e-4"', '""',
     "more flags for every training command; a short run needs a larger learning rate"),
    ("SAVE_FREQ", "2", "10", "crossval.py saves a checkpoint every SAVE_FREQ epochs"),
    ("TEST_EPOCH_AT", "10", "1360", "a saved epoch: crossval.py --test_epoch for AT"),
    ("TEST_EPOCH_ATV", "10", "1900",
     "a saved epoch: --test_epoch for ATV, and the checkpoint personalized"),
    ("EPOCH_RANGE", 'f"--epoch_min {SAVE_FREQ} --epoch_max {EPOCHS} --epoch_step {SAVE_FREQ}"',
     '""', "epochs cv_epochs.py checks; the guide's are its defaults, 100 to 2000 every 100"),
    ("PERSONAL_EPOCHS", "10", "250", "fine-tuning epochs of personalize.py"),
    ("RUN_QUICK_START", "False", "False", "run the Quick start's install-and-train line"),
    ("RUN_TESTS", "False", "False", "run the whole test suite (bash run_tests.sh)"),
    ("RUN_EXTRACT", "False", "False", "run the feature extraction (needs raw recordings)"),
]
# The guide's numbers that the parameters replace, in README.md's commands.
SUBSTITUTIONS = [
    (r"--cuda\b", "{CUDA}"),
    (r"--epochs 2000\b", "--epochs {EPOCHS}"),
    (r"--epochs 250\b", "--epochs {PERSONAL_EPOCHS}"),
    (r"(--epochs \{(?:PERSONAL_)?EPOCHS\})", r"\1 {TRAIN_ARGS}"),
    (r"--save_freq 10\b", "--save_freq {SAVE_FREQ}"),
    (r"--test_epoch 1360\b", "--test_epoch {TEST_EPOCH_AT}"),
    (r"--test_epoch 1900\b", "--test_epoch {TEST_EPOCH_ATV}"),
    (r"\bepoch_1900\.save\b", "epoch_{TEST_EPOCH_ATV}.save"),
    (r"(?<![\w/.])(\./)?data/", "{DATA}/"),
    (r"\bmodels_(ATV?)\b", r"{MODELS}_\1"),
    (r"(python cv_epochs\.py .*)$", r"\1 {EPOCH_RANGE}"),
    (r"python (train|crossval|cv_epochs|personalize|fusion|cv_fusion)\.py ",
     r"python \1.py {DATA_ARGS} "),
]
# Blocks that are kept verbatim but only run when asked: (pattern, flag, why).
GUARDED = [
    ("bash run_tests.sh", "RUN_TESTS", "runs the whole test suite: minutes, and pip installs"),
    ("extract_features", "RUN_EXTRACT", "needs recordings in raw/"),
    ("pip install", "RUN_QUICK_START",
     ("installs the toolkit, writes the full-size ./data and trains models_AT on it "
      "(the rest of the notebook uses DATA and MODELS instead)")),
]
# Steps that the guide's prose describes before a block, spelled out so that the
# block runs: {text of the block: commands}. They are not README commands.
PROSE_STEPS = {
    "--test fusion_preds/fusion_model.joblib": [
        ("python train.py {DATA_ARGS} {CUDA} --mods audio,text --model_dir {MODELS}_AT "
         "--test_dir {DATA}/Testing --feat_dir feat_AT_test --features"),
        ("python train.py {DATA_ARGS} {CUDA} --mods audio,text,v_sub --model_dir {MODELS}_ATV "
         "--test_dir {DATA}/Testing --feat_dir feat_ATV_test --features"),
        ("cp -r feat_AT_test/feat_test {DATA}/Testing/feat_AT && "
         "cp -r feat_ATV_test/feat_test {DATA}/Testing/feat_ATV"),
    ],
}
PLOT_OUT = re.compile(r"python plot\.py .*--out (\S+\.png)")
IMAGE_LINE = re.compile(r"^!\[[^\]]*\]\([^)]*\)\s*$")

INTRO = """\
*This notebook is written from `README.md` by `make_notebook.py`: edit the guide and
run `python make_notebook.py` rather than editing the notebook.*

Run it from the repository folder with a kernel that has `requirements.txt` installed
(and `ipykernel`, listed in `requirements-dev.txt`); the cells run the guide's
commands with `!python`, so that `python` must be first on your `PATH`. Without a
Jupyter front end, `jupyter execute README.ipynb --output README_run` (nbclient's,
also in `requirements-dev.txt`) runs it top to bottom and saves the executed copy as
`README_run.ipynb`. The parameters below make it a short run on the built-in
synthetic data, written to `DATA` (`data_notebook`) first if that folder has no
`Training/`: 2 min 34 s to 2 min 45 s in three runs on a 2-core AMD EPYC alone, 4 min
45 s to 5 min 3 s in three runs beside a test-suite run,
and the pictures in the guide's Plots
section are those of this run. Its data and models (`notebook_models_AT`,
`notebook_models_ATV`) are its own, so a quick start run in the same folder (`./data`,
`models_AT`) is neither used nor touched. For the guide's full run on the real data
(or on the full-size built-in data, `python make_data.py`), set each parameter to the
value its comment gives as `guide:`. The installs, the test suite and the feature
extraction are skipped unless their `RUN_` flag is set. The scripts refuse to train
over an earlier run, so run the notebook again in a fresh folder, or delete the
`notebook_models_*`, `cv_*`, `personal_*`, `feat_*`, `preds_*`, `fusion*` and `plots`
folders and the copied `DATA/*/feat_*` folders first."""

SETUP = """\
import os
from IPython.display import Image, display

if not os.path.isfile("train.py"):
    raise RuntimeError("run this notebook from the repository folder, next to train.py")
# The scripts read ./data by default; DATA_ARGS points them at another DATA folder.
DATA_ARGS = ("" if os.path.normpath(DATA) == "data"
             else f"--train_dir {DATA}/Training --test_dir {DATA}/Validation")
if not os.path.isdir(os.path.join(DATA, "Training")):
    !python make_data.py --out_dir {DATA} {MAKE_DATA}"""


def get_args_parser():
    parser = argparse.ArgumentParser("make_notebook.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", default=str(ROOT / "README.md"),
                        help="the guide to follow (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "README.ipynb"),
                        help="notebook to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if --out differs from what would be written")
    return parser


# ---------------------------------------------------------------- README.md

def split_readme(text):
    """README.md as a list of ("markdown", text) and ("shell", command lines) parts;
    prose is also cut before each `## ` section heading."""
    parts, prose, in_fence = [], [], False
    lines = iter(text.splitlines())
    for line in lines:
        if line.strip() == SHELL_FENCE and not in_fence:
            parts += [("markdown", "\n".join(prose)), ("shell", read_shell_block(lines))]
            prose = []
            continue
        if line.startswith("```"):
            in_fence = not in_fence
        elif line.startswith("## ") and not in_fence:
            parts.append(("markdown", "\n".join(prose)))
            prose = []
        prose.append(line)
    parts.append(("markdown", "\n".join(prose)))
    return [(kind, body.strip("\n")) for kind, body in parts if body.strip()]


def read_shell_block(lines):
    block = []
    for line in lines:
        if line.strip() == "```":
            return join_continuations("\n".join(block))
        block.append(line)
    raise utils.ToolkitError("README.md has a ```shell block without its closing ```")


def join_continuations(block):
    """One command per line: backslash-newline continuations joined with a space."""
    return re.sub(r"[ \t]*\\\n[ \t]*", " ", block.strip())


# ---------------------------------------------------------------- cells

def parameterize(command):
    for pattern, replacement in SUBSTITUTIONS:
        command = re.sub(pattern, replacement, command)
    return command


def guard_for(command):
    return next(((flag, why) for pattern, flag, why in GUARDED if pattern in command), None)


def command_cell(block):
    """The code cell of one ```shell block."""
    commands = [command for command in block.splitlines() if command.strip()]
    guard = guard_for(block)
    if guard:
        flag, why = guard
        comment = textwrap.wrap(f"Skipped unless {flag} = True: {why}.", 86)
        lines = [f"# {line}" for line in comment] + [f"if {flag}:"]
        return "\n".join(lines + [f"    !{command}" for command in commands])
    lines = [f"!{parameterize(command)}" for command in commands]
    lines += [f'display(Image(filename="{match.group(1)}"))'
              for command in commands if (match := PLOT_OUT.search(command))]
    return "\n".join(lines)


def markdown_cell(text):
    # The guide's pictures are left out: the notebook shows the ones its run draws.
    return "\n".join(line for line in text.splitlines() if not IMAGE_LINE.match(line)).strip()


def prose_steps_cell(block):
    """The code cell of the steps the prose asks for before `block`, or None."""
    for key, commands in PROSE_STEPS.items():
        if key in block:
            comment = "# The steps the paragraph above describes (not a README command):"
            return "\n".join([comment] + [f"!{command}" for command in commands])
    return None


def parameters_cell():
    lines = ["# Parameters: a short run on the built-in data. For the guide's full run,",
             "# set each one to the value after `guide:`."]
    for name, quick, guide, what in PARAMETERS:
        lines += [f"# {what} (guide: {guide})", f"{name} = {quick}"]
    return "\n".join(lines)


def build_notebook(readme_text):
    parts = split_readme(readme_text)
    cells = []
    title, rest = parts[0], parts[1:]
    if title[0] != "markdown":
        raise utils.ToolkitError("README.md must start with prose before its first command")
    cells.append(("markdown", markdown_cell(title[1]), []))
    cells.append(("markdown", INTRO, []))
    cells.append(("code", parameters_cell(), ["parameters"]))
    cells.append(("code", SETUP, ["setup"]))
    for kind, body in rest:
        if kind == "shell" and prose_steps_cell(body):
            cells.append(("code", prose_steps_cell(body), ["prose-steps"]))
        if kind == "shell":
            cells.append(("code", command_cell(body), ["readme-command"]))
        elif markdown_cell(body):
            cells.append(("markdown", markdown_cell(body), []))
    notebook = nbformat.v4.new_notebook()
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for index, (kind, source, tags) in enumerate(cells):
        make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
        cell = make(source, id=f"cell-{index:03d}")  # stable ids: the same README, the same file
        if tags:
            cell.metadata["tags"] = tags
        notebook.cells.append(cell)
    nbformat.validate(notebook)
    return nbformat.writes(notebook) + "\n"


def main(args):
    readme = Path(args.readme)
    if not readme.is_file():
        raise utils.ToolkitError(f"{readme} does not exist: pass the guide with --readme")
    text = build_notebook(readme.read_text())
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            raise utils.ToolkitError(f"{out} is out of date: run python make_notebook.py")
        print(f"{out} is up to date")
        return text
    with utils.atomic_path(out) as temporary:
        temporary.write_text(text)
        temporary.chmod(0o644)  # a file of the repository, not a private temporary
    print(f"wrote {out}")
    return text


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
