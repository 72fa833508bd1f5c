"""Blockwise Gram assembly: kernel tiles from per-sample Jacobian blocks.

``K[(i,a),(j,b)] = <J_ia, J_jb>`` (SGD), ``<sign J_ia, sign J_jb>`` (SignGD),
``<sign J_ia, J_jb>`` (asymmetric SignGD), Malladi et al. 2023. Tiles are
accumulated in float32 (float64 for float64 inputs) whatever the storage
precision of J, by the tile ops of the chosen backend (``linft.ops.gram`` or
``linft.triton_kernels.gram``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .store import JacobianStore

KERNELS = ("sgd", "signgd", "asym_signgd")
OUTPUTS = ("full", "trace")


def kernel_signs(kernel: str) -> tuple[bool, bool]:
    """(sign on rows, sign on columns) of each kernel."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    return {"sgd": (False, False), "signgd": (True, True), "asym_signgd": (True, False)}[kernel]


def _rows(J: torch.Tensor, span: slice, c: int | None) -> torch.Tensor:
    """[n*C, p] rows of J [n, C, P] restricted to a column span (one output c if given)."""
    if c is None:
        return J.view(-1, J.shape[-1])[:, span]
    return J[:, c, span]


def kernel_tile(
    ops,
    Ji: torch.Tensor,
    Jj: torch.Tensor,
    spans: list[slice],
    kernel: str,
    outputs: str,
    diagonal: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One tile of K between blocks i and j, summed over the column spans of a group.

    ``diagonal`` (i == j, symmetric kernel) computes only the upper triangle of
    tiles inside the op and mirrors it, so K is exactly symmetric.
    """
    sign_a, sign_b = kernel_signs(kernel)
    n_i, C = Ji.shape[:2]
    n_j = Jj.shape[0]
    per_output = outputs == "trace" and C > 1
    shape = (n_i, n_j) if per_output else (n_i * C, n_j * C)
    total = torch.zeros(shape, dtype=dtype, device=Ji.device)
    part = torch.empty_like(total) if (len(spans) > 1 or per_output) else total
    for span in spans:
        for c in range(C) if per_output else [None]:
            a = _rows(Ji, span, c)
            if diagonal and sign_a == sign_b:
                ops.gram_symmetric(a, part, sign_a)
            else:
                ops.gram_tile(a, _rows(Jj, span, c), part, sign_a, sign_b)
            if part is not total:
                total += part
    return total


def assemble(
    blocks,
    blocks2,
    groups: dict[str, list[slice]],
    kernel: str,
    outputs: str,
    ops,
    dtype: torch.dtype,
    store: JacobianStore,
    allocate,
    on_finish=None,
) -> tuple[dict[str, torch.Tensor], int]:
    """The kernel of each column group from streams of ``(start, J, finished)`` blocks.

    ``blocks2 is None``: the symmetric K(X, X); only tiles I <= J are computed
    (both orders for the asymmetric SignGD kernel). Otherwise the cross kernel
    K(X, X2): the X2 blocks are stored first, then every X block meets them all.
    ``allocate(name, per)`` makes a kernel matrix (``per`` rows per sample: C, or
    1 for traces); blocks marked finished already have their tiles in it.
    ``on_finish(side, start, J, keep)`` runs once a block's tiles are written.
    Returns the kernels as matrices ``[N*C, M*C]`` (``[N, M]`` for traces) and C.
    """
    if outputs not in OUTPUTS:
        raise ValueError(f"unknown outputs {outputs!r}; choose one of {OUTPUTS}")
    symmetric_kernel = kernel != "asym_signgd"
    K: dict[str, torch.Tensor] = {}
    per = None

    def put(name: str, si: int, sj: int, tile: torch.Tensor, mirror: bool) -> None:
        r0, c0 = si * per, sj * per
        K[name][r0 : r0 + tile.shape[0], c0 : c0 + tile.shape[1]].copy_(tile)
        if mirror:
            K[name][c0 : c0 + tile.shape[1], r0 : r0 + tile.shape[0]].copy_(tile.t())

    def tiles(si, Ji, sj, Jj, mirror) -> None:
        for name, spans in groups.items():
            put(
                name, si, sj, kernel_tile(ops, Ji, Jj, spans, kernel, outputs, False, dtype), mirror
            )

    def ensure(J: torch.Tensor) -> None:
        nonlocal per
        if per is None:
            C = J.shape[1]
            per = 1 if outputs == "trace" or C == 1 else C
            K.update((name, allocate(name, per)) for name in groups)
        elif per != 1 and J.shape[1] != per:
            raise ValueError(f"the output gave C = {J.shape[1]} after C = {per}")

    def finish(side: str, start: int, J: torch.Tensor, keep: bool) -> None:
        if on_finish is not None:
            on_finish(side, start, J, keep)

    if blocks2 is not None:
        for sj, Jj, done in blocks2:
            ensure(Jj)
            if not done:
                finish("cols", sj, Jj, True)
            store.add(sj, Jj)
        for si, Ji, done in blocks:
            if done:
                continue
            ensure(Ji)
            for sj, Jj in store:
                tiles(si, Ji, sj, Jj, False)
            finish("rows", si, Ji, False)
        return K, store.num_outputs

    for sj, Jj, done in blocks:
        ensure(Jj)
        if not done:
            for si, Ji in store:
                tiles(si, Ji, sj, Jj, symmetric_kernel)
                if not symmetric_kernel:
                    tiles(sj, Jj, si, Ji, False)
            for name, spans in groups.items():
                put(
                    name,
                    sj,
                    sj,
                    kernel_tile(ops, Jj, Jj, spans, kernel, outputs, True, dtype),
                    False,
                )
            finish("rows", sj, Jj, True)
        store.add(sj, Jj)
    return K, store.num_outputs
