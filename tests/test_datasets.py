import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from empathy import datasets
from empathy.datasets import FeatureScaler, load_videos, parse_mods, per_second
from empathy.utils import ToolkitError


def write_split(folder, videos, mods=("audio",), file_format="csv", suffix=""):
    """videos: {(subject, story): (n_frames, {mod: array})}"""
    for (subject, story), (n_frames, features) in videos.items():
        name = f"Subject_{subject}_Story_{story}{suffix}"
        (folder / "Annotations").mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"valence": np.linspace(-1, 1, n_frames)}).to_csv(
            folder / "Annotations" / f"{name}.csv", index=False)
        for mod in mods:
            mod_dir = folder / datasets.MODALITY_FOLDERS[mod]
            mod_dir.mkdir(exist_ok=True)
            if file_format == "csv":
                pd.DataFrame(features[mod]).to_csv(mod_dir / f"{name}.csv", index=False)
            else:
                np.save(mod_dir / f"{name}.npy", features[mod])


def test_loads_generated_split_with_dims_from_the_data(tiny_data):
    videos = load_videos(tiny_data / "Training", ["audio", "text", "v_sub"])
    assert videos.input_dims == {"audio": 24, "text": 16, "v_sub": 32}
    assert videos.stories == [2, 4, 5] and videos.subjects == [1, 2, 3]
    assert len(videos) == 9
    for video in videos.videos:
        assert video.n_seconds >= 1
        assert abs(video.n_seconds - np.ceil(video.annotation.size / 25)) <= 2


def test_csv_and_npy_give_the_same_arrays_and_suffixes_are_accepted(tmp_path):
    rng = np.random.default_rng(0)
    features = {"audio": rng.standard_normal((4, 3)).astype(np.float32)}
    write_split(tmp_path / "csv", {(1, 2): (100, features)}, suffix="_x")
    write_split(tmp_path / "npy", {(1, 2): (100, features)}, file_format="npy")
    from_csv = load_videos(tmp_path / "csv", ["audio"])
    from_npy = load_videos(tmp_path / "npy", ["audio"])
    assert from_csv.videos[0].name == "Subject_1_Story_2"
    # float32 written at full precision parses back to the same bits
    np.testing.assert_array_equal(from_csv.features["audio"], features["audio"])
    np.testing.assert_array_equal(from_npy.features["audio"], features["audio"])


@pytest.mark.parametrize("text,expected", [
    ("a,b\r\n1,2\r\n3,4e-5\r\n", [[1, 2], [3, 4e-5]]),     # CRLF, exponent
    ("a,b\n1,2\n\n3,4", [[1, 2], [3, 4]]),                     # blank line, no final newline
    ("a,a\n 1, 2\n\"3\",4\n", [[1, 2], [3, 4]]),               # repeated names, spaces, quotes
    ("a,b\n1,\n3,4\n", [[1, np.nan], [3, 4]]),                 # empty cell: NaN, refused later
    ("a,b\n", np.zeros((0, 2))),                               # header only: refused later
    ("a,b,\n1,2,\n3,4,\n", [[1, 2], [3, 4]]),                  # a comma ending every line
])
def test_csv_parsing_edge_cases(tmp_path, text, expected):
    path = tmp_path / "features.csv"
    path.write_bytes(text.encode())
    np.testing.assert_array_equal(datasets._parse_csv(path),
                                  np.array(expected, dtype=np.float32).reshape(-1, 2))


@pytest.mark.parametrize("text,message", [
    ("", "features.csv is empty"),
    ("a,b\n1,2\n3,4,5\n", "features.csv is not a table of numbers .*more fields"),
    ("a,b\n1,x\n", "features.csv is not a table of numbers .*could not parse `x`"),
])
def test_malformed_csv_names_the_file(tmp_path, text, message):
    path = tmp_path / "features.csv"
    path.write_bytes(text.encode())
    with pytest.raises(ToolkitError, match=message):
        datasets._parse_csv(path)


def test_arrays_of_more_than_two_dimensions_are_flattened_per_row(tmp_path):
    features = {"audio": np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)}
    write_split(tmp_path, {(1, 1): (100, features)}, file_format="npy")
    videos = load_videos(tmp_path, ["audio"])
    assert videos.input_dims == {"audio": 6}
    np.testing.assert_array_equal(videos.features["audio"][1], np.arange(6, 12))


def test_modalities_and_target_are_cut_to_the_shortest(tmp_path):
    features = {"audio": np.ones((6, 2), np.float32), "text": np.ones((5, 3), np.float32)}
    write_split(tmp_path, {(1, 1): (25 * 4 + 3, features)}, mods=("audio", "text"))
    video = load_videos(tmp_path, ["audio", "text"]).videos[0]
    assert video.n_seconds == 5            # shortest modality
    assert video.labelled_seconds == 5     # annotation has 5 (partial) seconds
    features = {"audio": np.ones((6, 2), np.float32)}   # 2 rows longer: the most accepted
    write_split(tmp_path / "long", {(1, 1): (25 * 4, features)})
    video = load_videos(tmp_path / "long", ["audio"]).videos[0]
    assert (video.n_seconds, video.labelled_seconds) == (6, 4)


def test_targets_are_the_annotation_averaged_per_second():
    frames = np.concatenate([np.zeros(25), np.ones(25), np.full(5, 0.5)]).astype(np.float32)
    np.testing.assert_allclose(per_second(frames), [0, 1, 0.5])


def test_pooling_selection_and_repetition(tiny_data):
    pooled = load_videos([tiny_data / "Training", tiny_data / "Validation"], ["audio"])
    assert pooled.stories == [1, 2, 4, 5]
    fold = pooled.select(exclude_stories=[4])
    assert fold.stories == [1, 2, 5] and fold.features is pooled.features
    assert pooled.select(stories=[1], subjects=[2]).videos[0].name == "Subject_2_Story_1"
    repeated = pooled.repeat_subjects([3], 4)
    assert sum(video.subject == 3 for video in repeated.videos) == 4 * 4
    assert sum(video.subject != 3 for video in repeated.videos) == 8


def test_training_segments_cut_each_video_into_contiguous_pieces(tiny_data):
    videos = load_videos(tiny_data / "Training", ["audio"])
    segments = videos.training_segments(5)
    assert len(segments) == 5 * len(videos)
    first = videos.videos[0]
    pieces = segments[:5]
    assert pieces[0][0] == first.start
    assert sum(length for _, length in pieces) == first.labelled_seconds
    assert max(l for _, l in pieces) - min(l for _, l in pieces) <= 1
    for (start, length), (next_start, _) in zip(pieces, pieces[1:]):
        assert start + length == next_start
    with pytest.raises(ToolkitError, match="--split 1000 is larger"):
        videos.training_segments(1000)


def test_gather_returns_rows_back_to_back_with_targets(tiny_data):
    videos = load_videos(tiny_data / "Training", ["audio", "text"])
    batch = videos.gather([(0, 3), (10, 2)])
    assert batch.lengths.tolist() == [3, 2]
    assert batch.inputs["audio"].shape == (5, 24)
    torch.testing.assert_close(batch.inputs["text"][3:], videos.features["text"][10:12])
    torch.testing.assert_close(batch.targets[:3], videos.targets[:3])


def test_normalization_uses_training_statistics_for_every_set(tiny_data):
    train = load_videos(tiny_data / "Training", ["audio"])
    test = load_videos(tiny_data / "Validation", ["audio"])
    scaler = FeatureScaler.fit(train)
    scaled_train = train.with_scaler(scaler).gather(train.video_segments()).inputs["audio"]
    assert scaled_train.min() == pytest.approx(-1) and scaled_train.max() == pytest.approx(1)
    raw = test.gather(test.video_segments()).inputs["audio"]
    scaled = test.with_scaler(scaler).gather(test.video_segments()).inputs["audio"]
    low, high = scaler.minimum["audio"], scaler.maximum["audio"]
    torch.testing.assert_close(scaled, (raw - low) / (high - low) * 2 - 1)
    restored = FeatureScaler.from_state_dict(scaler.state_dict())
    torch.testing.assert_close(
        test.with_scaler(restored).gather(test.video_segments()).inputs["audio"], scaled)


def test_constant_dimension_scales_to_zero(tmp_path):
    features = {"audio": np.column_stack([np.full(5, 3.0), np.arange(5.0)]).astype(np.float32)}
    write_split(tmp_path, {(1, 1): (125, features)})
    videos = load_videos(tmp_path, ["audio"])
    scaled = videos.with_scaler(FeatureScaler.fit(videos)).gather(videos.video_segments())
    assert scaled.inputs["audio"][:, 0].abs().max() == 0


def test_csv_is_parsed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    features = {"audio": np.ones((5, 2), np.float32)}
    write_split(tmp_path, {(1, 1): (125, features)})
    load_videos(tmp_path, ["audio"])
    assert any(datasets.cache_dir().glob("*.npy"))

    def fail(path):
        raise AssertionError(f"{path} parsed again")
    monkeypatch.setattr(datasets, "_parse_csv", fail)
    assert load_videos(tmp_path, ["audio"]).features["audio"].shape == (5, 2)
    # an edited file is parsed again
    pd.DataFrame(np.zeros((6, 2))).to_csv(tmp_path / "CombinedAudio" / "Subject_1_Story_1.csv",
                                          index=False)
    with pytest.raises(AssertionError, match="parsed again"):
        load_videos(tmp_path, ["audio"])


@pytest.mark.parametrize("text,message", [("audio,face", "unknown modality face"),
                                          ("audio,audio", "names a modality twice"),
                                          ("", "unknown modality")])
def test_parse_mods_rejects_bad_names(text, message):
    with pytest.raises(ToolkitError, match=message):
        parse_mods(text)
    assert parse_mods("text,audio") == ["text", "audio"]


def bad_input_cases():
    """(description, how to damage a copy of the tiny Training folder, expected message)"""
    def remove(path):
        def damage(split):
            target = split / path
            if target.is_dir():
                import shutil
                shutil.rmtree(target)
            else:
                target.unlink()
        return damage

    def write_audio(array):
        def damage(split):
            path = split / "CombinedAudio" / "Subject_1_Story_2.npy"
            np.save(path, array(np.load(path)))
        return damage

    def write_annotation(text):
        def damage(split):
            (split / "Annotations" / "Subject_1_Story_2.csv").write_text(text)
        return damage

    def csv_with_text(split):
        path = split / "CombinedAudio" / "Subject_1_Story_2.npy"
        frame = pd.DataFrame(np.load(path)).astype(object)
        frame.iloc[2, 1] = "abc"
        path.unlink()
        frame.to_csv(path.with_suffix(".csv"), index=False)

    def empty_folder(split):
        for path in (split / "CombinedAudio").iterdir():
            path.unlink()

    def with_nan(array):
        array = array.copy()
        array[1, 1] = np.nan
        return array

    def with_inf(array):
        array = array.copy()
        array[0, 0] = np.inf
        return array

    def with_huge(array):
        array = array.astype(np.float64)
        array[0, 0] = 1e300  # finite in the file, inf once read as float32
        return array

    return [
        ("missing modality folder", remove("CombinedAudio"), "CombinedAudio does not exist"),
        ("missing annotation folder", remove("Annotations"), "Annotations does not exist"),
        ("empty modality folder", empty_folder, "no Subject_<s>_Story_<t>"),
        ("missing feature file", remove("CombinedAudio/Subject_1_Story_2.npy"),
         "lacks Subject_1_Story_2"),
        ("missing annotation file", remove("Annotations/Subject_1_Story_2.csv"),
         "has Subject_1_Story_2, which has no annotation"),
        ("NaN in features", write_audio(with_nan), "Subject_1_Story_2.npy contains NaN"),
        ("inf in features", write_audio(with_inf), "Subject_1_Story_2.npy contains NaN or inf"),
        ("float64 beyond float32", write_audio(with_huge), "Subject_1_Story_2.npy contains NaN or inf"),
        ("different width", write_audio(lambda a: a[:, :5]), "has 5 columns but"),
        ("non-numeric cell", csv_with_text, "Subject_1_Story_2.csv is not a table of numbers"),
        ("annotation without header", write_annotation("0.1\n0.2\n"), "has no `valence` column"),
        ("empty annotation", write_annotation(""), "is empty"),
        ("annotation header only", write_annotation("valence\n"), "has no rows"),
        ("non-numeric annotation", write_annotation("valence\n0.1\nx\n"), "on line 3"),
    ]


@pytest.mark.parametrize("description,damage,message", bad_input_cases(),
                         ids=[case[0] for case in bad_input_cases()])
def test_bad_input_names_the_file(tiny_data, description, damage, message):
    damage(tiny_data / "Training")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error line is all the user sees
        with pytest.raises(ToolkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_videos(tiny_data / "Training", ["audio", "text"])


def test_missing_split_folder(tmp_path):
    with pytest.raises(ToolkitError, match="split folder .*nowhere does not exist"):
        load_videos(tmp_path / "nowhere", ["audio"])


def test_a_video_in_two_pooled_splits_is_refused(tiny_data):
    with pytest.raises(ToolkitError, match="in one split only"):
        load_videos([tiny_data / "Training", tiny_data / "Training"], ["audio"])


def test_csv_parsing_fills_the_current_cache(tmp_path, monkeypatch):
    from conftest import write_tiny_data
    data = write_tiny_data(tmp_path / "data", file_format="csv", subjects=2, stories=2, seconds=12)
    for cache in ("first", "second"):
        monkeypatch.setenv("OMG_CACHE_DIR", str(tmp_path / cache))
        datasets.load_videos(data / "Training", ["audio", "text"])
        assert len(list((tmp_path / cache).glob("*.npy"))) == 4
