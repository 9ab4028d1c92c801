"""Every training script refuses the same bad inputs, resume guards included, before
it writes anything: they share one check (options.check_before_writing)."""
import shutil

import pytest

from conftest import write_tiny_data
from test_reliability import assert_one_line_error, command  # noqa: F401

DATA = ["--mods", "audio", "--ledger", "none"]
SAVED = ["--epochs", "1", "--save_freq", "1"]
# How each script is pointed at the runs made below, and the flag of its output folder.
SCRIPTS = {
    "train.py": (["--model_dir", "m"], "--model_dir"),
    "crossval.py": (["--out_dir", "cv", "--stories", "1", "2"], "--out_dir"),
    "personalize.py": (["--out_dir", "p"], "--out_dir"),
    "cv_epochs.py": (["--out_dir", "cv", "--stories", "1", "2", "--epoch_min", "1",
                      "--epoch_max", "1", "--epoch_step", "1"], "--out_dir"),
}
TRAINING = ("train.py", "crossval.py", "personalize.py")
BAD_FLAGS = [  # (flags, the error's words, the scripts that take the flags)
    (["--smooth", "nan"], "--smooth must be a number of seconds >= 0", tuple(SCRIPTS)),
    (["--lowpass", "20"], "is not below the Nyquist frequency", tuple(SCRIPTS)),
    (["--precision", "fp16"], "--precision fp16 needs a GPU", tuple(SCRIPTS)),
    (["--jobs", "0"], "--jobs must be at least 1", ("crossval.py", "personalize.py",
                                                    "cv_epochs.py")),
    (["--lr", "-1"], "--lr must be a positive number", TRAINING),
    (["--lr", "1e300"], "--lr must be a positive number up to 3.4e+38 (float32)", TRAINING),
    (["--weight_decay", "1e300"], "--weight_decay must be a number >= 0 up to 3.4e+38", TRAINING),
    (["--batch_size", "0"], "--batch_size must be at least 1", TRAINING),
    (["--split", "1000"], "is larger than", TRAINING),
    (["--tensorboard", "m/metrics.csv"], "is a file: give a folder", TRAINING),
    (["--tensorboard", "data/Training/Annotations/tb"], "is inside a split folder's Annotations",
     TRAINING),
]
RESUME_GUARDS = [
    (["--lr", "0.5"], "was trained with --lr 1e-05, not 0.5"),
    (["--label_delay", "2"], "was trained with --label_delay 0.0, not 2.0"),
    (["--normalize"], "was trained without --normalize"),
    (["--batch_size", "7"], "was trained with --batch_size 25, not 7"),
]


@pytest.fixture(scope="module")
def workspace_master(tmp_path_factory):
    """Tiny data, and a finished run of each training script to resume or evaluate."""
    import contextlib
    import os
    import crossval
    import personalize
    import train
    root = tmp_path_factory.mktemp("workspace")
    write_tiny_data(root / "data")
    with contextlib.chdir(root):
        for script, argv in ((train, SCRIPTS["train.py"][0]),
                             (crossval, SCRIPTS["crossval.py"][0])):
            script.main(script.get_args_parser().parse_args(DATA + SAVED + argv))
        os.mkdir("p")
        shutil.copy("cv/val_on_1/best.save", "p/init.save")
        personalize.main(personalize.get_args_parser().parse_args(
            DATA + SAVED + SCRIPTS["personalize.py"][0]))
    return root


@pytest.fixture
def workspace(workspace_master, tmp_path, monkeypatch):
    root = shutil.copytree(workspace_master, tmp_path / "w")
    monkeypatch.chdir(root)
    return root


def snapshot(root):
    return {str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file()}


def assert_refused_and_unchanged(command, root, script, flags, message):
    before = snapshot(root)
    result = command(script, *DATA, *SCRIPTS[script][0], *flags)
    assert_one_line_error(result, message)  # noqa: the flags are in the failure's locals
    assert snapshot(root) == before, f"{script} wrote before refusing {flags}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_flags_are_refused_alike_before_any_write(workspace, command, script):
    for flags, message, scripts in BAD_FLAGS:
        if script in scripts:
            # --epochs 2: a refusal that fails costs a second, not a 1000-epoch run.
            resume = ["--resume", "--epochs", "2"] if script in TRAINING else []
            assert_refused_and_unchanged(command, workspace, script, flags + resume, message)


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_output_folder_inside_the_data_is_refused(workspace, command, script):
    argv, flag = SCRIPTS[script]
    inside = "data/Validation/Annotations/out"
    before = snapshot(workspace)
    result = command(script, *DATA, *argv, flag, inside, *(["--overwrite"] if script in TRAINING
                                                           else []))
    if script in ("personalize.py", "cv_epochs.py"):  # these need their runs in the folder
        assert result.returncode == 1 and "Traceback" not in result.stderr
    else:
        assert_one_line_error(result, f"{flag} {inside} is inside a split folder's Annotations")
    assert snapshot(workspace) == before


@pytest.mark.parametrize("script", TRAINING)
def test_resume_guards_are_the_same_in_every_training_script(workspace, command, script):
    for flags, message in RESUME_GUARDS:
        assert_refused_and_unchanged(command, workspace, script,
                                     ["--resume", "--epochs", "2", *flags], message)


def test_cv_epochs_refuses_checkpoints_of_other_modalities_before_its_record(workspace,
                                                                            command):
    before = snapshot(workspace)
    result = command("cv_epochs.py", "--mods", "audio,text", "--ledger", "none",
                     *SCRIPTS["cv_epochs.py"][0])
    assert_one_line_error(result, "was trained on --mods audio, not audio,text")
    assert snapshot(workspace) == before
    assert not (workspace / "cv" / "cv_epochs_args.json").exists()
