"""Pure-torch Gram tile ops: the CPU path and the oracle of ``linft.triton_kernels.gram``.

``out = op(a) @ op(b)^T`` with op = sign or identity, accumulated in float32
(float64 for float64 inputs) whatever the storage precision of the rows.
The Triton kernels share these signatures.
"""

from __future__ import annotations

import torch


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    if t.dtype == torch.int8:  # signs: sums of +-1 are exact in float32 below 2^24 terms
        return torch.float32 if t.shape[-1] < 2**24 else torch.float64
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _load(t: torch.Tensor, sign: bool) -> torch.Tensor:
    t = t.to(_accumulation_dtype(t))
    return torch.sign(t) if sign else t


def gram_tile(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    sign_a: bool = False,
    sign_b: bool = False,
) -> None:
    """``out = op(a) @ op(b)^T``, op = sign or identity; a: [m, P], b: [k, P], out: [m, k].

    ``a`` and ``b`` may be strided row views (last stride 1); ``out`` may be a view into K.
    """
    out.copy_(_load(a, sign_a) @ _load(b, sign_b).t())


def gram_symmetric(a: torch.Tensor, out: torch.Tensor, sign: bool = False) -> None:
    """``out = op(a) @ op(a)^T`` made exactly symmetric; a: [m, P], out: [m, m]."""
    a = _load(a, sign)
    tile = a @ a.t()
    # A GEMM's two triangles may round differently; mirror the upper one.
    upper = torch.triu(tile)
    out.copy_(upper + torch.triu(tile, diagonal=1).t())
