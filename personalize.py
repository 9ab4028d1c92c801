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

--finetune all|head|adapter, --anchor, --mix, --mix_weighting, --ema and --swa_start
choose how a subject's model is fine-tuned (see finetuning.py); given several values
(--ema and --swa_start take none as one), --inner_cv
tries every combination in subject_<s>/inner_<method>/val_on_<story>/ and keeps, per
subject, the one (and the number of epochs) with the best mean held-out CCC;
personalize.csv then says what each subject got (finetune, anchor, mix, weighting,
ema, swa_start, epochs), the gain in CCC that the inner folds estimated for it and the gain measured
on the test videos. --inner_init CV_DIR starts each inner fold from a crossval.py model
that never saw its held-out story; a finished inner fold keeps no weights unless
--keep_inner_weights.
"""
import argparse
from dataclasses import replace
from functools import partial
from pathlib import Path

import pandas as pd

from empathy import (command, datasets, finetuning, layout, ledger, options, parallel, tables,
                     utils)
from empathy.utils import ToolkitError

# imported on first use (they load torch), so that --help and the flag checks need none


def get_args_parser():
    parser = argparse.ArgumentParser(
        "personalize.py", description="Fine-tune a trained model for each listener.",
        # --ema and --swa_start are finetuning's: several values, for --inner_cv
        parents=[options.get_data_args_parser(),
                 options.get_training_args_parser(weight_averaging=False),
                 parallel.get_parallel_args_parser("fine-tune subjects"),
                 finetuning.get_args_parser(), ledger.get_ledger_args_parser()])
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
    path = Path(out_dir) / layout.INIT_CHECKPOINT
    if not path.is_file():
        raise ToolkitError(f"{path} does not exist: copy the model to start from there, e.g. "
                           f"mkdir -p {out_dir} && cp cv_AT/val_on_1/best.save {path}")
    return path


def personalize_subject(train_all, test_all, subject, out_dir, run, augment=None,
                        inner_cv=None, methods=(finetuning.DEFAULT,)):
    """Fine-tune init.save for one subject (once per seed of options.RunOptions
    `run`) with the method of `methods` (finetuning.Method) and the number of epochs
    that the inner cross-validation `inner_cv` (a finetuning.InnerCV) chooses, if
    asked; returns its CCC before and after (of the seeds' average prediction, with
    their mean and std), what it got, and with `inner_cv` the gain it estimated
    beside the one measured."""
    from empathy import checkpoints, engine
    device = run.device
    flags = run.postprocessing_flags or {}
    init = checkpoints.load_trained([init_checkpoint(out_dir)], train_all, run.normalize, device)[0]
    train_all, test_all = train_all.with_scaler(init.scaler), test_all.with_scaler(init.scaler)
    test_set = test_all.select(subjects=[subject])
    postprocessing = engine.saved_postprocessing([init], flags, train_all)
    precision = run.settings.precision
    before = engine.evaluate(init.network, test_set, device, postprocessing, precision)
    subject_folder = layout.subject_dir(out_dir, subject)
    tuning = finetuning.SubjectTuning(train_all, subject, init, run, postprocessing, augment,
                                      inner_cv.starts if inner_cv else None)

    method, epochs = methods[0], run.settings.epochs
    if inner_cv:
        choice = finetuning.choose_method(tuning, methods, subject_folder, inner_cv)
        method, epochs = choice.method, choice.epochs
    row = {"subject": subject, "before_ccc": before["ccc"]}
    if epochs == 0:  # the inner cross-validation found fine-tuning not worth it
        after = {**before, "seed_ccc": [before["ccc"]] * run.settings.seeds}
    else:
        chosen = replace(run, settings=method.settings(replace(run.settings, epochs=epochs)))
        for folder, _ in chosen.resumed_runs(subject_folder):
            finetuning.check_resumed(folder, method)
        train_set = tuning.videos(method)
        summaries = engine.fit_seeds(lambda: tuning.model(method), train_set, test_set,
                                     subject_folder, chosen, device, postprocessing,
                                     finetuning=tuning.finetuning(method, chosen.settings))
        # Fine-tuning ends after the last epoch (or where --patience stopped it): last.save.
        # The fine-tuned models calibrate with the statistics of the videos they were tuned on.
        tuned, tuned_postprocessing = engine.load_for_evaluation(
            checkpoints.run_checkpoints(subject_folder, layout.LAST), train_set, run.normalize, flags,
            device, [test_set])
        if chosen.settings.average_last:  # the mean of the last epochs' predictions, per seed
            after = engine.score_seed_predictions(
                [summary["predictions"] for summary in summaries], test_set,
                tuned_postprocessing)
        else:
            after = engine.evaluate_seeds(tuned, test_set, device, tuned_postprocessing, precision)
    utils.write_predictions(layout.predictions_dir(out_dir, "test"), test_set.videos,
                            after["frames"])
    row["after_ccc"] = after["ccc"]
    if list(methods) != [finetuning.DEFAULT]:  # say what the subject got
        got = method if epochs else finetuning.Method(finetuning.KEPT_INIT)
        row.update(finetuning.table_record(got, methods))
    if inner_cv:
        row["epochs"] = epochs
        row["estimated_gain"] = choice.estimated_gain  # on the subject's training stories
        row["measured_gain"] = after["ccc"] - before["ccc"]  # on the test videos
    if run.settings.seeds > 1:
        row.update(tables.seed_columns("after_ccc", after["seed_ccc"]))
    return row


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
    """personalize.csv: a row per subject, then their Mean (of the subjects that have
    a value); no mean of the methods."""
    columns = [name for name in ("before_ccc", "after_ccc", *finetuning.DEFAULT.record, "epochs",
                                 "estimated_gain", "measured_gain", "after_ccc_seed_mean",
                                 "after_ccc_seed_std") if name in rows[0]]
    whole = {"epochs": object} if "epochs" in columns else {}  # whole numbers, not 3.0000
    table = pd.DataFrame(rows, columns=["subject", *columns]).astype(whole)
    if "swa_start" in columns:  # an epoch, or blank without SWA
        table["swa_start"] = table["swa_start"].astype("Int64")
    table = tables.with_summary_rows(
        table, "subject", [name for name in columns if name not in finetuning.DEFAULT.record],
        rows=("Mean",), skipna=True)
    if whole:  # their mean too, where it is one
        epochs = round(float(table["epochs"].iloc[-1]), 2)
        table.loc[len(table) - 1, "epochs"] = int(epochs) if epochs.is_integer() else epochs
    return table


def ledger_results(table):
    """The ledger's results: the subjects' CCC after fine-tuning (the personalized track)."""
    subjects = table[table["subject"] != "Mean"]
    return tables.spread_results(subjects["after_ccc"])


def main(args):
    mods = datasets.parse_mods(args.mods)
    # The averaging of the weights is part of each method (several for --inner_cv).
    settings = options.TrainingSettings.from_args(
        argparse.Namespace(**{**vars(args), "ema": None, "swa_start": None}))
    if args.inner_cv and settings.patience is not None:
        raise ToolkitError("--inner_cv chooses how long to fine-tune by itself: leave out "
                           "--patience (which would stop on the test videos)")
    if args.inner_cv and settings.average_last is not None:
        raise ToolkitError("--inner_cv chooses the epoch whose weights score best on the "
                           "held-out stories; --average_last would score other predictions: "
                           "leave it out (--ema or --swa_start average the weights)")
    if args.inner_cv and settings.lr_schedule != "constant":
        raise ToolkitError(f"--inner_cv chooses how many epochs to fine-tune, and --lr_schedule "
                           f"{settings.lr_schedule} would spread its rates over that number, "
                           "not over the --epochs its folds were scored with: leave it out")
    for flag in ("inner_init", "keep_inner_weights"):
        if getattr(args, flag) and not args.inner_cv:
            raise ToolkitError(f"--{flag} sets how --inner_cv runs its folds: add --inner_cv, "
                               f"or leave out --{flag}")
    methods = finetuning.methods_from_args(args)
    finetuning.check_method_settings(methods, settings)
    out_dir = Path(args.out_dir)
    runner = parallel.Runner.from_args(args)
    init = init_checkpoint(out_dir)
    train_all, test_all = datasets.load_train_test(args.train_dir, args.test_dir, mods,
                                                   args.test_set)
    subjects = choose_subjects(train_all, test_all, args.subjects, args.augment)
    finetuning.check_weighting(methods, train_all)
    runs, inner = subject_runs(train_all, subjects, out_dir, settings, args.inner_cv, methods)
    inner_cv = inner_cv_options(args, train_all, subjects, init, runner)
    # --resume skips the inner folds that finished (they kept no last.save), once checked
    finished = {folder: finetuning.inner_fold_record(method, settings, inner_cv.init_dir)
                for folder, method in inner.items()
                if args.resume and finetuning.finished_inner_fold(folder)}
    plan = options.Plan(
        outputs=[(out_dir, "--out_dir")], data=train_all, trains=True, base=init,
        options=options.RunOptions.from_args(args, settings, runner=runner), runner=runner,
        split_dirs=(args.train_dir, args.test_dir), base_checks=[finetuning.base_check(methods)])
    inner = {folder: method for folder, method in inner.items() if folder not in finished}
    check_methods = partial(finetuning.check_resumed_methods, [folder for _, folder in runs],
                            inner, methods=methods)
    check_finished = partial(finetuning.check_finished_folds, finished)
    runs += [(method.settings(settings), folder)  # an inner fold trains one seed
             for folder, method in inner.items()]
    with command.Command(args, plan, out_dir, runs, checks=[check_methods, check_finished]) as run:
        train_videos, test_videos = videos_for_tasks(train_all, test_all, args, mods, runner)
        tasks = [dict(train_all=train_videos, test_all=test_videos, subject=subject,
                      out_dir=runner.path(out_dir), run=run, augment=args.augment,
                      inner_cv=inner_cv, methods=methods)
                 for subject in subjects]
        table = subject_table(runner.run(personalize_subject, tasks, "subjects"))
        utils.write_csv(table, out_dir / layout.PERSONALIZE_TABLE)
    print("CCC per subject on the test videos, before and after fine-tuning:")
    print(utils.format_table(table))
    return table


def inner_cv_options(args, train_all, subjects, init, runner):
    """--inner_cv's finetuning.InnerCV (None without --inner_cv): with --inner_init,
    each training story's fold of that crossval.py run, checked against init.save."""
    if not args.inner_cv:
        return None
    starts, init_dir = {}, None
    if args.inner_init:
        stories = train_all.select(subjects=subjects).stories
        starts = {story: runner.path(path) for story, path in
                  finetuning.inner_init_starts(args.inner_init, stories, init).items()}
        init_dir = str(Path(args.inner_init).resolve())
    return finetuning.InnerCV(starts, init_dir, args.keep_inner_weights, args.resume)


def subject_runs(train_all, subjects, out_dir, settings, inner_cv, methods):
    """The runs of the subjects, (settings of a seed, its folder) per seed, and with
    --inner_cv the folders of their inner cross-validation folds ({folder: its method})."""
    runs = [seed_run for subject in subjects
            for seed_run in subject_settings(settings, methods, layout.subject_dir(out_dir, subject))
            .seed_runs(layout.subject_dir(out_dir, subject))]
    inner = {folder: method for subject in subjects if inner_cv
             for folder, method in
             finetuning.inner_cv_folders(train_all, subject, out_dir, methods).items()}
    return runs, inner


def subject_settings(settings, methods, subject_folder):
    """The settings a subject's own run is checked against on --resume: its method's
    averaging; where --inner_cv chooses among several, the averaging its last.save was
    trained with (the chosen method itself is checked once chosen)."""
    if len(methods) == 1:
        return methods[0].settings(settings)
    from empathy import checkpoints
    saved = [path for path in checkpoints.run_checkpoints(subject_folder, layout.LAST)
             if path.is_file()]
    if not saved:
        return settings
    training = checkpoints.load_checkpoint(saved[0]).get("training") or {}
    return replace(settings, ema=training.get("ema"), swa_start=training.get("swa_start"))


if __name__ == "__main__":
    ledger.run_cli(main, get_args_parser(), ledger_results)
