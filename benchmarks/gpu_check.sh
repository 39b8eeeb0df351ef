#!/usr/bin/env bash
# This project's GPU figures from one command on one GPU (at most 8 minutes on an H100):
# the GPU-marked tests, opdlm plan against the measured memory, gpu_bench.py at the Qwen3-0.6B shape,
# and FP8 where Transformer Engine imports; one JSON (benchmarks/gpu_check.py says what each part does).
#
#   bash benchmarks/gpu_check.sh [--out PATH] [--budget-s 480]     # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/check.json    # the CPU half (CI runs it)
#
# Wheels carried in .whl/ (megatron-core, and any pure-Python package the machine lacks; see
# README "GPU figures") are installed into /tmp/site first; nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec python3 benchmarks/gpu_check.py "$@"
