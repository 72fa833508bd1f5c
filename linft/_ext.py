"""Load the optional C++/CUDA extension that registers the ``torch.ops.linft`` ops.

Order: the prebuilt module ``linft._C`` (``pip install .``) if importable; else a JIT build of
``csrc/`` with :func:`torch.utils.cpp_extension.load` (ninja) when ``LINFT_JIT=1`` or when
:func:`load` is called with ``jit=True``; else ``None`` and linft runs its pure-torch twins
(:mod:`linft.eig`), which give the same results.
"""

from __future__ import annotations

import glob
import importlib
import os
import threading

import torch

_LOCK = threading.Lock()
_STATE: dict[str, object] = {"tried_prebuilt": False, "source": None}
_OPS = ("symm_matmul", "orthonormalize", "rayleigh_ritz")
_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def _registered() -> bool:
    return all(hasattr(torch.ops.linft, op) for op in _OPS)


def _register_fakes() -> None:
    # Shape functions so the fixed-shape ops trace under torch.compile / opcheck. orthonormalize
    # has a data-dependent number of columns and is only used eagerly.
    if _STATE.get("fakes"):
        return

    @torch.library.register_fake("linft::symm_matmul")
    def _(A, X, tile=256):
        return torch.empty_like(X)

    @torch.library.register_fake("linft::rayleigh_ritz")
    def _(V, AV, k, largest):
        kk = min(k, V.shape[1])
        f64 = {"dtype": torch.float64, "device": V.device}
        return (
            V.new_empty(kk, **f64),
            V.new_empty(V.shape[0], kk),
            V.new_empty(V.shape[0], kk),
            V.new_empty((), **f64),
        )

    _STATE["fakes"] = True


def _jit_build(verbose: bool = False) -> None:
    from torch.utils.cpp_extension import load

    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cpp")))
    if not sources:
        raise RuntimeError(f"linft: no C++ sources under {_CSRC}; JIT build needs a source tree")
    cuda = sorted(glob.glob(os.path.join(_CSRC, "cuda", "*.cu")))
    use_cuda = bool(cuda) and torch.cuda.is_available() and torch.version.cuda is not None
    flags = ["-O3", "-std=c++17"] + (["-DLINFT_WITH_CUDA"] if use_cuda else [])
    load(
        name="linft_jit_C",
        sources=sources + (cuda if use_cuda else []),
        extra_cflags=flags,
        extra_cuda_cflags=["-O3", "-std=c++17"],
        is_python_module=False,
        verbose=verbose,
    )


def load(jit: bool | None = None, verbose: bool = False) -> str | None:
    """Make the ``torch.ops.linft`` ops available; return where they came from.

    Returns ``"prebuilt"`` (``linft._C``), ``"jit"`` (built from ``csrc/`` now or earlier in this
    process) or ``None`` (not available: the pure-torch twins are used). ``jit=None`` builds only
    when ``LINFT_JIT=1``; ``jit=True`` builds if nothing prebuilt is there, and raises if the
    build fails; ``jit=False`` never builds.
    """
    with _LOCK:
        if _STATE["source"] is not None:
            return _STATE["source"]
        if not _STATE["tried_prebuilt"]:
            _STATE["tried_prebuilt"] = True
            try:
                importlib.import_module("linft._C")
            except ImportError:
                pass
            else:
                if _registered():
                    _STATE["source"] = "prebuilt"
        if _STATE["source"] is None:
            want = os.environ.get("LINFT_JIT", "0") == "1" if jit is None else jit
            if want:
                _jit_build(verbose)
                _STATE["source"] = "jit"
        if _STATE["source"] is not None:
            _register_fakes()
        return _STATE["source"]


def available() -> bool:
    """Whether the extension ops are loaded (tries the prebuilt module; never builds)."""
    return load(jit=False) is not None


def ops():
    """The ``torch.ops.linft`` namespace; raises if the extension is not loaded."""
    if not available():
        raise RuntimeError(
            "linft: the C++ extension is not available; build it with "
            "`pip install -e . --no-build-isolation`, or JIT-build it with LINFT_JIT=1 or "
            "linft._ext.load(jit=True), or pass backend='torch'"
        )
    return torch.ops.linft
