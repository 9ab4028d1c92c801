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
average of their predictions. init.save's post-processing carries over; with
--calibrate, a fine-tuned model calibrates with its subject's own training videos.

With a handful of videos per listener, fine-tuning for a fixed number of epochs can
make things worse. --inner_cv chooses the number per subject without looking at the
test videos: for each of the subject's training stories in turn, init.save is
fine-tuned on the other training videos (subject_<s>/inner_val_on_<story>/) and the
held-out video is scored every --eval_freq epochs; the epoch (0, no fine-tuning,
included) with the best mean held-out CCC is the one the subject's model is then
fine-tuned for on all of them. subject_<s>/inner_cv.csv holds the curves.
"""
import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

import checkpoints
import datasets
import engine
import options
import parallel
import runs
import utils
from utils import ToolkitError


def get_args_parser():
    parser = argparse.ArgumentParser(
        "personalize.py", description="Fine-tune a trained model for each listener.",
        parents=[options.get_data_args_parser(), options.get_training_args_parser(),
                 parallel.get_parallel_args_parser("fine-tune subjects"),
                 runs.get_ledger_args_parser()])
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
    group.add_argument("--inner_cv", action="store_true",
                       help="choose each subject's number of fine-tuning epochs (0 to "
                            "--epochs) by leave-one-story-out over their own training videos")
    return parser


def init_checkpoint(out_dir):
    path = Path(out_dir) / runs.INIT_CHECKPOINT
    if not path.is_file():
        raise ToolkitError(f"{path} does not exist: copy the model to start from there, e.g. "
                           f"mkdir -p {out_dir} && cp cv_AT/val_on_1/best.save {path}")
    return path


def subject_sets(train_all, test_all, subject, augment):
    train_set = (train_all.repeat_subjects([subject], augment) if augment
                 else train_all.select(subjects=[subject]))
    return train_set, test_all.select(subjects=[subject])


def inner_folders(subject_folder, stories):
    return {story: runs.inner_fold_dir(subject_folder, story) for story in stories}


def personalize_subject(train_all, test_all, subject, out_dir, run, augment=None,
                        inner_cv=False):
    """Fine-tune init.save for one subject (once per seed of options.RunOptions
    `run`; for the number of epochs that `inner_cv` chooses, if asked); returns
    its CCC before and after (of the seeds' average prediction, with their mean and std)."""
    device = run.device
    flags = run.postprocessing_flags or {}
    init = checkpoints.load_trained([init_checkpoint(out_dir)], train_all, run.normalize, device)[0]
    train_set, test_set = subject_sets(train_all.with_scaler(init.scaler),
                                       test_all.with_scaler(init.scaler), subject, augment)
    postprocessing = engine.saved_postprocessing([init], flags, train_all)
    precision = run.settings.precision
    before = engine.evaluate(init.network, test_set, device, postprocessing, precision)
    subject_folder = runs.subject_dir(out_dir, subject)

    def load_init():
        return checkpoints.load_trained([init_checkpoint(out_dir)], train_all, run.normalize,
                                        device)[0].network

    epochs = run.settings.epochs
    if inner_cv:
        own_videos = train_all.with_scaler(init.scaler).select(subjects=[subject])
        epochs = choose_epochs(load_init, init.network, train_set, own_videos, subject_folder,
                               run, device, postprocessing)
    row = {"subject": subject, "before_ccc": before["ccc"]}
    if epochs == 0:  # the inner cross-validation found fine-tuning not worth it
        after = {**before, "seed_ccc": [before["ccc"]] * run.settings.seeds}
    else:
        tuning = replace(run, settings=replace(run.settings, epochs=epochs))
        engine.fit_seeds(load_init, train_set, test_set, subject_folder, tuning, device,
                         postprocessing)
        # Fine-tuning ends after the last epoch (or where --patience stopped it): last.save.
        # The fine-tuned models calibrate with the statistics of the videos they were tuned on.
        tuned, tuned_postprocessing = engine.load_for_evaluation(
            runs.run_checkpoints(subject_folder, runs.LAST), train_set, run.normalize, flags,
            device, [test_set])
        after = engine.evaluate_seeds(tuned, test_set, device, tuned_postprocessing, precision)
    utils.write_predictions(runs.predictions_dir(out_dir, "test"), test_set.videos,
                            after["frames"])
    row["after_ccc"] = after["ccc"]
    if inner_cv:
        row["epochs"] = epochs
    if run.settings.seeds > 1:
        row.update(after_ccc_seed_mean=np.mean(after["seed_ccc"]),
                   after_ccc_seed_std=np.std(after["seed_ccc"]))
    return row


def choose_epochs(load_init, init_network, train_set, own_videos, subject_folder, run,
                  device, postprocessing):
    """The number of fine-tuning epochs (0 to --epochs) with the best mean CCC on the
    subject's own training videos, each held out in turn (see the module's
    docstring); writes the curves to <subject_folder>/inner_cv.csv."""
    stories = sorted({video.story for video in own_videos.videos})
    settings = run.settings
    inner_settings = replace(settings, seeds=1, patience=None, save_freq=settings.epochs)
    curves = {}
    for story, folder in inner_folders(subject_folder, stories).items():
        held_out = own_videos.select(stories=[story])
        start = engine.evaluate(init_network, held_out, device, postprocessing,
                               settings.precision)["ccc"]
        engine.seed_everything(inner_settings.seed)
        engine.fit(load_init(), train_set.select(exclude_stories=[story]), held_out, folder,
                  inner_settings, device, resume=run.resumes_run(folder),
                  progress=run.progress, postprocessing=postprocessing,
                  tensorboard_dir=run.tensorboard_dir)
        history = pd.read_csv(folder / runs.METRICS).dropna(subset=["val_ccc"])
        curves[runs.fold_name(story)] = pd.Series([start, *history["val_ccc"]],
                                                  index=[0, *history["epoch"]])
    table = pd.DataFrame(curves).rename_axis("epoch").reset_index()
    table["mean_ccc"] = table[list(curves)].mean(axis=1)
    utils.write_csv(table, Path(subject_folder) / runs.INNER_CV_TABLE)
    return int(table.loc[table["mean_ccc"].idxmax(), "epoch"])


def inner_cv_folders(train_all, subject, out_dir):
    """{story: folder} of a subject's inner cross-validation, which needs two or more
    of their training stories."""
    stories = sorted({video.story for video in train_all.select(subjects=[subject]).videos})
    if len(stories) < 2:
        raise ToolkitError(f"--inner_cv needs two or more training stories of subject {subject}, "
                           f"who has {len(stories)}: leave out --inner_cv or that subject")
    return inner_folders(runs.subject_dir(out_dir, subject), stories)


def videos_for_tasks(train_all, test_all, args, mods, runner):
    """The training and test videos as subject tasks get them from `runner`."""
    return runner.data((train_all, test_all), datasets.load_train_test, parts=2,
                       train_dir=Path(args.train_dir), test_dir=Path(args.test_dir), mods=mods,
                       test_stories=args.test_set)


def choose_subjects(train_all, test_all, requested, augment):
    """Subjects with test videos and (unless --augment) training videos."""
    datasets.check_augment(augment)
    trainable = set(test_all.subjects)
    if not augment:
        trainable &= set(train_all.subjects)
    if not requested:
        return sorted(trainable)
    datasets.check_known("subject", requested, sorted(trainable), "--subjects")
    return sorted(requested)


def subject_table(rows):
    scores = [name for name in ("before_ccc", "after_ccc", "epochs", "after_ccc_seed_mean",
                                "after_ccc_seed_std") if name in rows[0]]
    table = pd.DataFrame(rows, columns=["subject", *scores])
    mean = table[scores].mean()
    summary = pd.DataFrame([{"subject": "Mean", **mean}])
    if "epochs" in table:  # whole numbers, not 3.0000 (their mean too, where it is one)
        table = table.astype({"epochs": object})
        summary = summary.astype({"epochs": object})
        epochs = round(float(mean["epochs"]), 2)
        summary.loc[0, "epochs"] = int(epochs) if epochs.is_integer() else epochs
    return pd.concat([table.astype({"subject": object}), summary], ignore_index=True)


def ledger_results(table):
    """The ledger's results: the subjects' CCC after fine-tuning (the personalized track)."""
    subjects = table[table["subject"] != "Mean"]
    return runs.spread_results(subjects["after_ccc"])


def main(args):
    mods = datasets.parse_mods(args.mods)
    settings = options.TrainingSettings.from_args(args)
    if args.inner_cv and settings.patience is not None:
        raise ToolkitError("--inner_cv chooses how long to fine-tune by itself: leave out "
                           "--patience (which would stop on the test videos)")
    out_dir = Path(args.out_dir)
    runner = parallel.Runner.from_args(args)
    init = init_checkpoint(out_dir)
    train_all, test_all = datasets.load_train_test(args.train_dir, args.test_dir, mods,
                                                   args.test_set)
    subjects = choose_subjects(train_all, test_all, args.subjects, args.augment)
    folders, inner = subject_folders(train_all, subjects, out_dir, settings, args.inner_cv)
    resumes = runs.check_fresh_runs(folders + inner, args.resume, args.overwrite)
    run = options.RunOptions.from_args(args, settings, resumes, runner)
    resumed = [(folder, seed_settings) for subject in subjects for folder, seed_settings
               in run.resumed_runs(runner.path(runs.subject_dir(out_dir, subject)))]
    resumed += [(folder, settings) for folder in inner if resumes[folder]]  # one seed each
    options.check_before_writing(options.Plan(
        outputs=[(out_dir, "--out_dir")], options=run, data=train_all, trains=True, base=init,
        resumed=resumed, runner=runner, split_dirs=(args.train_dir, args.test_dir)))
    with runs.owned(out_dir):
        runs.check_fresh_runs(folders + inner, args.resume, args.overwrite)  # none began meanwhile
        runs.write_run_record(args, out_dir)
        train_videos, test_videos = videos_for_tasks(train_all, test_all, args, mods, runner)
        tasks = [dict(train_all=train_videos, test_all=test_videos, subject=subject,
                      out_dir=runner.path(out_dir), run=run, augment=args.augment,
                      inner_cv=args.inner_cv)
                 for subject in subjects]
        table = subject_table(runner.run(personalize_subject, tasks, "subjects"))
        utils.write_csv(table, out_dir / runs.PERSONALIZE_TABLE)
    print("CCC per subject on the test videos, before and after fine-tuning:")
    print(utils.format_table(table))
    return table


def subject_folders(train_all, subjects, out_dir, settings, inner_cv):
    """The run folders of the subjects (one per seed) and of their inner
    cross-validation folds (with --inner_cv)."""
    folders = [folder for subject in subjects
               for _, folder in settings.seed_runs(runs.subject_dir(out_dir, subject))]
    inner = [folder for subject in subjects if inner_cv
             for folder in inner_cv_folders(train_all, subject, out_dir).values()]
    return folders, inner


if __name__ == "__main__":
    runs.run_cli(main, get_args_parser(), ledger_results)
