#!/usr/bin/env bash
# One device call: GPU tests, then the text-throughput benchmark; logs and tables to $OUT.
# Usage (on the GPU machine, repo root):
#   bash benchmarks/gpu_run.sh [tests|mmtests|bench|kernels|all]
# tests: engine + kernel GPU tests; mmtests: multimodal GPU tests (bf16 vs HF bf16).
# The device machine lacks msgspec, pyzmq, av, blake3 and the server's packages: run
# `bash benchmarks/fetch_device_wheels.sh` on the dev machine first and carry ".whl".
set -u
what=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py tests/mmkernels 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [ "$what" = mmtests ] || [ "$what" = all ]; then
  timeout ${MMTESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_mm.py 2>&1 | tee "$OUT/gpu_mmtests.log" | tail -40
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 560 python3 benchmarks/bench_text_throughput.py ${BENCH_ARGS:-} 2>&1 | grep -v "it/s\]" | tail -40 | tee "$OUT/bench.log"
fi
if [ "$what" = kernels ]; then
  timeout 240 python3 benchmarks/bench_kernels.py 2>&1 | tail -60 | tee "$OUT/kernels.log"
fi
