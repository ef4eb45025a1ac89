#!/usr/bin/env bash
# The benchmark on a lent GPU (H200), as one prepared command, about 8 minutes (+ the int8 / NF4 table, not yet run):
#   run(command="bash benchmarks/gpu.sh", timeout_s=600)
# Uses the machine's own torch / transformers / peft (no installs: it has no network). Results land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
python3 benchmarks/checkpoint.py /tmp/pg3b                                             # full 3B shapes, float32 files
python3 benchmarks/bench.py --ckpt /tmp/pg3b --device cuda --reps 5 --hbm 4800 --out "$OUT/gpu-table.md" 2>&1 | tee "$OUT/gpu-log.txt"
python3 benchmarks/compile_decode.py --ckpt /tmp/pg3b --device cuda --bandwidth 4800 --out "$OUT/gpu-compile.md" 2>&1 | tee -a "$OUT/gpu-log.txt"
python3 benchmarks/bench.py --ckpt /tmp/pg3b --train-ckpt /tmp/pg3b --device cuda --reps 3 --hbm 4800 --quantize int8 nf4 --out "$OUT/gpu-quant.md" 2>&1 | tee -a "$OUT/gpu-log.txt"
