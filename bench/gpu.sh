#!/usr/bin/env bash
# The GPU benchmarks in one command, on a machine with a CUDA GPU and sitsflow's dependencies
# installed (docs/benchmarks.md records the figures):
#   networks  : each network's forms and precisions, 4M pixels, 36 dates x 10 bands
#   inference : the whole stage on a generated 2048 x 2048 px chunk (local ZSTD COG), L-TAE, the
#               features computed by the readers and by the GPU (SITSFLOW_DEVICE_FEATURES=0, 1)
#   training  : L-TAE training samples/s at batch 8192, full and stream loaders
#   tests     : tests/test_device_features.py's CUDA tests (when pytest is installed)
# Logs go to $OUT (default bench-gpu-out/). Usage: bash bench/gpu.sh [READERS]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-gpu-out}"
READERS="${1:-$(nproc)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/services${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# the device-side feature computation against the CPU's (tests skipped without CUDA run here)
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_device_features.py -k cuda 2>&1 | tee "$OUT/tests.log"
fi
timeout 150 "$PY" bench/networks.py --device cuda --networks LTAEClassifier MLPClassifier 2>&1 | tee "$OUT/networks.log"
SITSFLOW_COMPILE="${SITSFLOW_COMPILE:-0}" timeout 300 "$PY" bench/inference.py --device cuda --size 2048 --network LTAEClassifier --readers "$READERS" \
  --repeat 2 --device-features both 2>&1 | tee "$OUT/inference.log"
timeout 150 "$PY" bench/training.py --device cuda --network LTAEClassifier --batch-size 8192 --samples 400000 \
  --epochs 2 --num-workers 4 --repeats 1 2>&1 | tee "$OUT/training.log"
