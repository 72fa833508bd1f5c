"""Fused per-sample Jacobian rows of LoRA and linear modules (papers.md "LoRA structure").

For sample ``i``, output ``c`` and tokens ``t`` (padding skipped), with captured
inputs ``x_t`` and output gradients ``g_t``:

- LoRA ``y = W x + s B (A x)``: ``dA = s sum_t (B^T g_t) x_t^T`` (r x d_in),
  ``dB = s sum_t g_t (A x_t)^T`` (d_out x r);
- linear ``y = W x + b``: ``dW = sum_t g_t x_t^T`` (or its transpose for the
  ``Conv1D`` layout), ``db = sum_t g_t``.

All four are one token-sum ``out[m, n] = scale * sum_t L[t, m] R[t, n]`` whose factors
are either read (``g`` or ``x``) or formed in registers as a rank-r product (``g B``
or ``x A^T``), so ``A x`` and ``g B`` never reach global memory. Results go straight
into their columns of the block's Jacobian buffer ``out [n, C, P]``. Twins and
oracles: ``linft.ops.jacobian.lora_jacobian`` / ``linear_jacobian`` (same signatures).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .utils import (
    KERNEL_DTYPES,
    check_device,
    compute_dtype,
    dot_precision,
    jacobian_config,
    merge_config,
)


@triton.jit
def _token_sum_kernel(
    l_ptr,  # left source, g [n, C, T, K_L] or x [n, T, K_L] (then stride_lc = 0)
    r_ptr,  # right source, x [n, T, K_R] or g [n, C, T, K_R]
    pl_ptr,  # left projection [K_L, M] (B for dA), read only if PROJ_L
    pr_ptr,  # right projection [K_R, N] (A^T for dB, as strides of A), read only if PROJ_R
    mask_ptr,  # padding mask [n, T] as uint8 (1 = real token), read only if HAS_MASK
    bounds_ptr,  # [n, 2] int32: first real token, last real token + 1; read only if HAS_MASK
    out_ptr,  # Jacobian buffer [n, C, P]; block (i, c) written at col + m * N + n
    M,  # rows of the result block (r, d_out or d_in)
    N,  # columns of the result block (d_in, r, d_out, or 1 for a bias)
    K_L,  # feature dim of the left source (contracted with pl if PROJ_L, else = M)
    K_R,  # feature dim of the right source (contracted with pr if PROJ_R, else = N)
    T,  # tokens per sample
    C,  # outputs per sample
    col,  # first column of the block in out
    scale,  # LoRA scaling s (1.0 for linear)
    stride_ln,  # left source strides: sample, output (0 for x), token, feature
    stride_lc,
    stride_lt,
    stride_lk,
    stride_rn,  # right source strides, same order
    stride_rc,
    stride_rt,
    stride_rk,
    stride_plk,  # left projection strides
    stride_plm,
    stride_prk,  # right projection strides
    stride_prn,
    stride_mn,  # mask strides
    stride_mt,
    stride_on,  # out strides: sample, output (the column stride is 1)
    stride_oc,
    PROJ_L: tl.constexpr,  # L = l_src @ pl (rank-r factor formed in registers)
    PROJ_R: tl.constexpr,  # R = r_src @ pr
    RIGHT_ONES: tl.constexpr,  # R = 1 (bias: sum_t L[t, m]); N must be 1
    HAS_MASK: tl.constexpr,  # skip padded tokens
    SIGN: tl.constexpr,  # write sign(value)
    CD: tl.constexpr,  # dtype of the dot operands read from memory
    PROJ_PREC: tl.constexpr,  # input_precision of the rank-r products
    MAIN_PREC: tl.constexpr,  # input_precision of the token sum
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # 1-D grid, tile index fastest: the programs of one (i, c) run together and share
    # their g and x rows through L2; no 65535 limit on n * C.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    tile = pid % tiles
    ic = pid // tiles
    c = ic % C
    i = (ic // C).to(tl.int64)
    pid_m = tile // tiles_n
    pid_n = tile % tiles_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t0 = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    l_base = l_ptr + i * stride_ln + c.to(tl.int64) * stride_lc
    r_base = r_ptr + i * stride_rn + c.to(tl.int64) * stride_rc

    if HAS_MASK:
        t_lo = tl.load(bounds_ptr + 2 * i)
        t_hi = tl.load(bounds_ptr + 2 * i + 1)
    else:
        t_lo = 0
        t_hi = T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + offs_t0
        tok = offs_t < t_hi
        if HAS_MASK:
            real = tl.load(mask_ptr + i * stride_mn + offs_t * stride_mt, mask=tok, other=0)
            tok = tok & (real != 0)
        # masked loads return 0 without reading: NaN at padded positions cannot leak

        if PROJ_L:
            lt = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, K_L, BLOCK_K):
                kk = k0 + offs_k
                src = tl.load(
                    l_base + offs_t[:, None] * stride_lt + kk[None, :] * stride_lk,
                    mask=tok[:, None] & (kk[None, :] < K_L),
                    other=0.0,
                )
                proj = tl.load(
                    pl_ptr + kk[:, None] * stride_plk + offs_m[None, :] * stride_plm,
                    mask=(kk[:, None] < K_L) & (offs_m[None, :] < M),
                    other=0.0,
                )
                lt = tl.dot(src.to(CD), proj.to(CD), lt, input_precision=PROJ_PREC)
        else:
            lt = tl.load(
                l_base + offs_t[:, None] * stride_lt + offs_m[None, :] * stride_lk,
                mask=tok[:, None] & (offs_m[None, :] < M),
                other=0.0,
            ).to(CD)

        if RIGHT_ONES:
            rt = tl.where(tok[:, None] & (offs_n[None, :] < N), 1.0, 0.0).to(CD)
        elif PROJ_R:
            rt = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K_R, BLOCK_K):
                kk = k0 + offs_k
                src = tl.load(
                    r_base + offs_t[:, None] * stride_rt + kk[None, :] * stride_rk,
                    mask=tok[:, None] & (kk[None, :] < K_R),
                    other=0.0,
                )
                proj = tl.load(
                    pr_ptr + kk[:, None] * stride_prk + offs_n[None, :] * stride_prn,
                    mask=(kk[:, None] < K_R) & (offs_n[None, :] < N),
                    other=0.0,
                )
                rt = tl.dot(src.to(CD), proj.to(CD), rt, input_precision=PROJ_PREC)
        else:
            rt = tl.load(
                r_base + offs_t[:, None] * stride_rt + offs_n[None, :] * stride_rk,
                mask=tok[:, None] & (offs_n[None, :] < N),
                other=0.0,
            ).to(CD)

        if PROJ_L or PROJ_R:
            # one factor is an fp32 register product: form the sum in fp32
            acc = tl.dot(
                tl.trans(lt.to(tl.float32)), rt.to(tl.float32), acc, input_precision=MAIN_PREC
            )
        else:
            acc = tl.dot(tl.trans(lt), rt, acc, input_precision=MAIN_PREC)

    acc = acc * scale
    if SIGN:
        acc = tl.where(acc > 0, 1.0, tl.where(acc < 0, -1.0, 0.0))
    out_base = out_ptr + i * stride_on + c.to(tl.int64) * stride_oc + col
    out_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_base + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _check_common(x: torch.Tensor, g: torch.Tensor, mask, out: torch.Tensor) -> tuple:
    if x.dim() != 3:
        raise ValueError(f"x must be [n, T, d_in], got shape {tuple(x.shape)}")
    if g.dim() != 4:
        raise ValueError(f"g must be [n, C, T, d_out], got shape {tuple(g.shape)}")
    n, T, _ = x.shape
    if g.shape[0] != n or g.shape[2] != T:
        raise ValueError(f"g {tuple(g.shape)} does not match x {tuple(x.shape)} in n or T")
    C = g.shape[1]
    if out.dim() != 3 or out.shape[0] != n or out.shape[1] != C:
        raise ValueError(f"out must be [n={n}, C={C}, P], got shape {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    for name, t in (("x", x), ("g", g)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension")
    if x.dtype != g.dtype:
        raise TypeError(f"x and g must share a dtype, got {x.dtype} and {g.dtype}")
    supported = KERNEL_DTYPES + (torch.float64,)
    if x.dtype not in supported or out.dtype not in supported:
        raise TypeError(f"unsupported dtypes x={x.dtype}, out={out.dtype}")
    tensors = [x, g, out]
    if mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (n, T):
            raise ValueError(
                f"mask must be bool [n={n}, T={T}], got {mask.dtype} {tuple(mask.shape)}"
            )
        tensors.append(mask)
    check_device(*tensors)
    return n, C, T


def _check_col(out: torch.Tensor, col: int | None, size: int, name: str) -> None:
    if col is None:
        return
    if not 0 <= col or col + size > out.shape[2]:
        raise ValueError(f"{name} columns [{col}, {col + size}) outside out's P={out.shape[2]}")


class _Tokens(NamedTuple):
    """What the kernel needs of the padding mask."""

    mask: torch.Tensor  # uint8 view of the mask (any tensor when unused)
    bounds: torch.Tensor  # [n, 2] int32 first real token, last real token + 1
    strides: tuple[int, int]
    used: bool


def _tokens(mask: torch.Tensor | None, x: torch.Tensor) -> _Tokens:
    if mask is None or mask.shape[1] == 0:
        return _Tokens(x, x, (0, 0), False)
    T = mask.shape[1]
    real = mask.view(torch.uint8)
    hits = mask.to(torch.int32)
    first = hits.argmax(dim=1)  # the first maximum: the first real token
    last = T - hits.flip(1).argmax(dim=1)
    empty = ~mask.any(dim=1)
    bounds = torch.stack((first, last), dim=1).masked_fill(empty[:, None], 0).to(torch.int32)
    return _Tokens(real, bounds.contiguous(), (real.stride(0), real.stride(1)), True)


def _strides4(t: torch.Tensor, has_c: bool) -> tuple[int, int, int, int]:
    if has_c:
        return t.stride(0), t.stride(1), t.stride(2), t.stride(3)
    return t.stride(0), 0, t.stride(1), t.stride(2)


def _launch(out, tokens, left, right, shape, col, scale, pl=None, pr=None, *, ones=False,
            sign=False, input_precision=None, config=None) -> None:  # fmt: skip
    """One token-sum launch ``out[m, n] = scale sum_t L[t, m] R[t, n]``.

    left / right: (source tensor, has an output axis C); shape: (M, N, K_L, K_R);
    pl / pr: the projections that turn a source into a rank-r factor, if any.
    """
    (l_src, l_has_c), (r_src, r_has_c) = left, right
    M, N, K_L, K_R = shape
    n, C = out.shape[:2]
    T = l_src.shape[2] if l_has_c else l_src.shape[1]
    dtype = l_src.dtype
    projected = pl is not None or pr is not None
    k_proj = K_L if pl is not None else (K_R if pr is not None else 0)
    cfg = merge_config(jacobian_config(M, N, k_proj, T, dtype, projected), config)
    if dtype == torch.float32:
        proj_prec = main_prec = dot_precision(dtype, input_precision)
    else:
        # half x half dots are exact products with fp32 accumulation; the token sum
        # of a projected factor multiplies an fp32 register value by a half value
        proj_prec = "ieee"
        main_prec = dot_precision(dtype, input_precision) if projected else "ieee"
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    pls = (pl.stride(0), pl.stride(1)) if pl is not None else (0, 0)
    prs = (pr.stride(0), pr.stride(1)) if pr is not None else (0, 0)
    _token_sum_kernel[(tiles * C * n,)](
        l_src, r_src, l_src if pl is None else pl, r_src if pr is None else pr,
        tokens.mask, tokens.bounds, out,
        M, N, K_L, K_R, T, C, col, float(scale),
        *_strides4(l_src, l_has_c), *_strides4(r_src, r_has_c), *pls, *prs, *tokens.strides,
        out.stride(0), out.stride(1),
        PROJ_L=pl is not None, PROJ_R=pr is not None, RIGHT_ONES=ones, HAS_MASK=tokens.used,
        SIGN=sign, CD=compute_dtype(dtype), PROJ_PREC=proj_prec, MAIN_PREC=main_prec,
        **cfg,
    )  # fmt: skip


def lora_jacobian(
    x: torch.Tensor,
    g: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    col_A: int | None,
    col_B: int | None,
    sign: bool = False,
    *,
    input_precision: str | None = None,
    config: dict | None = None,
) -> None:
    """Write ``dA = s sum_t (B^T g_t) x_t^T`` and ``dB = s sum_t g_t (A x_t)^T`` into ``out``.

    x: [n, T, d_in]; g: [n, C, T, d_out]; A: [r, d_in]; B: [d_out, r]; scaling: s;
    mask: [n, T] bool (True = real token) or None; out: contiguous [n, C, P];
    col_A / col_B: first column of A / B flattened row-major (None = not selected);
    sign: write sign(value). float64 runs on the torch twin. ``input_precision``
    ("ieee", "tf32", "tf32x3") applies to float32 inputs (default "ieee");
    ``config`` overrides the tiles of ``utils.jacobian_config``.
    """
    n, C, _ = _check_common(x, g, mask, out)
    d_in, d_out = x.shape[2], g.shape[3]
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != d_in or B.shape[0] != d_out:
        raise ValueError(
            f"A must be [r, d_in={d_in}] and B [d_out={d_out}, r], "
            f"got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    r = A.shape[0]
    if B.shape[1] != r:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} disagree on the rank")
    check_device(x, A, B)
    _check_col(out, col_A, r * d_in, "A")
    _check_col(out, col_B, d_out * r, "B")
    if torch.float64 in (x.dtype, out.dtype):
        from linft.ops.jacobian import lora_jacobian as reference

        reference(x, g, A, B, scaling, mask, out, col_A, col_B, sign)
        return
    if n == 0 or C == 0:
        return
    tokens = _tokens(mask, x)
    opts = {"sign": sign, "input_precision": input_precision, "config": config}
    if col_A is not None:
        # dA [r, d_in]: L = g B (in registers), R = x
        shape = (r, d_in, d_out, d_in)
        _launch(out, tokens, (g, True), (x, False), shape, col_A, scaling, pl=B, **opts)
    if col_B is not None:
        # dB [d_out, r]: L = g, R = x A^T (in registers), A^T read through A's strides
        shape = (d_out, r, d_out, d_in)
        _launch(out, tokens, (g, True), (x, False), shape, col_B, scaling, pr=A.t(), **opts)


def linear_jacobian(
    x: torch.Tensor,
    g: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    col_W: int | None,
    col_b: int | None,
    transposed: bool = False,
    sign: bool = False,
    *,
    input_precision: str | None = None,
    config: dict | None = None,
) -> None:
    """Write ``dW = sum_t g_t x_t^T`` and ``db = sum_t g_t`` into ``out``.

    x: [n, T, d_in]; g: [n, C, T, d_out]; mask: [n, T] bool or None; out: [n, C, P];
    col_W / col_b: first column of the weight / bias (None = not selected);
    ``transposed``: transformers' ``Conv1D`` weight layout [d_in, d_out].
    """
    n, C, _ = _check_common(x, g, mask, out)
    d_in, d_out = x.shape[2], g.shape[3]
    _check_col(out, col_W, d_in * d_out, "W")
    _check_col(out, col_b, d_out, "b")
    if torch.float64 in (x.dtype, out.dtype):
        from linft.ops.jacobian import linear_jacobian as reference

        reference(x, g, mask, out, col_W, col_b, transposed, sign)
        return
    if n == 0 or C == 0:
        return
    tokens = _tokens(mask, x)
    opts = {"sign": sign, "input_precision": input_precision, "config": config}
    if col_W is not None:
        if transposed:  # Conv1D: dW [d_in, d_out] = sum_t x_t g_t^T
            left, right, M, N = (x, False), (g, True), d_in, d_out
        else:
            left, right, M, N = (g, True), (x, False), d_out, d_in
        _launch(out, tokens, left, right, (M, N, M, N), col_W, 1.0, **opts)
    if col_b is not None:
        # db [d_out] = sum_t g_t: R = a column of ones
        _launch(out, tokens, (g, True), (g, True), (d_out, 1, d_out, 1), col_b, 1.0, ones=True,
                **opts)  # fmt: skip
