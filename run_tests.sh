#!/usr/bin/env bash
# Install everything the test suite needs (Debian packages listed in
# tests/apt-packages.txt, Python packages in requirements-dev.txt and, without
# their dependencies, requirements-extract-nodeps.txt), then run it.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
if [ -f tests/apt-packages.txt ]; then
  for package in $(grep -v '^#' tests/apt-packages.txt); do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
fi
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m pip install -q -r requirements-dev.txt
# Without its dependencies, which pin an old torch (see the file).
python3 -m pip install -q --no-deps -r requirements-extract-nodeps.txt
# Two worker processes (pytest-xdist): most tests are small and single-threaded, so
# two cores finish the suite in about two thirds of the time one process takes.
python3 -m pytest -q -n 2 "$@"
