#!/usr/bin/env bash
# The CUDA path in one run: GPU tests, then engine throughput vs HF transformers on large
# models with random ("dummy") weights. Writes logs and JSON under $OUT (default results/gpu).
# Usage on a machine with an NVIDIA GPU and torch+transformers installed:
#   bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
export KVBATON_CACHE_DIR=${KVBATON_CACHE_DIR:-/tmp/kvbaton-cache}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_attention.py \
    tests/test_engine_consistency.py 2>&1 | tee "$OUT/pytest.log"
bench() {  # model, requests, HF subset, HF batch sizes
    $PY benchmarks/engine_throughput.py --device cuda --dtype bfloat16 --load-format dummy \
        --model "$1" --num-requests "$2" --hf-num-requests "$3" --hf-batch-sizes "$4" \
        --max-num-seqs 256 --max-num-batched-tokens 8192 \
        --json "$OUT/engine_$1.json" 2>&1 | tee "$OUT/engine_$1.log"
}
bench llama-3.2-1b 256 128 32,128
bench llama-3.1-8b 128 64 16,64
