"""Summaries of a kernel's spectrum: extremes, condition number, ranks, power-law decay.

For K (PSD, [n, n] or a full kernel [N, C, N, C] reshaped to [N*C, N*C]) with eigenvalues
``lambda_1 >= ... >= lambda_n``:

- ``condition_number = (lambda_1 + ridge) / (lambda_n + ridge)``; ``inf`` when K is numerically
  singular (``rank < n``) and ``ridge == 0``. The condition number of K at initialization
  predicts the training loss and accuracy of fine-tuning (Afzal et al., NeurIPS 2025).
- ``rank = #{j : lambda_j > rtol * lambda_1}``, ``rtol = n * eps(dtype of K)`` by default (the
  convention of ``numpy.linalg.matrix_rank``). K is singular whenever N*C exceeds the number of
  parameters.
- ``trace = sum_j K_jj``, ``stable_rank = trace / lambda_1``,
  ``effective_rank = exp(-sum_j p_j log p_j)`` with ``p_j = lambda_j / sum_i lambda_i``
  (Roy & Vetterli 2007; negative rounding-level eigenvalues count as 0).
- ``decay_exponent``: least-squares slope ``alpha`` of ``log lambda_j = c - alpha log j`` over
  ``j in decay_fit_range`` (1-based, inclusive; default: all returned eigenvalues above the rank
  threshold), the power-law summary of the eigenvalue decay that governs early stopping
  (arXiv 2602.13942; Raskutti, Wainwright & Yu 2014).

Computation: up to ``dense_threshold`` (default 8192) every eigenvalue comes from
``torch.linalg.eigvalsh`` in fp64. Above it, ``k`` top eigenvalues come from
:func:`linft.topk_eigh` and ``lambda_n`` from inverse iteration with a fp64 Cholesky factor,
``lambda_n = 1 / lambda_1((K + s I)^{-1}) - s`` (``s = 0``, or the smallest shift that makes the
factorization succeed when K is singular); the rank of a singular K is then counted by Sylvester's
law of inertia from an LDL^T factorization of ``K - rtol * lambda_1 * I``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from linft.eig import _check_dense, topk_eigh

__all__ = ["Spectrum", "spectrum"]


@dataclass
class Spectrum:
    """Spectrum summary of a symmetric PSD kernel (see the module docstring for the formulas).

    ``eigenvalues`` (fp64, descending: all of them, or the top ``k``), ``lambda_max``,
    ``lambda_min``, ``condition_number``, ``rank``, ``trace``, ``effective_rank`` (over
    ``eigenvalues``: exact when ``complete``), ``stable_rank``, ``decay_exponent`` and
    ``decay_fit_range`` (1-based inclusive ``(j_first, j_last)``; ``nan`` and ``(0, 0)`` when
    fewer than two eigenvalues are usable), ``ridge``, ``n``, ``rank_threshold`` (absolute) and
    ``complete`` (whether every eigenvalue was computed).
    """

    eigenvalues: Tensor
    lambda_max: float
    lambda_min: float
    condition_number: float
    rank: int
    trace: float
    effective_rank: float
    stable_rank: float
    decay_exponent: float
    decay_fit_range: tuple[int, int]
    ridge: float
    n: int
    rank_threshold: float
    complete: bool


def spectrum(
    K: Tensor,
    *,
    k: int | None = None,
    ridge: float = 0.0,
    rtol: float | None = None,
    fit_range: tuple[int, int] | None = None,
    dense_threshold: int = 8192,
) -> Spectrum:
    """Spectrum summary of ``K`` ([n, n] or [N, C, N, C]); ``k`` keeps the top k ``eigenvalues``.

    ``ridge >= 0`` enters the condition number only. ``rtol`` sets the relative rank threshold
    (default ``n * eps``), ``fit_range`` the 1-based range of the decay fit, and
    ``dense_threshold`` the size above which the top-k / Cholesky path replaces dense ``eigvalsh``.
    """
    M = _as_matrix(K)
    n = M.shape[0]
    if isinstance(k, bool) or (k is not None and (not isinstance(k, int) or not 0 < k <= n)):
        raise ValueError(f"spectrum: k must be an integer in [1, n = {n}] or None, got {k!r}")
    if not ridge >= 0:
        raise ValueError(f"spectrum: ridge must be >= 0, got {ridge}")
    rtol = n * torch.finfo(M.dtype).eps if rtol is None else float(rtol)
    trace = float(M.diagonal().double().sum())
    if n <= dense_threshold or k is None:
        w = torch.linalg.eigvalsh(M.double()).flip(0)
        lmax, lmin = float(w[0]), float(w[-1])
        tau = rtol * max(lmax, 0.0)
        rank = int((w > tau).sum())
        eigs, complete = (w if k is None else w[:k]), True
        entropy_over = w
    else:
        eigs = topk_eigh(M, k, tol=1e-6 if M.dtype == torch.float64 else 1e-4, seed=0).values
        eigs = eigs.double()
        lmax = float(eigs[0])
        tau = rtol * max(lmax, 0.0)
        lmin = _lambda_min_cholesky(M, lmax)
        rank = n if lmin > tau else n - _count_below(M, tau)
        complete, entropy_over = False, eigs
    if ridge == 0:
        cond = math.inf if rank < n or lmin <= 0 else lmax / lmin
    else:
        cond = (lmax + ridge) / (max(lmin, 0.0) + ridge)
    alpha, rng = _decay_exponent(eigs, tau, fit_range)
    return Spectrum(
        eigenvalues=eigs,
        lambda_max=lmax,
        lambda_min=lmin,
        condition_number=cond,
        rank=rank,
        trace=trace,
        effective_rank=_effective_rank(entropy_over),
        stable_rank=trace / lmax if lmax > 0 else math.nan,
        decay_exponent=alpha,
        decay_fit_range=rng,
        ridge=float(ridge),
        n=n,
        rank_threshold=tau,
        complete=complete,
    )


def _as_matrix(K: Tensor) -> Tensor:
    if not isinstance(K, Tensor):
        raise TypeError(f"spectrum: K must be a tensor, got {type(K).__name__}")
    if K.dim() == 4:
        N, C, N2, C2 = K.shape
        if (N, C) != (N2, C2):
            raise ValueError(
                f"spectrum: a full kernel must be [N, C, N, C], got {tuple(K.shape)}; "
                "pass the symmetric train kernel K(X, X)"
            )
        K = K.reshape(N * C, N * C)
    if K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(
            f"spectrum: K must be a square matrix [n, n] or a kernel [N, C, N, C], "
            f"got shape {tuple(K.shape)}"
        )
    _check_dense(K)
    return K if K.dtype in (torch.float32, torch.float64) else K.float()


def _effective_rank(w: Tensor) -> float:
    w = w.clamp_min(0.0)
    s = float(w.sum())
    if s <= 0:
        return 0.0
    p = w[w > 0] / s
    return float(torch.exp(-(p * p.log()).sum()))


def _decay_exponent(
    eigs: Tensor, tau: float, fit_range: tuple[int, int] | None
) -> tuple[float, tuple[int, int]]:
    if fit_range is None:
        usable = int((eigs > max(tau, 0.0)).sum()) if float(eigs[0]) > 0 else 0
        j0, j1 = 1, usable
    else:
        j0, j1 = int(fit_range[0]), int(fit_range[1])
        if not 1 <= j0 < j1 <= eigs.numel():
            raise ValueError(
                f"spectrum: fit_range must satisfy 1 <= first < last <= {eigs.numel()}, "
                f"got {fit_range}"
            )
        if float(eigs[j1 - 1]) <= 0:
            raise ValueError(f"spectrum: eigenvalues in fit_range {fit_range} must be positive")
    if j1 - j0 < 1:
        return math.nan, (0, 0)
    x = torch.arange(j0, j1 + 1, dtype=torch.float64).log()
    y = eigs[j0 - 1 : j1].double().cpu().log()
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    return -slope, (j0, j1)


def _lambda_min_cholesky(M: Tensor, lmax: float) -> float:
    """``lambda_n(K)`` by inverse iteration (block Krylov on ``(K + s I)^{-1}``), fp64."""
    Md = M.double()
    eye = torch.eye(Md.shape[0], dtype=torch.float64, device=Md.device)
    eps = torch.finfo(torch.float64).eps
    # s = 0 when K is numerically PD; else the smallest shift whose Cholesky succeeds, which
    # keeps |lambda_n| resolved to about s.
    for s in (0.0, 1e3 * eps * abs(lmax), 1e-8 * abs(lmax), 2.0 * abs(lmax) + 1.0):
        L, info = torch.linalg.cholesky_ex(Md + s * eye if s else Md)
        if int(info) == 0:
            break
    else:
        raise ValueError("spectrum: K + s I not positive definite for any shift; K not symmetric?")

    class _Inverse:
        shape = Md.shape
        dtype = torch.float64
        device = Md.device

        def matmul(self, X: Tensor) -> Tensor:
            return torch.cholesky_solve(X, L)

    top = topk_eigh(_Inverse(), 1, tol=1e-6, method="krylov", seed=0)
    return 1.0 / float(top.values[0]) - s


def _count_below(M: Tensor, tau: float) -> int:
    """#{j : lambda_j < tau} from the inertia of ``LDL^T = K - tau I`` (Sylvester)."""
    Md = M.double() - tau * torch.eye(M.shape[0], dtype=torch.float64, device=M.device)
    LD, piv = torch.linalg.ldl_factor(Md)
    d = LD.diagonal().cpu().tolist()
    sub = LD.diagonal(-1).cpu().tolist()
    piv = piv.cpu().tolist()
    count, i, n = 0, 0, len(d)
    while i < n:
        if piv[i] > 0 or i + 1 == n:
            count += d[i] < 0
            i += 1
        else:  # 2x2 block [[d_i, e], [e, d_i+1]] (Bunch-Kaufman): signs of its two eigenvalues
            a, c, e = d[i], d[i + 1], sub[i]
            det = a * c - e * e
            count += 1 if det < 0 else (2 if a + c < 0 else 0)
            i += 2
    return count
