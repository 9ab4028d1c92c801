"""crossval.py reports what can be reported (issue 33, parts 3-5): each fold's
last.save beside the epoch picked on the held-out story, a fold ensemble on videos
in no fold, and post-processing chosen on the folds and taken by train.py and
personalize.py with --postprocessing_from. The numbers are recomputed here by hand
from the saved models' per-second predictions and the annotations."""
import contextlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import crossval
import personalize
import train
from empathy import checkpoints, datasets, engine, tables, utils
from conftest import run_in_process

MODS = ["audio", "text"]
STORIES = (2, 4, 5)  # the training stories: story 1 (data/Validation) is in no fold
DELAY = 25  # frames: --label_delay 1
CV_FLAGS = ["--mods", "audio,text", "--normalize", "--label_delay", "1", "--lr", "1e-3",
            "--ledger", "none"]


def run(module, *argv):
    return module.main(module.get_args_parser().parse_args([str(arg) for arg in argv]))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_data_master):
    """Tiny data, and a cross-validation over the training stories with a label delay,
    normalization and calibration, its fold ensemble on data/Validation and its choice
    of post-processing: cv/."""
    root = tmp_path_factory.mktemp("reporting")
    shutil.copytree(tiny_data_master, root / "data")
    with contextlib.chdir(root):
        run(crossval, *CV_FLAGS, "--calibrate", "--out_dir", "cv", "--stories", *STORIES,
            "--epochs", 3, "--save_freq", 1, "--ensemble_dir", "data/Validation",
            "--choose_postprocessing")
    return root


@pytest.fixture
def in_workspace(workspace, tmp_path, monkeypatch):
    """A private copy of the workspace (tests may add to it), as the working folder."""
    copy = shutil.copytree(workspace, tmp_path / "w")
    monkeypatch.chdir(copy)
    return copy


# ---------------------------------------------------------------- by hand

def pooled_videos(root):
    return datasets.load_videos([root / "data" / "Training", root / "data" / "Validation"], MODS)


def per_second(path, videos):
    """The per-second predictions of `videos` by the model saved at `path`, with
    its own normalization."""
    model = checkpoints.load_trained([path], videos, False, "cpu")[0]
    return engine.predict(model.network, videos.with_scaler(model.scaler), "cpu")


def moving_average(frames, seconds):
    """A centred moving average over `seconds` (an odd number of frames), the edges
    repeating the end values."""
    width = 2 * round(seconds * 25 / 2) + 1
    padded = np.pad(frames.astype(np.float64), width // 2, mode="edge")
    sums = np.cumsum(np.insert(padded, 0, 0.0))
    return (sums[width:] - sums[:-width]) / width


def frames_by_hand(prediction, n_frames, smooth=0.0):
    """25 fps frames of a per-second prediction: each second repeated 25 times to the
    length less the delay (padded with the last value), smoothed, then shifted by
    the label delay (the first value repeated in front)."""
    frames = np.repeat(prediction.astype(np.float64), 25)[:n_frames - DELAY]
    frames = np.concatenate([frames, np.full(n_frames - DELAY - frames.size, frames[-1])])
    if smooth:
        frames = moving_average(frames, smooth)
    return np.concatenate([np.full(DELAY, frames[0]), frames])


def calibrated(frames, annotations):
    """Standardized over the video, then given the mean and std of `annotations`."""
    values = np.concatenate(annotations).astype(np.float64)
    return values.mean() + values.std() * (frames - frames.mean()) / frames.std()


def listener_annotations(videos, subject):
    return [video.annotation for video in videos.videos if video.subject == subject]


def scored_by_hand(videos, predictions, listeners, smooth=0.0):
    """Mean CCC over `videos` of the calibrated 25 fps predictions, each listener
    calibrated to their annotations in `listeners` (the model's training videos);
    and the frames."""
    frames = [calibrated(frames_by_hand(prediction, video.n_frames, smooth),
                         listener_annotations(listeners, video.subject))
              for video, prediction in zip(videos.videos, predictions)]
    scores = [utils.ccc(f, video.annotation) for f, video in zip(frames, videos.videos)]
    return np.mean(scores), frames


# ---------------------------------------------------------------- part 5: last.save

def test_last_ccc_is_the_ccc_of_last_save_beside_the_picked_epoch(workspace):
    table = pd.read_csv(workspace / "cv" / "crossval.csv")
    assert table.columns.tolist() == ["story", "train_ccc", "val_ccc", "val_epoch", "last_ccc",
                                      "last_epoch"]
    pooled = pooled_videos(workspace).select(stories=STORIES)
    folds = table.iloc[:3]
    for row in folds.itertuples():
        train_set, held_out = datasets.fold_sets(pooled, int(row.story))
        fold = workspace / "cv" / f"val_on_{row.story}"
        expected, _ = scored_by_hand(held_out, per_second(fold / "last.save", held_out),
                                     train_set)
        assert row.last_ccc == pytest.approx(expected, abs=1e-5)
        assert row.last_epoch == 3
        best = checkpoints.load_checkpoint(fold / "best.save")
        assert row.val_epoch == best["epoch"] == best["best_epoch"]
    summary = table.set_index("story")
    assert summary.loc["Mean", "last_ccc"] == pytest.approx(folds["last_ccc"].mean())
    assert summary.loc["Std", "last_ccc"] == pytest.approx(folds["last_ccc"].std(ddof=0))
    assert summary.loc["Mean-Std", "last_ccc"] == pytest.approx(
        folds["last_ccc"].mean() - folds["last_ccc"].std(ddof=0))
    assert summary[["val_epoch", "last_epoch"]].iloc[3:].isna().all().all()
    results = tables.crossval_results(table)  # the ledger's: the last epoch, nothing picked
    assert results["mean_ccc"] == pytest.approx(folds["last_ccc"].mean())
    assert results["std_ccc"] == pytest.approx(folds["last_ccc"].std(ddof=0))


def test_test_epoch_keeps_the_last_epoch_and_labels_what_was_picked(in_workspace, capsys):
    before = pd.read_csv("cv/crossval.csv")
    table = run(crossval, *CV_FLAGS, "--out_dir", "cv", "--stories", *STORIES, "--test",
                "--test_epoch", 2)
    assert table["val_epoch"][:3].tolist() == [2, 2, 2]
    np.testing.assert_allclose(table["last_ccc"].to_numpy(float), before["last_ccc"], atol=1e-12)
    out = capsys.readouterr().out
    assert "cross-validation of epoch_2.save" in out
    assert "last_ccc, last_epoch: last.save, the last epoch" in out
    assert "nothing picked on the held-out story" in out
    run(crossval, *CV_FLAGS, "--out_dir", "cv", "--stories", *STORIES, "--test")
    assert "best.save, the epoch with the best CCC on the held-out story itself: picked on " \
           "the held-out story" in capsys.readouterr().out


def test_a_fold_without_last_save_has_no_last_ccc_and_no_mean_of_it(in_workspace):
    (in_workspace / "cv" / "val_on_4" / "last.save").unlink()
    table = run(crossval, *CV_FLAGS, "--out_dir", "cv", "--stories", *STORIES, "--test")
    assert np.isnan(table["last_ccc"][1]) and np.isnan(table["last_ccc"][3])
    assert not np.isnan(table["last_ccc"][0]) and not np.isnan(table["val_ccc"][3])


# ---------------------------------------------------------------- part 3: the fold ensemble

def fold_predictions(root, videos, checkpoint="last.save"):
    return [per_second(root / "cv" / f"val_on_{story}" / checkpoint, videos) for story in STORIES]


def written(folder, videos):
    return [np.loadtxt(folder / f"{video.name}.csv", skiprows=1) for video in videos.videos]


def test_the_ensemble_is_the_mean_of_the_folds_calibrated_with_the_pooled_videos(workspace):
    pooled = pooled_videos(workspace).select(stories=STORIES)
    videos = datasets.load_videos(workspace / "data" / "Validation", MODS)
    per_fold = fold_predictions(workspace, videos)
    mean = [np.mean(rows, axis=0) for rows in zip(*per_fold)]
    expected, frames = scored_by_hand(videos, mean, pooled)
    for hand, saved in zip(frames, written(workspace / "cv" / "ensemble_pred", videos)):
        np.testing.assert_allclose(saved, hand, atol=2e-6)
    table = pd.read_csv(workspace / "cv" / "ensemble.csv").set_index("model")
    assert table.loc["ensemble", "ccc"] == pytest.approx(expected, abs=1e-5)
    for story, predictions in zip(STORIES, per_fold):  # each fold with its own statistics
        own, _ = scored_by_hand(videos, predictions, pooled.select(exclude_stories=[story]))
        assert table.loc[f"val_on_{story}", "ccc"] == pytest.approx(own, abs=1e-5)
        assert table.loc[f"val_on_{story}", "epoch"] == 3
    assert table.loc["Mean", "ccc"] == pytest.approx(table["ccc"][:3].mean())


def test_the_ensemble_of_an_epoch_averages_raw_predictions(in_workspace, capsys):
    run(crossval, *CV_FLAGS, "--out_dir", "cv", "--stories", *STORIES, "--test",
        "--test_epoch", 2, "--no-calibrate", "--ensemble_dir", "data/Validation")
    videos = datasets.load_videos(in_workspace / "data" / "Validation", MODS)
    mean = [np.mean(rows, axis=0) for rows in zip(*fold_predictions(in_workspace, videos,
                                                                    "epoch_2.save"))]
    frames = [frames_by_hand(rows, video.n_frames) for rows, video in zip(mean, videos.videos)]
    for hand, saved in zip(frames, written(in_workspace / "cv" / "ensemble_pred", videos)):
        np.testing.assert_allclose(saved, hand, atol=2e-6)
    table = pd.read_csv(in_workspace / "cv" / "ensemble.csv").set_index("model")
    expected = np.mean([utils.ccc(f, video.annotation) for f, video in zip(frames, videos.videos)])
    assert table.loc["ensemble", "ccc"] == pytest.approx(expected, abs=1e-5)
    assert (table["epoch"][:3] == 2).all()
    out = capsys.readouterr().out
    assert "each fold's epoch_2.save, and the mean of their per-second predictions" in out
    assert "ensemble" in out and "val_on_5" in out


# ---------------------------------------------------------------- part 4: the choice

def test_the_choice_rescores_the_folds_last_save_under_every_candidate(workspace):
    candidates = pd.read_csv(workspace / "cv" / "postprocessing_candidates.csv")
    assert len(candidates) == 20
    assert {0.002, 0.004, 0.01, 0.02, 0.05} <= set(candidates["lowpass"])
    assert candidates["candidate"][:2].tolist() == ["none", "--calibrate"]
    row = candidates.set_index("candidate").loc["--smooth 5 --calibrate"]
    pooled = pooled_videos(workspace)
    scores = []
    for story in STORIES:
        train_set, held_out = datasets.fold_sets(pooled.select(stories=STORIES), story)
        predictions = per_second(workspace / "cv" / f"val_on_{story}" / "last.save", held_out)
        score, _ = scored_by_hand(held_out, predictions, train_set, smooth=5)
        assert row[f"val_on_{story}"] == pytest.approx(score, abs=1e-5)
        scores.append(score)
    assert row["mean_ccc"] == pytest.approx(np.mean(scores), abs=1e-5)
    assert row["std_ccc"] == pytest.approx(np.std(scores), abs=1e-5)

    best = candidates.loc[candidates["mean_ccc"].idxmax()]
    assert best["chosen"] == "*" and candidates["chosen"].notna().sum() == 1
    choice = json.loads((workspace / "cv" / "postprocessing.json").read_text())
    assert choice["flags"] == best["candidate"]
    assert choice["cv_mean"] == pytest.approx(best["mean_ccc"])
    assert choice["postprocessing"]["lowpass"] == best["lowpass"]
    assert choice["postprocessing"]["calibrate"] == best["calibrate"]
    assert (choice["mods"], choice["normalize"], choice["label_delay"]) == (MODS, True, 1.0)
    assert choice["stories"] == list(STORIES)


def by_hand_flags(choice):
    """The flags that give the choice, as a user would type them."""
    flags = choice["flags"].split() if choice["flags"] != "none" else []
    return flags + ([] if choice["postprocessing"]["calibrate"] else ["--no-calibrate"])


def test_postprocessing_from_is_the_choice_given_by_hand(in_workspace):
    choice = json.loads((in_workspace / "cv" / "postprocessing.json").read_text())
    assert choice["flags"] != "none"  # the tiny data's choice filters: something to take
    common = [*CV_FLAGS, "--epochs", 2, "--save_freq", 2]
    run(train, *common, "--model_dir", "chosen", "--postprocessing_from", "cv")
    run(train, *common, "--model_dir", "by_hand", *by_hand_flags(choice))
    recorded = json.loads((in_workspace / "chosen" / "args.json").read_text())
    assert recorded["postprocessing_from"] == "cv"
    for name, value in choice["postprocessing"].items():
        assert recorded[name] == value
    chosen, by_hand = (checkpoints.load_checkpoint(in_workspace / folder / "last.save")
                       for folder in ("chosen", "by_hand"))
    assert chosen["postprocessing"] == by_hand["postprocessing"]
    assert chosen["postprocessing"]["smooth"] == choice["postprocessing"]["smooth"]
    assert (in_workspace / "chosen" / "metrics.csv").read_bytes() == \
        (in_workspace / "by_hand" / "metrics.csv").read_bytes()
    # --test: the choice replaces what the model was saved with, as the flags would
    run(train, *CV_FLAGS, "--model_dir", "cv/val_on_2", "--load", "cv/val_on_2/last.save",
        "--test", "--pred_dir", "p_chosen", "--postprocessing_from", "cv")
    run(train, *CV_FLAGS, "--model_dir", "cv/val_on_2", "--load", "cv/val_on_2/last.save",
        "--test", "--pred_dir", "p_by_hand", *by_hand_flags(choice))
    for path in (in_workspace / "p_by_hand" / "pred_test").iterdir():
        assert (in_workspace / "p_chosen" / "pred_test" / path.name).read_bytes() == \
            path.read_bytes()


def test_personalize_takes_the_choice(in_workspace):
    choice = json.loads((in_workspace / "cv" / "postprocessing.json").read_text())
    for folder in ("p_chosen", "p_by_hand"):
        (in_workspace / folder).mkdir()
        shutil.copy(in_workspace / "cv" / "val_on_2" / "last.save",
                    in_workspace / folder / "init.save")
    flags = [*CV_FLAGS, "--epochs", 1]
    chosen = run(personalize, *flags, "--out_dir", "p_chosen", "--postprocessing_from", "cv")
    by_hand = run(personalize, *flags, "--out_dir", "p_by_hand", *by_hand_flags(choice))
    pd.testing.assert_frame_equal(chosen, by_hand)
    recorded = json.loads((in_workspace / "p_chosen" / "args.json").read_text())
    assert recorded["smooth"] == choice["postprocessing"]["smooth"]
    assert recorded["calibrate"] == choice["postprocessing"]["calibrate"]


# ---------------------------------------------------------------- refusals

def edited_choice(folder, **changes):
    """cv's choice, copied into `folder` with some of its entries changed."""
    choice = json.loads((folder.parent / "cv" / "postprocessing.json").read_text())
    folder.mkdir()
    (folder / "postprocessing.json").write_text(json.dumps({**choice, **changes}))
    return folder.name


TRAIN = ["train.py", *CV_FLAGS, "--epochs", "1", "--model_dir", "new"]
REFUSED = [  # (argv, the error's words)
    (TRAIN + ["--postprocessing_from", "data"],
     "--postprocessing_from data holds no postprocessing.json: choose post-processing there "
     "first with crossval.py --out_dir data --choose_postprocessing"),
    (TRAIN + ["--postprocessing_from", "nowhere"], "--postprocessing_from nowhere does not exist"),
    (["train.py", "--mods", "audio", "--normalize", "--label_delay", "1", "--ledger", "none",
      "--model_dir", "new", "--postprocessing_from", "cv"],
     "--postprocessing_from cv was chosen for --mods audio,text, not audio"),
    ([arg for arg in TRAIN if arg != "--normalize"] + ["--postprocessing_from", "cv"],
     "--postprocessing_from cv was chosen for models trained with --normalize: give --normalize"),
    ([arg if arg != "1" else "2" for arg in TRAIN] + ["--postprocessing_from", "cv"],
     "--postprocessing_from cv was chosen for models trained with --label_delay 1, but this "
     "command gives --label_delay 2"),
    (TRAIN + ["--postprocessing_from", "cv", "--lowpass", "7"],
     "--postprocessing_from cv chose"),
    (["crossval.py", *CV_FLAGS, "--out_dir", "new", "--stories", "2", "4", "--epochs", "1",
      "--ensemble_dir", "nowhere"], "--ensemble_dir nowhere does not exist"),
    (["crossval.py", *CV_FLAGS, "--out_dir", "new", "--epochs", "1",
      "--ensemble_dir", "data/Validation"],
     "--ensemble_dir data/Validation holds story 1, which the folds hold too (val_on_1)"),
    (["crossval.py", *CV_FLAGS, "--out_dir", "new", "--stories", "2", "4", "--epochs", "1",
      "--ensemble_dir", "new_data/Validation"],
     "--ensemble_dir new_data/Validation: its text features have 12 columns, the folds' 16"),
    (["crossval.py", *CV_FLAGS, "--out_dir", "new", "--stories", "2", "4", "--epochs", "1",
      "--ensemble_dir", "data/Validation/CombinedAudio"],
     "--ensemble_dir data/Validation/CombinedAudio has no CombinedAudio folder"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=range(len(REFUSED)))
def test_bad_input_is_one_line_before_any_write(in_workspace, argv, message):
    if "new_data/Validation" in argv:
        from conftest import write_tiny_data
        write_tiny_data(in_workspace / "new_data", dims="24,12,32,32")
    result = run_in_process(*argv)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1
    assert not (in_workspace / "new").exists()


def test_a_saved_model_of_another_label_delay_is_refused(in_workspace):
    folder = edited_choice(in_workspace / "delay_0", label_delay=0.0)
    result = run_in_process("train.py", "--mods", "audio,text", "--normalize", "--ledger", "none",
                            "--load", "cv/val_on_2/last.save", "--test", "--pred_dir", "new",
                            "--postprocessing_from", folder)
    assert result.returncode == 1
    assert result.stderr == ("error: --postprocessing_from delay_0 was chosen for models trained "
                             "with --label_delay 0, but cv/val_on_2/last.save was trained with "
                             "--label_delay 1: evaluate a model trained with that delay, or "
                             "choose on a cross-validation of models like this one\n")
    assert not (in_workspace / "new").exists()


def test_a_damaged_choice_is_refused(in_workspace):
    folder = edited_choice(in_workspace / "damaged", normalize="yes")
    result = run_in_process(*TRAIN, "--postprocessing_from", folder)
    assert result.stderr.startswith("error: --postprocessing_from damaged: "
                                    "damaged/postprocessing.json is damaged")
    assert not (in_workspace / "new").exists()


def test_choosing_needs_every_folds_last_save(in_workspace):
    (in_workspace / "cv" / "val_on_5" / "last.save").unlink()
    (in_workspace / "cv" / "postprocessing.json").unlink()
    before = (in_workspace / "cv" / "crossval.csv").read_bytes()
    result = run_in_process("crossval.py", *CV_FLAGS, "--out_dir", "cv", "--stories", "2", "4",
                            "5", "--test", "--choose_postprocessing")
    assert result.returncode == 1
    assert result.stderr == ("error: --choose_postprocessing: cv/val_on_5/last.save does not "
                             "exist (it holds the fold's last epoch): train the folds with "
                             "crossval.py first, or --resume them\n")
    assert (in_workspace / "cv" / "crossval.csv").read_bytes() == before
    assert not (in_workspace / "cv" / "postprocessing.json").exists()
