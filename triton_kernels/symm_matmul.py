"""``Y = A X`` for a symmetric ``A``, reading each tile on or above the diagonal once.

The eigensolver's products ``K @ X`` (X a block of ~100 columns) read all of K for
little arithmetic. Each program takes one tile ``A_IJ`` (I <= J) and applies it to
both sides, ``Y_I += A_IJ X_J`` and (I < J) ``Y_J += A_IJ^T X_I``, so half of A is
read from memory (its repeat loads, per column step and transposed, hit the cache).
fp32 products run on tensor cores as ``"tf32x3"`` by default (three tf32 products of
split operands, about fp32 accuracy) or exactly on FMAs (``"ieee"``); partial results
meet in Y through relaxed atomic adds (their order, and so the last bits, may vary run
to run). Twin and oracle: ``linft.eig.symm_matmul`` (the C++ op ``linft::symm_matmul``
computes the same).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_device, dot_precision, interpreting, merge_config


@triton.jit
def _symm_matmul_kernel(
    a_ptr,  # [n, n] symmetric, row stride stride_a, unit column stride
    x_ptr,  # [n, m] row stride stride_x, unit column stride
    y_ptr,  # [n, m] contiguous fp32, zero on entry
    n,
    m,
    stride_a,
    stride_x,
    PREC: tl.constexpr,  # input_precision of the fp32 dots
    BLOCK: tl.constexpr,  # rows and columns of one tile of A
    BLOCK_N: tl.constexpr,  # columns of X per step
):
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    if ti > tj:  # below the diagonal: covered by the transpose of tile (tj, ti)
        return
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    ok_i = offs_i < n
    ok_j = offs_j < n
    rows_i = offs_i.to(tl.int64)
    rows_j = offs_j.to(tl.int64)
    for c0 in range(0, m, BLOCK_N):
        offs_c = c0 + tl.arange(0, BLOCK_N)
        ok_c = offs_c < m
        # Y_I += A_IJ X_J. The tile is loaded where it is used, once per column step:
        # DRAM reads it once, later steps and the transposed load below hit the cache.
        a = tl.load(
            a_ptr + rows_i[:, None] * stride_a + offs_j[None, :],
            mask=ok_i[:, None] & ok_j[None, :],
            other=0.0,
        )
        x_j = tl.load(
            x_ptr + rows_j[:, None] * stride_x + offs_c[None, :],
            mask=ok_j[:, None] & ok_c[None, :],
            other=0.0,
        )
        y_i = tl.dot(a, x_j, input_precision=PREC)
        tl.atomic_add(
            y_ptr + rows_i[:, None] * m + offs_c[None, :],
            y_i,
            mask=ok_i[:, None] & ok_c[None, :],
            sem="relaxed",
        )
        if ti < tj:  # Y_J += A_IJ^T X_I, A_IJ^T read through transposed addresses
            a_t = tl.load(
                a_ptr + rows_i[None, :] * stride_a + offs_j[:, None],
                mask=ok_j[:, None] & ok_i[None, :],
                other=0.0,
            )
            x_i = tl.load(
                x_ptr + rows_i[:, None] * stride_x + offs_c[None, :],
                mask=ok_i[:, None] & ok_c[None, :],
                other=0.0,
            )
            y_j = tl.dot(a_t, x_i, input_precision=PREC)
            tl.atomic_add(
                y_ptr + rows_j[:, None] * m + offs_c[None, :],
                y_j,
                mask=ok_j[:, None] & ok_c[None, :],
                sem="relaxed",
            )


def symm_matmul_config(m: int, precision: str) -> dict:
    """Tiles of A 64 x 64; the column step is what keeps the split operands of tf32x3 in
    registers on sm_90 (``benchmarks/kernel_resources.py``, Triton 3.6 and 3.9: 16 columns
    on 4 warps for tf32x3, 16 on 8 warps for ieee, 32 on 8 for tf32; no spills)."""
    if interpreting():
        return {"BLOCK": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    if precision == "tf32x3":
        return {"BLOCK": 64, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if precision == "ieee":
        return {"BLOCK": 64, "BLOCK_N": 16, "num_warps": 8, "num_stages": 1}
    return {"BLOCK": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}


def symm_matmul(
    A: torch.Tensor,
    X: torch.Tensor,
    *,
    input_precision: str | None = "tf32x3",
    config: dict | None = None,
) -> torch.Tensor:
    """``A @ X`` for a symmetric float32 ``A`` [n, n] and ``X`` [n, m], reading tiles I <= J.

    ``input_precision``: ``"tf32x3"`` (default; tensor cores, close to fp32), ``"ieee"``
    (exact fp32 products on FMAs) or ``"tf32"`` (fastest, about 1e-3 relative error).
    Returns a new float32 tensor [n, m].
    """
    from linft.eig import _check_matmul_inputs  # the twin's shape and dtype checks

    _check_matmul_inputs(A, X, 1)
    if A.dtype != torch.float32:
        raise TypeError(
            f"symm_matmul (Triton): A and X must be float32, got {A.dtype} and {X.dtype}; "
            "float64 goes to linft.eig.symm_matmul"
        )
    check_device(A, X)
    A = A if A.stride(1) == 1 else A.contiguous()
    X = X if X.stride(1) == 1 else X.contiguous()
    n, m = X.shape
    Y = torch.zeros(n, m, dtype=torch.float32, device=X.device)
    if n == 0 or m == 0:
        return Y
    prec = dot_precision(torch.float32, input_precision)
    cfg = merge_config(symm_matmul_config(m, prec), config)
    tiles = triton.cdiv(n, cfg["BLOCK"])
    if tiles > 65535:
        raise ValueError(f"symm_matmul: n = {n} needs more than 65535 tiles of {cfg['BLOCK']}")
    _symm_matmul_kernel[(tiles, tiles)](A, X, Y, n, m, A.stride(0), X.stride(0), PREC=prec, **cfg)
    return Y
