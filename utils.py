"""Small shared helpers, at the top level where the design card puts it: `import utils` gives
everything `empathy.utils` defines (the CCC metric, losses, atomic writes).

The code lives in the package so that importing it sets the thread policy first
(empathy/__init__.py); this file is the short name for notebooks and user scripts.
"""
from empathy.utils import *  # noqa: F401,F403
