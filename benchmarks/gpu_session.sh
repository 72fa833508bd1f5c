#!/usr/bin/env bash
# Everything that needs the GPU machine, in phases that each fit one device call (10 min).
# The machine keeps nothing once it goes idle, so a phase that needs the extension builds
# it first unless a build for this checkout is there; bench_ntk needs none (Triton compiles
# at run time). Logs and JSON land in $OUT (or ./out), one log per phase (the device tool
# returns at most 8 files). From the repo root:
#   bash benchmarks/gpu_session.sh check   # build (sm_90), tests on CUDA, bench_kernels
#   bash benchmarks/gpu_session.sh ntk     # bench_ntk, N = 256 ... 16384, all providers
#   bash benchmarks/gpu_session.sh large   # bench_ntk N = 65536 bf16 (K on the host), bench_eig
#   bash benchmarks/gpu_session.sh quick   # every step at small sizes (a dry run: ~3 min)
# Each step has its own time limit, so a phase returns (with what it has) inside 10 minutes.
set -uo pipefail
PHASE=${1:-check}
OUT=${OUT:-out}
mkdir -p "$OUT"
LOG="$OUT/$PHASE.log"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0

step() {  # step SECONDS NAME COMMAND...: run with a limit, log, never stop the phase
  local limit=$1 name=$2
  shift 2
  echo "=== $name ($(date -u +%FT%TZ), limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -40
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
}

build() {
  versions
  local has_cuda_op="import torch, linft._C, sys; sys.exit(not \
torch._C._dispatch_has_kernel_for_dispatch_key('linft::symm_matmul', 'CUDA'))"
  if python3 -c "$has_cuda_op" 2>/dev/null &&
    [ -n "$(find linft -name '_C*.so' -newer csrc/cuda/symm_matmul.cu)" ]; then
    echo "extension already built" | tee -a "$LOG"
  else
    step 150 build env FORCE_CUDA=1 python3 -m pip install -q -e . --no-deps --no-build-isolation
  fi
}

versions() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$LOG"
  python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__)" | tee -a "$LOG"
}

case "$PHASE" in
  check)
    build
    step 300 tests python3 -m pytest -q -p no:cacheprovider -rf tests
    step 90 bench_kernels python3 benchmarks/bench_kernels.py
    ;;
  ntk)  # no build: the checkout on PYTHONPATH
    versions
    step 560 bench_ntk env PYTHONPATH=. python3 benchmarks/bench_ntk.py --ns 256,1024,4096,16384 \
      --json "$OUT/bench_ntk.json"
    ;;
  large)
    build
    step 180 bench_ntk_65536 env PYTHONPATH=. python3 benchmarks/bench_ntk.py --ns 65536 \
      --providers floor-bf16,linft-triton-bf16 --out-device cpu --json "$OUT/bench_ntk_65536.json"
    step 220 bench_eig python3 benchmarks/bench_eig.py --n 32768
    ;;
  quick)
    build
    step 240 tests python3 -m pytest -q -x -p no:cacheprovider tests
    step 60 bench_kernels python3 benchmarks/bench_kernels.py --quick
    step 120 bench_ntk python3 benchmarks/bench_ntk.py --ns 256,1024 --loop-samples 8
    step 60 bench_eig python3 benchmarks/bench_eig.py --n 8192
    ;;
  *)
    echo "unknown phase $PHASE: check, ntk, large or quick" >&2
    exit 2
    ;;
esac
