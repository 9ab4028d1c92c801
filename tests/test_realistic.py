"""Results that hold on real recordings: the realistic built-in data, data_stats.py,
--calibrate, --lowpass and personalize.py --inner_cv."""
import os
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import crossval
import data_stats
import fusion
import personalize
import train
from empathy import datasets, layout, ledger, postprocessing, svr_fusion, utils
from conftest import write_tiny_data
from empathy.utils import FPS, ToolkitError


def run(module, *argv):
    return module.main(module.get_args_parser().parse_args([str(arg) for arg in argv]))


def video(subject, story, annotation):
    return SimpleNamespace(subject=subject, story=story, annotation=np.asarray(annotation, np.float32))


# ---------------------------------------------------------------- calibration arithmetic

STATS = {"pooled": [0.0, 1.0], "subjects": {"1": [0.5, 0.2]}}


def test_calibration_of_a_hand_computed_video():
    # Per second 1, 2, 3 -> 25 frames each: mean 2, population sd sqrt(2/3), so the
    # standardized seconds are -1.2247, 0, 1.2247; listener 1 has mean 0.5, sd 0.2.
    calibrated = postprocessing.Postprocessing(calibrate=True, listener_stats=STATS).frames(
        np.array([1, 2, 3], np.float32), 3 * FPS, subject=1)
    z = 1 / np.sqrt(2 / 3)
    expected = np.repeat([0.5 - 0.2 * z, 0.5, 0.5 + 0.2 * z], FPS)
    np.testing.assert_allclose(calibrated, expected, atol=1e-6)
    assert calibrated.mean() == pytest.approx(0.5, abs=1e-6)
    assert calibrated.std() == pytest.approx(0.2, abs=1e-6)


def test_a_listener_without_training_videos_takes_the_pooled_statistics(capsys):
    calibration = postprocessing.Postprocessing(calibrate=True, listener_stats=STATS)
    calibrated = calibration.frames(np.array([1, 2, 3], np.float32), 3 * FPS, subject=9)
    np.testing.assert_allclose(calibrated, np.repeat([-1 / np.sqrt(2 / 3), 0, 1 / np.sqrt(2 / 3)], FPS),
                               atol=1e-6)
    assert calibration.unseen_listeners([1, 9, 9, 4]) == [4, 9]
    postprocessing.report_unseen_listeners(calibration, [video(9, 1, [0]), video(1, 1, [0])])
    assert "listener(s) 9 had no training videos" in capsys.readouterr().err
    # Without --calibrate nobody is mapped, so nothing is said.
    assert postprocessing.Postprocessing(listener_stats=STATS).unseen_listeners([9]) == []


def test_a_constant_prediction_becomes_the_listeners_mean():
    calibrated = postprocessing.Postprocessing(calibrate=True, listener_stats=STATS).frames(
        np.full(4, 0.3, np.float32), 4 * FPS, subject=1)
    np.testing.assert_allclose(calibrated, 0.5)


def test_listener_statistics_count_each_video_once():
    first, second = video(1, 2, [0.0, 1.0]), video(1, 4, [1.0, 1.0])
    other = video(2, 2, [-1.0, -1.0, -1.0, -1.0])
    stats = postprocessing.listener_statistics([first, second, second, second, other])  # --augment repeats
    assert stats["subjects"]["1"] == pytest.approx([0.75, np.sqrt(0.1875)])
    assert stats["subjects"]["2"] == pytest.approx([-1.0, 0.0])
    assert stats["pooled"] == pytest.approx([-0.125, np.std([0, 1, 1, 1, -1, -1, -1, -1])])


def test_calibration_without_statistics_is_refused():
    with pytest.raises(ToolkitError, match="--calibrate needs"):
        postprocessing.Postprocessing(calibrate=True).frames(np.zeros(2, np.float32), 2 * FPS, 1)


# ---------------------------------------------------------------- low-pass

def test_lowpass_keeps_slow_changes_and_removes_fast_ones():
    t = np.arange(120 * FPS) / FPS
    slow, fast = np.sin(2 * np.pi * 0.01 * t), 0.5 * np.sin(2 * np.pi * 2 * t)
    frames = (slow + fast).astype(np.float32)
    filtered = postprocessing.Postprocessing(lowpass=0.1)._low_passed(frames)
    assert np.std(filtered - slow) < 0.05 < np.std(frames - slow)
    assert utils.ccc(filtered, slow) > 0.99
    # Zero phase: filtering a time-reversed series gives the reversed result.
    reversed_filtered = postprocessing.Postprocessing(lowpass=0.1)._low_passed(frames[::-1].copy())
    np.testing.assert_allclose(reversed_filtered[::-1], filtered, atol=1e-4)
    # A constant stays exactly constant, even with a cutoff far below 1 / length.
    constant = postprocessing.Postprocessing(lowpass=0.004).frames(np.full(30, 0.35, np.float32), 30 * FPS)
    np.testing.assert_allclose(constant, 0.35, atol=1e-6)


def test_lowpass_runs_before_calibration():
    steps = postprocessing.Postprocessing(lowpass=0.05, calibrate=True, listener_stats=STATS)
    per_second = np.random.default_rng(0).standard_normal(200).astype(np.float32)
    result = steps.frames(per_second, 200 * FPS, subject=1)
    assert result.mean() == pytest.approx(0.5, abs=1e-5) and result.std() == pytest.approx(0.2, abs=1e-5)


@pytest.mark.parametrize("options, message", [
    (dict(lowpass=12.5), "--lowpass 12.5 Hz is not below the Nyquist"),
    (dict(lowpass=-1.0), "--lowpass must be a number of Hz"),
    (dict(lowpass=float("nan")), "--lowpass must be a number of Hz"),
    (dict(lowpass=0.01, smooth=4.0), "--lowpass and --smooth both filter"),
    (dict(lowpass=1e-300), "--lowpass 1e-300 Hz is below 0.0001 Hz"),
])
def test_bad_lowpass_values_are_refused(options, message):
    with pytest.raises(ToolkitError, match=message):
        postprocessing.Postprocessing(**options)


def test_the_lowest_lowpass_cutoff_still_filters():
    frames = postprocessing.Postprocessing(lowpass=postprocessing.MIN_LOWPASS).frames(
        np.random.default_rng(0).standard_normal(300).astype(np.float32), 300 * FPS)
    assert np.isfinite(frames).all()


def test_a_checkpoint_from_a_newer_version_is_refused_by_name():
    with pytest.raises(ToolkitError, match="unknown setting warp_factor: it was saved by a newer"):
        postprocessing.Postprocessing.resolve({"smooth": 1.0, "warp_factor": 9})


def test_a_bad_lowpass_flag_writes_nothing(in_tmp, capsys):
    with pytest.raises(SystemExit) as stopped:
        ledger.run_cli(train.main, train.get_args_parser(), train.ledger_results,
                       ["--mods", "audio,text", "--epochs", "1", "--model_dir", "m", "--lowpass", "30"])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --lowpass 30 Hz is not below the Nyquist frequency of 25 fps predictions "
        "(12.5 Hz): give a lower cutoff, e.g. 0.01"]
    assert sorted(path.name for path in in_tmp.iterdir()) == ["data"]  # no model, no ledger


# ---------------------------------------------------------------- statistics travel with the model

def test_calibration_statistics_travel_with_the_model(in_tmp, capsys):
    run(train, "--mods", "audio,text", "--epochs", 2, "--lr", 1e-3, "--model_dir", "m",
        "--calibrate", "--lowpass", 0.05)
    checkpoint = torch.load(in_tmp / "m" / "best.save", weights_only=True)
    train_set = datasets.load_videos(in_tmp / "data" / "Training", ["audio", "text"])
    saved = checkpoint["postprocessing"]
    assert saved["calibrate"] and saved["lowpass"] == 0.05
    assert saved["listener_stats"] == postprocessing.listener_statistics(train_set.videos)
    # --test scores exactly what training selected the best epoch on ...
    capsys.readouterr()
    run(train, "--mods", "audio,text", "--model_dir", "m", "--pred_dir", "p", "--test")
    assert f"test CCC: {checkpoint['best_ccc']:.4f}" in capsys.readouterr().out
    # ... and its written predictions carry each listener's training mean and sd.
    for path in sorted((in_tmp / "p" / "pred_test").glob("*.csv")):
        subject = datasets.VIDEO_FILE.match(path.name).group(1)
        mean, std = saved["listener_stats"]["subjects"][subject]
        prediction = datasets.read_annotation(path)
        assert prediction.mean() == pytest.approx(mean, abs=1e-5)
        assert prediction.std() == pytest.approx(std, abs=1e-5)
    # A model trained without --calibrate still holds the statistics: calibrating later
    # needs no training data of its own.
    run(train, "--mods", "audio,text", "--epochs", 1, "--model_dir", "plain")
    plain = torch.load(in_tmp / "plain" / "best.save", weights_only=True)["postprocessing"]
    assert not plain["calibrate"] and plain["listener_stats"] == saved["listener_stats"]


def test_crossval_calibrates_each_fold_with_its_own_training_videos(in_tmp):
    run(crossval, "--mods", "audio,text", "--epochs", 1, "--out_dir", "cv", "--calibrate",
        "--stories", 1, 2, 4)
    pooled = datasets.load_pool("data/Training", "data/Validation", ["audio", "text"], [1, 2, 4], None)
    for story in (1, 2, 4):
        train_set, _ = datasets.fold_sets(pooled, story)
        saved = torch.load(in_tmp / "cv" / f"val_on_{story}" / "best.save", weights_only=True)
        assert saved["postprocessing"]["listener_stats"] == postprocessing.listener_statistics(train_set.videos)
    table = pd.read_csv(in_tmp / "cv" / "crossval.csv")
    run(crossval, "--mods", "audio,text", "--out_dir", "cv", "--test", "--stories", 1, 2, 4,
        "--no-calibrate")
    uncalibrated = pd.read_csv(in_tmp / "cv" / "crossval.csv")
    assert not np.allclose(table["val_ccc"], uncalibrated["val_ccc"])
    run(crossval, "--mods", "audio,text", "--out_dir", "cv", "--test", "--stories", 1, 2, 4)
    np.testing.assert_allclose(pd.read_csv(in_tmp / "cv" / "crossval.csv")["val_ccc"],
                               table["val_ccc"], rtol=0, atol=1e-12)


def test_fusion_saves_its_calibration_and_test_uses_it(in_tmp, capsys):
    run(train, "--mods", "audio,text", "--epochs", 1, "--model_dir", "m")
    run(train, "--mods", "audio,text", "--model_dir", "m", "--feat_dir", "f", "--features")
    fitted = run(fusion, "f", "--calibrate", "--pred_dir", "fused")
    record = svr_fusion.load_model(in_tmp / "fused" / layout.FUSION_MODEL)
    train_set = datasets.load_videos(in_tmp / "data" / "Training", ["audio"])
    assert record["postprocessing"]["calibrate"]
    assert record["postprocessing"]["listener_stats"] == postprocessing.listener_statistics(train_set.videos)
    tested = run(fusion, "f", "--test", in_tmp / "fused" / layout.FUSION_MODEL, "--pred_dir", "again")
    assert tested["test"]["ccc"] == pytest.approx(fitted["test"]["ccc"], abs=1e-12)
    plain = run(fusion, "f", "--test", in_tmp / "fused" / layout.FUSION_MODEL, "--pred_dir", "raw",
                "--no-calibrate")
    assert plain["test"]["ccc"] != pytest.approx(fitted["test"]["ccc"], abs=1e-6)


# ---------------------------------------------------------------- personalize.py --inner_cv

def test_inner_cv_chooses_the_epochs_on_the_subjects_own_training_videos(in_tmp):
    run(train, "--mods", "audio,text", "--epochs", 2, "--lr", 1e-3, "--model_dir", "m")
    (in_tmp / "p").mkdir()
    (in_tmp / "p" / "init.save").write_bytes((in_tmp / "m" / "best.save").read_bytes())
    table = run(personalize, "--mods", "audio,text", "--out_dir", "p", "--epochs", 3, "--lr", 1e-3,
                "--inner_cv", "--subjects", 1, 2)
    for subject in (1, 2):
        curves = pd.read_csv(in_tmp / "p" / f"subject_{subject}" / "inner_cv.csv")
        # the subject's training stories 2, 4, 5 held out in turn, epochs 0 (init) to 3
        assert list(curves.columns) == ["epoch", "val_on_2", "val_on_4", "val_on_5", "mean_ccc"]
        assert list(curves["epoch"]) == [0, 1, 2, 3]
        chosen = int(curves.loc[curves["mean_ccc"].idxmax(), "epoch"])
        row = table[table["subject"] == subject].iloc[0]
        assert row["epochs"] == chosen
        subject_dir = in_tmp / "p" / f"subject_{subject}"
        if chosen:
            assert torch.load(subject_dir / "last.save", weights_only=True)["epoch"] == chosen
        else:
            assert row["after_ccc"] == row["before_ccc"] and not (subject_dir / "last.save").exists()
        # a finished inner run keeps its curve and how it was trained, not its weights
        inner = subject_dir / "inner_val_on_4"
        assert pd.read_csv(inner / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
        assert (inner / "inner_fold.json").is_file() and not list(inner.glob("*.save"))
    assert sorted(p.name for p in (in_tmp / "p" / "pred_test").glob("*.csv")) == [
        "Subject_1_Story_1.csv", "Subject_2_Story_1.csv"]


def test_inner_cv_refusals(in_tmp):
    run(train, "--mods", "audio,text", "--epochs", 1, "--model_dir", "m")
    (in_tmp / "p").mkdir()
    (in_tmp / "p" / "init.save").write_bytes((in_tmp / "m" / "best.save").read_bytes())
    with pytest.raises(ToolkitError, match="leave out --patience"):
        run(personalize, "--mods", "audio,text", "--out_dir", "p", "--inner_cv", "--patience", 2)
    with pytest.raises(ToolkitError, match="two or more training stories of subject 1"):
        run(personalize, "--mods", "audio,text", "--out_dir", "p", "--inner_cv",
            "--test_set", 1, 2, 4)
    assert sorted(path.name for path in (in_tmp / "p").iterdir()) == ["init.save"]


# ---------------------------------------------------------------- data_stats.py

def write_annotation(folder, subject, story, values):
    folder.mkdir(parents=True, exist_ok=True)
    utils.write_valence(folder / f"{datasets.video_name(subject, story)}.csv",
                        np.asarray(values, np.float32))


def test_data_stats_on_a_hand_made_folder(tmp_path, capsys):
    annotations = tmp_path / "split" / "Annotations"
    first = np.repeat([0.0, 0.05, 0.1, 0.1], 2 * FPS)      # 8 s on the 0.05 grid
    second = np.repeat([0.1, 0.1, 0.05, 0.0], 2 * FPS)     # the mirror image
    write_annotation(annotations, 1, 1, first)
    write_annotation(annotations, 2, 1, second)
    write_annotation(annotations, 1, 2, np.repeat([0.0, -0.5], 4 * FPS + 3))
    write_annotation(annotations, 2, 3, np.zeros(10))       # a dummy: left out
    table = run(data_stats, tmp_path / "split", "--out", tmp_path / "stats.csv")
    stats = table.set_index("statistic")
    assert stats.loc["pairwise CCC of two listeners on the same story (mean per story)", "mean"] == \
        pytest.approx(utils.ccc(first, second))
    assert stats.loc["fraction of 25 fps frames that differ from the previous frame", "mean"] == \
        pytest.approx(5 / (2 * (8 * FPS - 1) + 8 * FPS + 6 - 1))  # 2 + 2 + 1 changes
    assert "value grid step (0.05)" in stats.index
    all_values = np.concatenate([first, second, np.repeat([0.0, -0.5], 4 * FPS + 3)])
    assert stats.loc["fraction of frames exactly 0", "mean"] == pytest.approx(np.mean(all_values == 0))
    assert stats.loc["per-video standard deviation", "count"] == 3
    listener_means = [np.mean([first.mean(), np.repeat([0.0, -0.5], 4 * FPS + 3).mean()]),
                      second.mean()]
    assert stats.loc["sd of the per-listener means across listeners", "mean"] == \
        pytest.approx(np.std(listener_means), abs=1e-6)
    assert stats.loc["story length (s)", "max"] == pytest.approx((8 * FPS + 6) / FPS)
    assert "1 constant (dummy) annotations left out" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "stats.csv")["statistic"].tolist() == table["statistic"].tolist()


def test_autocorrelation_half_life():
    lags = np.arange(400)
    assert data_stats.autocorrelation_half_life(np.sin(2 * np.pi * lags / 40)) == 7  # cos(2pi 7/40) < 0.5
    assert np.isnan(data_stats.autocorrelation_half_life(np.ones(10)))


def test_data_stats_refuses_a_folder_without_annotations(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        utils.run_cli(data_stats.main, data_stats.get_args_parser(),
                      [str(tmp_path), "--out", str(tmp_path / "s.csv")])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'Annotations'} does not exist: give "
                                     "split folders that hold Annotations/ (e.g. data/Training)")
    assert not (tmp_path / "s.csv").exists()
    with pytest.raises(ToolkitError, match="is a folder: give the CSV file to write"):
        run(data_stats, tmp_path, "--out", tmp_path)


# ---------------------------------------------------------------- the realistic preset

def test_the_realistic_preset_has_the_real_annotations_statistics(tmp_path):
    data = write_tiny_data(tmp_path / "data", preset="realistic", subjects=8, stories=5,
                           seconds=200, dims="6,6,6,6")
    table = run(data_stats, data / "Training", data / "Validation", "--mods", "audio,text",
                "--out", tmp_path / "stats.csv").set_index("statistic")
    mean = table["mean"]
    assert 0.0 < mean["pairwise CCC of two listeners on the same story (mean per story)"] < 0.3
    assert 0.005 < mean["fraction of 25 fps frames that differ from the previous frame"] < 0.05
    assert "value grid step (0.05)" in table.index
    assert 0.1 < mean["fraction of frames exactly 0"] < 0.45
    assert 0.2 < mean["per-video standard deviation"] < 0.5
    assert 4 <= table.loc["autocorrelation of the per-second series falls below 0.5 after (s)",
                          "median"] <= 30
    best_audio = [name for name in table.index if name.startswith("Pearson r of the best single audio")]
    assert abs(mean[best_audio[0]]) < 0.3
    easy = write_tiny_data(tmp_path / "easy", subjects=8, stories=5, seconds=200, dims="6,6,6,6")
    easy_table = run(data_stats, easy / "Training", easy / "Validation",
                     "--out", tmp_path / "easy.csv").set_index("statistic")
    assert easy_table["mean"]["pairwise CCC of two listeners on the same story (mean per story)"] > 0.4
    assert "value grid step (continuous)" in easy_table.index


# ---------------------------------------------------------------- the unstable preset

def unstable_data(out_dir, *argv):
    import make_data
    make_data.main(make_data.get_args_parser().parse_args(
        ["--preset", "unstable", "--out_dir", str(out_dir), *map(str, argv)]))
    return out_dir


def test_the_unstable_preset_has_the_real_datas_shape(tmp_path):
    data = unstable_data(tmp_path / "data")
    assert sorted(folder.name for folder in data.iterdir()) == ["Training", "Validation"]
    train_set, val_set = datasets.load_train_test(data / "Training", data / "Validation",
                                                  ["audio", "text", "v_sub", "v_act"])
    # 10 listeners x stories 2, 4, 5, 8 training and 1 validating, as released
    assert train_set.stories == [2, 4, 5, 8] and val_set.stories == [1]
    assert train_set.subjects == list(range(1, 11)) and len(train_set) + len(val_set) == 50
    assert train_set.input_dims == {"audio": 2, "text": 2, "v_sub": 1, "v_act": 1}
    seconds = {(video.subject, video.story): video.n_frames / FPS
               for video in train_set.videos + val_set.videos}
    assert 300 <= min(seconds.values()) and max(seconds.values()) <= 450
    for story in (1, 2, 4, 5, 8):  # every listener's recording of a story has its own length
        lengths = [length for (_, of_story), length in seconds.items() if of_story == story]
        assert len(set(lengths)) == 10
    # the statistics of the real annotations, as the realistic preset has them
    table = run(data_stats, data / "Training", data / "Validation", "--out",
                tmp_path / "stats.csv").set_index("statistic")["mean"]
    assert 0.05 < table["pairwise CCC of two listeners on the same story (mean per story)"] < 0.35
    assert 0.005 < table["fraction of 25 fps frames that differ from the previous frame"] < 0.05
    assert 0.1 < table["fraction of frames exactly 0"] < 0.45


def test_the_unstable_presets_audio_and_text_follow_the_storyteller_not_the_listener():
    import make_data
    # the relation of what is told to what is felt differs by story, in sign too, so a
    # model fitting the training stories one batch at a time is pulled to and fro
    relations = [make_data.story_relation(story) for story in (2, 4, 5, 8)]
    assert min(relations) < 0 < max(relations) and make_data.story_relation(1) > 0
    rng = np.random.default_rng(0)
    story = make_data.make_unstable_story(rng, 300 * FPS, relation=-0.6)
    correlation = np.corrcoef(story["expressed"], story["trajectory"])[0, 1]
    assert correlation == pytest.approx(-0.6, abs=0.15)


def test_the_other_presets_are_unchanged_by_the_unstable_one(tmp_path):
    """Both older presets write what make_data.py wrote before --preset unstable
    (commit f4b4072), file for file, byte for byte: their tables stay true."""
    import shutil
    import subprocess
    from conftest import ROOT
    old = subprocess.run(["git", "-C", str(ROOT), "show", "f4b4072:make_data.py"],
                         capture_output=True, text=True)
    if shutil.which("git") is None or old.returncode:
        pytest.skip("the toolkit at f4b4072 is not in this checkout (a shallow clone?)")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "make_data.py").write_text(old.stdout)
    for preset in ("easy", "realistic"):
        argv = ["--preset", preset, "--subjects", "2", "--stories", "5", "--seconds", "12",
                "--dims", "3,3,3,3"]
        for tree, folder in ((ROOT, "new"), (tmp_path / "old", "old")):
            finished = subprocess.run([sys.executable, str(tree / "make_data.py"), *argv,
                                       "--out_dir", str(tmp_path / f"{folder}_{preset}")],
                                      capture_output=True, text=True,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert finished.returncode == 0, finished.stderr
        new, old_files = (sorted(path.relative_to(tmp_path / f"{folder}_{preset}")
                                 for path in (tmp_path / f"{folder}_{preset}").rglob("*")
                                 if path.is_file()) for folder in ("new", "old"))
        assert new == old_files and new
        for name in new:
            assert (tmp_path / f"new_{preset}" / name).read_bytes() == \
                (tmp_path / f"old_{preset}" / name).read_bytes(), (preset, name)
