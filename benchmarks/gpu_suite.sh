#!/usr/bin/env bash
# Throughput table on one accelerator, within a short lease: every config is first compiled in parallel
# (--compile_only, JOBS at a time, into a persistent compilation cache), then each (model, dtype) is timed
# alone in its own process from the cache, so compile time is paid on all host cores at once and the
# timings see an otherwise idle device.
#
#   bash benchmarks/gpu_suite.sh OUTDIR "efficientnet-b0:224:128 efficientnet-b1:240:128" [JOBS]
#
# Writes OUTDIR/compile.log, OUTDIR/bench.log and OUTDIR/results.jsonl (one JSON line per process).
# Environment: DTYPES (default "float32 bfloat16"), METHODS (default vanilla,fast_advprop,advprop),
# EXTRA (more throughput flags, e.g. --remat), STEPS (default 10), DEADLINE_S (stop starting timed
# runs after this many seconds; default 540).
set -u
out=${1:?OUTDIR}; models=${2:?'"model:size:batch ..."'}; jobs=${3:-8}
dtypes=${DTYPES:-float32 bfloat16}; methods=${METHODS:-vanilla,fast_advprop,advprop}
steps=${STEPS:-10}; deadline=${DEADLINE_S:-540}; extra=${EXTRA:-}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/advprop_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
mkdir -p "$out"
start=$(date +%s)
# The timed step needs no TensorFlow, TFDS or CLU (synthetic batch; the config and step modules are TF-free).

runs=()
for m in $models; do
  IFS=: read -r model size batch <<<"$m"
  for dtype in $dtypes; do
    for name in ${methods//,/ }; do
      runs+=("--model=$model --image_size=$size --batch=$batch --dtype=$dtype --method=$name $extra")
    done
  done
done

echo "== compile ${#runs[@]} configs, $jobs at a time" | tee -a "$out/bench.log"
# Each line is one argument ($0), split on spaces only: flag values may hold quotes (JSON overrides).
printf '%s\n' "${runs[@]}" | XLA_PYTHON_CLIENT_PREALLOCATE=false xargs -d '\n' -n 1 -P "$jobs" bash -c \
  'timeout 480 python -m benchmarks.throughput --compile_only $0 2>&1 | grep -E "compile only|Error" | sed "s|^|$0 :: |"' \
  >>"$out/compile.log"
echo "== compiled in $(( $(date +%s) - start )) s" | tee -a "$out/bench.log"

for m in $models; do
  IFS=: read -r model size batch <<<"$m"
  for dtype in $dtypes; do
    if [ $(( $(date +%s) - start )) -gt "$deadline" ]; then echo "== deadline: skip $m $dtype" | tee -a "$out/bench.log"; continue; fi
    args="--model=$model --image_size=$size --batch=$batch --dtype=$dtype --methods=$methods --steps=$steps --warmup=2 $extra"
    echo "== $args" >>"$out/bench.log"
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m benchmarks.throughput $args >"$out/run.log" 2>&1
    grep -E '^\[|x vanilla|Error' "$out/run.log" | tee -a "$out/bench.log"
    tail -n 1 "$out/run.log" | grep '^{' >>"$out/results.jsonl" || tail -n 30 "$out/run.log" >>"$out/bench.log"
  done
done
echo "== done in $(( $(date +%s) - start )) s" | tee -a "$out/bench.log"
