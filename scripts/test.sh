#!/usr/bin/env bash
# The test suite: lint, format check and pytest, in the project's environment.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

ruff check .
ruff format --check .
python -m pytest "$@"
