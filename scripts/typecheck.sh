#!/usr/bin/env bash
# Type-check fedtune with mypy (configuration in pyproject.toml).
# The repository keeps the product's top-level folders (privacy/, client/, server/, simulations/), which
# are installed as sub-packages of `fedtune`; mypy cannot follow setuptools' editable-install mapping,
# so this lays the same package out with symlinks in a temporary folder and checks that.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree/fedtune"
for item in fedtune/*; do ln -s "$root/$item" "$tree/fedtune/$(basename "$item")"; done
for part in privacy client server simulations; do ln -s "$root/$part" "$tree/fedtune/$part"; done
cd "$tree"
python -m mypy --config-file "$root/pyproject.toml" -p fedtune "$@"
