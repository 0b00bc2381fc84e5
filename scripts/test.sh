#!/usr/bin/env bash
# The test suite: lint, format check and pytest, in the project's environment.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh dev
# Spinning OpenMP threads make torch 10-30x slower beside any other busy process
# (measured here: the BERT test took 11 s idle, 360 s beside a training job).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

ruff check .
ruff format --check .
python -m pytest "$@"
