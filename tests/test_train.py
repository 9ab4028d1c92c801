import json

import numpy as np
import pandas as pd
import pytest
import torch

from empathy import checkpoints, datasets, engine, models, options
import train
from conftest import assert_same_checkpoints, run_in_process, run_script


def run_train(*argv):
    return train.main(train.get_args_parser().parse_args(list(argv)))


def guide(command):
    """A command of the user guide, with `python train.py` dropped."""
    return command.split()[2:]


def test_guide_training_commands_produce_the_named_files(in_tmp):
    run_train(*guide("python train.py --cuda --epochs 2000 --mods audio,text --model_dir models_AT"),
              "--epochs", "3", "--save_freq", "2")
    run_train(*guide("python train.py --cuda --epochs 2000 --mods audio,text,v_sub "
                     "--model_dir models_ATV"), "--epochs", "2")
    for name in ("best.save", "epoch_2.save", "last.save", "args.json", "metrics.csv"):
        assert (in_tmp / "models_AT" / name).is_file(), name
    assert not (in_tmp / "models_AT" / "epoch_3.save").exists()
    metrics = pd.read_csv(in_tmp / "models_AT" / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3] and metrics["val_ccc"].notna().all()
    assert json.loads((in_tmp / "models_AT" / "args.json").read_text())["mods"] == "audio,text"

    best = torch.load(in_tmp / "models_AT" / "best.save", weights_only=True)
    assert best["config"]["mods"] == ["audio", "text"]
    assert best["epoch"] == best["best_epoch"] and "optimizer" not in best
    assert best["best_ccc"] == pytest.approx(metrics["val_ccc"].max())
    last = torch.load(in_tmp / "models_AT" / "last.save", weights_only=True)
    assert last["epoch"] == 3 and "optimizer" in last
    assert torch.load(in_tmp / "models_ATV" / "best.save", weights_only=True)[
        "config"]["input_dims"] == {"audio": 24, "text": 16, "v_sub": 32}


def test_guide_test_and_feature_commands(in_tmp, capsys):
    run_train("--epochs", "2", "--mods", "audio,text", "--model_dir", "models_AT")
    capsys.readouterr()
    run_train(*guide("python train.py --cuda --mods audio,text --model_dir models_AT "
                     "--pred_dir preds_AT --test"))
    printed = capsys.readouterr().out
    assert "train CCC" in printed and "test CCC" in printed
    test_files = sorted(p.name for p in (in_tmp / "preds_AT" / "pred_test").iterdir())
    assert test_files == [f"Subject_{s}_Story_1.csv" for s in (1, 2, 3)]
    assert len(list((in_tmp / "preds_AT" / "pred_train").iterdir())) == 9
    prediction = pd.read_csv(in_tmp / "preds_AT" / "pred_test" / "Subject_2_Story_1.csv")
    annotation = pd.read_csv(in_tmp / "data" / "Validation" / "Annotations" / "Subject_2_Story_1.csv")
    assert list(prediction.columns) == ["valence"] and len(prediction) == len(annotation)

    run_train(*guide("python train.py --cuda --mods audio,text --model_dir models_AT --test "
                     "--test_dir ./data/Testing"))
    assert sorted(p.name for p in (in_tmp / "pred_test").iterdir()) == [
        f"Subject_{s}_Story_{t}.csv" for s in (1, 2, 3) for t in (3,)]

    run_train(*guide("python train.py --cuda --mods audio,text --model_dir models_AT "
                     "--feat_dir feat_AT --features"))
    features = np.load(in_tmp / "feat_AT" / "feat_test" / "Subject_1_Story_1.npy")
    video = datasets.load_videos(in_tmp / "data" / "Validation", ["audio", "text"]).videos[0]
    assert features.shape == (video.n_seconds, 128) and features.dtype == np.float32
    assert len(list((in_tmp / "feat_AT" / "feat_train").iterdir())) == 9


def test_printed_ccc_matches_the_scorer_on_written_predictions(in_tmp, capsys):
    import score
    run_train("--epochs", "2", "--mods", "audio,text", "--model_dir", "m")
    run_train("--mods", "audio,text", "--model_dir", "m", "--pred_dir", "p", "--test")
    printed = capsys.readouterr().out
    per_video, _, _ = score.main(score.get_args_parser().parse_args(
        ["data/Validation/Annotations", "p/pred_test"]))
    assert f"test CCC: {per_video['ccc'].mean():.4f}" in printed


def test_training_learns(in_tmp):
    """After a short training the validation CCC clearly beats the untrained model's."""
    (summary,) = run_train("--epochs", "25", "--mods", "audio,text", "--model_dir", "m",
                           "--lr", "1e-3", "--eval_freq", "25")
    train_set = datasets.load_videos(in_tmp / "data" / "Training", ["audio", "text"])
    val_set = datasets.load_videos(in_tmp / "data" / "Validation", ["audio", "text"])
    torch.manual_seed(1)
    untrained = engine.evaluate(models.create("lstm", train_set.input_dims), val_set, "cpu")
    assert summary["best_ccc"] > untrained["ccc"] + 0.3
    assert summary["best_ccc"] > 0.4


def test_same_seed_same_predictions(in_tmp):
    for name in ("a", "b"):
        run_train("--epochs", "2", "--mods", "audio", "--model_dir", name)
    for name in ("best.save", "last.save"):
        first = torch.load(in_tmp / "a" / name, weights_only=True)["model"]
        second = torch.load(in_tmp / "b" / name, weights_only=True)["model"]
        for key in first:
            torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_optimizer_matches_plain_adam_bit_for_bit(tiny_data):
    """build_optimizer's faster settings must not change a single bit of training."""
    train_set = datasets.load_videos(tiny_data / "Training", ["audio", "text", "v_sub"])
    training = engine.Training(train_set, options.TrainingSettings(lr=1e-3, batch_size=4), "cpu")
    state_dicts = []
    for plain_adam in (False, True):
        torch.manual_seed(1)
        model = models.create("lstm", train_set.input_dims)
        run = engine.TrainingRun(model, training)  # with build_optimizer's Adam
        if plain_adam:
            run.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
        for _ in range(3):
            engine.train_one_epoch(run)
        state_dicts.append(model.state_dict())
    for key, value in state_dicts[0].items():
        assert torch.equal(value.view(torch.int32), state_dicts[1][key].view(torch.int32)), key


def test_resume_continues_exactly_as_an_uninterrupted_run(in_tmp):
    run_train("--epochs", "4", "--mods", "audio", "--model_dir", "whole", "--save_freq", "2")
    run_train("--epochs", "2", "--mods", "audio", "--model_dir", "parts", "--save_freq", "2")
    run_train("--epochs", "4", "--mods", "audio", "--model_dir", "parts", "--save_freq", "2",
              "--resume")
    whole = pd.read_csv(in_tmp / "whole" / "metrics.csv")
    parts = pd.read_csv(in_tmp / "parts" / "metrics.csv")
    pd.testing.assert_frame_equal(whole, parts)
    assert_same_checkpoints(in_tmp / "whole", in_tmp / "parts",
                            ["last.save", "epoch_4.save", "best.save"])


def test_normalization_travels_with_the_checkpoint(in_tmp):
    run_train("--epochs", "2", "--mods", "audio", "--model_dir", "m", "--normalize")
    checkpoint = torch.load(in_tmp / "m" / "best.save", weights_only=True)
    train_set = datasets.load_videos(in_tmp / "data" / "Training", ["audio"])
    expected = datasets.FeatureScaler.fit(train_set)
    torch.testing.assert_close(checkpoint["normalization"]["min"]["audio"], expected.minimum["audio"])
    # testing with other training data still scales with the stored statistics
    scaler = checkpoints.resolve_scaler(checkpoint, False, train_set.select(subjects=[1]), "m")
    torch.testing.assert_close(scaler.maximum["audio"], expected.maximum["audio"])


def test_subjects_augment_and_test_set(in_tmp):
    train_set, test_set = datasets.load_train_test("data/Training", "data/Validation", ["audio"],
                                                subjects=[2])
    assert train_set.subjects == [2] and test_set.subjects == [2]
    train_set, test_set = datasets.load_train_test("data/Training", "data/Validation", ["audio"],
                                                subjects=[2], augment=3)
    assert len(train_set) == 6 + 3 * 3 and test_set.subjects == [2]
    train_set, test_set = datasets.load_train_test("data/Training", "data/Validation", ["audio"],
                                                test_stories=[4, 1])
    assert train_set.stories == [2, 5] and test_set.stories == [1, 4]
    run_train("--epochs", "1", "--mods", "audio", "--model_dir", "m", "--test_set", "2",
              "--subjects", "1", "3", "--augment", "2")
    assert (in_tmp / "m" / "best.save").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--mods", "audio,face"], "unknown modality face in --mods"),
    (["--train_dir", "nowhere"], "split folder nowhere does not exist"),
    (["--test_set", "9"], "--test_set: story 9 is not in the data"),
    (["--subjects", "7"], "--subjects: subject 7 is not in the data"),
    (["--augment", "2"], "--augment needs --subjects"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--split", "500"], "--split 500 is larger than"),
    (["--test"], "models/best.save does not exist"),
])
def test_bad_flags_give_one_line_and_exit_1(in_tmp, argv, message):
    result = run_in_process("train.py", "--mods", "audio", *argv, cwd=in_tmp)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (in_tmp / "models" / "best.save").exists()


def test_checkpoint_of_other_modalities_is_refused(in_tmp):
    run_train("--epochs", "1", "--mods", "audio", "--model_dir", "m")
    result = run_in_process("train.py", "--mods", "audio,text", "--model_dir", "m", "--test",
                        "--pred_dir", "p", cwd=in_tmp)
    assert result.returncode == 1 and "run with --mods audio" in result.stderr
    assert not (in_tmp / "p").exists()


def test_an_earlier_run_is_not_overwritten(in_tmp):
    run_train("--epochs", "1", "--mods", "audio", "--model_dir", "m")
    before = (in_tmp / "m" / "best.save").read_bytes()
    result = run_in_process("train.py", "--mods", "audio", "--model_dir", "m", "--epochs", "1",
                        cwd=in_tmp)
    assert result.returncode == 1 and "already holds a run: pass --resume" in result.stderr
    assert (in_tmp / "m" / "best.save").read_bytes() == before
    run_train("--epochs", "1", "--mods", "audio", "--model_dir", "m", "--overwrite", "--seed", "2")
    assert (in_tmp / "m" / "best.save").read_bytes() != before


def test_cuda_without_gpu_warns_once_and_runs(in_tmp):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_script("train.py", "--cuda", "--mods", "audio", "--epochs", "1", cwd=in_tmp)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("no GPU is available") == 1
    assert "best validation CCC" in result.stdout
