"""Summaries of a kernel's spectrum: extremes, condition number, ranks, power-law decay.

For K (PSD, [n, n] or a full kernel [N, C, N, C] reshaped to [N*C, N*C]) with eigenvalues
``lambda_1 >= ... >= lambda_n``:

- ``condition_number = (lambda_1 + ridge) / (lambda_n + ridge)``; ``inf`` when K is numerically
  singular (``rank < n``) and ``ridge == 0``. Afzal et al. (NeurIPS 2025) tie the condition
  number at initialization to the training loss and accuracy of fine-tuning. Across subsets
  of layers of the pretrained MiniLM on SST-2 it did not predict them (``benchmarks/
  exp_real.py``, section (c) of ``RESULTS_real.md``): with one step size for every subset the
  better-conditioned subsets ended with the higher loss (Spearman -0.77), and with the step
  normalised per subset the sign changed between seeds. What held
  there: the loss curve predicted from K (``dynamics.linearized_loss``) tracks fine-tuning,
  more closely as the regularizer grows, and with the head trained kernel regression matches
  fine-tuning's accuracy.
- ``rank = #{j : lambda_j > tau}``, with ``tau`` (``rank_threshold``; its source in
  ``rank_threshold_source``) what K's precision certifies: K is numerically singular when
  ``lambda_n <= tau``. By Weyl's inequality
  ``|lambda_j(K + E) - lambda_j(K)| <= ||E||_2``, so an eigenvalue above a bound on the error E
  that K carries is certified nonzero, and one below it is not. With ``u = eps / 2`` the unit
  roundoff of K's dtype:

  - rounding K's entries gives ``|E_ij| <= u |K_ij|``, hence
    ``||E||_2 <= || |E| ||_2 <= u || |K| ||_2`` (``|K|`` entrywise; its norm is bounded above
    by Collatz-Wielandt, ``max_i (|K| x)_i / x_i`` for ``x > 0`` from power iteration on
    ``|K|``). For a PSD K this is at most ``u * trace(K)``, and far below the
    ``n * eps * lambda_1`` of ``numpy.linalg.matrix_rank`` when the spectrum is not flat;
  - a K computed in its own precision also carries the error of that computation: a Gram
    ``J J^T`` accumulated over P terms errs by up to ``P u |J_i| . |J_j|`` per entry (about
    ``sqrt(P) u`` for independent roundings; Higham & Mary, SIAM J. Sci. Comput. 2019), which
    K alone does not reveal. Float32 Grams of rank-deficient J (P up to 2e5) and linft
    kernels of known rank put their spurious eigenvalues within ``1.7 u || |K| ||_2``, so
    the rounding floor takes 8 units: ``(8 u + n eps64) || |K| ||_2``, the ``n eps64`` for
    the fp64 eigensolver's own backward error;
  - K is PSD, so a negative ``lambda_n`` is error that K demonstrably carries
    (``||E||_2 >= -lambda_n``) and its positive counterpart is as large: ``tau`` is the
    larger of the rounding floor and ``2 max(0, -lambda_n)``.

  ``rtol`` overrides all of this with ``tau = rtol * lambda_1`` (e.g. for a kernel whose
  Jacobians were stored in bfloat16, whose error the float32 K does not show).
- ``trace = sum_j K_jj``, ``stable_rank = trace / lambda_1``,
  ``effective_rank = exp(-sum_j p_j log p_j)`` with ``p_j = lambda_j / sum_i lambda_i``
  (Roy & Vetterli 2007; negative rounding-level eigenvalues count as 0).
- ``decay_exponent``: least-squares slope ``alpha`` of ``log lambda_j = c - alpha log j`` over
  ``j in decay_fit_range`` (1-based, inclusive; default: all returned eigenvalues above the rank
  threshold), the power-law summary of the eigenvalue decay that governs early stopping
  (arXiv 2602.13942; Raskutti, Wainwright & Yu 2014).

Computation: up to ``dense_threshold`` (default 8192) every eigenvalue comes from
``torch.linalg.eigvalsh`` in fp64. Above it, ``k`` top eigenvalues come from
:func:`linft.topk_eigh` (each certified to 1e-4 of itself for float32 K, 1e-6 for float64,
down to what the working precision resolves)
and ``lambda_n`` from inverse iteration with a fp64 Cholesky factor,
``lambda_n = s + 1 / lambda_1((K - s I)^{-1})``: ``s`` the rounding floor
``(8 u + n eps64) || |K| ||_2`` when that factorization succeeds (which certifies
``lambda_n`` above it), else the first of ``-2, -20, -200, ...`` times it that succeeds; the
rank of a singular K is then counted by Sylvester's law of inertia from an LDL^T
factorization of ``K - tau I``. The bound on ``|| |K| ||_2`` costs a few passes over K.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from linft.eig import ConvergenceWarning, _check_dense, topk_eigh

__all__ = ["Spectrum", "spectrum"]


@dataclass
class Spectrum:
    """Spectrum summary of a symmetric PSD kernel (see the module docstring for the formulas).

    ``eigenvalues`` (fp64, descending: all of them, or the top ``k``), ``lambda_max``,
    ``lambda_min``, ``condition_number``, ``rank``, ``trace``, ``effective_rank`` (over
    ``eigenvalues``: exact when ``complete``), ``stable_rank``, ``decay_exponent`` and
    ``decay_fit_range`` (1-based inclusive ``(j_first, j_last)``; ``nan`` and ``(0, 0)`` when
    fewer than two eigenvalues are usable), ``ridge``, ``n``, ``rank_threshold`` (``tau``,
    absolute), ``complete`` (whether every eigenvalue was computed) and
    ``rank_threshold_source``: which floor ``tau`` is (the rounding of K, a negative
    ``lambda_n``, or ``rtol``), with its formula. ``certified`` (fp64, an operator's
    spectrum): per eigenvalue a bound on its error relative to itself; ``method``: what found
    them (``"eigvalsh"``, ``"topk_eigh"``, and for an operator ``"gram"``, ``"features"``,
    ``"krylov"`` or ``"dense"``).
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
    rank_threshold_source: str = ""
    certified: Tensor | None = None
    method: str = ""


def spectrum(
    K: Tensor,
    *,
    k: int | None = None,
    ridge: float = 0.0,
    rtol: float | None = None,
    fit_range: tuple[int, int] | None = None,
    dense_threshold: int = 8192,
) -> Spectrum:
    """Spectrum summary of ``K`` ([n, n] or [N, C, N, C], or an operator: see
    ``operator_spectrum``); ``k`` keeps the top k ``eigenvalues``.

    ``ridge >= 0`` enters the condition number only. ``rtol`` overrides the rank threshold with
    ``tau = rtol * lambda_max`` (default: what K's precision certifies, see the module
    docstring), ``fit_range`` sets the 1-based range of the decay fit, and ``dense_threshold``
    the size above which the top-k / Cholesky path replaces dense ``eigvalsh``.
    """
    if not isinstance(K, Tensor) and callable(getattr(K, "matmul", None)):
        return operator_spectrum(K, k=k, ridge=ridge, rtol=rtol, fit_range=fit_range,
                                 dense_threshold=dense_threshold)  # fmt: skip
    M = _as_matrix(K)
    n = M.shape[0]
    if isinstance(k, bool) or (k is not None and (not isinstance(k, int) or not 0 < k <= n)):
        raise ValueError(f"spectrum: k must be an integer in [1, n = {n}] or None, got {k!r}")
    if not ridge >= 0:
        raise ValueError(f"spectrum: ridge must be >= 0, got {ridge}")
    rtol = None if rtol is None else float(rtol)
    trace = float(M.diagonal().double().sum())
    floor, source = precision_floor(M, K.dtype)
    if floor == 0.0:  # K = 0: every eigenvalue is 0, known exactly
        w = torch.zeros(n if k is None else k, dtype=torch.float64, device=M.device)
        lmax = lmin = tau = 0.0
        rank, eigs, complete, entropy_over = 0, w, True, w
    elif n <= dense_threshold or k is None:
        w = torch.linalg.eigvalsh(M.double()).flip(0)
        lmax, lmin = float(w[0]), float(w[-1])
        tau, source = _threshold(floor, source, lmax, lmin, rtol)
        rank = int((w > tau).sum())
        eigs, complete = (w if k is None else w[:k]), True
        entropy_over = w
    else:
        eigs = topk_eigh(M, k, tol=1e-6 if M.dtype == torch.float64 else 1e-4, seed=0).values
        eigs = eigs.double()
        lmax = float(eigs[0])
        lmin = _lambda_min_cholesky(M, floor)
        tau, source = _threshold(floor, source, lmax, lmin, rtol)
        rank = n if lmin > tau else _count_above(M, tau)
        complete, entropy_over = False, eigs
    singular = rank < n or lmin <= 0
    out = summary(eigs, lmax, lmin, singular, rank, trace, tau, source, ridge, n, complete,
                  fit_range, entropy_over)  # fmt: skip
    out.method = "eigvalsh" if complete else "topk_eigh"
    return out


def summary(
    eigs: Tensor, lmax: float, lmin: float, singular: bool, rank: int | None, trace: float,
    tau: float, source: str, ridge: float, n: int, complete: bool,
    fit_range: tuple[int, int] | None, entropy_over: Tensor,
) -> Spectrum:  # fmt: skip
    """The ``Spectrum`` of eigenvalues already found:
    condition number, decay fit, effective and stable ranks."""
    if ridge == 0:
        cond = math.inf if singular else lmax / lmin
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
        rank_threshold_source=source,
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


def _lambda_min_cholesky(M: Tensor, floor: float) -> float:
    """``lambda_n(K)`` by inverse iteration (block Krylov on ``(K - s I)^{-1}``), fp64."""
    Md = M.double()
    eye = torch.eye(Md.shape[0], dtype=torch.float64, device=Md.device)
    # s = floor: success certifies lambda_n > floor and leaves no cancellation in s + 1/mu.
    # Else K is singular at its precision and the smallest shift K + |s| I that factors
    # resolves lambda_n to about 1e-6 |s|, within 10x of |lambda_n| or of the floor.
    s, L, limit = floor, None, 4.0 * abs_norm_bound(M) + 1.0  # beyond ||K||_2: K + |s| I is PD
    while L is None:
        L, info = torch.linalg.cholesky_ex(Md - s * eye)
        if int(info) != 0:
            L = None
            s = -2.0 * floor if s > 0 else 10.0 * s
            if -s > limit:
                raise ValueError(
                    "spectrum: K - s I not positive definite for any shift; K not symmetric?"
                )

    class _Inverse:
        shape = Md.shape
        dtype = torch.float64
        device = Md.device

        def matmul(self, X: Tensor) -> Tensor:
            return torch.cholesky_solve(X, L)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        top = topk_eigh(_Inverse(), 1, tol=1e-6, method="krylov", seed=0)
    if not top.converged and s > 0:
        # Singular K (s < 0): lambda_n is rounding noise, needed only to about its size.
        warnings.warn(
            f"spectrum: lambda_min is known only to a relative {float(top.errors[0]):.2g} "
            "(a cluster at the bottom of the spectrum); use a larger dense_threshold for "
            "every eigenvalue from eigvalsh",
            RuntimeWarning,
            stacklevel=3,
        )
    return s + 1.0 / float(top.values[0])


def _count_above(M: Tensor, tau: float) -> int:
    """#{j : lambda_j > tau} from the inertia of ``LDL^T = K - tau I`` (Sylvester)."""
    Md = M.double() - tau * torch.eye(M.shape[0], dtype=torch.float64, device=M.device)
    LD, piv = torch.linalg.ldl_factor(Md)
    d = LD.diagonal().cpu().tolist()
    sub = LD.diagonal(-1).cpu().tolist()
    piv = piv.cpu().tolist()
    count, i, n = 0, 0, len(d)
    while i < n:
        if piv[i] > 0 or i + 1 == n:
            count += d[i] > 0
            i += 1
        else:  # 2x2 block [[d_i, e], [e, d_i+1]] (Bunch-Kaufman): signs of its two eigenvalues
            a, c, e = d[i], d[i + 1], sub[i]
            det = a * c - e * e
            if det < 0:
                count += 1
            elif a + c > 0:
                count += 2 if det > 0 else 1
            i += 2
    return count


# ----------------------------------------------------------------- the precision floor

# Units of roundoff of K's dtype in the floor: spurious eigenvalues of float32 Grams of
# rank-deficient J reached 1.7 u || |K| ||_2 (P up to 2e5; the module docstring).
_ROUNDING_UNITS = 8
_EPS64 = torch.finfo(torch.float64).eps


def abs_norm_bound(M: Tensor, *, symmetric: bool = True, iters: int = 12) -> float:
    """An upper bound on ``|| |M| ||_2`` (``|M|`` entrywise) of a square M, computed in fp64.

    Symmetric M: ``|M|`` is symmetric and nonnegative, so ``|| |M| ||_2`` is its Perron root,
    and for any ``x > 0``, ``rho(|M|) <= max_i (|M| x)_i / x_i`` (Collatz-Wielandt); ``x = 1``
    gives the largest row sum, and steps of power iteration tighten it to within 5% (or
    ``iters`` steps). Otherwise ``sqrt(||M||_1 ||M||_inf)``. Row blocks bound the temporary
    memory; ``(1 + n eps64)`` covers the rounding of the fp64 sums.
    """
    n = M.shape[0]
    rows = max(1, (1 << 22) // max(1, n))
    if not symmetric:
        cols = torch.zeros(n, dtype=torch.float64, device=M.device)
        row_max = 0.0
        for i in range(0, n, rows):
            a = M[i : i + rows].double().abs()
            cols += a.sum(0)
            row_max = max(row_max, float(a.sum(1).max()))
        return math.sqrt(float(cols.max()) * row_max) * (1 + n * _EPS64)
    x = torch.ones(n, dtype=torch.float64, device=M.device)
    best = math.inf
    for _ in range(iters):
        y = torch.cat([M[i : i + rows].double().abs() @ x for i in range(0, n, rows)])
        best = min(best, float((y / x).max()))
        top = float(y.max())
        if top == 0.0:
            return 0.0
        lower = float((x * y).sum() / (x * x).sum())  # Rayleigh quotient: rho(|M|) >= it
        if best <= 1.05 * lower:
            break
        x = (y / top).clamp_min(1e-12)
    return best * (1 + n * _EPS64)


def precision_floor(M: Tensor, dtype: torch.dtype, *, symmetric: bool = True) -> tuple[float, str]:
    """``((8 u + n eps64) || |K| ||_2, its description)``: the error K carries at its precision.

    ``u`` is the unit roundoff of ``dtype`` (the dtype K came in; 0 for integers, which are
    exact). By Weyl's inequality no eigenvalue of K within it of 0 is certified nonzero; see
    the module docstring for the terms.
    """
    n = M.shape[0]
    u = torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0
    bound = abs_norm_bound(M, symmetric=symmetric)
    name = str(dtype).replace("torch.", "")
    what = f"(8 u + n eps64) || |K| ||_2, u = unit roundoff of {name}"
    return (_ROUNDING_UNITS * u + n * _EPS64) * bound, f"rounding of K: {what}"


def _threshold(
    floor: float, source: str, lmax: float, lmin: float, rtol: float | None
) -> tuple[float, str]:
    """``tau`` and its source: ``rtol * lambda_max`` if given, else the larger of the floor
    and twice the error a negative ``lambda_n`` shows."""
    if rtol is not None:
        return rtol * max(lmax, 0.0), f"rtol * lambda_max, rtol = {rtol:.3g}"
    if -2.0 * lmin > floor:
        return -2.0 * lmin, "negative eigenvalue: 2 |lambda_min|, error K demonstrably carries"
    return floor, source


# ----------------------------------------------------------------- operators


def operator_spectrum(
    A,
    *,
    k: int | None = None,
    ridge: float = 0.0,
    rtol: float | None = None,
    fit_range: tuple[int, int] | None = None,
    dense_threshold: int = 8192,
    tol: float | None = None,
) -> Spectrum:
    """``spectrum`` of an operator: ``shape``, ``dtype``, ``matmul(X)`` and ``trace()``; what
    else it offers picks the method (by what it can do, never by its type):

    - ``num_features`` P < n with ``feature_gram()`` (``A = F F^T``, P <= ``GRAM_LIMIT``):
      every eigenvalue, from one pass over F and an fp64 ``eigh`` of ``F^T F`` (P x P)
      padded with the n - P zeros of A (``complete``; K singular when P < n).
    - else, ``k=None`` and n <= ``dense_threshold``: ``to_dense()`` and the dense path.
    - else the top ``k`` from ``topk_eigh`` (residual ``tol``, default 1e-6 for float64
      products, 1e-5 for float32): of ``feature_kernel()`` (``F^T F``, whose product reads F
      once: K's nonzero eigenvalues at one pass over F per product, ``method="features"``)
      where it is offered with ``k <= P``, else of the operator itself (``"krylov"``: two
      passes per product for ``J (J^T X)``); and ``lambda_min``: 0 when P < n is known
      (rank <= P), else ``topk_eigh(largest=False)`` on the operator. Effective rank over
      the top k then. The trace is ``trace()`` (``linft.ntk_operator``: kept from the J pass).

    ``certified``: per eigenvalue, the bound on its error relative to itself; ``method``:
    which of these gave the values.

    The floor ``tau`` is ``spectrum``'s rounding floor with ``|| |K| ||_2 <= trace(K)``
    (``|K_ij| <= sqrt(K_ii K_jj)`` for a PSD K): ``(8 u + n eps64) trace(K)`` with ``u``
    the unit roundoff of the operator's dtype, raised to the resolution of ``lambda_min``
    (its residual times ``||K||_2``), or ``rtol * lambda_max``. ``lambda_min <= tau``:
    singular. ``rank``: n above the floor, the count of the top-k eigenvalues above ``tau``
    when the k-th is below it, else None (only every eigenvalue would tell). Every process
    of a sharded operator (``linft.KernelShard``, ``JacobianShard.kernel()``) gets the same
    answer.
    """
    from .eig import features_route, gram_route

    shape = tuple(getattr(A, "shape", ()))
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
        raise ValueError(f"spectrum: an operator must have a square shape (n, n), got {shape}")
    n = int(shape[0])
    if isinstance(k, bool) or (k is not None and (not isinstance(k, int) or not 0 < k <= n)):
        raise ValueError(f"spectrum: k must be an integer in [1, n = {n}] or None, got {k!r}")
    if not ridge >= 0:
        raise ValueError(f"spectrum: ridge must be >= 0, got {ridge}")
    rtol = None if rtol is None else float(rtol)
    dtype = torch.float64 if getattr(A, "dtype", None) == torch.float64 else torch.float32
    P = getattr(A, "num_features", None)
    if gram_route(A, n):
        return _gram_spectrum(A, n, k, ridge, rtol, fit_range, dtype)
    if k is None:
        if n > dense_threshold or not callable(getattr(A, "to_dense", None)):
            raise ValueError(
                f"spectrum of an operator with n = {n} rows (dense_threshold = "
                f"{dense_threshold}, to_dense: {callable(getattr(A, 'to_dense', None))}): pass "
                "k= (the top eigenvalues to compute)"
            )
        M = A.to_dense()
        return spectrum((M + M.T) * 0.5, ridge=ridge, rtol=rtol, fit_range=fit_range)
    if not callable(getattr(A, "trace", None)):
        raise TypeError("spectrum: an operator needs trace() (sum of its diagonal) for k=...")
    tol = (1e-6 if dtype == torch.float64 else 1e-5) if tol is None else float(tol)
    low_rank = isinstance(P, int) and P < n  # rank <= P < n: lambda_min = 0 exactly
    # Values only: F^T F (one pass over F per product) has K's nonzero eigenvalues
    features = features_route(A) and k <= P and P > 256
    top_of = A.feature_kernel() if features else A
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # how well lambda_min is resolved is judged below
        top = topk_eigh(top_of, k, tol=tol, seed=0,
                        method="krylov" if features or n > 256 else "auto")  # fmt: skip
        bottom = None if low_rank else topk_eigh(A, 1, largest=False, tol=tol, seed=1)
    if not top.converged:
        warnings.warn(
            f"spectrum: the top {k} eigenvalues are certified only to a relative "
            f"{float(top.errors.max()):.2g} (tol {tol:g})",
            ConvergenceWarning,
            stacklevel=3,
        )
    eigs = top.values.double().cpu()
    lmax = float(eigs[0])
    lmin = 0.0 if bottom is None else float(bottom.values[0])
    trace = float(A.trace())
    u = torch.finfo(dtype).eps / 2
    rounding = (8 * u + n * _EPS64) * max(trace, 0.0)
    resolved = 0.0 if bottom is None else float(bottom.residuals[0]) * max(top.norm, abs(lmax))
    floor, source = (
        max(rounding, resolved),
        (
            f"rounding of K: (8 u + n eps64) trace(K), u = unit roundoff of {dtype}"
            if rounding >= resolved
            else "resolution of lambda_min: its residual times ||K||_2"
        ),
    )
    tau, source = _threshold(floor, source, lmax, lmin, rtol)
    if lmin > tau:
        rank = n
    elif float(eigs[-1]) <= tau:
        rank = int((eigs > tau).sum())
    else:
        rank = None
    out = summary(eigs, lmax, lmin, lmin <= tau, rank, trace, tau, source, ridge, n, k == n,
                  fit_range, eigs)  # fmt: skip
    out.certified = top.errors.cpu()
    out.method = "features" if features else top.method
    return out


def _gram_spectrum(A, n: int, k, ridge, rtol, fit_range, dtype) -> Spectrum:
    """Every eigenvalue of ``A = F F^T`` from ``F^T F`` (``operator_spectrum``)."""
    G = A.feature_gram().double()
    w = torch.linalg.eigvalsh((G + G.T) * 0.5).flip(0).cpu()
    P = w.numel()
    w = torch.cat([w, w.new_zeros(n - P)])
    trace = float(G.diagonal().sum())  # trace(F^T F) = trace(F F^T)
    u = torch.finfo(dtype).eps / 2
    floor = (_ROUNDING_UNITS * u + n * _EPS64) * max(trace, 0.0)
    source = (
        f"rounding of K: (8 u + n eps64) trace(K), u = unit roundoff of "
        f"{str(dtype).replace('torch.', '')}"
    )
    lmax, lmin = float(w[0]), float(w[-1])
    tau, source = _threshold(floor, source, lmax, lmin, rtol)
    rank = int((w > tau).sum())
    eigs = w if k is None else w[:k]
    out = summary(eigs, lmax, lmin, rank < n or lmin <= 0, rank, trace, tau, source, ridge, n,
                  True, fit_range, w)  # fmt: skip
    # eigh in fp64 of a Gram accumulated in fp64 is backward stable: each eigenvalue to
    # P eps64 ||G|| (Weyl), relative to itself
    bound = P * _EPS64 * max(lmax, 0.0)
    out.certified = torch.where(eigs > 0, bound / eigs.clamp_min(1e-300), math.inf)
    out.method = "gram"
    return out
