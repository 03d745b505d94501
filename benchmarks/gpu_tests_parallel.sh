#!/usr/bin/env bash
# All GPU tests in one device call, as parallel pytest processes on one card (each engine
# uses a fixed small KV pool, so they fit side by side). Logs to $OUT/gpu_tests/*.log.
# Usage (device machine, repo root, after the .whl set-up of gpu_run.sh):
#   bash benchmarks/gpu_tests_parallel.sh [timeout_s]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/gpu_tests"
limit=${1:-500}
if [ -d .whl ] && [ ! -d /tmp/site/msgspec ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2}
groups=(
  "tests/test_gpu_engine.py::test_fp32_greedy_identical_to_hf_on_gpu"
  "tests/test_gpu_engine.py::test_fp32_greedy_identical_to_hf_with_compile_and_graphs tests/test_gpu_engine.py::test_nothing_compiles_after_start_up"
  "tests/test_gpu_engine.py::test_cuda_graphs_and_eager_give_the_same_tokens tests/test_gpu_engine.py::test_mixed_step_graphs_replay_prompt_steps_and_give_the_eager_tokens"
  "tests/test_gpu_engine.py::test_bf16_logprobs_close_to_hf_bf16"
  "tests/mmkernels tests/encoders/test_gpu.py tests/processors/test_preprocess_gpu.py"
  "tests/test_gpu_mm.py::test_mm_bf16_prompt_logprobs_close_to_hf"
  "tests/test_gpu_mm.py::test_mm_fp32_greedy_identical_to_hf_on_gpu"
  "tests/test_gpu_mm.py::test_engine_steps_never_make_the_host_wait_for_the_gpu tests/test_gpu_mm.py::test_no_image_size_compiles_anything_after_start_up"
  "tests/test_gpu_mm.py::test_vision_steps_replay_mixed_graphs_and_keep_hf_tokens"
  "tests/test_gpu_engine.py::test_fp32_greedy_identical_to_hf_with_batch1_options_and_early_pdl_triggers"
)
pids=()
for i in "${!groups[@]}"; do
  timeout "$limit" python3 -m pytest -v -m gpu -p no:cacheprovider -o faulthandler_timeout=$((limit - 30)) \
    ${groups[$i]} > "$OUT/gpu_tests/group$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; r=$?
  echo "group$i rc=$r ${groups[$i]}: $(grep -E '^(=+ .*(passed|failed|error).* =+)$' "$OUT/gpu_tests/group$i.log" | tail -1)"
  [ $r -ne 0 ] && rc=1
done
exit $rc
