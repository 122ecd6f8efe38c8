#!/usr/bin/env bash
# On a lent GPU machine (one H200; PyTorch + transformers only: no vLLM, no Ray, no hub), from the
# repository root:   bash benchmarks/gpu/run.sh
# Measures the SDPO learner step (ours vs TRL), the learner step and the colocated CUDA-IPC weight hand-off into the HF engine on a
# random-init model of Qwen2-0.5B's shape, and writes a JSON results file to $OUT (when the device
# tool sets it) or benchmarks/gpu/results/. Budget: well under 8 minutes.
# CPU smoke test of the same script (what can be checked without a GPU):
#   bash benchmarks/gpu/run.sh --device cpu --tiny
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
# The SDPO learner step, ours vs TRL's (tokens/s, MFU) on Qwen2.5-0.5B/1.5B shapes; then the hand-off.
timeout 240 "$PY" benchmarks/gpu/learner.py --steps 2 "$@" || echo "learner benchmark failed"
exec timeout 210 "$PY" benchmarks/gpu/colocated_ipc.py "$@"
