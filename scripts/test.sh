#!/usr/bin/env bash
# Install (first time only), lint, and run the test suite on CPU. Extra arguments go to pytest, e.g.
# the fast tier: bash scripts/test.sh -m "not integration and not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m ruff check .  # style never needs a review comment ([tool.ruff] in pyproject.toml)
exec .venv/bin/python -m pytest -q "$@"
