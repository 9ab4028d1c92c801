"""Write a synthetic dataset shaped like OMG-Empathy, for trying every command.

    python make_data.py                      # ./data: 10 subjects x 8 stories, ~5 min each
    python make_data.py --subjects 3 --stories 5 --seconds 40 --dims 12,8,16,16
    python make_data.py --preset realistic --out_dir data_realistic

How the data is made (and what it is not): each story has a smooth latent
"emotional trajectory". The storyteller's audio and transcript features are noisy
linear read-outs of it (plus story and recording nuisance). Each listener feels the
story through their own gain, offset and delay, plus an idiosyncratic drift; their
25 fps valence annotation is that response. The listener's face features show
their own valence, but only in expressive moments and mixed with identity and head
motion; the speaker's face carries little. So audio+text learns the average
listener, the listener's face adds something, and fine-tuning per listener helps.
It is not real behaviour: the responses are linear-Gaussian with a tanh, and the
numbers it gives say nothing about the real data.

That is the easy preset (the default): listeners agree and the features carry a
strong signal, so every command visibly learns. --preset realistic matches the
statistics of the real OMG-Empathy annotations instead (see data_stats.py): each
listener shares only a small, story-dependent part of their response with the
others, answers with their own mean, range and delay, moves the slider in held
steps on a 0.05 grid with a neutral zone at 0, and the features follow the story
(and the listener's face their own valence) weakly. Compare methods on it.

The official split is the default: stories 2, 4, 5, 8 train, 1 validation, 3, 6, 7
test (dummy annotations of the right length); --val_stories and --test_stories
change it. Feature files are sometimes a row or two
longer or shorter than the annotation, as in the real data.
"""
import argparse
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter1d

from empathy import utils
from empathy.datasets import ANNOTATION_FOLDER, MODALITY_FOLDERS, video_name
from empathy.utils import FPS, ToolkitError

PRESETS = ("easy", "realistic", "unstable")
OFFICIAL_TEST_STORIES = (3, 6, 7)
# The sizes of each preset where the flags are not given: --preset unstable has the
# real annotations' shape (10 listeners; stories 1, 2, 4, 5, 8 of 300-450 s; the
# published 2+2+1-d audio/text/face features) and leaves the test stories out.
DEFAULT_SIZES = {"subjects": 10, "stories": 8, "seconds": 300, "length_spread": 0.3,
                 "dims": "990,300,4096,4096", "testing": True}
UNSTABLE_SIZES = {**DEFAULT_SIZES, "seconds": 375, "length_spread": 0.2, "dims": "2,2,1,1",
                  "testing": False}


def get_args_parser():
    parser = argparse.ArgumentParser("make_data.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="./data", help="where to write (default: %(default)s)")
    parser.add_argument("--subjects", type=int, default=None,
                        help="listeners (default: 10)")
    parser.add_argument("--stories", type=int, default=None,
                        help="stories (default: 8; --preset unstable writes stories 1, 2, 4, "
                             "5, 8 of them, see --no-testing)")
    parser.add_argument("--seconds", type=int, default=None,
                        help="mean story length in seconds (default: 300; 375 with --preset "
                             "unstable)")
    parser.add_argument("--length_spread", type=float, default=None,
                        help="story lengths vary by up to this fraction (default: 0.3; 0.2 with "
                             "--preset unstable, whose every recording of a story differs in "
                             "length)")
    parser.add_argument("--val_stories", type=int, nargs="*", default=[1], metavar="STORY",
                        help="validation stories (default: 1, the official split)")
    parser.add_argument("--test_stories", type=int, nargs="*", default=None, metavar="STORY",
                        help="test stories, with dummy annotations (default: 3 6 7, the "
                             "official split, those of them up to --stories); the others "
                             "train")
    parser.add_argument("--dims", default=None,
                        help="audio,text,v_sub,v_act dimensions (default: 990,300,4096,4096; "
                             "2,2,1,1 with --preset unstable, the published features' sizes)")
    parser.add_argument("--testing", action=argparse.BooleanOptionalAction, default=None,
                        help="write the test stories with dummy annotations to Testing; "
                             "--no-testing leaves them out, the other stories keeping their "
                             "numbers (default: --testing; --no-testing with --preset unstable, "
                             "which has the released annotations' stories 1, 2, 4, 5, 8)")
    parser.add_argument("--format", choices=["npy", "csv"], default="npy",
                        help="feature file format (default: %(default)s)")
    parser.add_argument("--preset", choices=PRESETS, default="easy",
                        help="easy: a clear signal that every command learns in a few epochs "
                             "(for trying the toolkit); realistic: the statistics of the real "
                             "OMG-Empathy annotations, little agreement between listeners and a "
                             "weak signal in the features (for comparing methods); unstable: "
                             "the real data's shape and its unstable training, a relation "
                             "between features and valence whose strength and sign differ by "
                             "story, so that single epochs are a lottery (for comparing methods "
                             "that average epochs) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the split folders if --out_dir already has them")
    return parser


def check_split(n_stories, val_stories, test_stories):
    """Refuse a split that would write a folder short without a word: a validation or
    test story beyond --stories, one story in both, or no training story left."""
    for flag, stories in (("--val_stories", val_stories), ("--test_stories", test_stories)):
        unknown = sorted(story for story in set(stories) if not 1 <= story <= n_stories)
        if unknown:
            raise ToolkitError(f"{flag} {' '.join(map(str, unknown))}: there is no story "
                               f"{unknown[0]} (--stories {n_stories} makes stories 1 to "
                               f"{n_stories}); choose stories from that range")
    both = sorted(set(val_stories) & set(test_stories))
    if both:
        raise ToolkitError(f"story {both[0]} is in both --val_stories and --test_stories: "
                           "give each story one split")
    if not set(range(1, n_stories + 1)) - set(val_stories) - set(test_stories):
        raise ToolkitError(f"--val_stories and --test_stories take all {n_stories} stories: "
                           "leave at least one for training")


def split_of(story, val_stories, test_stories):
    if story in val_stories:
        return "Validation"
    return "Testing" if story in test_stories else "Training"


def smooth_noise(rng, n, sigma):
    """Unit-variance Gaussian noise smoothed over `sigma` samples."""
    series = gaussian_filter1d(rng.standard_normal(n + 6 * int(sigma)), sigma)[3 * int(sigma):][:n]
    return (series - series.mean()) / (series.std() + 1e-8)


def per_second_mean(frames, n_seconds):
    padded = np.pad(frames, (0, max(0, n_seconds * FPS - frames.size)), mode="edge")
    return padded[:n_seconds * FPS].reshape(n_seconds, FPS).mean(axis=1)


class Projections:
    """Fixed random read-outs from latent signals to feature space, like a feature
    extractor shared by all recordings, with per-dimension scales and offsets."""

    def __init__(self, rng, dims, n_latent=6):
        self.read_out = {mod: rng.standard_normal((n_latent, dim)).astype(np.float32)
                         for mod, dim in dims.items()}
        self.scale = {mod: np.exp(rng.uniform(-0.7, 0.7, dim)).astype(np.float32)
                      for mod, dim in dims.items()}
        self.offset = {mod: rng.normal(0, 1, dim).astype(np.float32) for mod, dim in dims.items()}

    def features(self, rng, mod, latent, noise):
        """Rows = latent @ read-out + unit noise * `noise`, scaled and offset per dim."""
        n_latent = latent.shape[1]
        clean = latent.astype(np.float32) @ self.read_out[mod][:n_latent]
        clean += noise * rng.standard_normal(clean.shape, dtype=np.float32)
        return clean * self.scale[mod] + self.offset[mod]


def make_listeners(rng, n_subjects):
    return [{"gain": rng.uniform(0.2, 1.5), "offset": rng.normal(0, 0.5),
             "delay": int(rng.integers(0, 7)), "identity": rng.standard_normal(2)}
            for _ in range(n_subjects)]


def make_video(rng, projections, trajectory, listener, story_nuisance, mods):
    """Annotation (25 fps) and features (per second) of one listener and story."""
    n_frames = trajectory.size - int(rng.integers(0, FPS))  # recordings differ by a few frames
    n_seconds = math.ceil(n_frames / FPS)
    lagged = np.concatenate([np.full(listener["delay"] * FPS, trajectory[0]), trajectory])[:n_frames]
    drift = smooth_noise(rng, n_frames, 6 * FPS)
    valence = np.tanh(listener["gain"] * lagged[:n_frames] + listener["offset"] + 0.4 * drift)
    valence = np.clip(valence + 0.02 * rng.standard_normal(n_frames), -1, 1).astype(np.float32)

    story = per_second_mean(trajectory[:n_frames], n_seconds)
    own = per_second_mean(valence, n_seconds)
    nuisance = story_nuisance[:n_seconds]
    recording = smooth_noise(rng, n_seconds, 20)
    expressive = (smooth_noise(rng, n_seconds, 3) > 0.2).astype(np.float32)
    speaking = (rng.random(n_seconds) < 0.85).astype(np.float32)
    identity = np.broadcast_to(listener["identity"], (n_seconds, 2))
    latents = {
        "audio": (np.column_stack([story, nuisance, recording]), 3.0),
        "text": (np.column_stack([story * speaking, nuisance * speaking, speaking]), 4.0),
        "v_sub": (np.column_stack([own * expressive, identity, smooth_noise(rng, n_seconds, 2)]), 6.0),
        "v_act": (np.column_stack([0.15 * story, smooth_noise(rng, n_seconds, 2),
                                   smooth_noise(rng, n_seconds, 8)]), 6.0),
    }
    return valence, _features(rng, projections, latents, n_seconds, mods)


# ---------------------------------------------------------------- the realistic preset

def make_realistic_listeners(rng, n_subjects):
    """Listeners who annotate as the OMG-Empathy listeners do: each with their own
    mean, range, delay, neutral zone and pace of moving the slider."""
    return [{"offset": rng.normal(-0.08, 0.18), "scale": rng.uniform(0.15, 0.6),
             "delay": int(rng.integers(0, 7)), "neutral": rng.uniform(0.08, 0.26),
             "hold": rng.uniform(0.3, 1.0), "identity": rng.standard_normal(2)}
            for _ in range(n_subjects)]


def make_realistic_story(rng, n_frames):
    """A story: its emotional trajectory (frames), its mean mood, how clearly it
    moves listeners alike (the share of their response that is shared), nuisance."""
    timescale = math.exp(rng.uniform(math.log(4), math.log(18)))
    return {"trajectory": smooth_noise(rng, n_frames + FPS, timescale * FPS),
            "mood": rng.normal(0, 0.1), "shared": rng.uniform(0.12, 0.45),
            "nuisance": smooth_noise(rng, n_frames // FPS + 2, 10)}


def held_steps(rng, continuous, hold_seconds, neutral):
    """What a listener's slider records: the response read at random moments (mean
    `hold_seconds` apart), set to 0 inside the neutral zone, rounded to the 0.05
    grid, and held until the next reading."""
    n_frames = continuous.size
    gaps = rng.exponential(hold_seconds * FPS, n_frames // FPS + 10).astype(int) + 1
    readings = np.cumsum(np.concatenate([[0], gaps]))
    readings = readings[readings < n_frames]
    values = continuous[readings]
    values = np.where(np.abs(values) < neutral, 0.0, np.round(values / 0.05) * 0.05)
    held = np.repeat(values, np.diff(np.append(readings, n_frames)))
    return np.clip(held, -1, 1).astype(np.float32)


def make_realistic_video(rng, projections, story, listener, mods):
    """Annotation (25 fps) and features (per second) of one listener and story: the
    listener shares a small part of their response with the others, the features
    follow the story (and the listener's face their own valence) only weakly."""
    trajectory = story["trajectory"]
    n_frames = trajectory.size - int(rng.integers(0, FPS))
    n_seconds = math.ceil(n_frames / FPS)
    lagged = np.concatenate([np.full(listener["delay"] * FPS, trajectory[0]), trajectory])[:n_frames]
    own_timescale = math.exp(rng.uniform(math.log(2), math.log(30)))
    idiosyncratic = smooth_noise(rng, n_frames, own_timescale * FPS)
    response = math.sqrt(story["shared"]) * lagged + math.sqrt(1 - story["shared"]) * idiosyncratic
    scale = listener["scale"] * math.exp(rng.normal(0, 0.35))
    mean = listener["offset"] + story["mood"] + rng.normal(0, 0.12)
    jitter = 0.05 * smooth_noise(rng, n_frames, FPS // 3)  # the hand on the slider
    continuous = np.tanh(mean + scale * response) + jitter
    valence = held_steps(rng, continuous, listener["hold"], listener["neutral"])

    story_signal = per_second_mean(trajectory[:n_frames], n_seconds)
    own = per_second_mean(valence, n_seconds)
    nuisance = story["nuisance"][:n_seconds]
    speaking = (rng.random(n_seconds) < 0.85).astype(np.float32)
    identity = np.broadcast_to(listener["identity"], (n_seconds, 2))
    latents = {
        "audio": (np.column_stack([story_signal, nuisance, smooth_noise(rng, n_seconds, 20)]), 16.0),
        "text": (np.column_stack([story_signal * speaking, nuisance * speaking, speaking]), 18.0),
        "v_sub": (np.column_stack([own, identity, smooth_noise(rng, n_seconds, 2)]), 40.0),
        "v_act": (np.column_stack([0.1 * story_signal, smooth_noise(rng, n_seconds, 2),
                                   smooth_noise(rng, n_seconds, 8)]), 12.0),
    }
    return valence, _features(rng, projections, latents, n_seconds, mods)


# ---------------------------------------------------------------- the unstable preset

# How the storyteller's expressed emotion (what the audio and text features follow)
# relates to what the listeners feel, by story: 1 they feel what is told, below 0 they
# feel against it (a bitter story told cheerfully). Trained on stories 2, 4, 5, 8 the
# relation is positive on the whole, but each batch pulls it its own way.
STORY_RELATIONS = {1: 0.8, 2: -0.6, 3: 0.5, 4: -0.3, 5: 0.6, 6: 0.3, 7: -0.4, 8: 0.8}


def story_relation(story):
    """STORY_RELATIONS, repeated for stories beyond 8."""
    return STORY_RELATIONS[(story - 1) % len(STORY_RELATIONS) + 1]


def make_unstable_story(rng, n_frames, relation):
    """A story whose listeners feel `relation` times what the storyteller expresses,
    plus what the features do not show; like make_realistic_story otherwise."""
    timescale = math.exp(rng.uniform(math.log(4), math.log(18)))
    expressed = smooth_noise(rng, n_frames + FPS, timescale * FPS)
    unseen = smooth_noise(rng, n_frames + FPS, timescale * FPS)
    return {"expressed": expressed,
            "trajectory": relation * expressed + math.sqrt(1 - relation ** 2) * unseen,
            "mood": rng.normal(0, 0.1), "shared": rng.uniform(0.3, 0.5),
            "nuisance": smooth_noise(rng, n_frames // FPS + 2, 10)}


def make_unstable_video(rng, projections, story, listener, n_frames, mods):
    """Annotation (25 fps, `n_frames`) and features (per second) of one listener and
    story: annotated as make_realistic_video's, with the audio and text features
    following what the storyteller expresses, not what the listeners feel."""
    n_seconds = math.ceil(n_frames / FPS)
    trajectory = story["trajectory"][:n_frames]
    lagged = np.concatenate([np.full(listener["delay"] * FPS, trajectory[0]), trajectory])[:n_frames]
    own_timescale = math.exp(rng.uniform(math.log(2), math.log(30)))
    idiosyncratic = smooth_noise(rng, n_frames, own_timescale * FPS)
    response = math.sqrt(story["shared"]) * lagged + math.sqrt(1 - story["shared"]) * idiosyncratic
    scale = listener["scale"] * math.exp(rng.normal(0, 0.35))
    mean = listener["offset"] + story["mood"] + rng.normal(0, 0.12)
    jitter = 0.05 * smooth_noise(rng, n_frames, FPS // 3)  # the hand on the slider
    continuous = np.tanh(mean + scale * response) + jitter
    valence = held_steps(rng, continuous, listener["hold"], listener["neutral"])

    expressed = per_second_mean(story["expressed"][:n_frames], n_seconds)
    own = per_second_mean(valence, n_seconds)
    nuisance = story["nuisance"][:n_seconds]
    speaking = (rng.random(n_seconds) < 0.85).astype(np.float32)
    identity = np.broadcast_to(listener["identity"], (n_seconds, 2))
    latents = {
        "audio": (np.column_stack([expressed, nuisance, smooth_noise(rng, n_seconds, 20)]), 4.0),
        "text": (np.column_stack([expressed * speaking, nuisance * speaking, speaking]), 5.0),
        "v_sub": (np.column_stack([own, identity, smooth_noise(rng, n_seconds, 2)]), 12.0),
        "v_act": (np.column_stack([0.1 * expressed, smooth_noise(rng, n_seconds, 2),
                                   smooth_noise(rng, n_seconds, 8)]), 12.0),
    }
    return valence, _features(rng, projections, latents, n_seconds, mods)


def generate_unstable_videos(rng, dims, subjects, stories, seconds, length_spread):
    """generate_videos for --preset unstable: every listener's recording of a story
    has its own length, within `length_spread` of `seconds`."""
    projections = Projections(rng, dims)
    listeners = make_realistic_listeners(rng, subjects)
    shortest, longest = seconds * (1 - length_spread), seconds * (1 + length_spread)
    for story in stories:
        story_state = make_unstable_story(rng, int(longest * FPS), story_relation(story))
        for subject, listener in enumerate(listeners, start=1):
            n_frames = int(rng.uniform(shortest, longest) * FPS)
            valence, features = make_unstable_video(rng, projections, story_state, listener,
                                                    n_frames, list(dims))
            yield subject, story, valence, features


def _features(rng, projections, latents, n_seconds, mods):
    features = {}
    for mod in mods:
        latent, noise = latents[mod]
        rows = n_seconds + int(rng.choice([0, 0, 0, 0, 1, -1, 2, -2]))  # sometimes a row off
        latent = np.resize(latent, (rows, latent.shape[1])) if rows > n_seconds else latent[:rows]
        features[mod] = projections.features(rng, mod, latent, noise)
    return features


def write_video(split_dir, name, valence, features, file_format, dummy):
    annotation = np.zeros_like(valence) if dummy else valence
    utils.write_valence(split_dir / ANNOTATION_FOLDER / f"{name}.csv", annotation)
    for mod, rows in features.items():
        path = split_dir / MODALITY_FOLDERS[mod] / f"{name}.{file_format}"
        if file_format == "npy":
            utils.save_array(path, rows)
        else:
            frame = pd.DataFrame(rows, columns=[f"{mod}_{i}" for i in range(rows.shape[1])])
            utils.write_csv(frame, path)


def parse_dims(text):
    try:
        values = [int(value) for value in text.split(",")]
    except ValueError:
        values = []
    if len(values) != len(MODALITY_FOLDERS) or min(values) < 1:
        raise ToolkitError(f"--dims {text}: give four positive sizes for "
                           f"{','.join(MODALITY_FOLDERS)}, e.g. 990,300,4096,4096")
    return dict(zip(MODALITY_FOLDERS, values))


def generate_videos(rng, dims, subjects, stories, seconds, length_spread, realistic):
    """(subject, story, 25 fps valence, {mod: per-second features}) of every video of
    `stories` (story numbers), story by story, all drawn from `rng` in this order (so
    a seed gives one dataset)."""
    projections = Projections(rng, dims)
    listeners = (make_realistic_listeners if realistic else make_listeners)(rng, subjects)
    for story in stories:
        n_frames = int(seconds * rng.uniform(1 - length_spread, 1 + length_spread) * FPS)
        if realistic:
            story_state = make_realistic_story(rng, n_frames)
        else:
            trajectory = smooth_noise(rng, n_frames + FPS, 5 * FPS)
            story_nuisance = smooth_noise(rng, n_frames // FPS + 2, 10)
        for subject, listener in enumerate(listeners, start=1):
            if realistic:
                valence, features = make_realistic_video(rng, projections, story_state, listener,
                                                         list(dims))
            else:
                valence, features = make_video(rng, projections, trajectory, listener,
                                               story_nuisance, list(dims))
            yield subject, story, valence, features


def preset_sizes(args):
    """The size flags given, and the preset's defaults for the others."""
    defaults = UNSTABLE_SIZES if args.preset == "unstable" else DEFAULT_SIZES
    return {name: default if getattr(args, name) is None else getattr(args, name)
            for name, default in defaults.items()}


def main(args):
    sizes = preset_sizes(args)
    dims = parse_dims(sizes["dims"])
    n_stories = sizes["stories"]
    if sizes["subjects"] < 1 or n_stories < 2 or sizes["seconds"] < 10:
        raise ToolkitError("make_data.py needs --subjects >= 1, --stories >= 2 and "
                           "--seconds >= 10")
    if not 0 <= sizes["length_spread"] < 0.9:
        raise ToolkitError(f"--length_spread must be at least 0 and below 0.9, got "
                           f"{sizes['length_spread']}")
    test_stories = (args.test_stories if args.test_stories is not None
                    else [story for story in OFFICIAL_TEST_STORIES if story <= n_stories])
    check_split(n_stories, args.val_stories, test_stories)
    out_dir = Path(args.out_dir)
    split = {story: split_of(story, args.val_stories, test_stories)
             for story in range(1, n_stories + 1)
             if sizes["testing"] or story not in test_stories}
    splits = sorted(set(split.values()))
    existing = [out_dir / split for split in splits if (out_dir / split).exists()]
    if existing and not args.overwrite:
        raise ToolkitError(f"{existing[0]} already exists: pass --overwrite to replace it, "
                           "or choose another --out_dir")
    utils.check_writable(out_dir)
    for folder in existing:
        shutil.rmtree(folder)

    rng = np.random.default_rng(args.seed)
    if args.preset == "unstable":
        videos = generate_unstable_videos(rng, dims, sizes["subjects"], list(split),
                                          sizes["seconds"], sizes["length_spread"])
    else:
        videos = generate_videos(rng, dims, sizes["subjects"], list(split), sizes["seconds"],
                                 sizes["length_spread"], args.preset == "realistic")
    for subject, story, valence, features in videos:
        write_video(out_dir / split[story], video_name(subject, story), valence, features,
                    args.format, dummy=split[story] == "Testing")
    print(f"wrote {sizes['subjects']} subjects x {len(split)} stories ({args.preset} preset) "
          "to " + ", ".join(str(out_dir / split) for split in splits))


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
