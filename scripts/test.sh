#!/usr/bin/env bash
# Install fedtune with its test extras and run the test suite (README: "Run the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0          # local CPU wheel; a bare `torch` pulls GBs of CUDA
python -m pip install --quiet -e ".[dev]"
export FEDTUNE_DATA_DIR="${FEDTUNE_DATA_DIR:-$(cd .. && pwd)/shared/data/glue}"
# Two workers, whole files each (module fixtures such as a federation run once), one torch thread per
# worker (tests/conftest.py): the suite keeps both cores busy. `-n 0` runs it in one process.
python -m pytest -q -n 2 --dist loadfile -p no:benchmark --durations=25 "$@"
