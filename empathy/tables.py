"""What each script reports: result tables over folds, seeds and subjects."""


import pandas as pd



# ---------------------------------------------------------------- what each script reports

SEED_COLUMNS = ("val_ccc_seed_mean", "val_ccc_seed_std")
# crossval.py's columns after the guide's, where its rows have them: the epoch of the
# evaluated checkpoint (best.save's is picked on the held-out story), then those of
# each fold's last.save, where nothing is picked. One more column of last.save goes
# at the end; a name ending in _ccc gets the summary rows, one ending in _epoch not.
FOLD_COLUMNS = ("val_epoch", "last_ccc", "last_epoch", "average_last_ccc")
SUMMARY_ROWS = ("Mean", "Std", "Mean-Std")
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
    epochs = [name for name in columns if name.endswith("_epoch")]
    scores = [name for name in columns if name not in epochs]
    table = pd.DataFrame(folds, columns=["story", *columns])
    values = table[scores].astype(float)
    mean, std = values.mean(skipna=False), values.std(ddof=0, skipna=False)
    summary = pd.DataFrame([mean, std, mean - std])
    summary.insert(0, "story", list(SUMMARY_ROWS))
    summary[epochs] = ""
    table = table.astype({"story": object, **dict.fromkeys(epochs, object)})
    return pd.concat([table, summary], ignore_index=True)[["story", *columns]]


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


def spread_results(values, **extra):
    """Mean, std and mean-std of a list of CCCs (seeds, subjects)."""
    series = pd.Series(values, dtype=float)
    mean, std = series.mean(), series.std(ddof=0)
    return {"mean_ccc": mean, "std_ccc": std, "mean_minus_std": mean - std, **extra}


