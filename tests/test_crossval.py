"""The guide's sections "Cross-validation across stories", "Cross-validation across
epochs" and "Fine-tuning personalized models", end to end on tiny data."""
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

import crossval
import cv_epochs
import personalize
from empathy import checkpoints, datasets, engine, utils
from conftest import run_in_process, run_script


def run(module, command, *extra):
    """Run a guide command in-process: `python <script> ...` plus extra flags."""
    argv = command.split()[2:] + list(extra)
    return module.main(module.get_args_parser().parse_args(argv))


def recomputed_val_ccc(root, pred_folder, story):
    """Mean CCC over subjects of the written predictions of one story."""
    scores = []
    for annotation in sorted((root / "data").glob(f"*/Annotations/Subject_*_Story_{story}.csv")):
        truth = datasets.read_annotation(annotation)
        prediction = datasets.read_annotation(root / pred_folder / annotation.name)
        scores.append(utils.ccc(prediction, truth))
    return np.mean(scores)


def test_guide_sections_run_end_to_end(in_tmp, capsys):
    # Cross-validation across stories
    run(crossval, "python crossval.py --cuda --epochs 2000 --mods audio,text --out_dir cv_AT "
                  "--save_freq 10", "--epochs", "20")
    run(crossval, "python crossval.py --cuda --epochs 2000 --mods audio,text,v_sub --out_dir "
                  "cv_ATV --save_freq 10", "--epochs", "20")
    for out_dir in ("cv_AT", "cv_ATV"):
        table = pd.read_csv(in_tmp / out_dir / "crossval.csv")
        assert table["story"].tolist() == ["1", "2", "4", "5", "Mean", "Std", "Mean-Std"]
        # the guide's columns, then the picked epoch and the last one (nothing picked)
        assert table.columns.tolist() == ["story", "train_ccc", "val_ccc", "val_epoch",
                                          "last_ccc", "last_epoch"]
        assert (table["last_epoch"][:4] == 20).all()
        folds = table.iloc[:4]
        assert table["val_ccc"][4] == pytest.approx(folds["val_ccc"].mean())
        assert table["val_ccc"][5] == pytest.approx(folds["val_ccc"].std(ddof=0))
        assert table["val_ccc"][6] == pytest.approx(table["val_ccc"][4] - table["val_ccc"][5])
        for story, val_ccc in zip(folds["story"], folds["val_ccc"]):
            assert val_ccc == pytest.approx(recomputed_val_ccc(in_tmp, f"{out_dir}/cv_pred", story),
                                            abs=1e-6)
        assert len(list((in_tmp / out_dir / "cv_pred").iterdir())) == 4 * 3
        assert (in_tmp / out_dir / "val_on_1" / "epoch_20.save").is_file()

    run(crossval, "python crossval.py --cuda --mods audio,text --out_dir cv_AT --test "
                  "--test_epoch 1360", "--test_epoch", "10")
    assert "cross-validation of epoch_10.save" in capsys.readouterr().out
    at_epoch_10 = pd.read_csv(in_tmp / "cv_AT" / "crossval.csv")
    assert (at_epoch_10["val_epoch"][:4] == 10).all() and (at_epoch_10["last_epoch"][:4] == 20).all()
    run(crossval, "python crossval.py --cuda --mods audio,text,v_sub --out_dir cv_ATV --test "
                  "--test_epoch 1900", "--test_epoch", "20")

    # Cross-validation across epochs
    table, best_epoch = run(cv_epochs, "python cv_epochs.py --cuda --mods audio,text --out_dir cv_AT",
                            "--epoch_min", "10", "--epoch_max", "20", "--epoch_step", "10")
    assert table["epoch"].tolist() == [10, 20]
    assert table["mean_ccc"][0] == pytest.approx(at_epoch_10["val_ccc"][4], abs=1e-6)
    assert best_epoch == table["epoch"][table["mean_ccc"].idxmax()]
    assert "best epoch" in capsys.readouterr().out
    run(cv_epochs, "python cv_epochs.py --cuda --mods audio,text,v_sub --out_dir cv_ATV",
        "--epoch_min", "10", "--epoch_max", "20", "--epoch_step", "10")
    for story in (1, 2, 4, 5):
        fold = in_tmp / "cv_ATV" / f"val_on_{story}"
        assert len(list((fold / "feat_train").glob("*.npy"))) == 9
        assert len(list((fold / "feat_test").glob("*.npy"))) == 3
    assert pd.read_csv(in_tmp / "cv_ATV" / "cv_epochs.csv").columns.tolist()[-4:] == [
        "val_on_1", "val_on_2", "val_on_4", "val_on_5"]

    # Fine-tuning personalized models: the guide's shell steps, verbatim
    subprocess.run("mkdir personal_AT personal_ATV", shell=True, check=True, cwd=in_tmp)
    subprocess.run("cp cv_AT/val_on_1/best.save personal_AT/init.save", shell=True, check=True,
                   cwd=in_tmp)
    subprocess.run("cp cv_ATV/val_on_1/epoch_20.save personal_ATV/init.save", shell=True,
                   check=True, cwd=in_tmp)
    for out_dir, mods in (("personal_AT", "audio,text"), ("personal_ATV", "audio,text,v_sub")):
        table = run(personalize, f"python personalize.py --cuda --mods {mods} --out_dir {out_dir} "
                                 "--epochs 250", "--epochs", "3")
        assert table["subject"].tolist() == [1, 2, 3, "Mean"]
        predictions = sorted(p.name for p in (in_tmp / out_dir / "pred_test").iterdir())
        assert predictions == [f"Subject_{s}_Story_1.csv" for s in (1, 2, 3)]
        for row in table.iloc[:3].itertuples():
            truth = datasets.read_annotation(in_tmp / "data" / "Validation" / "Annotations" /
                                             f"Subject_{row.subject}_Story_1.csv")
            written = datasets.read_annotation(in_tmp / out_dir / "pred_test" /
                                               f"Subject_{row.subject}_Story_1.csv")
            assert row.after_ccc == pytest.approx(utils.ccc(written, truth), abs=1e-6)
        assert (in_tmp / out_dir / "subject_2" / "last.save").is_file()
        assert pd.read_csv(in_tmp / out_dir / "personalize.csv")["after_ccc"].notna().all()


def test_personalization_starts_from_init_and_learns_each_listener(in_tmp):
    """Fine-tuning starts from init.save and moves each listener's predictions
    towards their own offset, which the shared model cannot know."""
    run(crossval, "python crossval.py --mods audio,text --out_dir cv", "--epochs", "15",
        "--lr", "1e-3", "--save_freq", "15", "--stories", "1", "2")
    (in_tmp / "p").mkdir()
    shutil.copy(in_tmp / "cv" / "val_on_1" / "best.save", in_tmp / "p" / "init.save")
    table = run(personalize, "python personalize.py --mods audio,text --out_dir p",
                "--epochs", "30", "--lr", "1e-3", "--eval_freq", "30")
    model, _ = checkpoints.load_model(in_tmp / "p" / "init.save", ["audio", "text"],
                                      {"audio": 24, "text": 16})
    validation = datasets.load_videos(in_tmp / "data" / "Validation", ["audio", "text"])
    shared = engine.evaluate(model, validation, "cpu")
    assert table["before_ccc"][0] == pytest.approx(shared["records"][0]["ccc"])
    bias_before, bias_after = [], []
    for video, frames in zip(validation.videos, shared["frames"]):
        personal = datasets.read_annotation(in_tmp / "p" / "pred_test" / f"{video.name}.csv")
        bias_before.append(abs(frames.mean() - video.annotation.mean()))
        bias_after.append(abs(personal.mean() - video.annotation.mean()))
    assert np.mean(bias_after) < np.mean(bias_before)


def test_jobs_give_identical_numbers(in_tmp):
    # The same --threads per fold: float sums depend on how work splits among threads.
    base = "python crossval.py --mods audio,text --epochs 3 --save_freq 3 --threads 1"
    one = run(crossval, base, "--out_dir", "one", "--jobs", "1")
    two = run(crossval, base, "--out_dir", "two", "--jobs", "2")
    pd.testing.assert_frame_equal(one, two)
    for name in (p.name for p in (in_tmp / "one" / "cv_pred").iterdir()):
        assert (in_tmp / "one" / "cv_pred" / name).read_bytes() == \
            (in_tmp / "two" / "cv_pred" / name).read_bytes()


def test_features_per_fold_and_resume_skips_finished_folds(in_tmp):
    base = "python crossval.py --mods audio --epochs 2 --save_freq 2 --out_dir cv --stories 1 2"
    run(crossval, base, "--features")
    assert len(list((in_tmp / "cv" / "val_on_2" / "feat_test").iterdir())) == 3
    before = (in_tmp / "cv" / "val_on_1" / "last.save").stat().st_mtime_ns
    run(crossval, base, "--resume")
    assert (in_tmp / "cv" / "val_on_1" / "last.save").stat().st_mtime_ns == before


def test_unsaved_test_epoch_names_the_file_and_lists_saved_epochs(in_tmp):
    run(crossval, "python crossval.py --mods audio --epochs 4 --save_freq 2 --out_dir cv "
                  "--stories 1 2")
    (in_tmp / "cv" / "crossval.csv").unlink()
    result = run_in_process("crossval.py", "--mods", "audio", "--out_dir", "cv", "--stories", "1", "2",
                        "--test", "--test_epoch", "3", cwd=in_tmp)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: cv/val_on_1/epoch_3.save does not exist "
                                     "(saved epochs: 2, 4): give --test_epoch one of them")
    assert not (in_tmp / "cv" / "crossval.csv").exists()


def test_cv_epochs_checks_every_fold_before_starting(in_tmp):
    run(crossval, "python crossval.py --mods audio --epochs 4 --save_freq 2 --out_dir cv "
                  "--stories 1 2")
    (in_tmp / "cv" / "val_on_2" / "epoch_4.save").unlink()
    result = run_in_process("cv_epochs.py", "--mods", "audio", "--out_dir", "cv", "--stories", "1", "2",
                        "--epoch_min", "2", "--epoch_max", "4", "--epoch_step", "2", cwd=in_tmp)
    assert result.returncode == 1
    assert "cv/val_on_2/epoch_4.save does not exist (saved epochs: 2)" in result.stderr
    assert not (in_tmp / "cv" / "cv_epochs.csv").exists()
    assert not (in_tmp / "cv" / "val_on_1" / "feat_train").exists()


def test_missing_init_save_says_how_to_make_it(in_tmp):
    result = run_in_process("personalize.py", "--mods", "audio", "--out_dir", "personal_AT",
                        cwd=in_tmp)
    assert result.returncode == 1
    assert "personal_AT/init.save does not exist: copy the model to start from there" in result.stderr
    assert not (in_tmp / "personal_AT").exists()


def test_crossval_refuses_to_train_over_saved_folds(in_tmp):
    run(crossval, "python crossval.py --mods audio --epochs 1 --out_dir cv --stories 1 2")
    result = run_script("crossval.py", "--mods", "audio", "--epochs", "1", "--out_dir", "cv",
                        "--stories", "1", "2", cwd=in_tmp)
    assert result.returncode == 1 and "cv/val_on_1 already holds a run" in result.stderr
    result = run_script("crossval.py", "--mods", "audio", "--epochs", "5", "--save_freq", "2",
                        "--test_epoch", "3", "--out_dir", "new", cwd=in_tmp)
    assert result.returncode == 1 and "--test_epoch 3 will not be saved" in result.stderr
    assert not (in_tmp / "new").exists()
