"""The options researchers know from comparable toolkits: --loss ccc, --label_delay,
--smooth, --layers/--bidirectional, --seeds, --patience and prediction for test
folders without annotations. Each is off by default; each test shows its effect."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import crossval
import cv_epochs
import personalize
import score
import train
from empathy import checkpoints, datasets, engine, models, options, postprocessing, utils
from conftest import run_in_process
from empathy.utils import FPS, ToolkitError


def run(module, *argv):
    return module.main(module.get_args_parser().parse_args([str(arg) for arg in argv]))


def written(folder):
    """{video name: 25 fps predictions} of a prediction folder."""
    return {path.stem: datasets.read_annotation(path) for path in sorted(folder.glob("*.csv"))}


def scored(pred_dir, annotations="data/Validation/Annotations"):
    per_video, _, _ = score.main(score.get_args_parser().parse_args([annotations, str(pred_dir)]))
    return per_video["ccc"].mean()


# ---------------------------------------------------------------- --loss ccc

def test_ccc_loss_is_one_minus_the_metric():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=generator, dtype=torch.float64)
    y = 0.5 * x + torch.randn(200, generator=generator, dtype=torch.float64) + 0.3
    assert 1 - utils.ccc_loss(x, y).item() == pytest.approx(utils.ccc(x.numpy(), y.numpy()), abs=1e-12)
    constant = torch.zeros(10, requires_grad=True)
    utils.ccc_loss(constant, torch.zeros(10)).backward()
    assert torch.isfinite(constant.grad).all()


def test_training_with_ccc_loss_minimises_one_minus_batch_ccc(tiny_data):
    train_set = datasets.load_videos(tiny_data / "Training", ["audio", "text"])
    torch.manual_seed(0)
    model = models.create("lstm", train_set.input_dims)
    segments = train_set.training_segments(1)
    batch = train_set.gather(segments)
    model.eval()  # the loss of the one batch, without dropout, before the step
    with torch.no_grad():
        expected = 1 - utils.ccc(model(batch.inputs, batch.lengths).numpy(), batch.targets.numpy())
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    settings = options.TrainingSettings(lr=1e-3, weight_decay=0, split=1,
                                        batch_size=len(segments), seed=0, loss="ccc")
    run = engine.TrainingRun(model, engine.Training(train_set, settings, "cpu"))
    first = engine.train_one_epoch(run)
    assert first["loss"] == pytest.approx(expected, abs=1e-5)
    losses = [engine.train_one_epoch(run)["loss"] for _ in range(30)]
    assert losses[-1] < first["loss"] - 0.2


def test_loss_is_recorded_in_checkpoint_and_run_record(in_tmp):
    run(train, "--mods", "audio,text", "--epochs", 2, "--model_dir", "m", "--loss", "ccc")
    best = torch.load(in_tmp / "m" / "best.save", weights_only=True)
    assert best["training"]["loss"] == "ccc"
    assert json.loads((in_tmp / "m" / "args.json").read_text())["loss"] == "ccc"
    metrics = pd.read_csv(in_tmp / "m" / "metrics.csv")
    assert metrics["train_loss"].between(0, 2).all()


# ---------------------------------------------------------------- --label_delay

def test_label_delay_shifts_targets_and_predictions_back(tiny_data):
    videos = datasets.load_videos(tiny_data / "Training", ["audio"])
    delayed = videos.with_label_delay(2 * FPS)
    for video, late in zip(videos.videos, delayed.videos):
        expected = datasets.per_second(video.annotation[2 * FPS:])
        length = late.labelled_seconds
        assert length == min(video.n_seconds, expected.size)
        assert torch.equal(delayed.targets[late.start:late.start + length],
                           torch.from_numpy(expected[:length]))
    per_second = np.arange(10, dtype=np.float32)
    frames = postprocessing.Postprocessing(label_delay=2).frames(per_second, 10 * FPS)
    assert frames.size == 10 * FPS
    assert (frames[:2 * FPS] == 0).all()                  # before any prediction: the first
    assert np.array_equal(frames[2 * FPS:], np.repeat(per_second[:8], FPS))
    with pytest.raises(ToolkitError, match=r"--label_delay of 400 s is longer than Subject_1_Story_\d"):
        videos.with_label_delay(10_000)


def test_label_delay_end_to_end(in_tmp, capsys):
    run(train, "--mods", "audio,text", "--epochs", 2, "--model_dir", "m", "--label_delay", 1.5)
    assert torch.load(in_tmp / "m" / "best.save", weights_only=True)["postprocessing"][
        "label_delay"] == 1.5
    run(train, "--mods", "audio,text", "--model_dir", "m", "--pred_dir", "p", "--test")
    printed = capsys.readouterr().out
    predictions = written(in_tmp / "p" / "pred_test")
    for name, frames in predictions.items():   # the delay comes back from the checkpoint
        assert (frames[:round(1.5 * FPS)] == frames[0]).all()
        assert frames.size == datasets.read_annotation(
            in_tmp / "data" / "Validation" / "Annotations" / f"{name}.csv").size
    assert f"test CCC: {scored(in_tmp / 'p' / 'pred_test'):.4f}" in printed
    run(train, "--mods", "audio,text", "--model_dir", "m", "--feat_dir", "f", "--features")
    features = np.load(in_tmp / "f" / "feat_test" / "Subject_1_Story_1.npy")
    assert np.array_equal(features[0], features[1])   # shifted back by round(1.5) s


# ---------------------------------------------------------------- --smooth

def test_smoothing_windows():
    step = np.array([0, 0, 1, 1], np.float32)     # per second: 0 until frame 50, then 1
    moving = postprocessing.Postprocessing(smooth=1.0).frames(step, 4 * FPS)
    assert moving[2 * FPS - 1] == pytest.approx(12 / 25)   # frames 37..61: twelve are 1
    assert moving[0] == 0 and moving[-1] == 1 and (np.diff(moving) >= 0).all()
    assert moving.mean() == pytest.approx(0.5, abs=1e-6)   # symmetric: mass is kept
    gaussian = postprocessing.Postprocessing(smooth=2.0, smooth_window="gaussian").frames(step, 4 * FPS)
    assert 0 < gaussian[2 * FPS - 1] < 1 and (np.diff(gaussian) >= 0).all()
    constant = postprocessing.Postprocessing(smooth=3.0, smooth_window="gaussian").frames(
        np.full(5, 0.25, np.float32), 5 * FPS)
    assert np.allclose(constant, 0.25)
    with pytest.raises(ToolkitError, match="--smooth must be"):
        postprocessing.Postprocessing(smooth=-1)


def test_smoothing_is_the_same_in_evaluation_and_written_predictions(in_tmp, capsys):
    run(train, "--mods", "audio,text", "--epochs", 3, "--model_dir", "m", "--smooth", 4)
    best_ccc = torch.load(in_tmp / "m" / "best.save", weights_only=True)["best_ccc"]
    run(train, "--mods", "audio,text", "--model_dir", "m", "--pred_dir", "smooth", "--test")
    assert f"test CCC: {best_ccc:.4f}" in capsys.readouterr().out
    assert scored(in_tmp / "smooth" / "pred_test") == pytest.approx(best_ccc, abs=1e-5)
    # --smooth 0 at test time overrides the checkpoint: rougher predictions
    run(train, "--mods", "audio,text", "--model_dir", "m", "--pred_dir", "raw", "--test",
        "--smooth", 0)
    smooth, raw = written(in_tmp / "smooth" / "pred_test"), written(in_tmp / "raw" / "pred_test")
    for name in raw:
        assert np.abs(np.diff(smooth[name])).sum() < np.abs(np.diff(raw[name])).sum()


# ---------------------------------------------------------------- --layers, --bidirectional

def test_bidirectional_stacked_model_shapes_and_loading(tmp_path):
    model = models.FusionLSTM({"audio": 6, "text": 4}, hidden_dim=8, num_layers=2,
                              bidirectional=True)
    state = model.state_dict()
    assert {"lstm.weight_hh_l1", "lstm.weight_hh_l1_reverse"} <= set(state)
    assert state["dec_target.0.weight"].shape == (128, 16)
    assert models.config_from_state_dict(state) == model.config
    torch.save(state, tmp_path / "plain.save")     # a plain state_dict rebuilds too
    loaded, _ = checkpoints.load_model(tmp_path / "plain.save", ["audio", "text"],
                                  {"audio": 6, "text": 4})
    assert loaded.config["num_layers"] == 2 and loaded.config["bidirectional"]


def test_bidirectional_sees_the_future_and_ignores_padding():
    torch.manual_seed(0)
    dims = {"audio": 5}
    lengths = torch.tensor([7, 4])
    inputs = {"audio": torch.randn(11, 5)}
    for bidirectional in (False, True):
        model = models.FusionLSTM(dims, hidden_dim=16, bidirectional=bidirectional).eval()
        with torch.no_grad():
            together = model(inputs, lengths)
            alone = torch.cat([model({"audio": inputs["audio"][:7]}, lengths[:1]),
                               model({"audio": inputs["audio"][7:]}, lengths[1:])])
            changed = {"audio": inputs["audio"].clone()}
            changed["audio"][6] += 1.0          # the last step of the first video
            later = model(changed, lengths)
        assert torch.allclose(together, alone, atol=1e-6)     # padding never leaks in
        assert (later[0] != together[0]).item() == bidirectional   # step 0 sees step 6


def test_bidirectional_stacked_training_end_to_end(in_tmp):
    run(train, "--mods", "audio,text", "--epochs", 2, "--model_dir", "m", "--bidirectional",
        "--layers", 2)
    run(train, "--mods", "audio,text", "--model_dir", "m", "--pred_dir", "p", "--test")
    config = torch.load(in_tmp / "m" / "best.save", weights_only=True)["config"]
    assert config["bidirectional"] and config["num_layers"] == 2
    assert len(written(in_tmp / "p" / "pred_test")) == 3
    with pytest.raises(ToolkitError, match="--layers must be at least 1"):
        run(train, "--mods", "audio", "--model_dir", "n", "--layers", 0)


# ---------------------------------------------------------------- --seeds

def test_seeds_train_separately_and_average(in_tmp, capsys):
    run(train, "--mods", "audio,text", "--epochs", 2, "--model_dir", "m", "--seeds", 2,
        "--seed", 5)
    printed = capsys.readouterr().out
    assert "over 2 seeds" in printed
    for seed in (5, 6):
        assert torch.load(in_tmp / "m" / f"seed_{seed}" / "best.save",
                          weights_only=True)["training"]["seed"] == seed
    first, second = (pd.read_csv(in_tmp / "m" / f"seed_{seed}" / "metrics.csv") for seed in (5, 6))
    assert not first["train_loss"].equals(second["train_loss"])

    run(train, "--mods", "audio,text", "--model_dir", "m", "--pred_dir", "p", "--test")
    printed = capsys.readouterr().out
    average = written(in_tmp / "p" / "pred_test")
    seeds = [written(in_tmp / "p" / f"seed_{seed}" / "pred_test") for seed in (5, 6)]
    for name, frames in average.items():
        assert np.allclose(frames, (seeds[0][name] + seeds[1][name]) / 2, atol=2e-6)
    seed_scores = [scored(in_tmp / "p" / f"seed_{seed}" / "pred_test") for seed in (5, 6)]
    assert (f"test CCC: {scored(in_tmp / 'p' / 'pred_test'):.4f} (seeds: "
            f"{np.mean(seed_scores):.4f} +- {np.std(seed_scores):.4f})") in printed

    run(train, "--mods", "audio,text", "--model_dir", "m", "--feat_dir", "f", "--features")
    assert np.load(in_tmp / "f" / "feat_test" / "Subject_1_Story_1.npy").shape[1] == 2 * 128


def test_seeds_training_reports_their_last_epochs_average_first(in_tmp, capsys):
    """What a --seeds run can report is the validation CCC of the seeds' last.save
    models' average prediction (nothing picked), here of their --average_last
    averages, which train.py --test --load last.save writes; train.py prints it before
    the picks."""
    run(train, "--mods", "audio", "--epochs", 3, "--lr", "1e-2", "--model_dir", "m", "--seeds", 2,
        "--average_last", 2, "--ledger", "none")
    printed = capsys.readouterr().out
    for seed in (1, 2):
        run(train, "--mods", "audio", "--model_dir", "m", "--load", f"m/seed_{seed}/last.save",
            "--pred_dir", f"last_{seed}", "--test")
    first, second = (written(in_tmp / f"last_{seed}" / "pred_test") for seed in (1, 2))
    annotations = in_tmp / "data" / "Validation" / "Annotations"
    expected = np.mean([utils.ccc((first[name] + second[name]) / 2,
                                  datasets.read_annotation(annotations / f"{name}.csv"))
                        for name in first])
    reported = printed.split("average prediction's validation CCC at the last epoch ")[1]
    reported = float(reported.split()[0])
    assert reported == pytest.approx(expected, abs=1e-4)
    assert printed.index("(nothing picked)") < printed.index("(picked on validation)")


def test_seeds_in_crossval_cv_epochs_and_personalize(in_tmp, capsys):
    run(crossval, "--mods", "audio", "--epochs", 2, "--save_freq", 2, "--out_dir", "cv",
        "--seeds", 2, "--stories", 1, 2)
    table = pd.read_csv(in_tmp / "cv" / "crossval.csv")
    assert {"val_ccc_seed_mean", "val_ccc_seed_std"} <= set(table.columns)
    assert (in_tmp / "cv" / "val_on_1" / "seed_2" / "epoch_2.save").is_file()
    assert table["val_ccc"][0] == pytest.approx(
        np.mean([utils.ccc(prediction, truth) for prediction, truth in
                 ((datasets.read_annotation(path),
                   datasets.read_annotation(in_tmp / "data" / "Validation" / "Annotations" / path.name))
                  for path in (in_tmp / "cv" / "cv_pred").glob("*Story_1.csv"))]), abs=1e-6)

    _, best_epoch = run(cv_epochs, "--mods", "audio", "--out_dir", "cv", "--epoch_min", 2,
                        "--epoch_max", 2, "--stories", 1, 2)
    assert best_epoch == 2
    assert np.load(in_tmp / "cv" / "val_on_2" / "feat_test" / "Subject_1_Story_2.npy").shape[1] == 256

    (in_tmp / "pers").mkdir()
    shutil.copy(in_tmp / "cv" / "val_on_1" / "seed_1" / "best.save", in_tmp / "pers" / "init.save")
    table = run(personalize, "--mods", "audio", "--out_dir", "pers", "--epochs", 2, "--seeds", 2,
                "--subjects", 1)
    assert (in_tmp / "pers" / "subject_1" / "seed_2" / "last.save").is_file()
    assert {"after_ccc_seed_mean", "after_ccc_seed_std"} <= set(table.columns)


# ---------------------------------------------------------------- --patience

def test_patience_stops_training_and_resume_keeps_it_stopped(in_tmp, capsys):
    # A learning rate this small leaves the float32 weights unchanged: no improvement.
    run(train, "--mods", "audio,text", "--epochs", 10, "--model_dir", "m", "--lr", 1e-20,
        "--patience", 2, "--save_freq", 1)
    assert "(stopped by --patience)" in capsys.readouterr().out
    assert pd.read_csv(in_tmp / "m" / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    last = torch.load(in_tmp / "m" / "last.save", weights_only=True)
    assert last["stopped_early"] and last["epoch"] == 3 and last["training"]["patience"] == 2
    run(train, "--mods", "audio,text", "--epochs", 10, "--model_dir", "m", "--lr", 1e-20,
        "--patience", 2, "--save_freq", 1, "--resume")
    assert len(pd.read_csv(in_tmp / "m" / "metrics.csv")) == 3
    # A fold that stopped early counts with its final model at later epochs.
    assert checkpoints.run_checkpoints(in_tmp / "m", "epoch_8.save") == [in_tmp / "m" / "last.save"]
    assert checkpoints.run_checkpoints(in_tmp / "m", "epoch_2.save") == [in_tmp / "m" / "epoch_2.save"]


def test_patience_in_crossval_and_cv_epochs(in_tmp):
    run(crossval, "--mods", "audio", "--epochs", 6, "--save_freq", 2, "--out_dir", "cv",
        "--lr", 1e-20, "--patience", 1, "--stories", 1, 2)
    assert not (in_tmp / "cv" / "val_on_1" / "epoch_6.save").exists()
    table, _ = run(cv_epochs, "--mods", "audio", "--out_dir", "cv", "--epoch_min", 2,
                   "--epoch_max", 6, "--epoch_step", 2, "--stories", 1, 2)
    assert table["epoch"].tolist() == [2, 4, 6]
    assert table["mean_ccc"].nunique() == 1   # the weights never moved


# ---------------------------------------------------------------- unlabelled test folders

@pytest.fixture
def unlabelled(in_tmp):
    """A test folder without Annotations (the challenge's test split)."""
    shutil.copytree(in_tmp / "data" / "Validation", in_tmp / "data" / "Test")
    shutil.rmtree(in_tmp / "data" / "Test" / "Annotations")
    run(train, "--mods", "audio,text", "--epochs", 1, "--model_dir", "m")
    return in_tmp


def test_prediction_without_annotations_uses_feature_length(unlabelled, capsys):
    run(train, "--mods", "audio,text", "--model_dir", "m", "--test_dir", "data/Test",
        "--pred_dir", "p", "--test")
    printed = capsys.readouterr().out
    assert "no annotations" in printed and "test CCC" not in printed
    predictions = written(unlabelled / "p" / "pred_test")
    for name, frames in predictions.items():
        rows = min(np.load(unlabelled / "data" / "Test" / folder / f"{name}.npy").shape[0]
                   for folder in ("CombinedAudio", "CombinedText"))
        assert frames.size == rows * FPS


def test_prediction_without_annotations_uses_frame_counts(unlabelled, capsys):
    names = sorted(path.stem for path in (unlabelled / "data" / "Test" / "CombinedAudio").iterdir())
    # data/Test is data/Validation without annotations: counts near their real lengths
    annotations = unlabelled / "data" / "Validation" / "Annotations"
    counts = {name: len((annotations / f"{name}.csv").read_text().splitlines()) - 1 - index
              for index, name in enumerate(names)}
    pd.DataFrame({"video": [f"{name}.mp4" for name in counts], "frames": list(counts.values())}
                 ).to_csv(unlabelled / "frames.csv", index=False)
    run(train, "--mods", "audio,text", "--model_dir", "m", "--test_dir", "data/Test",
        "--pred_dir", "p", "--test", "--frame_counts", "frames.csv")
    assert {name: frames.size for name, frames in written(unlabelled / "p" / "pred_test").items()} == counts


@pytest.mark.parametrize("problem, message", [
    ("missing row", "has no row for Subject_3_Story_1"),
    ("bad header", "needs the header video,frames"),
    ("bad count", "line 2: expected a video name"),
    ("labelled folder", "is for test folders without Annotations"),
    ("training", "leave it out when training"),
])
def test_frame_count_errors(unlabelled, problem, message):
    names = sorted(path.stem for path in (unlabelled / "data" / "Test" / "CombinedAudio").iterdir())
    table = pd.DataFrame({"video": names, "frames": 750})
    if problem == "missing row":
        table = table[table["video"] != "Subject_3_Story_1"]
    if problem == "bad header":
        table = table.rename(columns={"frames": "n"})
    if problem == "bad count":
        table["frames"] = table["frames"].astype(object)
        table.loc[0, "frames"] = "many"
    table.to_csv(unlabelled / "frames.csv", index=False)
    test_dir = "data/Validation" if problem == "labelled folder" else "data/Test"
    command = ["train.py", "--mods", "audio,text", "--model_dir", "m", "--test_dir", test_dir,
               "--frame_counts", "frames.csv", "--pred_dir", "p"]
    result = run_in_process(*command, *([] if problem == "training" else ["--test"]), cwd=unlabelled)
    assert result.returncode == 1 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (unlabelled / "p").exists()


def test_training_needs_annotated_validation(unlabelled):
    with pytest.raises(ToolkitError, match="Test/Annotations does not exist"):
        run(train, "--mods", "audio,text", "--model_dir", "n", "--test_dir", "data/Test")


# ---------------------------------------------------------------- the comparison

def test_compare_options_tables_each_option(in_tmp, capsys):
    import compare_options
    table, personal = run(compare_options, "--epochs", 2, "--only", "default", "smooth_4",
                          "loss_ccc", "calibrate", "--personal_epochs", 1, "--personal_only",
                          "fine_tune", "fine_tune_calibrate", "inner_cv", "inner_cv_calibrate")
    assert table["option"].tolist() == ["default", "--loss ccc", "--smooth 4", "--calibrate"]
    # the last epoch's CCC over folds, which nothing was picked for
    default = pd.read_csv(in_tmp / "compare" / "default" / "crossval.csv").set_index("story")
    assert table["mean_ccc"][0] == pytest.approx(default["last_ccc"]["Mean"])
    smooth = pd.read_csv(in_tmp / "compare" / "smooth_4" / "crossval.csv").set_index("story")
    assert table["mean_ccc"][2] == pytest.approx(smooth["last_ccc"]["Mean"])
    assert table["mean_ccc"][2] != table["mean_ccc"][0]   # same models, smoothed
    assert torch.load(in_tmp / "compare" / "loss_ccc" / "val_on_1" / "best.save",
                      weights_only=True)["training"]["loss"] == "ccc"
    calibrated = torch.load(in_tmp / "compare" / "calibrate" / "val_on_1" / "best.save",
                            weights_only=True)["postprocessing"]
    assert calibrated["calibrate"] and calibrated["listener_stats"]["subjects"]
    # personalization starts from the default run's story-1 model, as the guide does
    assert personal["option"].tolist() == ["fine-tune", "fine-tune --calibrate", "--inner_cv",
                                           "--inner_cv --calibrate"]
    for name in ("fine_tune", "inner_cv"):
        assert (in_tmp / "compare" / f"personal_{name}" / "init.save").read_bytes() == \
            (in_tmp / "compare" / "default" / "val_on_1" / "best.save").read_bytes()
    assert personal["before_ccc"][0] == pytest.approx(personal["before_ccc"][2])
    inner = pd.read_csv(in_tmp / "compare" / "personal_inner_cv" / "personalize.csv")
    assert personal["after_ccc"][2] == pytest.approx(inner["after_ccc"].iloc[-1])
    assert personal["mean_epochs"][2] == pytest.approx(inner["epochs"].iloc[-1])
    out = capsys.readouterr().out
    assert "| `--smooth 4` |" in out and "| `--inner_cv --calibrate` |" in out
    # every run is in the ledger, as if run from the command line
    from empathy import ledger
    rows = ledger.read_ledger(in_tmp / "runs.csv")
    assert list(rows["script"]) == ["crossval.py"] * 4 + ["personalize.py"] * 4
    assert list(rows["mean_ccc"][:4]) == pytest.approx(list(table["mean_ccc"]))
    assert rows["command"][1].startswith("crossval.py --train_dir ./data/Training") and \
        rows["command"][1].endswith("--loss ccc")
    with pytest.raises(ToolkitError, match="unknown option dropout; choose from default, loss_ccc"):
        run(compare_options, "--only", "dropout")


def test_a_recipe_that_takes_a_chosen_postprocessing_leaves_out_its_own_flags():
    """--postprocessing_from refuses a --calibrate or filter beside a choice that differs
    (a choice without --calibrate once stopped a recipe of --calibrate): the recipe's
    train.py run gives the choice alone."""
    import compare_options
    flags = ["--normalize", "--calibrate", "--lowpass", "0.1", "--smooth", "2",
             "--smooth_window", "gaussian", "--lr", "1e-4", "--swa_start", "21"]
    assert compare_options.without_chosen(flags) == ["--normalize", "--lr", "1e-4",
                                                     "--swa_start", "21"]


def test_compare_recipes_tables_what_can_be_reported_beside_what_was_picked(in_tmp, capsys):
    import compare_options
    table = run(compare_options, "--recipes", "ema_0_99",
                "fold_ensemble_of_the_training_folds", "swa_start_21_post_processing_chosen_by_cv", "--epochs", 21, "--mods", "audio",
                "--ledger", "none")
    assert table["recipe"].tolist() == ["+ --ema 0.99", "fold ensemble of the training folds",
                                        "+ --swa_start 21, post-processing chosen by CV"]
    ema, ensemble, chosen = (in_tmp / "compare" / name for name in (
        "ema_0_99", "fold_ensemble_of_the_training_folds",
        "swa_start_21_post_processing_chosen_by_cv"))
    metrics = pd.read_csv(ema / "val" / "metrics.csv")
    assert len(metrics) == 21 and table["val_ccc"][0] == pytest.approx(metrics["val_ccc"].iloc[-1])
    assert table["best_ccc"][0] == pytest.approx(metrics["val_ccc"].max())
    assert table["std_last"][0] == pytest.approx(metrics["val_ccc"].tail(20).std(ddof=0))
    folds = pd.read_csv(ema / "cv" / "crossval.csv").set_index("story")
    assert len(folds) == 4 + 3  # stories 1, 2, 4, 5 and Mean, Std, Mean-Std
    assert table["cv_mean"][0] == pytest.approx(folds.loc["Mean", "last_ccc"])
    assert table["cv_std"][0] == pytest.approx(folds.loc["Std", "last_ccc"])
    # the ensemble of the training stories' folds scores story 1 once
    scored = pd.read_csv(ensemble / "cv" / "ensemble.csv").set_index("model")
    assert table["val_ccc"][1] == pytest.approx(scored.loc["ensemble", "ccc"])
    assert table["cv"][1] == "3 training folds" and pd.isna(table["std_last"][1])
    choice = json.loads((chosen / "cv" / "postprocessing.json").read_text())
    assert table["cv_mean"][2] == pytest.approx(choice["cv_mean"])
    assert "picked on them" in table["cv"][2]
    assert json.loads((chosen / "val" / "args.json").read_text())["postprocessing_from"] == \
        str(chosen.relative_to(in_tmp) / "cv")
    out = capsys.readouterr().out
    assert "best epoch's CCC (picked on validation)" in out and "| `+ --ema 0.99` |" in out
    with pytest.raises(ToolkitError, match="unknown recipe nope; choose from the_guide_s_default"):
        run(compare_options, "--recipes", "nope")
    with pytest.raises(ToolkitError, match="--recipes needs --epochs 21 or more"):
        run(compare_options, "--recipes", "--epochs", 10)


def test_compare_options_refuses_a_bad_jobs_before_writing(in_tmp):
    """--jobs 0 once trained the first recipe's train.py run (or wrote args.json)
    before crossval.py refused it."""
    import compare_options
    for recipes in (["--recipes", "swa_start_1"], []):
        with pytest.raises(ToolkitError, match="--jobs must be at least 1, got 0"):
            run(compare_options, *recipes, "--jobs", 0, "--out_dir", "jobs_0")
        assert not (in_tmp / "jobs_0").exists()


def test_a_seeds_recipe_reports_the_curve_of_the_seeds_average_prediction(in_tmp):
    """The --seeds rows' last, best and std columns are those of the seeds' average
    prediction epoch by epoch (what the row reports), not of one seed's metrics.csv;
    the epochs' checkpoints are scored, then deleted but for the last."""
    import compare_options
    model_dir = in_tmp / "seeds"
    run(train, "--mods", "audio", "--epochs", 3, "--seeds", 2, "--save_freq", 1, "--lr", "1e-2",
        "--model_dir", model_dir, "--ledger", "none")
    train_set, val_set = datasets.load_train_test("data/Training", "data/Validation", ["audio"])
    expected = []
    for epoch in (1, 2, 3):
        trained, saved = engine.load_for_evaluation(
            [model_dir / f"seed_{seed}" / f"epoch_{epoch}.save" for seed in (1, 2)], train_set,
            False, {}, "cpu", [val_set])
        scored = engine.evaluate_seeds(trained, val_set, "cpu", saved)
        assert scored["ccc"] not in scored["seed_ccc"]  # the average is neither seed
        expected.append(scored["ccc"])
    last, best, best_epoch, std = compare_options.seeds_curve(
        model_dir, "data/Training", "data/Validation", "audio")
    assert last == pytest.approx(expected[-1]) and best == pytest.approx(max(expected))
    assert best_epoch == 1 + int(np.argmax(expected)) and std == pytest.approx(np.std(expected))
    first_seed = pd.read_csv(model_dir / "seed_1" / "metrics.csv")["val_ccc"]
    assert list(first_seed) != pytest.approx(expected)
    for seed in (1, 2):
        assert sorted(path.name for path in (model_dir / f"seed_{seed}").glob("epoch_*")) == \
            ["epoch_3.save"]
