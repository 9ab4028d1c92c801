"""How torch's CPU threads wait for work, set before torch loads its OpenMP runtime.

torch (like scikit-learn) runs its parallel loops on GNU OpenMP (libgomp), whose
threads, having finished their share of a loop, spin for up to 300,000 iterations
(milliseconds) waiting for the next one before they sleep. Alone on the cores that
costs nothing; when another process shares them, a spinning thread burns the core
its partner thread or the other process needs. On the 2-core development machine
(AMD EPYC) one AT training epoch took 0.49 s alone, and 20-28 s when two runs
shared the cores (bench.py's "two runs at once" row). Spinning 1,000 iterations
(tens of microseconds) before sleeping keeps a run alone as fast (0.49-0.51 s) and
two runs at 1.03-1.09 s per epoch each, about what two runs can get from two cores;
sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a run alone 25% (0.62 s), since
every parallel loop then starts by waking its threads.

libgomp reads the setting once, when it is loaded, so the package applies it on
import (empathy/__init__.py), before any of its modules can load torch; scripts
reach torch only through the package (a test checks it), and worker processes
inherit the setting through the environment. Whoever sets OpenMP's wait policy themselves wins: nothing
is changed when OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME (Intel's OpenMP) is
set. Thread counts are left to torch (one per physical core) and to --threads.
"""
import os

SPIN_COUNT = "1000"
USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def apply(environ=os.environ):
    """Sets the spin count in `environ` unless the user chose a wait policy."""
    if not any(name in environ for name in USER_SETTINGS):
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT
