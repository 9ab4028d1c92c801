"""Decision-level fusion (fusion.py) and its cross-validation (cv_fusion.py), end to
end on tiny data: two tiny models are trained, their features extracted, then fused."""
import hashlib
import re
import shutil
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_script
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler
from sklearn.svm import SVR

import cv_fusion
import fusion
import train
from empathy import datasets, layout, svr_fusion, utils

MODELS = {"AT": "audio,text", "ATV": "audio,text,v_sub"}
POOLED_STORIES = [1, 2, 4, 5]  # tiny data: stories 2, 4, 5 train, 1 validates, 3 tests


def run_train(*argv):
    return train.main(train.get_args_parser().parse_args(list(argv)))


def run_fusion(*argv):
    return fusion.main(fusion.get_args_parser().parse_args(list(argv)))


def run_cv_fusion(*argv):
    return cv_fusion.main(cv_fusion.get_args_parser().parse_args(list(argv)))


def guide(command):
    """A command of the user guide, with `python <script>` dropped."""
    return command.split()[2:]


def expect_error(module, argv, capsys):
    """Run a script as its __main__ does and return its one-line error."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(module.main, module.get_args_parser(), list(argv))
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    return error


def snapshot(folder):
    """Every file under `folder` with its size and content hash."""
    return {str(path.relative_to(folder)): (path.stat().st_size,
                                            hashlib.sha1(path.read_bytes()).hexdigest())
            for path in sorted(Path(folder).rglob("*")) if path.is_file()}


def annotation_of(root, name):
    for split in ("Training", "Validation"):
        path = root / "data" / split / "Annotations" / f"{name}.csv"
        if path.is_file():
            return datasets.read_annotation(path)
    raise AssertionError(f"no annotation for {name}")


def recomputed_ccc(root, prediction_paths):
    """Mean CCC of written prediction files against the annotations."""
    return float(np.mean([utils.ccc(datasets.read_annotation(path),
                                    annotation_of(root, path.stem))
                          for path in prediction_paths]))


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def feature_master(tiny_data_master, tmp_path_factory):
    """./data, AT and ATV features from tiny models, and the guide's `cp -r` step."""
    root = tmp_path_factory.mktemp("fusion")
    shutil.copytree(tiny_data_master, root / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for name, mods in MODELS.items():
            run_train("--epochs", "2", "--mods", mods, "--model_dir", f"models_{name}")
            run_train(*guide(f"python train.py --cuda --mods {mods} --model_dir models_{name} "
                             f"--feat_dir feat_{name} --features"))
            # cp -r feat_AT/feat_train data/Training/feat_AT && cp -r feat_AT/feat_test ...
            shutil.copytree(f"feat_{name}/feat_train", f"data/Training/feat_{name}")
            shutil.copytree(f"feat_{name}/feat_test", f"data/Validation/feat_{name}")
    return root


@pytest.fixture
def workspace(feature_master, tmp_path, monkeypatch):
    """A private copy of feature_master (without checkpoints) as the working folder."""
    return working_copy(feature_master, tmp_path, monkeypatch, "models_*")


@pytest.fixture(scope="module")
def crossval_master(tiny_data_master, tmp_path_factory):
    """./data and crossval-shaped folders cv_AT, cv_ATV with features for every
    held-out story, made as crossval.py --features does: train.py per fold."""
    root = tmp_path_factory.mktemp("cv_fusion")
    shutil.copytree(tiny_data_master, root / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for name, mods in MODELS.items():
            for story in POOLED_STORIES:
                fold = f"cv_{name}/val_on_{story}"
                common = ["--mods", mods, "--test_set", str(story), "--model_dir", fold]
                run_train(*common, "--epochs", "2")
                run_train(*common, "--features", "--feat_dir", fold)
    return root


@pytest.fixture
def cv_workspace(crossval_master, tmp_path, monkeypatch):
    return working_copy(crossval_master, tmp_path, monkeypatch, "*.save")


def working_copy(master, tmp_path, monkeypatch, leave_out):
    """A private copy of `master` but the files matching `leave_out`, as the working folder."""
    root = Path(shutil.copytree(master, tmp_path / "work", ignore=shutil.ignore_patterns(leave_out)))
    monkeypatch.chdir(root)
    return root


# ---------------------------------------------------------------- fusion.py

def test_guide_fusion_command(workspace, capsys):
    results = run_fusion(*guide("python fusion.py feat_AT feat_ATV --normalize"))
    printed = capsys.readouterr().out

    out = workspace / "fusion_preds"
    # Test predictions in pred_test/, as runs.py's map of the output tree says.
    test_files = sorted((out / "pred_test").glob("*.csv"))
    assert [path.name for path in test_files] == [f"Subject_{s}_Story_1.csv" for s in (1, 2, 3)]
    assert not list(out.glob("*.csv"))
    assert len(list((out / "pred_train").glob("*.csv"))) == 9
    assert (out / layout.FUSION_MODEL).is_file() and (out / "args.json").is_file()
    for path in test_files:
        prediction = pd.read_csv(path)
        assert list(prediction.columns) == ["valence"]
        assert len(prediction) == annotation_of(workspace, path.stem).size

    # The printed CCC is the one recomputed from the written files.
    recomputed = recomputed_ccc(workspace, test_files)
    assert results["test"]["ccc"] == pytest.approx(recomputed, abs=1e-5)
    assert re.search(r"test CCC: (\S+) over 3 videos", printed).group(1) == f"{recomputed:.4f}"
    assert results["train"]["ccc"] == pytest.approx(
        recomputed_ccc(workspace, sorted((out / "pred_train").glob("*.csv"))), abs=1e-5)

    record = joblib.load(out / layout.FUSION_MODEL)
    assert record["in_names"] == ["feat_AT", "feat_ATV"] and record["input_dims"] == [128, 128]
    assert record["C"] == 0.01 and record["normalize"] and record["gamma"] == "auto"
    assert [name for name, _ in record["model"].steps] == ["scale", "svr"]
    assert isinstance(record["model"].steps[0][1], svr_fusion.FeatureScaling)

    # A saved model used with --test predicts the same, without fitting or saving.
    tested = run_fusion("feat_AT", "feat_ATV", "--test", "fusion_preds/fusion_model.joblib",
                        "--pred_dir", "tested")
    assert "train" not in tested and tested["test"]["ccc"] == results["test"]["ccc"]
    assert {path.name for path in (workspace / "tested").iterdir()} - {layout.LOCK} == \
        {"pred_test", "test_args.json"}
    for path in test_files:
        assert (workspace / "tested" / "pred_test" / path.name).read_bytes() == path.read_bytes()


def test_fusion_script_runs_as_the_guide_shows(workspace):
    finished = run_script("fusion.py", "feat_AT", "feat_ATV", "--normalize", cwd=workspace)
    assert finished.returncode == 0, finished.stderr
    assert "test CCC" in finished.stdout
    run_fusion("feat_AT", "feat_ATV", "--normalize", "--pred_dir", "in_process")
    written = sorted((workspace / "fusion_preds" / "pred_test").glob("*.csv"))
    assert len(written) == 3
    for path in written:
        assert (workspace / "in_process" / "pred_test" / path.name).read_bytes() == \
            path.read_bytes()


def test_copy_step_is_optional_and_nested_copies_are_found(workspace, capsys):
    run_fusion("feat_AT", "feat_ATV", "--pred_dir", "copied")
    # Features left where train.py wrote them ...
    shutil.rmtree("data/Training/feat_AT")
    shutil.rmtree("data/Validation/feat_AT")
    # ... and the nested folders that `cp -r` makes when the destination exists.
    for split, side in (("Training", "train"), ("Validation", "test")):
        shutil.rmtree(f"data/{split}/feat_ATV")
        shutil.copytree(f"feat_ATV/feat_{side}", f"data/{split}/feat_ATV/feat_{side}")
    capsys.readouterr()
    run_fusion("feat_AT", "feat_ATV", "--pred_dir", "found")
    printed = capsys.readouterr().out
    assert "feat_AT: features from feat_AT/feat_train, feat_AT/feat_test" in printed
    assert "data/Training/feat_ATV/feat_train" in printed
    for path in (workspace / "copied" / "pred_test").glob("*.csv"):
        assert (workspace / "found" / "pred_test" / path.name).read_bytes() == path.read_bytes()


def test_feature_files_a_row_or_two_off_are_accepted(workspace):
    shorter = workspace / "data/Validation/feat_AT/Subject_1_Story_1.npy"
    np.save(shorter, np.load(shorter)[:-2])
    longer = workspace / "data/Training/feat_ATV/Subject_2_Story_4.npy"
    rows = np.load(longer)
    np.save(longer, np.concatenate([rows, rows[-2:]]))
    run_fusion("feat_AT", "feat_ATV", "--normalize")
    prediction = pd.read_csv(workspace / "fusion_preds/pred_test/Subject_1_Story_1.csv")
    assert len(prediction) == annotation_of(workspace, "Subject_1_Story_1").size


def test_c_grid_is_chosen_on_training_stories_only(workspace, monkeypatch, capsys):
    fitted_on = []
    fit_model = svr_fusion.fit_model

    def spy(videos, c, settings):
        fitted_on.append({video.story for video in videos})
        return fit_model(videos, c, settings)

    monkeypatch.setattr(svr_fusion, "fit_model", spy)
    for argv, held_out, training in ((["--test_set", "4"], 4, {1, 2, 5}), ([], 1, {2, 4, 5})):
        fitted_on.clear()
        run_fusion("feat_AT", "feat_ATV", "--normalize", "--C", "0.01", "1", *argv)
        # Two C values x three leave-one-story-out folds, then the final fit.
        assert len(fitted_on) == 2 * 3 + 1
        assert all(held_out not in stories for stories in fitted_on)
        assert fitted_on[-1] == training
        assert all(len(stories) == 2 and stories < training for stories in fitted_on[:-1])

    videos, _, _ = svr_fusion.load_split(["feat_AT", "feat_ATV"], ["AT", "ATV"],
                                         "data/Training", "data/Validation")
    settings = svr_fusion.SVRSettings(c_values=(0.01, 1.0), normalize=True)
    best, table = svr_fusion.choose_c(videos, settings)
    assert [column for column in table.columns if column.startswith("story")] == \
        ["story 2", "story 4", "story 5"]
    assert best == table.loc[table["mean"].idxmax(), "C"]
    assert joblib.load(workspace / "fusion_preds" / layout.FUSION_MODEL)["C"] == best
    assert "chosen C" in capsys.readouterr().out



def test_a_model_saved_with_scikit_learns_min_max_scaler_predicts_as_it_did(workspace):
    """Models fitted before --normalize became datasets.FeatureScaler hold a
    Pipeline(MinMaxScaler(-1, 1), SVR), pickled as fusion.py saved it then: --test
    loads them and writes the very predictions that pipeline gives."""
    train_videos, test_videos, dims = svr_fusion.load_split(
        ["feat_AT", "feat_ATV"], ["feat_AT", "feat_ATV"], "data/Training", "data/Validation")
    rows, targets = zip(*(video.training_rows() for video in train_videos))
    old_model = Pipeline([("scale", MinMaxScaler(feature_range=(-1, 1))),
                          ("svr", SVR(kernel="rbf", C=0.01, epsilon=0.1, gamma="auto",
                                      cache_size=500))]).fit(np.concatenate(rows),
                                                             np.concatenate(targets))
    settings = svr_fusion.SVRSettings(normalize=True)
    joblib.dump(svr_fusion.model_record(old_model, 0.01, settings, ["feat_AT", "feat_ATV"], dims,
                                        train_videos), "old.joblib")

    tested = run_fusion("feat_AT", "feat_ATV", "--test", "old.joblib", "--pred_dir", "tested")
    expected = svr_fusion.evaluate(old_model, test_videos,
                                   svr_fusion.fitted_postprocessing(settings, train_videos))
    assert tested["test"]["ccc"] == expected["ccc"]
    utils.write_predictions("expected", test_videos, expected["frames"])
    for video in test_videos:
        name = f"{video.name}.csv"
        assert (workspace / "tested" / "pred_test" / name).read_bytes() == \
            (workspace / "expected" / name).read_bytes()


def test_a_model_saved_before_the_package_keeps_loading(workspace, monkeypatch):
    """Fusion models written before the library moved into empathy/ pickled
    FeatureScaling as svr_fusion.FeatureScaling; they load and predict as before."""
    import pickle
    import sys
    run_fusion("feat_AT", "feat_ATV", "--normalize", "--pred_dir", "new")
    record = joblib.load(workspace / "new" / layout.FUSION_MODEL)
    old_file = workspace / "old_fusion_model.joblib"
    # Pickle it as the code before the package did: the class under its old module path.
    with monkeypatch.context() as old_layout:
        old_layout.setattr(svr_fusion.FeatureScaling, "__module__", "svr_fusion")
        old_layout.setitem(sys.modules, "svr_fusion", svr_fusion)
        joblib.dump(record, old_file)
    assert b"svr_fusion" in old_file.read_bytes() and b"empathy." not in old_file.read_bytes()
    assert "svr_fusion" not in sys.modules
    with pytest.raises(ModuleNotFoundError, match="svr_fusion"):
        with open(old_file, "rb") as handle:
            pickle.load(handle)  # plain unpickling cannot find the old path
    loaded = svr_fusion.load_model(old_file)
    assert "svr_fusion" not in sys.modules  # the old name is only there while loading
    assert isinstance(loaded["model"].steps[0][1], svr_fusion.FeatureScaling)
    rows = np.random.default_rng(1).normal(size=(7, sum(record["input_dims"]))).astype(np.float32)
    assert np.array_equal(loaded["model"].predict(rows), record["model"].predict(rows))


def test_normalize_is_the_lstm_feature_scaler_as_a_pipeline_step():
    rng = np.random.default_rng(0)
    rows = (rng.normal(size=(40, 5)) * [1, 10, 100, 1e-3, 1]
            + [0, 5, -300, 0, 0]).astype(np.float32)
    rows[:, 4] = 2.5  # constant in training
    step = svr_fusion.FeatureScaling().fit(rows)
    before = rows.copy()
    scaled = step.transform(rows)
    assert np.array_equal(rows, before)  # the caller's rows are left alone
    # FeatureScaler's own arithmetic, from the state a checkpoint would hold.
    scaler = datasets.FeatureScaler.from_state_dict(step.state_)
    assert np.array_equal(scaled, scaler.scale_(step.MOD, torch.tensor(rows)).numpy())
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled[:, :4].min(0), -1, atol=1e-6)
    np.testing.assert_allclose(scaled[:, :4].max(0), 1, atol=1e-6)
    # Within a float32 rounding of scikit-learn's MinMaxScaler(-1, 1), which fusion used
    # before; a dimension constant in training is 0 for any value, as in the LSTM.
    reference = MinMaxScaler(feature_range=(-1, 1)).fit(rows)
    test_rows = rows + rng.normal(size=rows.shape).astype(np.float32)
    np.testing.assert_allclose(step.transform(test_rows)[:, :4],
                               reference.transform(test_rows)[:, :4], rtol=1e-6, atol=1e-6)
    assert not step.transform(test_rows)[:, 4].any()

def _drop_a_video():
    Path("data/Validation/feat_ATV/Subject_2_Story_1.npy").unlink()


def _rows_three_seconds_off():
    path = Path("data/Training/feat_AT/Subject_1_Story_2.npy")
    seconds = datasets.per_second(annotation_of(Path("."), path.stem)).size
    np.save(path, np.resize(np.load(path), (seconds + 3, 128)))


def _not_a_model():
    joblib.dump({"model": "something else"}, "other.joblib")


def _garbage_model():
    Path("other.joblib").write_bytes(b"not a pickle at all")


def _fit_a_model():
    run_fusion("feat_AT", "feat_ATV", "--pred_dir", "fitted")


@pytest.mark.parametrize("damage, argv, message", [
    (_drop_a_video, ["feat_AT", "feat_ATV"], "lacks Subject_2_Story_1"),
    (_rows_three_seconds_off, ["feat_AT", "feat_ATV"], "rows (seconds) but its annotation gives"),
    (None, ["feat_AT", "feat_XYZ"], "feature folder feat_XYZ not found"),
    (None, ["feat_AT", "feat_ATV", "--in_names", "AT"], "--in_names has 1 names for 2"),
    (None, ["feat_AT", "--test", "missing.joblib"], "missing.joblib does not exist"),
    (_not_a_model, ["feat_AT", "--test", "other.joblib"], "is not a fusion model"),
    (_garbage_model, ["feat_AT", "--test", "other.joblib"], "cannot read fusion model"),
    (_fit_a_model, ["feat_ATV", "feat_AT", "--test", "fitted/fusion_model.joblib"],
     "was fitted on inputs feat_AT feat_ATV"),
])
def test_fusion_bad_input_is_one_line_and_writes_nothing(workspace, capsys, damage, argv,
                                                         message):
    if damage:
        damage()
    assert message in expect_error(fusion, argv, capsys)
    assert not (workspace / "fusion_preds").exists()


# ---------------------------------------------------------------- cv_fusion.py

def test_guide_cv_fusion_command(cv_workspace, capsys):
    before = {folder: snapshot(cv_workspace / folder) for folder in ("data", "cv_AT", "cv_ATV")}
    table = run_cv_fusion(*guide("python cv_fusion.py cv_AT cv_ATV --normalize --in_names AT ATV"))
    printed = capsys.readouterr().out

    out = cv_workspace / "cv_fusion_out"
    written = pd.read_csv(out / "crossval.csv")
    assert written["story"].astype(str).tolist() == ["1", "2", "4", "5", "Mean", "Std", "Mean-Std"]
    columns = ["train_ccc", "val_ccc"]
    assert np.allclose(written[columns], table[columns].astype(float))
    assert "Mean-Std" in printed

    # Every value is the CCC recomputed from the written predictions.
    val_ccc = [recomputed_ccc(cv_workspace, sorted(out.glob(f"cv_pred/*_Story_{k}.csv")))
               for k in POOLED_STORIES]
    train_ccc = [recomputed_ccc(cv_workspace, sorted(out.glob(f"val_on_{k}/pred_train/*.csv")))
                 for k in POOLED_STORIES]
    assert len(list((out / "cv_pred").glob("*.csv"))) == 12
    assert np.allclose(written["val_ccc"][:4], val_ccc, atol=1e-5)
    assert np.allclose(written["train_ccc"][:4], train_ccc, atol=1e-5)
    for column, values in (("train_ccc", train_ccc), ("val_ccc", val_ccc)):
        assert np.allclose(written[column][4:], [np.mean(values), np.std(values),
                                                 np.mean(values) - np.std(values)], atol=1e-5)
    for story in POOLED_STORIES:
        record = joblib.load(layout.fold_dir(out, story) / layout.FUSION_MODEL)
        assert record["in_names"] == ["AT", "ATV"] and record["normalize"]
        assert not any(f"Story_{story}" in name for name in record["train_videos"])

    # The user's data and crossval folders are untouched.
    assert {folder: snapshot(cv_workspace / folder) for folder in before} == before

    # --test scores the saved fold models without fitting: the same table.
    tested = run_cv_fusion("cv_AT", "cv_ATV", "--in_names", "AT", "ATV", "--test")
    assert np.allclose(tested[columns].astype(float), table[columns].astype(float))


def test_cv_fusion_script_and_its_c_grid(cv_workspace, monkeypatch):
    finished = run_script("cv_fusion.py", "cv_AT", "cv_ATV", "--normalize", "--in_names", "AT",
                          "ATV", cwd=cv_workspace)
    assert finished.returncode == 0, finished.stderr
    assert (cv_workspace / "cv_fusion_out/crossval.csv").is_file()

    fitted_on = []
    fit_model = svr_fusion.fit_model
    monkeypatch.setattr(svr_fusion, "fit_model", lambda videos, c, settings: (
        fitted_on.append({video.story for video in videos}) or fit_model(videos, c, settings)))
    run_cv_fusion("cv_AT", "cv_ATV", "--C", "0.01", "1", "--out_dir", "grid")
    # Per fold: two C values x three inner folds, then the fold's final fit.
    assert len(fitted_on) == 4 * 7
    for index, held_out in enumerate(POOLED_STORIES):
        fold_fits = fitted_on[7 * index:7 * (index + 1)]
        assert all(held_out not in stories for stories in fold_fits)
        assert fold_fits[-1] == set(POOLED_STORIES) - {held_out}


def _drop_a_fold():
    shutil.rmtree("cv_ATV/val_on_5")


def _drop_fold_features():
    shutil.rmtree("cv_ATV/val_on_2/feat_test")


def _drop_a_fold_video():
    Path("cv_ATV/val_on_4/feat_train/Subject_1_Story_2.npy").unlink()


def _leak_a_training_video():
    for cv_dir in ("cv_AT", "cv_ATV"):
        shutil.copy(f"{cv_dir}/val_on_1/feat_train/Subject_1_Story_2.npy",
                    f"{cv_dir}/val_on_1/feat_test/")


@pytest.mark.parametrize("damage, argv, message", [
    (_drop_a_fold, ["cv_AT", "cv_ATV"], "val_on_5 does not exist"),
    (_drop_fold_features, ["cv_AT", "cv_ATV"], "val_on_2/feat_test does not exist"),
    (_drop_a_fold_video, ["cv_AT", "cv_ATV"], "lacks Subject_1_Story_2"),
    (_leak_a_training_video, ["cv_AT", "cv_ATV"], "videos of other stories than 1"),
    (None, ["cv_AT", "cv_missing"], "cv_missing/val_on_1 does not exist"),
    (None, ["cv_AT", "cv_ATV", "--in_names", "AT", "ATV", "X"], "--in_names has 3 names"),
    (None, ["cv_AT", "cv_ATV", "--test"], "fusion_model.joblib does not exist"),
])
def test_cv_fusion_bad_input_is_one_line_and_writes_nothing(cv_workspace, capsys, damage, argv,
                                                            message):
    if damage:
        damage()
    before = snapshot(cv_workspace / "data")
    assert message in expect_error(cv_fusion, argv, capsys)
    assert not (cv_workspace / "cv_fusion_out").exists()
    assert snapshot(cv_workspace / "data") == before
