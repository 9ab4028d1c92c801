"""personalize.py --inner_cv judged honestly (issue 34): --inner_init starts each
inner fold from a crossval.py model that never saw its held-out story, personalize.csv
sets the inner CV's estimated gain beside the measured one, and finished inner folds
keep no weights (--resume skips them)."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import crossval
import personalize
import train
from conftest import run_in_process, write_tiny_data
from empathy import checkpoints, datasets, engine, finetuning

MODS = "audio,text"


def run(module, *argv):
    return module.main(module.get_args_parser().parse_args([str(arg) for arg in argv]))


def split(root):
    return ["--train_dir", root / "data" / "Training", "--test_dir", root / "data" / "Validation"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny data, a shared model (one epoch) and a crossval.py run over the training
    stories (one epoch), in a folder of their own."""
    root = tmp_path_factory.mktemp("inner_init")
    write_tiny_data(root / "data")
    run(train, *split(root), "--mods", MODS, "--epochs", 1, "--lr", 1e-3, "--model_dir",
        root / "shared", "--ledger", "none")
    stories = datasets.load_train_test(*split(root)[1::2], datasets.parse_mods(MODS))[0].stories
    run(crossval, *split(root), "--mods", MODS, "--epochs", 2, "--lr", 1e-3, "--stories",
        *stories, "--out_dir", root / "cv", "--ledger", "none", "--save_freq", 2)
    return root


def personal_dir(workspace, name):
    folder = workspace / name
    folder.mkdir()
    shutil.copyfile(workspace / "shared" / "best.save", folder / "init.save")
    return folder


def personalize_run(workspace, folder, *argv):
    return run(personalize, *split(workspace), "--mods", MODS, "--out_dir", folder, "--lr", 1e-3,
               "--subjects", 1, "--ledger", "none", *argv)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_inner_folds_start_from_the_crossval_folds(workspace):
    """--finetune head leaves the encoder as it starts: each inner fold's encoder is
    its crossval fold's (last.save), not init.save's; epoch 0 scores that fold model."""
    folder = personal_dir(workspace, "head")
    personalize_run(workspace, folder, "--inner_cv", "--inner_init", workspace / "cv",
                    "--finetune", "head", "--epochs", 1, "--keep_inner_weights")
    init = weights(folder / "init.save")
    curves = pd.read_csv(folder / "subject_1" / "inner_cv.csv").set_index("epoch")
    train_all, _ = datasets.load_train_test(*split(workspace)[1::2], datasets.parse_mods(MODS))
    stories = train_all.select(subjects=[1]).stories
    assert len(stories) >= 2
    for story in stories:
        start = workspace / "cv" / f"val_on_{story}" / "last.save"
        tuned = weights(folder / "subject_1" / f"inner_val_on_{story}" / "last.save")
        encoder = [name for name in tuned if not name.startswith(("attn.", "dec_target."))]
        assert encoder and all(torch.equal(tuned[name], weights(start)[name]) for name in encoder)
        assert not all(torch.equal(tuned[name], init[name]) for name in encoder)
        fold = checkpoints.load_trained([start], train_all, False, "cpu")[0]
        held_out = train_all.select(subjects=[1], stories=[story])
        assert curves.loc[0, f"val_on_{story}"] == pytest.approx(
            engine.evaluate(fold.network, held_out, "cpu")["ccc"])


def test_the_estimated_gain_beside_the_measured_one(workspace):
    folder = personal_dir(workspace, "gains")
    table = personalize_run(workspace, folder, "--inner_cv", "--inner_init", workspace / "cv",
                            "--epochs", 2)
    row = table.iloc[0]
    curves = pd.read_csv(folder / "subject_1" / "inner_cv.csv")
    assert row["estimated_gain"] == pytest.approx(curves["mean_ccc"].max()
                                                  - curves["mean_ccc"].iloc[0])
    assert row["measured_gain"] == pytest.approx(row["after_ccc"] - row["before_ccc"])
    written = pd.read_csv(folder / "personalize.csv")
    assert list(written.columns) == ["subject", "before_ccc", "after_ccc", "epochs",
                                     "estimated_gain", "measured_gain"]
    assert written["estimated_gain"].iloc[-1] == pytest.approx(row["estimated_gain"])  # Mean


def test_a_finished_inner_fold_keeps_no_weights_and_resume_skips_it(workspace, monkeypatch):
    folder = personal_dir(workspace, "pruned")
    first = personalize_run(workspace, folder, "--inner_cv", "--epochs", 2)
    inner = sorted((folder / "subject_1").glob("inner_val_on_*"))
    assert len(inner) >= 2
    for fold in inner:
        assert not list(fold.glob("*.save"))
        assert (fold / "metrics.csv").is_file()
        record = json.loads((fold / finetuning.INNER_FOLD_RECORD).read_text())
        assert record["finetuning"]["finetune"] == "all" and record["training"]["epochs"] == 2
    curves = (folder / "subject_1" / "inner_cv.csv").read_bytes()

    def refit(*args, **kwargs):
        raise AssertionError("a finished inner fold was trained again")
    monkeypatch.setattr(finetuning, "fit_inner_fold", refit)
    again = personalize_run(workspace, folder, "--inner_cv", "--epochs", 2, "--resume")
    assert (folder / "subject_1" / "inner_cv.csv").read_bytes() == curves
    pd.testing.assert_frame_equal(first, again)


def test_resuming_finished_folds_with_other_flags_is_refused(workspace):
    folder = personal_dir(workspace, "pruned_other")
    personalize_run(workspace, folder, "--inner_cv", "--epochs", 1)
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    for flags, message in [(["--lr", "0.01"], "was fine-tuned with --lr 0.001, not 0.01"),
                           (["--inner_init", str(workspace / "cv")],
                            "started from --inner_init none (init.save)")]:
        result = run_in_process("personalize.py", *map(str, split(workspace)), "--mods", MODS,
                                "--out_dir", str(folder), "--subjects", "1", "--lr", "1e-3",
                                "--inner_cv", "--epochs", "1", "--resume", *flags)
        assert result.returncode == 1, result.stderr
        # (a note may come first: the subject kept init.save, so no run holds a last.save)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: --resume: ")
        assert message in errors[0]
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before


def bad_cv(kind, workspace, folder):
    """A --inner_init folder wrong in one way."""
    if kind == "not a crossval output":
        (folder / "empty").mkdir()
        return folder / "empty"
    cv = shutil.copytree(workspace / "cv", folder / "cv")
    fold = sorted(cv.glob("val_on_*"))[0]
    if kind == "missing fold":
        shutil.rmtree(fold)
    elif kind == "other modalities":
        run(train, *split(workspace), "--mods", "audio", "--epochs", 1, "--model_dir",
            folder / "audio", "--ledger", "none")
        shutil.copyfile(folder / "audio" / "last.save", fold / "last.save")
    elif kind == "normalized":
        checkpoint = torch.load(fold / "last.save", weights_only=True)
        run(train, *split(workspace), "--mods", MODS, "--epochs", 1, "--normalize",
            "--model_dir", folder / "normalized", "--ledger", "none")
        checkpoint["normalization"] = torch.load(folder / "normalized" / "last.save",
                                                 weights_only=True)["normalization"]
        torch.save(checkpoint, fold / "last.save")
    elif kind == "unfinished":
        checkpoint = torch.load(fold / "last.save", weights_only=True)
        checkpoint["epoch"] = 1
        torch.save(checkpoint, fold / "last.save")
    return cv


@pytest.mark.parametrize("kind, message", [
    ("not a crossval output", "is not a crossval.py output"),
    ("missing fold", "does not exist: the inner fold that holds out story"),
    ("other modalities", "has modalities (--mods) audio"),
    ("normalized", "has normalization (--normalize) on"),
    ("unfinished", "is at epoch 1 of 2: let that crossval.py run finish"),
])
def test_a_wrong_inner_init_stops_before_writing(workspace, tmp_path, kind, message):
    cv = bad_cv(kind, workspace, tmp_path)
    folder = personal_dir(workspace, f"bad_{kind.replace(' ', '_')}")
    result = run_in_process("personalize.py", *map(str, split(workspace)), "--mods", MODS,
                            "--out_dir", str(folder), "--inner_cv", "--inner_init", str(cv))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: --inner_init") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert [path.name for path in folder.iterdir()] == ["init.save"]


@pytest.mark.parametrize("flag", [["--inner_init", "cv"], ["--keep_inner_weights"]])
def test_inner_flags_without_inner_cv_are_refused(workspace, flag):
    folder = personal_dir(workspace, f"without_{flag[0].strip('-')}")
    result = run_in_process("personalize.py", *map(str, split(workspace)), "--mods", MODS,
                            "--out_dir", str(folder), *flag)
    assert result.returncode == 1
    assert f"error: {flag[0]} sets how --inner_cv runs its folds" in result.stderr
    assert [path.name for path in folder.iterdir()] == ["init.save"]


def test_compare_options_rows_with_inner_init(workspace):
    """compare_options.py's --inner_init twin of an --inner_cv row cross-validates over
    the training stories once, starts the inner folds there, and reports the gains and
    the disk the run takes."""
    import compare_options
    out_dir = workspace / "compare"
    (out_dir / "default" / "val_on_1").mkdir(parents=True)  # as its default run leaves it
    shutil.copyfile(workspace / "shared" / "best.save", compare_options.default_fold_model(out_dir))
    name = "--inner_cv --finetune head --inner_init"
    flags = dict(compare_options.PERSONAL_VARIANTS)[name]
    assert flags == ["--inner_cv", "--finetune", "head", "--inner_init",
                     compare_options.TRAINING_STORIES_CV]
    common = [*map(str, split(workspace)), "--mods", MODS, "--lr", "1e-3", "--subjects", "1"]
    cv_common = [*map(str, split(workspace)), "--mods", MODS, "--epochs", "1", "--lr", "1e-3",
                 "--save_freq", "1"]
    row = compare_options.run_personalization(name, flags, common, out_dir, 1,
                                              cv_common=cv_common)
    cv_dir = out_dir / compare_options.TRAINING_STORIES_CV
    train_all, _ = datasets.load_train_test(*split(workspace)[1::2], datasets.parse_mods(MODS))
    assert [int(path.name.split("_")[-1]) for path in sorted(cv_dir.glob("val_on_*"))] == sorted(
        train_all.stories)
    folder = out_dir / "personal_inner_cv_finetune_head_inner_init"
    assert json.loads((folder / "args.json").read_text())["inner_init"] == str(cv_dir)
    table = pd.read_csv(folder / "personalize.csv").set_index("subject")
    assert row["estimated_gain"] == pytest.approx(table.loc["Mean", "estimated_gain"])
    assert row["measured_gain"] == pytest.approx(table.loc["Mean", "after_ccc"]
                                                 - table.loc["Mean", "before_ccc"])
    sizes = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert row["disk_mb"] == pytest.approx(sizes / 1e6)
    assert "| `--inner_cv --finetune head --inner_init` |" in compare_options.personal_markdown(
        pd.DataFrame([row]))


# ---------------------------------------------------------------- --mix_weighting similar

def video(subject, story, annotation):
    return SimpleNamespace(subject=subject, story=story, annotation=np.array(annotation, float))


def test_similarity_weights_match_a_hand_computed_case():
    videos = [video(1, 2, [0, 1, 2, 3]), video(1, 4, [1, 2, 3]),
              video(2, 2, [0, 1, 2, 3]), video(2, 4, [1, 2, 3, 100]),  # r = 1 twice (3 frames)
              video(3, 2, [3, 2, 1, 0]),                                # r = -1: weighs 0
              video(4, 2, [0, 1, 0, 1]),                                # r = 1 / sqrt(5)
              video(5, 8, [0, 1, 2, 3])]                                # shares no story
    weights = finetuning.listener_similarity(SimpleNamespace(videos=videos), 1)
    assert weights == pytest.approx({2: 1.0, 3: 0.0, 4: 1 / 5 ** 0.5, 5: 0.0})
    nobody = [video(1, 2, [0, 1, 2, 3]), video(2, 2, [3, 2, 1, 0]), video(3, 4, [0, 1]),
              video(4, 2, [0.5, 0.5, 0.5, 0.5])]  # a flat annotation correlates with nothing
    assert finetuning.listener_similarity(SimpleNamespace(videos=nobody), 1) == {
        2: 1.0, 3: 1.0, 4: 1.0}


def test_similar_mixing_draws_in_proportion_to_the_weights(workspace):
    videos = datasets.load_videos(workspace / "data" / "Training", ["audio"])
    owner = {video.start: video.subject for video in videos.videos}

    def subject_of(segment):
        return owner[max(start for start in owner if start <= segment[0])]
    others = sorted(set(videos.subjects) - {1})
    weights = {others[0]: 1.0, **{other: 0.0 for other in others[1:]}}
    batches = finetuning.MixedBatches(videos, 1, 0.5, 5, 10, weights)(
        torch.Generator().manual_seed(0))
    drawn = [subject_of(piece) for batch in batches for piece in batch if subject_of(piece) != 1]
    assert drawn and set(drawn) == {others[0]}  # a listener who weighs 0 is never drawn
    own = videos.select(subjects=[1]).training_segments(5)
    assert sorted(piece for batch in batches for piece in batch if subject_of(piece) == 1) == \
        sorted(own)


def test_inner_cv_chooses_between_uniform_and_similar_mixing(workspace):
    folder = personal_dir(workspace, "weighting")
    table = personalize_run(workspace, folder, "--inner_cv", "--mix", 0.5, "--mix_weighting",
                            "uniform", "similar", "--epochs", 1)
    curves = pd.read_csv(folder / "subject_1" / "inner_cv.csv")
    assert list(curves["weighting"]) == ["uniform", "uniform", "similar"]
    assert sorted(path.name for path in (folder / "subject_1").glob("inner_*") if path.is_dir()) == [
        "inner_all_mix0.5", "inner_all_mix0.5_similar"]
    best = curves.loc[curves["mean_ccc"].idxmax()]
    assert table.iloc[0]["weighting"] == best["weighting"]


@pytest.mark.parametrize("flags, message", [
    (["--mix_weighting", "similar"], "--mix_weighting weights the other listeners' pieces"),
    (["--mix", "0.5", "--mix_weighting", "uniform", "similar"], "2 fine-tuning methods"),
])
def test_bad_weightings_stop_before_writing(workspace, flags, message):
    folder = personal_dir(workspace, f"bad_weighting_{len(flags)}")
    result = run_in_process("personalize.py", *map(str, split(workspace)), "--mods", MODS,
                            "--out_dir", str(folder), *flags)
    assert result.returncode == 1 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert [path.name for path in folder.iterdir()] == ["init.save"]


def test_similar_weighting_needs_three_listeners(tmp_path):
    write_tiny_data(tmp_path / "data", subjects=2)
    run(train, *split(tmp_path), "--mods", MODS, "--epochs", 1, "--model_dir", tmp_path / "m",
        "--ledger", "none")
    folder = tmp_path / "p"
    folder.mkdir()
    shutil.copyfile(tmp_path / "m" / "best.save", folder / "init.save")
    result = run_in_process("personalize.py", *map(str, split(tmp_path)), "--mods", MODS,
                            "--out_dir", str(folder), "--mix", "0.5", "--mix_weighting", "similar")
    assert result.returncode == 1
    assert "--mix_weighting similar" in result.stderr and "2 listener(s)" in result.stderr
    assert [path.name for path in folder.iterdir()] == ["init.save"]


# ---------------------------------------------------------------- averaging the weights

def test_inner_cv_chooses_the_averaging_of_the_weights(workspace):
    folder = personal_dir(workspace, "averaging")
    table = personalize_run(workspace, folder, "--inner_cv", "--swa_start", "none", "1",
                            "--epochs", 2)
    curves = pd.read_csv(folder / "subject_1" / "inner_cv.csv")
    assert list(curves["swa_start"].fillna(0)) == [0, 0, 0, 1, 1]  # keep init, none, SWA 1
    assert sorted(path.name for path in (folder / "subject_1").glob("inner_*")
                  if path.is_dir()) == ["inner_all", "inner_all_swa1"]
    folds = [column for column in curves if column.startswith("val_on_")]
    # The same seed: epoch 1 of SWA from epoch 1 is the trained weights of epoch 1 ...
    assert curves.loc[1, folds].tolist() == pytest.approx(curves.loc[3, folds].tolist())
    # ... and epoch 2 the mean of epochs 1 and 2, not epoch 2's weights.
    assert curves.loc[2, folds].tolist() != pytest.approx(curves.loc[4, folds].tolist())
    fold = sorted((folder / "subject_1" / "inner_all_swa1").iterdir())[0]
    assert json.loads((fold / finetuning.INNER_FOLD_RECORD).read_text())["training"][
        "swa_start"] == 1
    best = curves.loc[curves["mean_ccc"].idxmax()]
    row = table.iloc[0]
    assert pd.isna(row["swa_start"]) == pd.isna(best["swa_start"]) and row["epochs"] == best["epoch"]
    if best["epoch"]:
        saved = torch.load(folder / "subject_1" / "last.save", weights_only=True)
        assert saved["training"]["swa_start"] == (None if pd.isna(best["swa_start"]) else 1)
    # --resume skips the finished folds, SWA's among them, and gives the same table
    again = personalize_run(workspace, folder, "--inner_cv", "--swa_start", "none", "1",
                            "--epochs", 2, "--resume")
    pd.testing.assert_frame_equal(table, again)


def test_one_averaging_fine_tunes_with_it_and_resumes_exactly(workspace):
    from conftest import assert_same_checkpoints
    resumed, whole = personal_dir(workspace, "ema_resumed"), personal_dir(workspace, "ema_whole")
    personalize_run(workspace, resumed, "--ema", "0.9", "--epochs", 1, "--save_freq", 1)
    personalize_run(workspace, resumed, "--ema", "0.9", "--epochs", 2, "--save_freq", 1,
                    "--resume")
    table = personalize_run(workspace, whole, "--ema", "0.9", "--epochs", 2, "--save_freq", 1)
    assert_same_checkpoints(resumed / "subject_1", whole / "subject_1", ["last.save"])
    saved = torch.load(whole / "subject_1" / "last.save", weights_only=True)
    assert saved["training"]["ema"] == 0.9 and saved["finetuning"]["ema"] == 0.9
    assert table.iloc[0]["ema"] == 0.9


def test_a_run_shorter_than_the_averaging_gets_none():
    from empathy import options
    method = finetuning.Method(swa_start=5)
    assert method.settings(options.TrainingSettings(epochs=3)).swa_start is None
    assert method.settings(options.TrainingSettings(epochs=5)).swa_start == 5
    assert finetuning.Method(ema=0.9).settings(options.TrainingSettings(epochs=1)).ema == 0.9


@pytest.mark.parametrize("flags, message", [
    (["--ema", "0.9", "none"], "2 fine-tuning methods (all_ema0.9, all)"),
    (["--ema", "1.5"], "--ema must be at least 0 and below 1"),
    (["--ema", "abc"], "--ema must be a number or none, got 'abc'"),
    (["--swa_start", "1.5"], "--swa_start must be a whole number or none, got '1.5'"),
    (["--swa_start", "5", "--epochs", "2"], "--swa_start must be from 1 to --epochs (2), got 5"),
    (["--ema", "0.9", "--swa_start", "1"], "two ways of averaging the weights"),
    (["--inner_cv", "--average_last", "2", "--epochs", "2"], "--average_last would score other"),
    (["--inner_cv", "--lr_schedule", "cosine"], "--lr_schedule cosine would spread its rates"),
])
def test_bad_averagings_stop_before_writing(workspace, flags, message):
    folder = personal_dir(workspace, f"bad_averaging_{len(list(workspace.iterdir()))}")
    result = run_in_process("personalize.py", *map(str, split(workspace)), "--mods", MODS,
                            "--out_dir", str(folder), *flags)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert [path.name for path in folder.iterdir()] == ["init.save"]
