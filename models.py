"""The model families, at the top level where the design card puts it: `import models` gives
everything `empathy.models` defines (one class each; their registry is empathy.families).

The code lives in the package so that importing it sets the thread policy first
(empathy/__init__.py); this file is the short name for notebooks and user scripts.
"""
from empathy.models import *  # noqa: F401,F403
