"""Where tasks run: in this process, in local worker processes, or on a Dask cluster.

A script that has independent pieces of work (folds, subjects, videos) describes
each as a task, a dict of keyword arguments of one function, and hands them to a
`Runner` built from its --jobs and --scheduler flags (`get_parallel_args_parser`):

    runner = parallel.Runner.from_args(args)
    runner.check()                                      # before anything is written
    pooled = runner.data(pooled, load_pool, train_dir=Path(args.train_dir), ...)
    tasks = [dict(pooled=pooled, story=story, out_dir=runner.path(out_dir)) ...]
    rows = runner.run(run_fold, tasks, "folds")

Locally, data loaded once is memory-mapped into the workers; on a cluster each worker
loads it itself from the shared folders (`runner.data`), and paths are absolute
(`runner.path`), since workers run in other folders. Each task must seed itself, so
that its results do not depend on where it ran.

Stopping: Ctrl-C or SIGTERM (`StopRequests`) asks training to stop at the end of
the epoch in progress. The request reaches local workers through a file they look
for after every epoch (they start with both signals blocked, so that a Ctrl-C sent
to the whole terminal group cannot kill one mid-start); tasks not yet started are
left out, and the run ends with KeyboardInterrupt once the running ones have saved.
Around the whole command (`whole_run`, from ledger.run_cli), a signal outside training
stops it at once, and the worker processes end with the command, however it ends.
"""
import argparse
import contextlib
import dataclasses
import functools
import importlib
import os
import re
import signal
import sys
import tempfile
import threading
import uuid
from pathlib import Path

from tqdm import tqdm

from .utils import ToolkitError

# Imported on first use: fusion.py, cv_fusion.py and extract_features.py need none
# to start (their --help included).


def get_parallel_args_parser(what):
    """--jobs and --scheduler for a script that can `what` (e.g. "run folds") side
    by side."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("parallel runs")
    group.add_argument("--jobs", type=int, default=1, metavar="N",
                       help=f"{what} in N parallel processes (default: %(default)s)")
    group.add_argument("--scheduler", metavar="ADDRESS",
                       help=f"{what} on the workers of the Dask scheduler at ADDRESS (e.g. "
                            "tcp://host:8786) instead; data and outputs must be in folders "
                            "the workers share, at the same paths")
    group.add_argument("--threads", type=int, metavar="N",
                       help="intra-op threads of each task (default: the cores shared among "
                            "--jobs; one on a cluster worker). Float sums depend on how work "
                            "is split among threads, so tasks give bit-identical numbers "
                            "whatever --jobs or --scheduler is when --threads is the same")
    return parser


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# Processes or threads beyond a few per core only queue for the cores, and each costs
# memory and counts against the machine's limit on threads (--threads 100000 used it
# up, so other programs could not fork, then crashed): at most this many per core.
PER_CORE = 4
# A cluster worker's cores are not this machine's: there, --threads is only kept
# below what any machine has.
MAX_CLUSTER_THREADS = 1024


def most_local_threads():
    """The most processes x threads a local run may start (PER_CORE per core here)."""
    return PER_CORE * available_cores()


# ---------------------------------------------------------------- stopping

_stop_file = None  # in a worker process: where its parent's stop request appears


class StopRequests:
    """Turns Ctrl-C and SIGTERM into a request that training honours at the end of
    the epoch in progress, so that nothing but that epoch is lost. A second signal
    stops at once. Requests nest: one made while an enclosing StopRequests was
    listening counts here too (a signal between two tasks stops the next one's
    training). In a local worker process, the parent's request counts too.
    Outside the main thread (where signals cannot be caught) only that does."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, until="the end of this epoch", on_request=None):
        self.signalled = False
        self._until = until  # None: stop at once (KeyboardInterrupt), as `whole_run` does
        self._on_request = on_request
        self._previous = {}
        self._outer = None  # the StopRequests listening before this one

    @property
    def requested(self):
        return (self.signalled or (self._outer is not None and self._outer.requested)
                or (_stop_file is not None and os.path.exists(_stop_file)))

    def _handle(self, signum, frame):
        if self._until is None or self.signalled or (self._outer and self._outer.requested):
            raise KeyboardInterrupt
        self.signalled = True
        if self._on_request:
            self._on_request()
        print(f"\n{signal.Signals(signum).name}: stopping at {self._until} "
              "(send it again to stop now)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            try:
                for sig in self.SIGNALS:
                    self._previous[sig] = signal.signal(sig, self._handle)
            except BaseException:  # a signal between the two: never leave one handler behind
                self.__exit__()
                raise
            outer = getattr(self._previous[signal.SIGINT], "__self__", None)
            self._outer = outer if isinstance(outer, StopRequests) else None
            if self._on_request and self.requested:  # asked for before this one listened
                self._on_request()
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class _Stopped:
    """What a task returns from a worker when a stop request skipped or ended it."""


@contextlib.contextmanager
def whole_run():
    """The stop handler of a whole command, from its first check to its last write (its
    ledger row included). Outside training, where `StopRequests` waits for the end of
    the epoch, Ctrl-C and SIGTERM stop it at once as a KeyboardInterrupt: a SIGTERM ends
    the command as Ctrl-C does ("interrupted", status 130, locks released, no file
    half-written), never killed outright. However the block ends, the local worker
    processes it started end with it (`end_local_workers`)."""
    with StopRequests(until=None):
        try:
            yield
        finally:
            with _signals_held():  # a signal now ends the command once they have ended
                end_local_workers()


def end_local_workers():
    """End the worker processes that joblib keeps for reuse. Left alone, they outlive
    a killed parent by minutes (their signals are blocked, see `_signals_blocked`),
    and with them the resource trackers, whose pipes they hold, and joblib's folder in
    /dev/shm. Ended here, nothing of a command outlives it: the trackers end as its
    own end closes their pipes, and unlink what is left."""
    reusable = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(reusable, "_executor", None)
    if executor is not None:
        # Asked, not killed: they are idle (joblib kills busy ones when a run breaks off),
        # and a worker that exits itself releases its semaphores. joblib's executor then
        # removes its temporary folders.
        executor.terminate(kill_workers=False)


# ---------------------------------------------------------------- the runner

# How to go on after a stop request ended a run early (Runner.run's default).
RERUN = "run the same command again, with --resume where the script has it, to continue"


@dataclasses.dataclass(frozen=True)
class Runner:
    """Where a script's tasks run: `jobs` local processes, or the workers of the Dask
    scheduler at `scheduler` (--jobs, --scheduler)."""
    jobs: int = 1
    scheduler: str = None
    threads: int = None

    @classmethod
    def from_args(cls, args):
        return cls(args.jobs, args.scheduler, args.threads)

    def check(self):
        """Fail before anything is written: --jobs or --threads below 1 or beyond
        PER_CORE per core (their product, locally), or no reachable scheduler."""
        for flag, value in (("--jobs", self.jobs), ("--threads", self.threads)):
            if value is not None and value < 1:
                raise ToolkitError(f"{flag} must be at least 1, got {value}")
        if self.scheduler:
            if (self.threads or 1) > MAX_CLUSTER_THREADS:
                raise ToolkitError(f"--threads {self.threads} is more than any worker machine "
                                   f"has cores: give at most {MAX_CLUSTER_THREADS}, e.g. the "
                                   "cores of one worker")
            connect_scheduler(self.scheduler).close()
            return
        cores, most = available_cores(), most_local_threads()
        if self.jobs > most or (self.threads or 1) > most:
            flag, value = ("--jobs", self.jobs) if self.jobs > most else ("--threads", self.threads)
            raise ToolkitError(f"{flag} {value} is more than {PER_CORE} per core of this "
                               f"machine's {cores} cores: more only queue for the cores (and "
                               f"may exhaust the machine's threads); give at most {most}")
        if self.jobs * (self.threads or 1) > most:
            raise ToolkitError(f"--jobs {self.jobs} with --threads {self.threads} start "
                               f"{self.jobs * self.threads} threads, more than {PER_CORE} per "
                               f"core of this machine's {cores} cores: give --jobs x --threads at "
                               f"most {most}, e.g. --threads {max(1, cores // self.jobs)}")

    @property
    def in_this_process(self):
        """Whether tasks run here one after another (and may show progress bars)."""
        return self.jobs == 1 and not self.scheduler

    def path(self, path):
        """A path as tasks get it: absolute where they run in other processes (cluster
        workers run in other folders of the same shared file system; local workers
        live on between runs in the folder this process was in when they started),
        as given otherwise."""
        if path is None:
            return None
        return Path(path) if self.in_this_process else Path(path).absolute()

    def data(self, loaded, loader, parts=None, **arguments):
        """A task argument for data this process has `loaded` with `loader(**arguments)`:
        the data itself (local processes memory-map it), or, on a cluster, a stand-in
        that each worker loads itself (Path arguments made absolute). For a loader
        that returns a tuple of `parts` items, one task argument per item."""
        if not self.scheduler:
            return loaded
        stand_in = load_on_workers(loader, **{name: self._absolute(value)
                                              for name, value in arguments.items()})
        return stand_in.parts(parts) if parts else stand_in

    def _absolute(self, value):
        if isinstance(value, Path):
            return self.path(value)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, Path) for v in value):
            return [self.path(v) for v in value]
        return value

    def run(self, function, tasks, description, rerun=RERUN):
        """`[function(**task) for task in tasks]`, with a progress bar over finished
        tasks. Raises KeyboardInterrupt when a stop request ended the run early (having
        said that, and `rerun`: how to go on)."""
        function = importable(function)  # workers cannot import a script's __main__
        if self.scheduler:
            return _run_on_cluster(function, tasks, self.scheduler, description, self.threads)
        if self.jobs == 1 or len(tasks) <= 1:
            return _run_here(function, tasks, description, self.threads)
        jobs = min(self.jobs, len(tasks))
        threads = self.threads or max(1, available_cores() // jobs)
        return _run_in_processes(function, tasks, jobs, threads, description, rerun)


def _progress(results, total, description):
    # Off where stderr is not a terminal, so that logs hold only results.
    return tqdm(results, total=total, desc=description, unit="task", dynamic_ncols=True,
                disable=None)


@contextlib.contextmanager
def _threads(count):
    """torch on `count` intra-op threads (None: as it is, torch not even loaded) for the
    block."""
    import torch
    if not count:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_here(function, tasks, description, threads=None):
    results = []
    with StopRequests("the end of this task") as stop, _threads(threads):
        for task in _progress(tasks, len(tasks), description):
            if stop.requested:  # between tasks; training has its own requests within one
                raise KeyboardInterrupt
            results.append(_call(function, task))
    return results


def _run_in_processes(function, tasks, jobs, threads, description, rerun=RERUN):
    """joblib processes on `threads` threads each. Large arrays in the arguments are
    memory-mapped (copy-on-write) into the workers, not copied."""
    from joblib import Parallel, delayed
    from joblib.externals.loky.process_executor import BrokenProcessPool
    results = []
    with tempfile.TemporaryDirectory(prefix="stop-") as folder:
        stop_file = Path(folder) / "stop"
        with StopRequests("the end of the running tasks' epochs", stop_file.touch) as stop:
            try:
                with _signals_blocked():  # in the workers it starts, for good
                    started = Parallel(n_jobs=jobs, mmap_mode="c", return_as="generator")(
                        delayed(_call_in_worker)(function, threads, str(stop_file), task)
                        for task in tasks)
                results.extend(_progress(started, len(tasks), description))
            except BrokenProcessPool as error:  # a worker died: by a signal, memory, a crash
                if not stop.signalled:
                    raise ToolkitError(f"a worker process of the {description} died "
                                       f"({_exit_codes(error)}; e.g. killed for memory); what "
                                       "finished is saved: run again, with --resume where the "
                                       "script has it") from None
    finished = sum(not isinstance(result, _Stopped) for result in results)
    if stop.signalled or finished < len(tasks):
        print(f"stopped with {finished} of {len(tasks)} {description} finished: "
              f"{rerun}", file=sys.stderr)
        raise KeyboardInterrupt
    return results


@contextlib.contextmanager
def _signals_blocked():
    """Ctrl-C and SIGTERM blocked in this thread for the block, and so in the worker
    processes and threads it starts: a Ctrl-C goes to the terminal's whole process
    group, and would otherwise kill a worker still starting (a TerminatedWorkerError
    after its traceback). Workers stop through the stop file instead; signals that
    arrive meanwhile are delivered here when the block ends."""
    # Python's own resource tracker, started on the first run, unblocks both when it
    # starts: started now, it leaves the block alone.
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()
    with _signals_held():
        yield


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM held back in this thread for the block, and delivered when it
    ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, StopRequests.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _exit_codes(error):
    """'exit codes {SIGKILL(-9)}' from loky's message, or its first line."""
    match = re.search(r"exit codes? of the workers? (?:are|is) (\{[^}]*\})", str(error))
    return f"exit codes {match.group(1)}" if match else str(error).strip().splitlines()[0][:120]


def _call_in_worker(function, threads, stop_file, task):
    """A task in a joblib worker: on `threads` threads, honouring the parent's stop
    request (a task that has not started by then does not start)."""
    import torch
    global _stop_file
    _stop_file = stop_file
    torch.set_num_threads(threads)
    if os.path.exists(stop_file):
        return _Stopped()
    try:
        return _call(function, task)
    except KeyboardInterrupt:  # training saved its last.save and stopped
        return _Stopped()


def _call(function, task, threads=None):
    task = {name: value.load() if isinstance(value, LoadedOnWorkers) else value
            for name, value in task.items()}
    with _threads(threads):
        return function(**task)


# ---------------------------------------------------------------- cluster

@dataclasses.dataclass(frozen=True)
class LoadedOnWorkers:
    """A task argument that each cluster worker loads itself, `loader(**arguments)`,
    instead of receiving the data through the scheduler (see `load_on_workers`)."""
    loader: object
    arguments: tuple
    run: str
    part: int = None  # for a loader that returns a tuple: the item this argument is

    def parts(self, count):
        """One task argument per item of the loader's tuple; they are loaded once."""
        return [dataclasses.replace(self, part=index) for index in range(count)]

    def load(self):
        if self.part is None:
            return _load(self)
        return _load(dataclasses.replace(self, part=None))[self.part]


def load_on_workers(loader, **arguments):
    """A task argument standing for `loader(**arguments)` (e.g. the pooled videos),
    for runs on a cluster: workers read the data from paths they share with this
    machine (make relative paths absolute first), once per worker process and run.
    A new run reads again, so files changed between runs are never served stale."""
    arguments = {name: tuple(value) if isinstance(value, list) else value
                 for name, value in arguments.items()}  # hashable, for the cache
    return LoadedOnWorkers(importable(loader), tuple(sorted(arguments.items())),
                           uuid.uuid4().hex)


@functools.lru_cache(maxsize=2)  # the data of this run and of at most one other
def _load(data):
    return data.loader(**dict(data.arguments))


def importable(function):
    """`function` as an attribute of its module. `python crossval.py` defines its
    functions in __main__, which worker processes cannot import by that name (Dask
    would ship copies, so `_load`'s cache would miss every time); they import the
    script's module instead."""
    script = getattr(sys.modules["__main__"], "__file__", None)
    if getattr(function, "__module__", None) != "__main__" or script is None:
        return function
    return getattr(importlib.import_module(Path(script).stem), function.__qualname__)


_HOST = r"(\[[0-9a-fA-F:.]+\]|[^\s/:\[\]]+)"
SCHEDULER_ADDRESS = re.compile(rf"(tcp|tls|ucx|ws|wss|inproc)://{_HOST}(:\d+)?/?|{_HOST}:\d+")


def connect_scheduler(address):
    """A Dask client of the scheduler at `address`, or a one-line error after Dask's
    connect timeout (distributed.comm.timeouts.connect, 30 s unless configured)."""
    try:
        from distributed import Client
    except ImportError:
        raise ToolkitError("--scheduler needs Dask: pip install 'dask[distributed]'") from None
    # Checked here: a Client given a malformed address fails, then prints a traceback
    # when Python later collects it.
    if not SCHEDULER_ADDRESS.fullmatch(address):
        raise ToolkitError(f"--scheduler {address} is not a scheduler address: give "
                           "PROTOCOL://HOST:PORT, e.g. tcp://10.0.0.5:8786")
    try:
        return Client(address, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError):
        raise ToolkitError(f"cannot reach the Dask scheduler at {address}: start one with "
                           "'dask scheduler' or check the address") from None


def _run_on_cluster(function, tasks, scheduler, description, threads=None):
    """Each task as a Dask future on the cluster's workers.

    A worker that dies costs only the tasks it was running: the scheduler runs them
    again on another worker (tasks must therefore be idempotent), and gives up on a
    task that has taken down `distributed.scheduler.allowed-failures` + 1 workers.
    The first task that fails stops the run with its error.
    """
    from concurrent.futures import CancelledError
    from distributed import KilledWorker, as_completed
    client = connect_scheduler(scheduler)
    try:
        futures = [client.submit(_call, function, task, threads, pure=False) for task in tasks]
        for future in _progress(as_completed(futures, loop=client.loop), len(futures),
                                description):
            future.result()  # the first error stops the run, not the last task
        return [future.result() for future in futures]
    except KilledWorker:
        raise ToolkitError(f"a {description} task took down every Dask worker that ran it "
                           "(see the workers' logs, e.g. for running out of memory); what "
                           "finished is saved: run again, with --resume where the script "
                           "has it") from None
    except CancelledError:
        raise ToolkitError(f"lost the Dask scheduler at {scheduler}, and with it the running "
                           "tasks; what finished is saved: restart the scheduler and workers "
                           "and run again, with --resume where the script has it") from None
    except Exception as error:
        missing = _missing_module(error)
        if missing is None:
            raise
        raise ToolkitError(f"the Dask scheduler or workers cannot import {missing}: start "
                           "them with PYTHONPATH set to the toolkit's folder (README: "
                           "Running on a cluster)") from None
    finally:
        client.close()


def _missing_module(error):
    """The module a remote unpickling failed to import, if that is what `error` is
    (the scheduler wraps it in a RuntimeError)."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError):
            return error.name
        error = error.__cause__
    return None
