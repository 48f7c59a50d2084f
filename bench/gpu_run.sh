#!/usr/bin/env bash
# Run GPU benchmarks on a lent machine (torch/triton preinstalled there): installs kvtool without deps, then runs
# each named benchmark, logging to $OUT (or ./out/gpu). Usage: bash bench/gpu_run.sh mla calib corda oscar
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 || {
  echo "editable install failed; falling back to PYTHONPATH"; cat "$OUT/install.log" | tail -5; }
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
for name in "$@"; do
  echo "=== $name"
  case $name in
    mla) python3 bench/gpu_mla_decode.py 2>&1 | tee "$OUT/mla.log" ;;
    calib) python3 bench/calib_throughput.py --synthetic-8b --device cuda --samples 128 --seq-len 2048 2>&1 | tee "$OUT/calib.log" ;;
    *) f="bench/gpu_$name.py"; [ -f "$f" ] && python3 "$f" --device cuda 2>&1 | tee "$OUT/$name.log" || echo "no $f" ;;
  esac
done
