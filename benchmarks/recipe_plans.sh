#!/usr/bin/env bash
# The recipe table of benchmarks/RESULTS.md: configs/efficientnet.py recipes x methods compiled by
# `python -m advprop_jax.plan` for the slice each recipe names (config.tpu_slice) or for the slices given.
# One compile at a time: each takes minutes of one core and several GiB of host memory.
#
#   bash benchmarks/recipe_plans.sh OUTPUT_DIR "b0 b1 ..." "advprop vanilla fast_advprop" [SLICE ...]
#
# Rows go to OUTPUT_DIR/table.md (appended as each compile ends), logs to OUTPUT_DIR/<model>-<method>-<slice>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?OUTPUT_DIR}; models=${2:?models}; methods=${3:?methods}; shift 3
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
for model in $models; do
  for method_name in $methods; do
    for slice in "${@:-recipe}"; do
      topology=(); [ "$slice" != recipe ] && topology=(--topology="$slice")
      log="$out/$model-$method_name-$slice.log"
      /usr/bin/time -f 'host: %e s wall, %M KB max RSS' "$python" -m advprop_jax.plan \
          --config=configs/efficientnet.py:"$model" --config.method="$method_name" "${topology[@]}" \
          --output="$out" >"$log" 2>&1
      echo "rc=$?" >>"$log"
      row=$(grep '^| efficientnet' "$log" | tail -1)
      echo "${row:-| efficientnet-$model | $method_name | $slice | failed: see $log |}" | tee -a "$out/table.md"
    done
  done
done
