"""Signs for the SignGD kernels: an entry that rounding alone could have made non-zero
counts as zero.

``sign J`` is discontinuous at 0: where the exact Jacobian entry is zero (the query and
key projections of a one-token sample: softmax over one key has zero derivative; causal
models), the computed entry is rounding noise whose sign changes with the batch size and
the padding. Entries with ``|J_ij| <= tau * max_j |J_ij|`` (the whole row ``(i, a)``, so
that per-group kernels still sum to the full kernel) are set to zero before the sign.

NOTE: measured on the test GPT-2 and Llama models (1-token samples, float32): noise
entries reach 5e-8 of their row's largest entry, legitimate ones go down to 1e-6; 0.05%
of legitimate entries lie below the float32 threshold 2^-17 = 7.6e-6.
"""

from __future__ import annotations

import torch

# tau per precision: 2^7 unit roundoffs of the arithmetic that produced J. bf16 and tf32
# products accumulate in float32 in every op linft runs, so their noise sits far below
# their own unit roundoff; 2^-10 keeps a margin while zeroing few real entries.
_TAU = {"fp64": 2.0**-46, "fp32": 2.0**-17, "tf32": 2.0**-10, "bf16": 2.0**-10}


def sign_threshold(precision: str, dtype: torch.dtype) -> float:
    """tau: entries at most ``tau`` times their row's largest magnitude count as zero."""
    if dtype == torch.float64:
        return _TAU["fp64"]
    return _TAU[precision]


def zero_below_threshold(J: torch.Tensor, tau: float) -> torch.Tensor:
    """``J [n, C, P]`` with every entry ``|J_ij| <= tau * max_j |J_ij|`` set to zero."""
    scale = J.abs().amax(dim=-1, keepdim=True)
    return J.masked_fill(J.abs() <= tau * scale, 0)


def for_kernel(stream, kernel: str, tau: float):
    """The J blocks as the kernel reads them: rounding-level entries zeroed for the sign
    kernels, and for SignGD only int8 signs kept (4x less memory than fp32, exact, and the
    int8 tensor-core path of the Triton Gram)."""
    if kernel == "sgd":
        return stream
    return (_signed(start, J, done, kernel, tau) for start, J, done in stream)


def _signed(start: int, J, done: bool, kernel: str, tau: float) -> tuple:
    if J is not None and J.is_floating_point():
        J = zero_below_threshold(J, tau)
        if kernel == "signgd":
            J = torch.sign(J).to(torch.int8)
    return start, J, done
