#!/usr/bin/env bash
# The recipe on one GPU: tiny/full and small/full (eager and compiled), tokens/s and peak memory from the
# recipe's own logs. Usage (on a GPU machine, from the repo root, with the package importable):
#   bash benchmarks/recipe_gpu.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/recipe_gpu}
mkdir -p "$out"
tune=${TUNE:-tune}
run() {  # name, then overrides
  local name=$1; shift
  echo "== $name: $*"
  /usr/bin/time -f "$name wall %e s" $tune run moe_full_finetune "$@" output_dir="$out/$name" overwrite_output_dir=true 2>&1 \
    | tr '\r' '\n' | grep -v "it/s]" > "$out/$name.log"
  grep -E "^step |wall|exactly right|Error|error" "$out/$name.log" | tail -6
}
run tiny_full --config tiny/full device=cuda
run small_full_eager --config small/full max_steps_per_epoch=40 compile=false
run small_full_compiled --config small/full max_steps_per_epoch=40 compile=true
run small_full_compiled_ac --config small/full max_steps_per_epoch=40 compile=true enable_activation_checkpointing=true
