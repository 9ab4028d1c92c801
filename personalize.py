"""Fine-tune a trained model for each listener.

    mkdir personal_AT && cp cv_AT/val_on_1/best.save personal_AT/init.save
    python personalize.py --mods audio,text --out_dir personal_AT --epochs 250

Starting from <out_dir>/init.save, one model per subject is fine-tuned in
<out_dir>/subject_<s>/ on that subject's training videos (or, with --augment N, on
all training videos with that subject's repeated N times) and evaluated, after the
last epoch, on that subject's videos in --test_dir. Prints each subject's CCC before
and after fine-tuning and their mean, writes the table to
<out_dir>/personalize.csv and the predictions to <out_dir>/pred_test. With --seeds N
each subject is fine-tuned N times (subject_<s>/seed_<k>/) and scored on the
average of their predictions. init.save's label delay and smoothing carry over.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import datasets
import train
import utils
from utils import ToolkitError


def get_args_parser():
    parser = argparse.ArgumentParser(
        "personalize.py", description="Fine-tune a trained model for each listener.",
        parents=[train.get_data_args_parser(), train.get_training_args_parser(),
                 utils.get_parallel_args_parser("fine-tune subjects")])
    group = parser.add_argument_group("subjects")
    group.add_argument("--out_dir", default="./personal",
                       help="folder holding init.save; gets subject_<s>/ and pred_test/ "
                            "(default: %(default)s)")
    group.add_argument("--subjects", type=int, nargs="+", metavar="S",
                       help="subjects to fine-tune for (default: all)")
    group.add_argument("--augment", type=int, metavar="N",
                       help="train on all videos, repeating the subject's N times")
    group.add_argument("--test_set", type=int, nargs="+", metavar="STORY",
                       help="re-split: pool both folders and test on these stories")
    group.add_argument("--overwrite", action="store_true",
                       help="redo subjects that already hold a run")
    return parser


def init_checkpoint(out_dir):
    path = Path(out_dir) / "init.save"
    if not path.is_file():
        raise ToolkitError(f"{path} does not exist: copy the model to start from there, e.g. "
                           f"mkdir -p {out_dir} && cp cv_AT/val_on_1/best.save {path}")
    return path


def subject_sets(train_all, test_all, subject, augment):
    train_set = (train_all.repeat_subjects([subject], augment) if augment
                 else train_all.select(subjects=[subject]))
    return train_set, test_all.select(subjects=[subject])


def personalize_subject(train_all, test_all, subject, out_dir, settings, normalize, cuda,
                        augment=None, resumes=None, progress=True, postprocessing_flags=None):
    """Fine-tune init.save for one subject (once per seed); returns its CCC before
    and after (of the seeds' average prediction, with their mean and std)."""
    device = utils.get_device(cuda)
    init = train.load_trained([init_checkpoint(out_dir)], train_all, normalize, device)[0]
    postprocessing = train.saved_postprocessing([init], postprocessing_flags or {})
    train_set, test_set = subject_sets(train_all.with_scaler(init.scaler),
                                       test_all.with_scaler(init.scaler), subject, augment)
    before = train.evaluate(init.network, test_set, device, postprocessing)
    subject_dir = Path(out_dir) / f"subject_{subject}"
    train.fit_seeds(lambda: train.load_trained([init_checkpoint(out_dir)], train_all, normalize,
                                               device)[0].network,
                    train_set, test_set, subject_dir, settings, device, resumes, progress,
                    postprocessing)
    # Fine-tuning ends after the last epoch (or where --patience stopped it): last.save.
    tuned = train.load_trained(train.run_checkpoints(subject_dir, "last.save"), train_all,
                               normalize, device)
    after = train.evaluate_seeds(tuned, test_set, device, postprocessing)
    train.write_predictions(Path(out_dir) / "pred_test", test_set, after["frames"])
    row = {"subject": subject, "before_ccc": before["ccc"], "after_ccc": after["ccc"]}
    if settings.seeds > 1:
        row.update(after_ccc_seed_mean=np.mean(after["seed_ccc"]),
                   after_ccc_seed_std=np.std(after["seed_ccc"]))
    return row


def videos_for_tasks(train_all, test_all, args, mods):
    """The videos subject tasks get: the loaded ones (local processes memory-map them),
    or, with --scheduler, what lets each worker load them from the shared data folders."""
    if not args.scheduler:
        return train_all, test_all
    return utils.load_on_workers(
        train.load_train_test, train_dir=utils.task_path(args.train_dir, args.scheduler),
        test_dir=utils.task_path(args.test_dir, args.scheduler), mods=mods,
        test_stories=args.test_set).parts(2)


def choose_subjects(train_all, test_all, requested, augment):
    """Subjects with test videos and (unless --augment) training videos."""
    trainable = set(test_all.subjects)
    if not augment:
        trainable &= set(train_all.subjects)
    if not requested:
        return sorted(trainable)
    train.check_known("subject", requested, sorted(trainable), "--subjects")
    return sorted(requested)


def subject_table(rows):
    scores = [name for name in ("before_ccc", "after_ccc", "after_ccc_seed_mean",
                                "after_ccc_seed_std") if name in rows[0]]
    table = pd.DataFrame(rows, columns=["subject", *scores])
    mean = table[scores].mean()
    return pd.concat([table.astype({"subject": object}),
                      pd.DataFrame([{"subject": "Mean", **mean}])], ignore_index=True)


def main(args):
    mods = datasets.parse_mods(args.mods)
    settings = train.TrainingSettings.from_args(args)
    settings.check()
    out_dir = Path(args.out_dir)
    init_checkpoint(out_dir)
    train_all, test_all = train.load_train_test(args.train_dir, args.test_dir, mods, args.test_set)
    subjects = choose_subjects(train_all, test_all, args.subjects, args.augment)
    resumes = train.check_fresh_runs(
        [folder for subject in subjects
         for _, folder in settings.seed_runs(out_dir / f"subject_{subject}")],
        args.resume, args.overwrite)
    utils.check_scheduler(args.scheduler)
    utils.check_writable(out_dir)
    utils.write_json({**vars(args), "command": " ".join(sys.argv)}, out_dir / "args.json")

    train_videos, test_videos = videos_for_tasks(train_all, test_all, args, mods)
    tasks = [dict(train_all=train_videos, test_all=test_videos, subject=subject,
                  out_dir=utils.task_path(out_dir, args.scheduler), settings=settings,
                  normalize=args.normalize, cuda=args.cuda, augment=args.augment,
                  resumes={utils.task_path(folder, args.scheduler): resume
                           for folder, resume in resumes.items()},
                  progress=args.jobs == 1 and not args.scheduler,
                  postprocessing_flags=train.postprocessing_flags(args))
             for subject in subjects]
    table = subject_table(utils.run_parallel(personalize_subject, tasks, args.jobs, "subjects",
                                             args.scheduler))
    utils.write_csv(table, out_dir / "personalize.csv")
    print("CCC per subject on the test videos, before and after fine-tuning:")
    print(utils.format_table(table))
    return table


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
