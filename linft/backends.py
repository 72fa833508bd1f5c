"""Backends (who computes the Jacobian and Gram ops) and precisions.

``backend="torch"`` uses the pure-torch ops of ``linft.ops`` on any device;
``"triton"`` the fused kernels of
``linft.triton_kernels`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``);
``"auto"`` picks Triton for CUDA tensors when it is installed. Asking for a
backend that cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from .ops import gram_symmetric, gram_tile

PRECISIONS = ("fp32", "tf32", "bf16")
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Ops:
    """A backend's ops: the Gram tiles, and per rule name the Jacobian op that replaces the
    rule's pure-torch ``torch_op`` (Triton's fused twins; none on the torch backend)."""

    name: str
    gram_tile: Callable
    gram_symmetric: Callable
    jacobian: Mapping[str, Callable] = field(default_factory=dict)

    def rows_op(self, rule) -> Callable | None:
        return self.jacobian.get(rule.name, rule.torch_op)


TORCH_OPS = Ops("torch", gram_tile, gram_symmetric)


def triton_kernels() -> ModuleType:
    """``linft.triton_kernels``: installed, or ``triton_kernels/`` of a source checkout."""
    try:
        return importlib.import_module("linft.triton_kernels")
    except ModuleNotFoundError as err:
        if err.name != "linft.triton_kernels":
            raise
    source = Path(__file__).resolve().parent.parent / "triton_kernels" / "__init__.py"
    if not source.exists():
        raise ModuleNotFoundError("linft.triton_kernels is not installed; reinstall linft")
    spec = importlib.util.spec_from_file_location(
        "linft.triton_kernels", source, submodule_search_locations=[str(source.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["linft.triton_kernels"] = module
    spec.loader.exec_module(module)
    return module


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"the model is on {device.type}, and Triton kernels run on CUDA devices "
            "(or on the CPU, slowly, with TRITON_INTERPRET=1)"
        )
    return None


def resolve_ops(backend: str, device: torch.device) -> Ops:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return TORCH_OPS
    reason = triton_unavailable_reason(device)
    if backend == "auto":
        if reason is not None or device.type != "cuda":
            return TORCH_OPS
    elif reason is not None:
        raise RuntimeError(f'backend="triton" cannot run: {reason}; or pass backend="torch"')
    tk = triton_kernels()

    # NOTE: exact fp32 tiles go to cuBLAS SGEMM: Triton's IEEE fp32 dot has no tensor-core
    # path, so it is not expected to beat cuBLAS there; bf16 and sign tiles (fp32 output
    # without upcasting J, int8 SignGD) are Triton's. bench_kernels.py measures both.
    def gram_tile_(a, b, out, sign_a=False, sign_b=False):
        plain = a.dtype == b.dtype == torch.float32 and not (sign_a or sign_b)
        (gram_tile if plain else tk.gram_tile)(a, b, out, sign_a, sign_b)

    def gram_symmetric_(a, out, sign=False):
        plain = a.dtype == torch.float32 and not sign
        (gram_symmetric if plain else tk.gram_symmetric)(a, out, sign)

    return Ops("triton", gram_tile_, gram_symmetric_, _fused_twins(tk))


def _fused_twins(tk: ModuleType) -> dict[str, Callable]:
    """Rule name -> the Triton twin of its ``torch_op``, for every registered rule that has
    one (``Rule.triton_op``)."""
    from .rules import registered_rules

    return {
        rule.name: getattr(tk, rule.triton_op)
        for rule in registered_rules()
        if rule.triton_op is not None and hasattr(tk, rule.triton_op)
    }


def compute_dtype(precision: str, model_dtype: torch.dtype) -> torch.dtype:
    """dtype of the forward/backward passes and of J."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "bf16":
        return torch.bfloat16
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def kernel_dtype(model_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if model_dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def matmul_precision(precision: str):
    """tf32 on only for ``precision="tf32"``; the caller's settings are restored."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
