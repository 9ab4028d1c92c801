"""Score 25 fps valence predictions against annotations with the challenge's CCC.

    python score.py data/Validation/Annotations preds_AT/pred_test
    python score.py data/Validation/Annotations preds_AT/pred_test --out_dir scores_AT

Prints CCC per video, the generalized track (mean per story over subjects) and the
personalized track (mean per subject over stories); `--out_dir` also writes them as
per_video.csv, by_story.csv and by_subject.csv. A prediction longer or shorter than
its annotation is cut or padded with its last value, as the scripts do; one more than
2 s (50 frames) off is refused. Both are read as float64, as the challenge's scorer
reads them.
"""
import argparse
from pathlib import Path

import numpy as np

from empathy import layout, utils
from empathy.datasets import ROW_TOLERANCE, list_videos, read_annotation, read_prediction, video_name
from empathy.utils import FPS, ToolkitError


def get_args_parser():
    parser = argparse.ArgumentParser("score.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("annotations_dir", help="folder of Subject_<s>_Story_<t>.csv annotations")
    parser.add_argument("predictions_dir", help="folder of predictions with the same names")
    parser.add_argument("--out_dir", help="also write the three tables as CSV here")
    return parser


def score_folders(annotations_dir, predictions_dir):
    """Per-video CCC records for every annotated video."""
    annotations = list_videos(annotations_dir)
    predictions = list_videos(predictions_dir)
    missing = sorted(annotations.keys() - predictions.keys())
    if missing:
        raise ToolkitError(f"{predictions_dir} has no prediction for {video_name(*missing[0])} "
                           f"({len(missing)} of {len(annotations)} missing): predict every "
                           "annotated video")
    records = []
    for (subject, story), path in sorted(annotations.items()):
        # float64, as the challenge's scorer reads them: float32 would move the CCC by ~1e-9
        annotation = read_annotation(path, np.float64)
        prediction = read_prediction(predictions[subject, story], np.float64)
        check_length(predictions[subject, story], prediction.size, path, annotation.size)
        records.append({"subject": subject, "story": story,
                        "ccc": utils.ccc(utils.to_length(prediction, annotation.size),
                                         annotation)})
    return records


def check_length(path, frames, annotation_path, annotation_frames):
    """A prediction may be a few frames off its annotation (it is cut or padded), as
    features may be a row or two off; more means another video, or another rate
    (one row per second instead of per frame)."""
    if abs(frames - annotation_frames) > ROW_TOLERANCE * FPS:
        raise ToolkitError(f"{path} has {frames} rows but its annotation {annotation_path} has "
                           f"{annotation_frames}: a prediction needs one row per frame at {FPS} "
                           f"fps (up to {ROW_TOLERANCE} s off); predict this video again")


def main(args):
    if args.out_dir:
        layout.check_output_folder(args.out_dir, "--out_dir")  # never over the annotations
    per_video, by_story, by_subject = utils.summarize_ccc(
        score_folders(args.annotations_dir, args.predictions_dir))
    for title, table in (("CCC per video", per_video),
                         ("generalized track: mean CCC per story over subjects", by_story),
                         ("personalized track: mean CCC per subject over stories", by_subject)):
        print(f"{title}\n{utils.format_table(table)}\n")
    print(f"mean CCC over {len(per_video)} videos: {per_video['ccc'].mean():.4f}")
    if args.out_dir:
        out_dir = Path(args.out_dir)
        utils.check_writable(out_dir)
        for name, table in (("per_video", per_video), ("by_story", by_story),
                            ("by_subject", by_subject)):
            utils.write_csv(table, out_dir / f"{name}.csv")
    return per_video, by_story, by_subject


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
