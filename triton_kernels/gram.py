"""Gram tiles of Jacobian blocks with fp32 accumulation and sign-on-load.

``out[p, q] = <op_a(a_p), op_b(b_q)>`` with ``op`` the identity or ``sign``:
``K[(i,a),(j,b)] = <J_ia, J_jb>`` (SGD), ``<sign J_ia, sign J_jb>`` (SignGD),
``<sign J_ia, J_jb>`` (asymmetric SignGD), Malladi et al. 2023. bf16 blocks are
multiplied on tensor cores and accumulated and written in fp32 (torch's bf16
matmul rounds its output to bf16). SignGD tiles multiply int8 signs with int32
accumulation: exact, and twice the bf16 tensor-core rate. The symmetric op
computes only tiles with ``I <= J`` and writes each with its mirror from the same
registers, so ``out`` is exactly symmetric. Twins and oracles: ``linft.ops.gram``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    KERNEL_DTYPES,
    check_device,
    compute_dtype,
    dot_precision,
    gram_config,
    interpreting,
    merge_config,
)


@triton.jit
def _sign(v, dtype: tl.constexpr):
    return tl.where(v > 0, 1, tl.where(v < 0, -1, 0)).to(dtype)


@triton.jit
def _store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on, SYMMETRIC: tl.constexpr):
    """Store a finished fp32 tile; symmetric: the tile and its mirror (I < J), or the
    upper triangle of a diagonal tile mirrored into its lower one."""
    valid = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SYMMETRIC:
        # BLOCK_M == BLOCK_N, so in a tile with I < J every row is below every column:
        # row <= col keeps whole off-diagonal tiles and the upper half of diagonal ones
        valid = valid & (offs_m[:, None] <= offs_n[None, :])
    val = acc.to(out_ptr.dtype.element_ty)
    om = offs_m.to(tl.int64)
    on = offs_n.to(tl.int64)
    tl.store(out_ptr + om[:, None] * stride_om + on[None, :] * stride_on, val, mask=valid)
    if SYMMETRIC:
        mirror_ok = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        mirror_ok = mirror_ok & (offs_m[None, :] <= offs_n[:, None])
        tl.store(
            out_ptr + on[:, None] * stride_om + om[None, :] * stride_on,
            tl.trans(val),
            mask=mirror_ok,
        )


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped ordering (Triton tutorial 03): neighbouring programs share row panels in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    return pid_m, pid_n


@triton.jit
def _gram_kernel(
    a_ptr,  # [M, P] rows of one Jacobian block (row stride stride_am, unit column stride)
    b_ptr,  # [N, P] rows of the other block (= a_ptr when SYMMETRIC)
    out_ptr,  # [M, N] output view (any strides), written when SPLIT_K == 1
    ws_ptr,  # [SPLIT_K, M, N] fp32 partial tiles, written when SPLIT_K > 1
    M,  # rows of a
    N,  # rows of b
    P,  # shared length (parameters)
    k_per_split,  # columns of P per split (multiple of BLOCK_K)
    ws_plane,  # M * N, elements of one partial
    stride_am,  # row stride of a
    stride_bm,  # row stride of b
    stride_om,  # out strides
    stride_on,
    SYMMETRIC: tl.constexpr,  # b is a; only tiles with pid_m <= pid_n run
    SIGN_A: tl.constexpr,  # sign(a) on load
    SIGN_B: tl.constexpr,  # sign(b) on load
    INT8: tl.constexpr,  # both signs: int8 x int8 -> int32 dot
    CD: tl.constexpr,  # dot operand dtype when not INT8
    PREC: tl.constexpr,  # input_precision of fp32 dots
    UPCAST: tl.constexpr,  # fp32 right after loading (the interpreter's bf16 is raw bits)
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if SYMMETRIC and pid_m > pid_n:
        return
    pid_k = tl.program_id(1)
    k_lo = pid_k * k_per_split
    k_hi = min(P, k_lo + k_per_split)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bm
    row_ok = offs_m[:, None] < M
    col_ok = offs_n[None, :] < N

    if INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < k_hi
        a = tl.load(a_rows + kk[None, :], mask=row_ok & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + kk[:, None], mask=k_ok[:, None] & col_ok, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if INT8:
            acc = tl.dot(_sign(a, tl.int8), _sign(b, tl.int8), acc, out_dtype=tl.int32)
        else:
            a = _sign(a, CD) if SIGN_A else a.to(CD)
            b = _sign(b, CD) if SIGN_B else b.to(CD)
            acc = tl.dot(a, b, acc, input_precision=PREC)

    acc = acc.to(tl.float32)
    if SPLIT_K == 1:
        _store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on, SYMMETRIC)
    else:
        ws = ws_ptr + pid_k.to(tl.int64) * ws_plane
        ws_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(ws + ws_offs, acc, mask=row_ok & col_ok)


@triton.jit
def _gram_reduce_kernel(
    ws_ptr,  # [SPLIT_K, M, N] fp32 partial tiles
    out_ptr,  # [M, N] output view
    M,  # out rows
    N,  # out columns
    ws_plane,  # M * N, elements of one partial
    stride_om,  # out strides
    stride_on,
    splits,  # partials to sum (a runtime loop: no unrolling, one binary for every count)
    SYMMETRIC: tl.constexpr,  # only tiles with pid_m <= pid_n, written with their mirror
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Its tiles need not be the GEMM's: the symmetric store keeps only row <= col, and
    # every such element lies in a GEMM tile with I <= J, so it was computed.
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if SYMMETRIC and pid_m > pid_n:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ws_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    ws = ws_ptr + ws_offs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # fixed summation order: deterministic, run to run
    for _ in range(splits):
        acc += tl.load(ws, mask=ok, other=0.0)
        ws += ws_plane
    _store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on, SYMMETRIC)


def _check(a, b, out, sign_a: bool, sign_b: bool) -> None:
    m, k = a.shape[0], b.shape[0]
    for name, t, sign in (("a", a, sign_a), ("b", b, sign_b)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, P], got shape {tuple(t.shape)}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along P (a row view of J)")
        if t.dtype not in KERNEL_DTYPES + (torch.float64, torch.int8):
            raise TypeError(f"unsupported dtype of {name}: {t.dtype}")
        if t.dtype == torch.int8 and not sign:
            raise TypeError(f"int8 {name} is read as signs: pass sign=True for it")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} differ in P")
    if out.dim() != 2 or tuple(out.shape) != (m, k):
        raise ValueError(f"out must be [{m}, {k}], got shape {tuple(out.shape)}")
    if out.dtype not in KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"unsupported dtype of out: {out.dtype}")
    check_device(a, b, out)


def _launch(a, b, out, symmetric, sign_a, sign_b, int8, input_precision, config) -> None:
    m, k, p = a.shape[0], b.shape[0], a.shape[1]
    use_int8 = sign_a and sign_b and int8
    # a sign factor is exact in any float type, so the other factor sets the dtype
    if sign_a and sign_b:
        dtypes = [torch.bfloat16]
    elif sign_a or sign_b:
        dtypes = [b.dtype if sign_a else a.dtype]
    else:
        dtypes = [a.dtype, b.dtype]
    eff = torch.float32 if torch.float32 in dtypes or len(set(dtypes)) > 1 else dtypes[0]
    load_bytes = max(a.element_size(), b.element_size())
    default = gram_config(m, k, p, eff, use_int8, symmetric, a.device, load_bytes)
    cfg = merge_config(default, config)
    if symmetric and cfg["BLOCK_M"] != cfg["BLOCK_N"]:
        raise ValueError("gram_symmetric needs BLOCK_M == BLOCK_N")
    split = cfg.pop("SPLIT_K")
    reduce_block = cfg.pop("REDUCE_BLOCK")
    k_per_split = triton.cdiv(triton.cdiv(p, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = max(1, triton.cdiv(p, k_per_split))
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_N"])
    ws = torch.empty((split, m, k) if split > 1 else (1,), device=a.device, dtype=torch.float32)
    prec = dot_precision(torch.float32, input_precision)
    _gram_kernel[(tiles, split)](
        a, b, out, ws, m, k, p, k_per_split, m * k, a.stride(0), b.stride(0),
        out.stride(0), out.stride(1),
        SYMMETRIC=symmetric, SIGN_A=sign_a, SIGN_B=sign_b, INT8=use_int8,
        CD=compute_dtype(eff), PREC=prec, UPCAST=interpreting(), SPLIT_K=split, **cfg,
    )  # fmt: skip
    if split > 1:
        rb = reduce_block
        _gram_reduce_kernel[(triton.cdiv(m, rb) * triton.cdiv(k, rb),)](
            ws, out, m, k, m * k, out.stride(0), out.stride(1), split, SYMMETRIC=symmetric,
            BLOCK_M=rb, BLOCK_N=rb, GROUP_M=cfg["GROUP_M"], num_warps=4,
        )  # fmt: skip


def gram_tile(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    sign_a: bool = False,
    sign_b: bool = False,
    *,
    int8: bool = True,
    input_precision: str | None = None,
    config: dict | None = None,
) -> None:
    """``out = op(a) @ op(b)^T``, op = sign or identity; a: [m, P], b: [k, P], out: [m, k].

    a, b: row views with unit last stride (e.g. ``J.view(n, C, P)[:, c, :]``); out: any
    strided view (e.g. a tile of K). Accumulates in fp32 whatever the input dtype;
    float64 runs on the torch twin. ``int8``: SignGD (both signs) on int8 tensor cores
    (exact). A factor taken by its sign may be stored pre-signed as int8
    (``torch.sign(J).to(torch.int8)``), which halves the bytes read against bf16.
    ``input_precision``: of fp32 products ("ieee" default, "tf32x3", "tf32").
    """
    _check(a, b, out, sign_a, sign_b)
    if torch.float64 in (a.dtype, b.dtype, out.dtype):
        from linft.ops.gram import gram_tile as reference

        reference(a, b, out, sign_a, sign_b)
        return
    if out.numel() == 0:
        return
    if a.shape[1] == 0:
        out.zero_()
        return
    _launch(a, b, out, False, sign_a, sign_b, int8, input_precision, config)


def gram_symmetric(
    a: torch.Tensor,
    out: torch.Tensor,
    sign: bool = False,
    *,
    int8: bool = True,
    input_precision: str | None = None,
    config: dict | None = None,
) -> None:
    """``out = op(a) @ op(a)^T``, exactly symmetric; a: [m, P], out: [m, m].

    Only tiles with ``I <= J`` are computed (about half the work of ``gram_tile``).
    """
    _check(a, a, out, sign, sign)
    if torch.float64 in (a.dtype, out.dtype):
        from linft.ops.gram import gram_symmetric as reference

        reference(a, out, sign)
        return
    if out.numel() == 0:
        return
    if a.shape[1] == 0:
        out.zero_()
        return
    _launch(a, a, out, True, sign, sign, int8, input_precision, config)
