"""The thread policy reaches torch (every module that imports it sets the policy
first, and worker processes inherit it; a user's own setting wins), and the
commands that only read files, and every script's --help, load no torch."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from empathy import ledger, parallel, thread_policy
from test_plot import tables, predictions  # noqa: F401  fixtures
from test_runs import write_ledger

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("setting", [None, *thread_policy.USER_SETTINGS])
def test_the_spin_count_is_set_unless_the_user_chose_a_wait_policy(setting):
    environ = {"OMP_NUM_THREADS": "1"} | ({setting: "7"} if setting else {})
    before = dict(environ)
    thread_policy.apply(environ)
    assert environ == (before | {"GOMP_SPINCOUNT": thread_policy.SPIN_COUNT} if setting is None
                       else before)


def first_import(tree):
    return next(node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))


def imports_openmp_users(tree):
    """Whether the module imports torch or scikit-learn anywhere (also in a function,
    or on first use through utils.LazyModule)."""
    for node in ast.walk(tree):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom)
                 else [argument.value for argument in node.args
                       if isinstance(argument, ast.Constant) and isinstance(argument.value, str)]
                 if isinstance(node, ast.Call) and "LazyModule" in ast.unparse(node.func) else [])
        if any(name.split(".")[0] in ("torch", "sklearn") for name in names):
            return True
    return False


def test_every_module_importing_torch_sets_the_policy_first():
    users = []
    for path in sorted(ROOT.glob("*.py")):
        tree = ast.parse(path.read_text())
        if imports_openmp_users(tree):
            users.append(path.name)
            node = first_import(tree)
            assert isinstance(node, ast.Import) and node.names[0].name == "thread_policy", \
                f"{path.name}: make `import thread_policy` its first import"
    assert {"datasets.py", "engine.py", "models.py", "parallel.py", "svr_fusion.py"} <= set(users)


def spin_count_in_worker(_):
    return os.environ.get("GOMP_SPINCOUNT")


def test_worker_processes_inherit_the_policy_and_a_user_setting_wins():
    # a fresh interpreter that imports the library gets the policy before torch loads
    check = ("import sys, os, engine; assert 'torch' in sys.modules; "
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


def test_commands_that_read_files_load_no_torch(tiny_data, tables, predictions, tmp_path):  # noqa: F811
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
        ["plot.py", "epochs", tables["cv_epochs"], "--out", plots / "e.png"],
        ["plot.py", "subjects", tables["personal"], "--out", plots / "s.png"],
        ["plot.py", "stories", tables["crossval"], "--out", plots / "c.png"],
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
