"""Real recordings for the extraction tests, built from material that packages ship.

Speech comes from Debian's espeak-ng, faces from scikit-image's sample photographs
(the astronaut Eileen Collins; the coffee cup has no face), and PyAV muxes them into
an H.264/AAC mp4 shaped like an OMG-Empathy recording: listener and speaker side by
side, 25 fps. The system packages the tests need are listed in apt-packages.txt.
"""
import shutil
import subprocess
import tempfile
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from skimage import data
from skimage.transform import resize

FPS = 25
HALF = 160  # each half of the frame is HALF x HALF pixels: small keeps the tests fast


def speak(text, speed=190):
    """`text` spoken by espeak-ng: (mono float32 samples, sample rate)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed: run "
                           "apt-get install $(cat tests/apt-packages.txt)")
    with tempfile.TemporaryDirectory() as folder:
        wav = Path(folder) / "speech.wav"
        subprocess.run(["espeak-ng", "-s", str(speed), "-w", str(wav), text],
                       capture_output=True, check=True)
        with wave.open(str(wav)) as sound:
            rate = sound.getframerate()
            samples = np.frombuffer(sound.readframes(sound.getnframes()), dtype=np.int16)
    return samples.astype(np.float32) / 32768, rate


def _square(image):
    side = min(image.shape[:2])
    image = image[:side, (image.shape[1] - side) // 2:][:, :side]
    return (resize(image, (HALF, HALF), anti_aliasing=True) * 255).astype(np.uint8)


def face_image():
    """The astronaut's head and shoulders, HALF x HALF RGB."""
    return _square(data.astronaut()[:400, 50:450])


def no_face_image():
    """A coffee cup, HALF x HALF RGB."""
    return _square(data.coffee())


def soundtrack(seconds, rate, speech=None, speech_start=1.0, seed=0):
    """Faint noise (a quiet room) with `speech` samples placed at `speech_start` s."""
    noise = np.random.default_rng(seed).normal(0, 1e-3, int(seconds * rate)).astype(np.float32)
    if speech is not None:
        start = int(speech_start * rate)
        speech = speech[:noise.size - start]
        noise[start:start + speech.size] += speech
    return noise


def write_recording(path, n_frames, listener_face_seconds, speaker_face_seconds,
                    audio=None, audio_rate=22050, listener_side="right"):
    """Write a side-by-side mp4: the face photograph in the seconds listed per side,
    the coffee cup otherwise; `audio` (float samples) as its AAC track, if given."""
    path = Path(path)
    face, cup = face_image(), no_face_image()
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = 2 * HALF, HALF, "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "18"}
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=audio_rate, layout="mono")
        for index in range(n_frames):
            second = index // FPS
            listener = face if second in listener_face_seconds else cup
            speaker = face if second in speaker_face_seconds else cup
            halves = (speaker, listener) if listener_side == "right" else (listener, speaker)
            frame = av.VideoFrame.from_ndarray(np.hstack(halves), format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if sound is not None:
            _encode_audio(container, sound, audio, audio_rate)
    return path


def _encode_audio(container, stream, samples, rate, chunk=1024):
    for start in range(0, samples.size, chunk):
        piece = samples[start:start + chunk].reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format="fltp",
                                           layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def count_frames(path):
    """Decoded video frames of a recording (what the annotation counts)."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))
