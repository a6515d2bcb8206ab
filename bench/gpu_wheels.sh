#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before sending the repo to a GPU machine that has no package index:
# fetches wheels of what the project needs and that machine's image may lack (pycocotools), for its
# Python (3.12 by default), into .whl/ (git-ignored; bring it along). bench/gpu.sh installs them.
# Usage: bash bench/gpu_wheels.sh [python-version]
set -euo pipefail
cd "$(dirname "$0")/.."
ver=${1:-3.12}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$ver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pycocotools
ls -l .whl
