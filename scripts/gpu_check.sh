#!/usr/bin/env bash
# Run ON a lent GPU machine (the device tool), from the repository root, after
# scripts/gpu_prepare.sh here:  device.run("scripts/gpu_check.sh", carry=[".whl", ".gpu"])
# Installs the carried wheels, runs the CUDA tests and a short decode benchmark on
# the GPU; logs and JSON land in $OUT (or ./gpu-out). Budget: under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/services:$PWD/clients/python:$PWD PYTHONUNBUFFERED=1
export M2CACHE_SHARED=$PWD/.gpu/shared
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}
timeout 240 python3 bench/bench_gpu.py --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench"
exit $(( tests || bench ))
