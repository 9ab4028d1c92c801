"""The thread policy reaches torch (the package sets it on import, before any of its
modules can load torch, and worker processes inherit it; a user's own setting wins), and the
commands that only read files, and every script's --help, load no torch."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from empathy import ledger, parallel, thread_policy
from test_plot import table_files, predictions  # noqa: F401  fixtures
from test_runs import write_ledger

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("setting", [None, *thread_policy.USER_SETTINGS])
def test_the_spin_count_is_set_unless_the_user_chose_a_wait_policy(setting):
    environ = {"OMP_NUM_THREADS": "1"} | ({setting: "7"} if setting else {})
    before = dict(environ)
    thread_policy.apply(environ)
    assert environ == (before | {"GOMP_SPINCOUNT": thread_policy.SPIN_COUNT} if setting is None
                       else before)


def imports_openmp_users(tree, anywhere=True):
    """The lines where the module imports torch or scikit-learn: anywhere (also in a
    function), or only at module level."""
    nodes = ast.walk(tree) if anywhere else tree.body
    lines = []
    for node in nodes:
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(name.split(".")[0] in ("torch", "sklearn") for name in names):
            lines.append(node.lineno)
    return lines


def imports_the_package(tree):
    return any(isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "empathy"
               or isinstance(node, ast.Import) and node.names[0].name.split(".")[0] == "empathy"
               for node in tree.body)


def test_scripts_reach_torch_only_after_the_package_set_the_policy():
    """The package applies the policy on import (empathy/__init__.py), so no module
    carries an import-order rule: a script imports torch or scikit-learn only inside
    its functions, which run after its module-level import of the package."""
    for path in sorted(ROOT.glob("*.py")):
        tree = ast.parse(path.read_text())
        assert not imports_openmp_users(tree, anywhere=False), \
            f"{path.name}: import torch inside the function that needs it, after the package"
        if imports_openmp_users(tree):
            assert imports_the_package(tree), f"{path.name}: import the package at module level"
    package = sorted((ROOT / "empathy").glob("*.py"))
    rules = [path.name for path in package if "thread_policy" in path.read_text()
             and path.name not in ("__init__.py", "thread_policy.py")]
    assert not rules, f"{rules}: the package sets the thread policy; its modules need not"


@pytest.mark.parametrize("module", ["empathy.models", "empathy.engine", "models", "datasets"])
def test_any_first_import_sets_the_policy_before_torch_loads(module):
    check = (f"import sys, os, {module}, torch; "
             "print(os.environ.get('GOMP_SPINCOUNT'))")
    environ = {name: value for name, value in os.environ.items()
               if name not in thread_policy.USER_SETTINGS}
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=environ,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == [thread_policy.SPIN_COUNT]


def spin_count_in_worker(_):
    return os.environ.get("GOMP_SPINCOUNT")


def test_worker_processes_inherit_the_policy_and_a_user_setting_wins():
    # a fresh interpreter that imports the library gets the policy before torch loads
    check = ("import sys, os; from empathy import engine; assert 'torch' in sys.modules; "
             "print(os.environ.get('GOMP_SPINCOUNT'))")
    environ = {name: value for name, value in os.environ.items()
               if name not in thread_policy.USER_SETTINGS}
    ours = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=environ,
                          capture_output=True, text=True, check=True)
    theirs = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True,
                            env=environ | {"OMP_WAIT_POLICY": "ACTIVE"}, text=True, check=True)
    assert ours.stdout.split() == [thread_policy.SPIN_COUNT] and theirs.stdout.split() == ["None"]
    # and the local workers that --jobs starts inherit it
    runner = parallel.Runner(jobs=2)
    assert runner.run(spin_count_in_worker, [{"_": 1}, {"_": 2}], "tasks") == \
        [thread_policy.SPIN_COUNT] * 2


LIGHT = """
import runpy, sys
sys.path.insert(0, {root!r})
for argv in {commands!r}:
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        assert not stop.code, (argv, stop.code)
print(sorted(name for name in sys.modules if name.split(".")[0] == "torch"))
"""


COMMANDS = sorted(path.name for path in ROOT.glob("*.py")
                  if 'if __name__ == "__main__":' in path.read_text())


def test_every_script_is_a_command_here():
    assert {"train.py", "crossval.py", "cv_epochs.py", "personalize.py", "tune.py", "bench.py",
            "compare_options.py", "fusion.py", "score.py", "plot.py"} <= set(COMMANDS)


def test_commands_that_read_files_load_no_torch(tiny_data, table_files, predictions, tmp_path):  # noqa: F811
    ledger_csv = tmp_path / "runs.csv"
    write_ledger(ledger_csv, [("cv_a", '{"loss": "ccc"}', 0.3, 0.1), ("cv_b", "{}", 0.2, 0.05)])
    annotations, predicted = predictions
    plots = tmp_path / "plots"
    commands = [
        ["score.py", annotations, predicted, "--out_dir", tmp_path / "scores"],
        ["runs.py", ledger_csv],
        ["data_stats.py", tiny_data / "Training", "--out", tmp_path / "stats.csv"],
        ["plot.py", "predictions", "--pred_dir", predicted, "--annotations", annotations,
         "--out", plots / "p.png"],
        ["plot.py", "epochs", table_files["cv_epochs"], "--out", plots / "e.png"],
        ["plot.py", "subjects", table_files["personal"], "--out", plots / "s.png"],
        ["plot.py", "stories", table_files["crossval"], "--out", plots / "c.png"],
        ["plot.py", "runs", ledger_csv, "--out", plots / "r.png"],
        *[[script, "--help"] for script in COMMANDS],
    ]
    commands = [[str(ROOT / command[0]), *map(str, command[1:])] for command in commands]
    script = LIGHT.format(root=str(ROOT), commands=commands)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert sorted(path.name for path in plots.iterdir()) == ["c.png", "e.png", "p.png", "r.png",
                                                             "s.png"]
    assert (tmp_path / "scores").is_dir() and (tmp_path / "stats.csv").stat().st_size > 0
    assert "cv_a" in done.stdout and ledger.read_ledger(ledger_csv).shape[0] == 2
