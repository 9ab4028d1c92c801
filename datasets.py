"""The loader, at the top level where the design card puts it: `import datasets` gives
everything `empathy.datasets` defines (its docstring draws the data layout).

The code lives in the package so that importing it sets the thread policy first
(empathy/__init__.py); this file is the short name for notebooks and user scripts.
"""
from empathy.datasets import *  # noqa: F401,F403
