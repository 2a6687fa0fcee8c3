#!/usr/bin/env bash
# Install fedtune with its test extras and run the test suite (README: "Run the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0          # local CPU wheel; a bare `torch` pulls GBs of CUDA
python -m pip install --quiet -e ".[dev]"
export FEDTUNE_DATA_DIR="${FEDTUNE_DATA_DIR:-$(cd .. && pwd)/shared/data/glue}"
python -m pytest -q --durations=25 "$@"
