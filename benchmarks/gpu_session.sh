#!/usr/bin/env bash
# Everything that needs the GPU machine, in one call (it keeps nothing between calls):
# build the extension for sm_90, run the test suite on CUDA, then every benchmark.
# Logs and JSON land in $OUT (or ./out). Usage, from the repo root on the GPU machine:
#   bash benchmarks/gpu_session.sh [quick]
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
FORCE_CUDA=1 python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -3 | tee "$OUT/build.log"
python3 -m pytest -q -x tests 2>&1 | tail -15 | tee "$OUT/tests.log"
if [ "${1:-}" = quick ]; then
  NS=256,1024; KN=8192
else
  NS=256,1024,4096,16384; KN=32768
fi
python3 benchmarks/bench_kernels.py 2>&1 | tee "$OUT/bench_kernels.log" | tail -25
python3 benchmarks/bench_ntk.py --ns "$NS" --json "$OUT/bench_ntk.json" 2>&1 | tee "$OUT/bench_ntk.log" | tail -30
python3 benchmarks/bench_ntk.py --ns 65536 --providers floor-bf16,linft-triton-bf16 --out-device cpu --json "$OUT/bench_ntk_65536.json" 2>&1 | tee "$OUT/bench_ntk_65536.log" | tail -6
python3 benchmarks/bench_eig.py --n "$KN" 2>&1 | tee "$OUT/bench_eig.log" | tail -20
