#!/usr/bin/env bash
# The GPU check (docs/gpu.md): every CUDA path of mdsearch run once on one GPU, in one table,
# within 8 minutes (sections that would start after 330 s are skipped and say so). Run from the
# repository root on a machine with a CUDA build of torch:
#   bash benchmarks/gpu_check.sh [OUT_DIR [--sections trainer seeds step export compile]]
# A machine without the package installed can run it from a checkout: PYTHONPATH is set to it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec timeout 450 "$PYTHON" benchmarks/gpu_check.py --budget 330 ${1:+--out "$1"} "${@:2}"
