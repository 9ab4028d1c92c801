"""What each script reports: result tables over folds, seeds and subjects.

Every mean, std and mean-std of CCCs over folds, seeds or subjects that a result
table (a .csv) or a ledger row shows is made by `spread`, with the population std
(ddof=0, numpy's default): as rows below a table (`with_summary_rows`:
crossval.csv's Mean, Std, Mean-Std; personalize.csv's Mean), as columns beside it
(`summary_columns`: cv_epochs.csv's mean_ccc, std_ccc, mean_minus_std per epoch;
`seed_columns`: the spread over seeds of a fold's or a subject's CCC), or in a
ledger row (`spread_results`).
"""
from typing import NamedTuple

import pandas as pd


# ---------------------------------------------------------------- the one builder

class Spread(NamedTuple):
    mean: object
    std: object
    mean_minus_std: object


def spread(values, axis=0, skipna=False):
    """Mean, std (population, ddof=0) and mean minus std of the CCCs `values` (a
    DataFrame or Series of floats): with axis=0 over its rows (one value per
    column), with axis=1 over its columns (one value per row). mean minus std is a
    conservative score that favours settings that do well on every fold. With
    `skipna=False` a missing value makes them NaN (a mean over the other folds would
    pass for one over all); with True it is left out."""
    mean = values.mean(axis=axis, skipna=skipna)
    std = values.std(axis=axis, ddof=0, skipna=skipna)
    return Spread(mean, std, mean - std)


SUMMARY_ROWS = ("Mean", "Std", "Mean-Std")


def with_summary_rows(table, label, scores, rows=SUMMARY_ROWS, skipna=False):
    """`table` with rows `rows` (of SUMMARY_ROWS, in that order) below it, named in
    its column `label`: the spread of each of its columns `scores` over its rows.
    Its other columns are left blank there (and become text columns)."""
    summary = spread(table[scores].astype(float), 0, skipna)
    summary = pd.DataFrame([summary[SUMMARY_ROWS.index(name)] for name in rows])
    summary.insert(0, label, list(rows))
    blank = [name for name in table.columns if name != label and name not in scores]
    summary[blank] = ""
    table = table.astype({label: object, **dict.fromkeys(blank, object)})
    return pd.concat([table, summary], ignore_index=True)[list(table.columns)]


def summary_columns(per_fold, names=("mean_ccc", "std_ccc", "mean_minus_std")):
    """The spread of each row of `per_fold` (a CCC per fold in each column) as columns
    `names` (mean, std, mean minus std, or the first of them), NaN where a fold has
    none."""
    return pd.DataFrame(dict(zip(names, spread(per_fold.astype(float), 1))))


# ---------------------------------------------------------------- what each script reports

SEED_COLUMNS = ("val_ccc_seed_mean", "val_ccc_seed_std")
# crossval.py's columns after the guide's, where its rows have them: the epoch of the
# evaluated checkpoint (best.save's is picked on the held-out story), then those of
# each fold's last.save, where nothing is picked. One more column of last.save goes
# at the end; a name ending in _ccc gets the summary rows, one ending in _epoch not.
FOLD_COLUMNS = ("val_epoch", "last_ccc", "last_epoch", "average_last_ccc")
# crossval.csv's columns that nothing was picked for, in the order the ledger prefers them
REPORTED_COLUMNS = ("average_last_ccc", "last_ccc")


def crossval_table(folds):
    """crossval.csv: the cross-validation table of crossval.py and cv_fusion.py.

    `folds` holds one dict per held-out story: {"story", "train_ccc", "val_ccc"},
    for --seeds runs "val_ccc_seed_mean" and "val_ccc_seed_std" (of the seeds' own
    CCC), and crossval.py's FOLD_COLUMNS. Rows follow for Mean, Std (population, as
    numpy's default) and Mean-Std, a conservative score that favours settings that
    do well on every story, of every CCC column (a fold without a value makes them
    NaN: a mean over the other folds would pass for one over all); epochs are left
    blank there.
    """
    columns = [name for name in ("train_ccc", "val_ccc", *SEED_COLUMNS, *FOLD_COLUMNS)
               if name in folds[0]]
    table = pd.DataFrame(folds, columns=["story", *columns])
    return with_summary_rows(table, "story",
                             [name for name in columns if not name.endswith("_epoch")])


def crossval_results(table):
    """The ledger's results of a crossval.csv-shaped table (crossval.py, cv_fusion.py):
    the mean, std and mean-std over folds of the number that can be reported, where
    the table has one for every fold (crossval.py's average_last_ccc, else last_ccc:
    nothing picked on the held-out stories), else of val_ccc."""
    rows = table.set_index("story")
    reported = next((name for name in REPORTED_COLUMNS
                     if name in rows and not pd.isna(rows.loc["Mean", name])), "val_ccc")
    return {"mean_ccc": rows.loc["Mean", reported], "std_ccc": rows.loc["Std", reported],
            "mean_minus_std": rows.loc["Mean-Std", reported],
            "train_ccc": rows.loc["Mean", "train_ccc"]}


def seed_columns(name, values):
    """{<name>_seed_mean, <name>_seed_std}: the spread of one CCC over a run's seeds,
    beside its seed-averaged score in crossval.csv and personalize.csv."""
    mean, std, _ = spread(pd.Series(values, dtype=float))
    return {f"{name}_seed_mean": mean, f"{name}_seed_std": std}


def spread_results(values, **extra):
    """Mean, std and mean-std of a list of CCCs (seeds, subjects)."""
    mean, std, mean_minus_std = spread(pd.Series(values, dtype=float), skipna=True)
    return {"mean_ccc": mean, "std_ccc": std, "mean_minus_std": mean_minus_std, **extra}


