"""Per-sample Jacobian blocks from captured activations and output gradients.

For a module with inputs ``x_t`` and output gradients ``g_t = d f_a / d y_t``
(tokens ``t = 1..T`` of one sample), papers.md "LoRA structure":

- plain linear ``y = W x + b``:  ``dW = sum_t g_t x_t^T``, ``db = sum_t g_t``;
- LoRA ``y = W x + s B (A x)``:  ``dB = s sum_t g_t (A x_t)^T``,
  ``dA = s sum_t (B^T g_t) x_t^T``.

Each op writes its rows straight into columns of the block's Jacobian buffer
``out [n, C, P]`` (row ``(i, a)``, columns in ``named_parameters`` order).
These pure-torch functions are the CPU path and the oracle of the Triton
kernels in ``linft.triton_kernels.lora_jacobian``, which share their
signatures.
"""

from __future__ import annotations

import torch


def _masked(x: torch.Tensor, mask: torch.Tensor | None, token_dim: int) -> torch.Tensor:
    # masked_fill rather than a product: padded activations may hold NaN or inf
    # (fully masked attention rows), and 0 * NaN is NaN.
    if mask is None:
        return x
    shape = [1] * x.dim()
    shape[0], shape[token_dim] = mask.shape
    return x.masked_fill(~mask.view(shape), 0)


def _write(out: torch.Tensor, col: int | None, rows: torch.Tensor, sign: bool) -> None:
    if col is None:
        return
    n, c = out.shape[:2]
    rows = rows.reshape(n, c, -1)
    out[:, :, col : col + rows.shape[-1]] = torch.sign(rows) if sign else rows


def linear_jacobian(
    x: torch.Tensor,
    g: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    col_W: int | None,
    col_b: int | None,
    transposed: bool = False,
    sign: bool = False,
) -> None:
    """Rows of ``d f_a(x_i) / d (W, b)`` for ``y = x W^T + b`` (``x W + b`` if ``transposed``).

    x: [n, T, d_in]; g: [n, C, T, d_out]; mask: [n, T] bool (True = real token) or None;
    out: [n, C, P]; col_W / col_b: first column of the weight / bias (None = not selected).
    ``transposed`` is transformers' ``Conv1D`` layout, weight ``[d_in, d_out]``.
    """
    x = _masked(x, mask, 1)
    g = _masked(g, mask, 2)
    if col_W is not None:
        if transposed:
            dW = torch.einsum("nti,nctd->ncid", x, g)
        else:
            dW = torch.einsum("nctd,nti->ncdi", g, x)
        _write(out, col_W, dW, sign)
    if col_b is not None:
        _write(out, col_b, g.sum(dim=2), sign)


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
) -> None:
    """Rows of ``d f_a(x_i) / d (A, B)`` for the LoRA update ``s B (A x)``.

    x: [n, T, d_in]; g: [n, C, T, d_out]; A: [r, d_in]; B: [d_out, r]; scaling: s;
    mask: [n, T] bool or None; out: [n, C, P]; col_A / col_B: first column of A / B
    (row-major, as ``A.flatten()``), None = not selected.
    """
    x = _masked(x, mask, 1)
    g = _masked(g, mask, 2)
    if col_B is not None:
        ax = x @ A.t().to(x.dtype)  # [n, T, r]
        _write(out, col_B, scaling * torch.einsum("nctd,ntr->ncdr", g, ax), sign)
    if col_A is not None:
        gb = g @ B.to(g.dtype)  # [n, C, T, r]
        _write(out, col_A, scaling * torch.einsum("nctr,nti->ncri", gb, x), sign)
