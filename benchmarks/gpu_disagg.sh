#!/usr/bin/env bash
# The CUDA checks of the disaggregation work, as one device run (see docs/benchmarks.md):
# CUDA tests (engine, KV handoff between GPU engines over the data plane, transfer staging),
# then the KV transfer benchmark with CUDA tensors and with host tensors.
# Wheels the device image lacks are carried in .whl/ (pip download ... --python-version 3.12).
set -u
OUT=${OUT:-results}
mkdir -p "$OUT"
python -m pip install -q --no-index --find-links .whl msgspec pyzmq fastapi uvicorn httpx prometheus-client tqdm hypothesis xxhash 2>&1 | grep -v "root.. user" | tail -3; python -c "import msgspec, zmq, xxhash"
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout 300 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kv_transfer.py \
  tests/test_kv_transfer_shm.py tests/test_kv_handoff.py 2>&1 | tail -4
timeout 150 python benchmarks/kv_transfer.py --device cuda --paths tcp --out "$OUT/kv_transfer_cuda.json" 2>&1 | tail -12
timeout 150 python benchmarks/kv_transfer.py --out "$OUT/kv_transfer_cpu.json" 2>&1 | tail -12
