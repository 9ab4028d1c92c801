import numpy as np
import pandas as pd
import pytest

import score
from empathy import datasets, utils
from conftest import run_in_process, write_tiny_data


def test_scorer_prints_tracks_and_writes_tables(tiny_data, tmp_path, capsys):
    annotations = tiny_data / "Validation" / "Annotations"
    predictions = tmp_path / "pred"
    for path in annotations.iterdir():
        truth = datasets.read_annotation(path)
        # perfect for subject 1, negated for 2, shifted for 3; one frame short for 3
        subject = int(path.name.split("_")[1])
        prediction = {1: truth, 2: -truth, 3: truth[:-1] + 0.5}[subject]
        utils.write_valence(predictions / path.name, prediction)
    per_video, by_story, by_subject = score.main(score.get_args_parser().parse_args(
        [str(annotations), str(predictions), "--out_dir", str(tmp_path / "scores")]))
    assert per_video.set_index("subject")["ccc"][1] == pytest.approx(1.0)
    truth2 = datasets.read_annotation(annotations / "Subject_2_Story_1.csv").astype(float)
    expected = -2 * truth2.var() / (2 * truth2.var() + 4 * truth2.mean() ** 2)
    assert per_video.set_index("subject")["ccc"][2] == pytest.approx(expected)
    truth3 = datasets.read_annotation(annotations / "Subject_3_Story_1.csv")
    padded = np.append(truth3[:-1] + 0.5, truth3[-2] + 0.5)
    assert per_video.set_index("subject")["ccc"][3] == pytest.approx(utils.ccc(padded, truth3))
    assert by_story["ccc"][0] == pytest.approx(per_video["ccc"].mean())
    printed = capsys.readouterr().out
    assert "generalized track" in printed and "personalized track" in printed
    written = pd.read_csv(tmp_path / "scores" / "by_subject.csv")
    assert written["subject"].tolist() == [1, 2, 3]


def test_scorer_refuses_missing_predictions(tiny_data, tmp_path):
    (tmp_path / "pred").mkdir()
    utils.write_valence(tmp_path / "pred" / "Subject_1_Story_1.csv", np.zeros(10))
    result = run_in_process("score.py", str(tiny_data / "Validation" / "Annotations"),
                        str(tmp_path / "pred"))
    assert result.returncode == 1
    assert "has no prediction for Subject_2_Story_1 (2 of 3 missing)" in result.stderr


def test_generator_writes_the_official_split_with_rows_off_and_dummy_tests(tiny_data):
    assert sorted(p.name for p in tiny_data.iterdir()) == ["Testing", "Training", "Validation"]
    assert datasets.load_videos(tiny_data / "Testing", ["audio"]).stories == [3]
    test_annotation = datasets.read_annotation(tiny_data / "Testing" / "Annotations" /
                                               "Subject_1_Story_3.csv")
    assert (test_annotation == 0).all() and test_annotation.size > 25 * 10
    rows_off = 0
    for split in ("Training", "Validation"):
        for path in (tiny_data / split / "Annotations").iterdir():
            seconds = int(np.ceil(datasets.read_annotation(path).size / 25))
            for folder in datasets.MODALITY_FOLDERS.values():
                rows = np.load(tiny_data / split / folder / path.with_suffix(".npy").name).shape[0]
                assert abs(rows - seconds) <= 2
                rows_off += rows != seconds
    assert rows_off > 0


def test_generator_csv_format_and_same_seed_same_data(tmp_path):
    write_tiny_data(tmp_path / "a", file_format="csv", subjects=2, stories=2, seconds=12)
    write_tiny_data(tmp_path / "b", file_format="csv", subjects=2, stories=2, seconds=12)
    first = pd.read_csv(tmp_path / "a" / "Training" / "CombinedText" / "Subject_1_Story_2.csv")
    second = pd.read_csv(tmp_path / "b" / "Training" / "CombinedText" / "Subject_1_Story_2.csv")
    assert first.columns[0] == "text_0" and first.shape[1] == 16
    pd.testing.assert_frame_equal(first, second)


def test_generator_listeners_differ_and_share_the_story(tmp_path):
    """Listeners respond to the same story trajectory with their own gain and offset."""
    data = write_tiny_data(tmp_path / "d", subjects=4, stories=2, seconds=120)
    curves = [datasets.read_annotation(data / "Training" / "Annotations" /
                                       f"Subject_{s}_Story_2.csv")[:2500] for s in (1, 2, 3, 4)]
    correlations = np.corrcoef(curves)[np.triu_indices(4, 1)]
    assert np.mean(correlations) > 0.3          # a shared story signal
    assert np.ptp([curve.mean() for curve in curves]) > 0.1   # listener offsets


def test_generator_refuses_to_overwrite(tiny_data):
    result = run_in_process("make_data.py", "--out_dir", str(tiny_data), "--subjects", "1",
                        "--stories", "2", "--seconds", "10")
    assert result.returncode == 1 and "pass --overwrite" in result.stderr


def test_scorer_names_a_file_given_for_a_folder(tiny_data, tmp_path):
    """A user who passes one prediction file instead of its folder is told so."""
    annotation = tiny_data / "Validation" / "Annotations" / "Subject_1_Story_1.csv"
    result = run_in_process("score.py", str(tiny_data / "Validation" / "Annotations"),
                            str(annotation))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: folder {annotation} is a file, not a folder: check the split folder "
        "(--train_dir/--test_dir) and --mods, or the folder given"]
