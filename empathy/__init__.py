"""The toolkit's library: everything the scripts beside this package share.

From the bottom up (a module imports only those above it in this list, or none):

    utils            the CCC metric, losses, tables, atomic writes, the one-line errors
    datasets         the input tree: the only code that knows its folders and files
    families         the registry of model families and their size flags (no torch)
    models           the model families, one class each
    layout           the output tree: its names, the fresh/resume checks, the lock
    ledger           one row per finished run in runs.csv: writing and reading it
    tables           mean / std / mean-std tables over folds, seeds and subjects
    parallel         --jobs and --scheduler: local processes or a Dask cluster
    precision        --precision: float32, bf16 or fp16 autocast
    postprocessing   smoothing, low-pass, calibration, label delay, chosen on folds
    options          the shared flags, their checks, and the settings they make
    command          the run protocol: every check, the lock and args.json before a write
    checkpoints      the self-describing .save files: writing, reading, checking
    engine           fit, train_one_epoch, evaluate, predict, weight averaging
    finetuning       personalize.py's per-listener methods and inner folds
    tuning           tune.py's Optuna study
    svr_fusion       decision-level fusion with support vector regression
    face_features    the face descriptor of extract_features.py

Importing the package first sets how OpenMP threads wait (`thread_policy`), before
any of its modules can load torch: no module depends on the order of imports.
docs/architecture.md draws the layers and follows one train.py run through them.
"""
from . import thread_policy

thread_policy.apply()
