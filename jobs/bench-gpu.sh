#!/usr/bin/env bash
# The GPU session's measurements in one command each, on a machine with one or two NVIDIA GPUs.
#
#   bash jobs/bench-gpu.sh single OUT [SIZE]
#                                       `embed-corpus bench` of 4B and 0.6B (or SIZE alone) on the first GPU
#   bash jobs/bench-gpu.sh tests OUT    the GPU tests of the packed forward and the attention kernel
#   bash jobs/bench-gpu.sh attention OUT
#                                       `embed-corpus bench-attention` (tile choices of the attention kernel,
#                                       0.6B and 4B shapes), then `bench --no-run --profile` of both sizes
#   bash jobs/bench-gpu.sh scale OUT    `embed-corpus bench-scale` on two GPUs (0.6B and 4B; 0.6B also as two
#                                       separate processes, and with one of them killed)
#   bash jobs/bench-gpu.sh scale-long OUT [STEP]
#                                       jobs of ~9 GPU-minutes per size (0.6B 460,000 docs, 4B 92,000), the
#                                       command's own shard sizing, in steps that each fit a 10-minute call on
#                                       the same machine (OUT/work is kept between them): prepare, one (the
#                                       one-GPU runs of both sizes at once, one per GPU, each process pinned to
#                                       half the cores), many-0.6B, many-4B (the --gpus 2 launch), nodes-0.6B,
#                                       nodes-4B (two processes, one GPU each, as two nodes would run), kill-0.6B,
#                                       kill-4B (the same with one killed once 3/4 of the documents are done;
#                                       time lost against nodes-SIZE's run, and against the one-GPU rest);
#                                       no STEP: prepare, one, many-0.6B, many-4B in order
#
# Results (JSON records, the printed tables, logs packed in one archive) go to OUT. The sizes below fit a
# device session of ~30 minutes; pass BENCH_SCALE=2 (or more) in the environment for larger jobs.
# Needs: the Qwen tokenizer folder in $QWEN_TOKENIZER (or qwen.tiktoken in $QWEN_TIKTOKEN), and for the tests
# the qwen.tiktoken file (found through a `dashscope` package folder on PYTHONPATH; made here if missing).
set -uo pipefail
phase=${1:?single, tests, attention, scale or scale-long}
step=
status=0
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
  sizes=(${3:-4B 0.6B})
  args=()
  for s in "${sizes[@]}"; do args+=(--size "$s"); done
  CUDA_VISIBLE_DEVICES=0 $py -m pipeline.cli bench ${args[@]+"${args[@]}"} "${tok[@]}" \
    --docs 4B=$((1600 * k)) --docs 0.6B=$((6000 * k)) --run-docs 4B=$((6000 * k)) --run-docs 0.6B=$((30000 * k)) \
    --st-docs 4B=300 --st-docs 0.6B=800 --long-docs 6 \
    --repeats 3 --profile --split 400 --split 1500 --out "$out/bench${3:+-$3}.json" 2>&1 \
    | tee "$out/bench${3:+-$3}.txt" || status=$?
  ;;
tests)
  if [ -n "${QWEN_TIKTOKEN:-}" ] && ! $py -c 'import dashscope' 2>/dev/null; then
    mkdir -p /tmp/ds/dashscope/resources && touch /tmp/ds/dashscope/__init__.py
    cp "$QWEN_TIKTOKEN" /tmp/ds/dashscope/resources/qwen.tiktoken
    export PYTHONPATH="$PYTHONPATH:/tmp/ds"
  fi
  $py -m pytest -q -rs -p no:cacheprovider tests/model/test_packed.py tests/model/test_attention.py tests/model/test_rotary.py \
    tests/bench/test_attention_bench.py -o addopts="" > "$out/tests.txt" 2>&1 || status=$?
  echo "tests exit $status" >> "$out/tests.txt"
  tail -3 "$out/tests.txt"
  ;;
attention)
  $py -m pipeline.cli bench-attention --size 0.6B --size 4B --docs 6000 --out "$out/attention.json" 2>&1 \
    | tee "$out/attention.txt" || status=$?
  $py -m pipeline.cli bench --size 0.6B --size 4B "${tok[@]}" --docs 4B=$((1600 * k)) --docs 0.6B=$((6000 * k)) \
    --st-docs 0 --repeats 2 --no-run --no-ab --profile --out "$out/bench.json" 2>&1 | tee "$out/bench.txt" \
    || status=$?
  ;;
scale)
  $py -m pipeline.cli bench-scale --size 0.6B --size 4B "${tok[@]}" --gpus 2 \
    --docs 0.6B=$((30000 * k)) --docs 4B=$((5400 * k)) --shard-size 0.6B=1000 --shard-size 4B=200 \
    --nodes 0.6B --lease-seconds 15 --budget-seconds 470 --out "$out/scale.json" 2>&1 | tee "$out/scale.txt"
  ;;
scale-long)
  step=${3:-all}
  case "$step" in prepare|one|many-0.6B|many-4B|nodes-0.6B|nodes-4B|kill-0.6B|kill-4B|all) ;; *)
    echo "unknown step $step (prepare, one, many-SIZE, nodes-SIZE, kill-SIZE; SIZE 0.6B or 4B)" >&2; exit 2 ;; esac
  # the tokenizer folder made once, before two processes would make it at the same time
  $py -c 'import sys; from pipeline.cli.bench import _tokenizer; _tokenizer(sys.argv[1], sys.argv[2] or None)' \
    "${QWEN_TOKENIZER:-$out/qwen-tokenizer}" "${QWEN_TIKTOKEN:-}"
  long=(--gpus 2 --workdir "$out/work" --shard-size 0.6B=0 --shard-size 4B=0
        --docs 0.6B=$((460000 * k)) --docs 4B=$((92000 * k)))
  both() {  # one process per size at once, each on its own GPU and its own half of the allowed cores
    local halves a b r=0
    halves=$($py -c 'import os; c = sorted(os.sched_getaffinity(0)); h = len(c) // 2
print(",".join(map(str, c[:h])), ",".join(map(str, c[h:])))')
    read -r a b <<< "$halves"
    CUDA_VISIBLE_DEVICES=0 taskset -c "$a" $py -m pipeline.cli bench-scale --size 0.6B "${tok[@]}" \
      "${long[@]}" "$@" --out "$out/${1#--phase=}-0.6B.json" > "$out/${1#--phase=}-0.6B.txt" 2>&1 &
    local p1=$!
    CUDA_VISIBLE_DEVICES=1 taskset -c "$b" $py -m pipeline.cli bench-scale --size 4B "${tok[@]}" \
      "${long[@]}" "$@" --out "$out/${1#--phase=}-4B.json" > "$out/${1#--phase=}-4B.txt" 2>&1 &
    local p2=$!
    wait "$p1" || r=$?
    wait "$p2" || r=$?
    if [ "$r" -ne 0 ]; then
      tail -n 20 "$out/${1#--phase=}"-*.txt >&2
      echo "${1#--phase=} failed (exit $r)" >&2
      exit "$r"
    fi
  }
  many() {  # SIZE RUN [NAME [ARGS...]]: one of the scaled runs (launch, nodes, kill) of SIZE's job
    $py -m pipeline.cli bench-scale --size "$1" "${tok[@]}" "${long[@]}" --phase=many --run "$2" "${@:4}" \
      --note "the two-GPU run alone on the host ($(nproc) cores)" --out "$out/scale-long-${3:-$1}.json" 2>&1 \
      | tee "$out/scale-long-${3:-$1}.txt" || status=$?
  }
  case "$step" in
  prepare|all) both --phase=prepare ;;&
  one|all) both --phase=one --note "the one-GPU runs of 0.6B and 4B ran at the same time, one per GPU, each \
pinned to $(($(nproc) / 2)) of the host's $(nproc) cores (taskset): a GPU's share of the host in the two-GPU run" ;;&
  many-0.6B|all) many 0.6B launch ;;&
  many-4B|all) many 4B launch ;;
  nodes-*) many "${step#nodes-}" nodes "$step" ;;
  # killed once 3/4 of the job is done: the survivor's one-GPU rest (~1/4 of the one-GPU run) fits the call
  kill-*) many "${step#kill-}" kill "$step" --kill-at 0.75 ;;
  *) ;;
  esac
  ;;
*) echo "unknown phase $phase" >&2; exit 2 ;;
esac
mv "$out"/profile-*.txt "$out"/profile-*.json "$out/logs/" 2>/dev/null
tar czf "$out/logs-$phase${step:+-$step}.tgz" -C "$out" logs && rm -rf "$out/logs"
exit "$status"
