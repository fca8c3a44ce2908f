#!/usr/bin/env bash
# Install QingLM into the current Python environment (use a venv if you like: python -m venv .venv && . .venv/bin/activate).
#   bash scripts/setup.sh          the package and what it needs
#   bash scripts/setup.sh --dev    plus every optional extra and the test tools (pytest, ruff, transformers,
#                                  gguf, fastapi, openai, playwright), and Debian's chromium for the web page test
# PyTorch is installed first and pinned: a bare `torch` requirement with no torch present pulls a
# multi-GB CUDA build. An already installed torch (a CUDA build on a GPU machine, say) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TORCH_VERSION=${QINGLM_TORCH:-2.13.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: using installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: installing torch==$TORCH_VERSION"
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi
extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"
echo "setup: installing qinglm$extra"
"$PY" -m pip install -q -e ".$extra"
if [[ -n "$extra" ]] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
  echo "setup: installing Debian's chromium (headless browser for the web chat page test)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: warning: could not install chromium; the browser test will be skipped"
fi
"$PY" -m qinglm --version
