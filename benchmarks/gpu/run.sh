#!/usr/bin/env bash
# On a lent GPU machine (one H200; python3 with PyTorch + transformers only: no vLLM, no Ray, no
# pydantic, no internet), from the repository root:   bash benchmarks/gpu/run.sh
# Under 8 minutes in all; each part has its own time limit and appends its result as soon as it has
# one ($OUT/summary.jsonl: one line per part; each part's JSON in $OUT), so a timeout loses only the
# part it cut. $OUT: the device tool's output folder, else benchmarks/gpu/results.
#   1. check_paths.py    GPU-only code paths without vLLM (CUDA IPC handle as plain data opened by
#                        another process; offloaded-teacher gather under NCCL; flash-attn under bf16;
#                        the learner's empty_cache)
#   2. colocated_ipc.py  learner step and the colocated CUDA-IPC weight hand-off into the HF engine
#   3. learner.py        the SDPO learner step, ours vs TRL's (when trl imports)
# CPU smoke test of the same script (what can be checked without a GPU):
#   bash benchmarks/gpu/run.sh --device cpu
set -uo pipefail   # no -e: a part that fails is recorded and the next one runs
cd "$(dirname "$0")/../.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
device=cuda
extra=()
if [ "${1:-}" = "--device" ] && [ "${2:-}" = "cpu" ]; then device=cpu; extra=(--tiny); fi
OUT="${OUT:-benchmarks/gpu/results}"
export OUT
mkdir -p "$OUT"
summary="$OUT/summary.jsonl"
deps="$("$PY" benchmarks/gpu/deps.py)" || { echo "benchmarks/gpu/deps.py failed" >&2; exit 1; }
export PYTHONPATH="${deps:+$deps:}$PWD${PYTHONPATH:+:$PYTHONPATH}"

part() {  # part NAME SECONDS ARGS...: run one part under its time limit, append its outcome at once
  local name=$1 limit=$2 started rc
  shift 2
  started=$(date +%s)
  timeout "$limit" "$PY" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 15
  rc=${PIPESTATUS[0]}
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - started )), \"limit_s\": $limit}" >> "$summary"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
part environment 60 -c "import torch, transformers, pydantic; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'pydantic', pydantic.VERSION, 'GPUs', torch.cuda.device_count())"
part check_paths 60 benchmarks/gpu/check_paths.py --device "$device"
part colocated_ipc 150 benchmarks/gpu/colocated_ipc.py --device "$device" "${extra[@]}"
part learner 200 benchmarks/gpu/learner.py --device "$device" --steps 2 "${extra[@]}"
echo "results in $OUT (summary: $summary)"
