#!/usr/bin/env bash
# Everything this project measures on a GPU, as one prepared command (issue #23). On a lent H200:
#   run(command="bash benchmarks/gpu.sh", timeout_s=600)          # about 8 minutes; results in $OUT
# Rehearsal on any machine, small shapes (what a CPU session runs to keep it working):
#   bash benchmarks/gpu.sh --device cpu --small
#
# Sections, most important first, each writing its JSON into $OUT as it goes. Each runs under a
# timeout so that the whole stays inside HARD seconds (default 510, then the report); a section due
# to start after BUDGET seconds (default 480) is skipped and named:
#   1. parity with transformers (float32 and bf16; SDPA math / flash / memory-efficient / cuDNN)
#   2. each recipe row's training step: time and peak allocated memory (memory.py --method real),
#      beside the fake-tensor trace of the same row (memory.py --method fake, no GPU needed)
#   3. one fp16 run of train.py (--amp fp16: GradScaler, the loss scale logged)
#   4. decode tok/s at batch 1 and 8: ours eager, compiled (reduce-overhead: CUDA graphs), int8, NF4,
#      transformers (needs the 3B random checkpoint: written first, ~1 minute)
# Then one JSON ($OUT/gpu.json) and the README rows ($OUT/gpu.md). Uses the machine's own torch /
# transformers / peft (no installs: the device machine has no network).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda SMALL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --small) SMALL=1; shift ;;
    *) echo "gpu.sh: unknown argument $1 (expected --device D, --small)" >&2; exit 2 ;;
  esac
done
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/gpu-out}
if [ "$SMALL" = 1 ]; then  # the CPU rehearsal: every section must run, however slow the machine is
  HARD=${HARD:-3000} BUDGET=${BUDGET:-2900}
else  # a lent GPU: inside its 10-minute command limit, with time left for the report
  HARD=${HARD:-510} BUDGET=${BUDGET:-480}
fi
WORK=${WORK:-/tmp/gpu-work}
mkdir -p "$OUT" "$WORK"
START=$(date +%s)
declare -A SECONDS_TAKEN
STATUS=0

section() {  # section NAME COMMAND...: run it unless the budget is spent; record its time and status
  local name=$1; shift
  local elapsed=$(( $(date +%s) - START ))
  if [ "$elapsed" -ge "$BUDGET" ]; then
    echo "== $name: skipped (budget of ${BUDGET}s spent after ${elapsed}s)" | tee -a "$OUT/log.txt"
    SECONDS_TAKEN[$name]=skipped
    return
  fi
  echo "== $name (at ${elapsed}s)" | tee -a "$OUT/log.txt"
  local t0=$(date +%s)
  timeout $(( HARD - elapsed )) "$@" 2>&1 | tee -a "$OUT/log.txt"
  local rc=${PIPESTATUS[0]}
  SECONDS_TAKEN[$name]=$(( $(date +%s) - t0 ))
  if [ "$rc" -ne 0 ]; then echo "== $name: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)')" | tee -a "$OUT/log.txt"; STATUS=1; fi
}

python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" | tee "$OUT/versions.txt"

if [ "$SMALL" = 1 ]; then
  SHAPE=(--small) CKPT=$WORK/small BIG=$WORK/small LAYERS=(--text-layers 1 --vision-layers 1)
  DECODE=(--reps 1 --new 4) FP16=(--steps 4 --batch-size 4)
else
  SHAPE=() CKPT=$WORK/small BIG=$WORK/3b LAYERS=()
  DECODE=(--reps 3 --bandwidth 4800) FP16=(--steps 30 --batch-size 16)
fi
[ -e "$CKPT/config.json" ] || python3 benchmarks/checkpoint.py "$CKPT" --shape small >/dev/null

section parity python3 benchmarks/cuda_checks.py parity --ckpt "$CKPT" --device "$DEVICE" --out "$OUT/parity.json"
section memory python3 benchmarks/memory.py --method real --device "$DEVICE" "${SHAPE[@]}" "${LAYERS[@]}" \
  --out "$OUT/memory.json"
if [ "$SMALL" = 1 ]; then  # the 3B trace takes CPU minutes: it was run without a GPU and is committed
  section memory-fake python3 benchmarks/memory.py --method fake "${SHAPE[@]}" "${LAYERS[@]}" --out "$OUT/memory-fake.json"
else
  cp benchmarks/memory-fake-3b.json "$OUT/memory-fake.json"
fi
rm -rf "$WORK/fp16-run"
section fp16 python3 train.py --out "$WORK/fp16-run" --device "$DEVICE" --amp fp16 "${FP16[@]}" --eval-every 1000 \
  --val-captions 0 --eval-samples 4 --save-every 1000
mkdir -p "$OUT/fp16-run" && cp "$WORK/fp16-run/metrics.jsonl" "$OUT/fp16-run/" 2>/dev/null
if [ "$SMALL" = 0 ] && [ ! -e "$BIG/config.json" ]; then
  section checkpoint-3b python3 benchmarks/checkpoint.py "$BIG"
fi
section decode python3 benchmarks/compile_decode.py --ckpt "$BIG" --device "$DEVICE" "${DECODE[@]}" \
  --quantize int8 nf4 --out "$OUT/decode.json"

python3 - "$OUT/timings.json" <<EOF
import json, sys
t = {$(for k in "${!SECONDS_TAKEN[@]}"; do printf '"%s": "%s", ' "$k" "${SECONDS_TAKEN[$k]}"; done)}
t["total"] = $(( $(date +%s) - START ))
json.dump(t, open(sys.argv[1], "w"), indent=2)
print("timings:", t)
EOF
python3 benchmarks/cuda_checks.py report --results "$OUT" --fake "$OUT/memory-fake.json" --out "$OUT/gpu.json"
echo "gpu.sh: $(( $(date +%s) - START ))s, results in $OUT (gpu.json, gpu.md)"
exit $STATUS
