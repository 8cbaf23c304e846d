#!/usr/bin/env bash
# The GPU session's measurements in one command each, on a machine with one or two NVIDIA GPUs.
#
#   bash jobs/bench-gpu.sh single OUT   GPU tests on the second GPU (or after the bench on one GPU) while
#                                       `embed-corpus bench` measures 4B and 0.6B on the first
#   bash jobs/bench-gpu.sh scale OUT    `embed-corpus bench-scale` on two GPUs (0.6B and 4B; 0.6B also as two
#                                       separate processes, and with one of them killed)
#
# Results (JSON records, the printed tables, logs packed in one archive) go to OUT. The sizes below fit a
# device session of ~30 minutes; pass BENCH_SCALE=2 (or more) in the environment for larger jobs.
# Needs: the Qwen tokenizer folder in $QWEN_TOKENIZER (or qwen.tiktoken in $QWEN_TIKTOKEN), and for the tests
# the qwen.tiktoken file (found through a `dashscope` package folder on PYTHONPATH; made here if missing).
set -uo pipefail
phase=${1:?single or scale}
out=${2:?output folder}
mkdir -p "$out/logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
py=${PYTHON:-python3}
k=${BENCH_SCALE:-1}
tok=(--tokenizer "${QWEN_TOKENIZER:-$out/qwen-tokenizer}")
[ -n "${QWEN_TIKTOKEN:-}" ] && tok+=(--tiktoken "$QWEN_TIKTOKEN")
ngpu=$($py -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > "$out/logs/nvidia-smi.txt" 2>&1

case "$phase" in
single)
  tests() {
    if [ -n "${QWEN_TIKTOKEN:-}" ] && ! $py -c 'import dashscope' 2>/dev/null; then
      mkdir -p /tmp/ds/dashscope/resources && touch /tmp/ds/dashscope/__init__.py
      cp "$QWEN_TIKTOKEN" /tmp/ds/dashscope/resources/qwen.tiktoken
      export PYTHONPATH="$PYTHONPATH:/tmp/ds"
    fi
    $py -m pytest -q -rs -p no:cacheprovider tests/model/test_packed.py tests/model/test_attention.py \
      -o addopts="" > "$out/tests.txt" 2>&1
    echo "tests exit $?" >> "$out/tests.txt"
  }
  if [ "$ngpu" -ge 2 ]; then (CUDA_VISIBLE_DEVICES=1 tests) & tests_pid=$!; fi
  CUDA_VISIBLE_DEVICES=0 $py -m pipeline.cli bench --size 4B --size 0.6B "${tok[@]}" \
    --docs 4B=$((1600 * k)) --docs 0.6B=$((6000 * k)) --st-docs 4B=300 --st-docs 0.6B=800 --long-docs 6 \
    --repeats 3 --profile --out "$out/bench.json" 2>&1 | tee "$out/bench.txt"
  if [ "$ngpu" -ge 2 ]; then wait "$tests_pid"; else CUDA_VISIBLE_DEVICES=0 tests; fi
  tail -3 "$out/tests.txt"
  ;;
scale)
  $py -m pipeline.cli bench-scale --size 0.6B --size 4B "${tok[@]}" --gpus 2 \
    --docs 0.6B=$((30000 * k)) --docs 4B=$((5400 * k)) --shard-size 0.6B=1000 --shard-size 4B=200 \
    --nodes 0.6B --lease-seconds 15 --budget-seconds 470 --out "$out/scale.json" 2>&1 | tee "$out/scale.txt"
  ;;
*) echo "unknown phase $phase" >&2; exit 2 ;;
esac
mv "$out"/profile-*.txt "$out/logs/" 2>/dev/null
tar czf "$out/logs.tgz" -C "$out" logs && rm -rf "$out/logs"
