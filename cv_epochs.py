"""Find the epoch that is best across all cross-validation folds.

    python cv_epochs.py --mods audio,text --out_dir cv_AT

For every saved epoch from --epoch_min to --epoch_max (step --epoch_step) this
evaluates each fold of a crossval.py run on its held-out story, prints the mean and
std CCC per epoch and the best epoch (highest mean), writes the table to
<out_dir>/cv_epochs.csv, and extracts every fold's decision-level features at that
epoch into val_on_<story>/feat_train and feat_test, ready for cv_fusion.py. Folds
trained with --seeds are scored on their seeds' average prediction; a fold that
--patience stopped early counts with its final model at the later epochs.
"""
import argparse
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from empathy import command, datasets, layout, ledger, options, parallel, tables, utils



def get_args_parser():
    parser = argparse.ArgumentParser(
        "cv_epochs.py", description="Find the epoch that is best across all folds.",
        parents=[options.get_data_args_parser(), options.get_fold_args_parser(),
                 ledger.get_ledger_args_parser()])
    group = parser.add_argument_group("epochs")
    group.add_argument("--epoch_min", type=int, default=100, help="first epoch (default: %(default)s)")
    group.add_argument("--epoch_max", type=int, default=2000, help="last epoch (default: %(default)s)")
    group.add_argument("--epoch_step", type=int, default=100, help="step (default: %(default)s)")
    return parser


def epochs_to_check(epoch_min, epoch_max, epoch_step):
    if epoch_step < 1 or epoch_min < 1 or epoch_max < epoch_min:
        raise utils.ToolkitError(f"--epoch_min {epoch_min} --epoch_max {epoch_max} --epoch_step "
                                 f"{epoch_step} selects no epochs: use 1 <= min <= max, step >= 1")
    return list(range(epoch_min, epoch_max + 1, epoch_step))


def load_fold_epoch(pooled, story, out_dir, epoch, run, evaluated=()):
    """A fold's training and held-out videos, its models (one per seed) at `epoch` and
    the post-processing to score them with."""
    from empathy import checkpoints, engine
    train_set, val_set = datasets.fold_sets(pooled, story)
    paths = checkpoints.run_checkpoints(layout.fold_dir(out_dir, story),
                                        layout.checkpoint_name(epoch))
    trained, saved = engine.load_for_evaluation(paths, train_set, run.normalize,
                                                run.postprocessing_flags, run.device,
                                                [val_set] if evaluated else [])
    return train_set, val_set, trained, saved


def evaluate_fold_epochs(pooled, story, out_dir, epochs, run):
    """Held-out CCC of one fold at each epoch (of its seeds' average prediction):
    {"story", "scores": {epoch: ccc}}."""
    from empathy import engine
    scores = {}
    # Off where stderr is no terminal, and in worker processes, as the runner's bar is.
    for epoch in tqdm(epochs, desc=layout.fold_name(story), unit="epoch", leave=False,
                      dynamic_ncols=True, disable=None if run.progress else True):
        _, val_set, trained, saved = load_fold_epoch(pooled, story, out_dir, epoch, run,
                                                     evaluated=epoch == epochs[0])
        scores[epoch] = engine.evaluate_seeds(trained, val_set, run.device, saved,
                                              run.settings.precision)["ccc"]
    return {"story": story, "scores": scores}


def extract_fold_features(pooled, story, out_dir, epoch, run):
    from empathy import engine
    train_set, val_set, trained, saved = load_fold_epoch(pooled, story, out_dir, epoch, run)
    engine.extract_features(trained, train_set, val_set, layout.fold_dir(out_dir, story),
                            run.device, saved.label_delay, run.settings.precision)


def epoch_table(folds, epochs):
    """One row per epoch: mean, std and mean-std of the held-out CCC over folds,
    then each fold's CCC."""
    per_fold = pd.DataFrame({layout.fold_name(fold["story"]): [fold["scores"][e] for e in epochs]
                             for fold in folds})
    return pd.concat([pd.DataFrame({"epoch": epochs}), tables.summary_columns(per_fold),
                      per_fold], axis=1)


def ledger_results(returned):
    """The ledger's results: the cross-validated CCC of the best epoch."""
    table, best_epoch = returned
    best = table.set_index("epoch").loc[best_epoch]
    return {"mean_ccc": best["mean_ccc"], "std_ccc": best["std_ccc"],
            "mean_minus_std": best["mean_minus_std"], "best_epoch": best_epoch}


def main(args):
    from empathy import checkpoints
    mods = datasets.parse_mods(args.mods)
    epochs = epochs_to_check(args.epoch_min, args.epoch_max, args.epoch_step)
    out_dir = Path(args.out_dir)
    runner = parallel.Runner.from_args(args)
    pooled = datasets.load_pool(args.train_dir, args.test_dir, mods, args.stories, args.subjects)
    checkpoints.check_fold_checkpoints(out_dir, pooled.stories, epochs,
                                       "--epoch_min/--epoch_max/--epoch_step")
    first_epoch = [path for story in pooled.stories for path in checkpoints.run_checkpoints(
        layout.fold_dir(out_dir, story), layout.checkpoint_name(epochs[0]))]
    plan = options.Plan(outputs=[(out_dir, "--out_dir")], data=pooled, evaluated=first_epoch,
                        options=options.RunOptions.from_args(args, runner=runner), runner=runner)
    with command.Command(args, plan, out_dir, record=layout.CV_EPOCHS_RUN_RECORD) as run:
        return evaluate_and_extract(pooled, epochs, out_dir, args, run, runner)


def evaluate_and_extract(pooled, epochs, out_dir, args, run, runner):
    """Score every fold at every epoch, then write the best epoch's features."""
    common = dict(pooled=datasets.pool_for_tasks(pooled, runner, args.train_dir, args.test_dir,
                                                 args.stories, args.subjects),
                  out_dir=runner.path(out_dir), run=run)
    folds = runner.run(evaluate_fold_epochs,
                       [dict(story=s, epochs=epochs, **common) for s in pooled.stories], "folds")
    table = epoch_table(folds, epochs)
    best_epoch = int(table.loc[table["mean_ccc"].idxmax(), "epoch"])
    utils.write_csv(table, out_dir / layout.CV_EPOCHS_TABLE)
    print(utils.format_table(table[["epoch", "mean_ccc", "std_ccc", "mean_minus_std"]]))
    print(f"best epoch: {best_epoch} (mean CCC {table['mean_ccc'].max():.4f})")

    runner.run(extract_fold_features,
               [dict(story=s, epoch=best_epoch, **common) for s in pooled.stories], "features")
    print(f"features of epoch {best_epoch} written to {out_dir}/val_on_<story>/feat_train "
          "and feat_test")
    return table, best_epoch


if __name__ == "__main__":
    ledger.run_cli(main, get_args_parser(), ledger_results)
