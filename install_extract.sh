#!/usr/bin/env bash
# Install what extract_features.py needs, on top of the core toolkit: one command.
# fer comes without its dependencies (see requirements-extract-nodeps.txt).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -r requirements-extract.txt
python3 -m pip install --no-deps -r requirements-extract-nodeps.txt
