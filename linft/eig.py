"""Top-k eigenpairs of a symmetric matrix or operator: randomized block Krylov, Nystrom, dense.

``topk_eigh`` finds the k largest (or smallest) eigenpairs of a symmetric ``A`` given as a dense
tensor or as any object with ``shape`` and ``matmul(X) -> A @ X`` (e.g. ``K @ X = J (J^T X)``
without forming K). Methods:

- ``"krylov"``: randomized block Krylov iteration with Rayleigh-Ritz (Musco & Musco, *Randomized
  Block Krylov Methods for Stronger and Faster Approximate Singular Value Decomposition*,
  NeurIPS 2015). A block of ``b = k + p`` Gaussian vectors is grown into the basis
  ``[Q, A Q, ..., A^q Q]`` (orthonormalised block by block), ``H = V^T A V`` is solved in fp64,
  and the iteration restarts from the best ``b`` Ritz vectors (a thick restart whose ``A Q`` is
  known, ``A U = (A V) S``) until every returned pair meets ``tol`` in residual
  (``||A u - theta u|| / ||A||_2``) and in its certified eigenvalue error relative to itself
  (:func:`topk_eigh` gives the bound).
- ``"nystrom"``: the stable shifted Nystrom approximation of a PSD matrix (Tropp, Yurtsever,
  Udell & Cevher, *Fixed-Rank Approximation of a Positive-Semidefinite Matrix from Streaming
  Data*, NeurIPS 2017, Alg. 3): ``Y_nu = A Omega + nu Omega``, ``C = chol(Omega^T Y_nu)``,
  ``U Sigma = svd(Y_nu C^{-1})``, ``Lambda = max(Sigma^2 - nu, 0)``; repeated with
  ``Omega <- U`` (subspace iteration) until the pairs meet ``tol`` as for ``"krylov"``. One
  product per step.
- ``"dense"``: ``torch.linalg.eigh`` in fp64 (exact; used by ``"auto"`` when the Krylov basis
  would be a large fraction of n).
- ``"gram"``: for an operator ``A = F F^T`` that offers its ``P x P`` Gram ``F^T F``
  (``num_features``, ``feature_gram()``, ``feature_matmul(U)``; ``linft.ntk_operator`` with
  F = J) and ``P < n``: ``F^T F`` and ``F F^T`` share their nonzero eigenvalues, so one fp64
  ``eigh`` of ``P x P`` gives all of them and ``F u / sqrt(w)`` the vectors. When F is read
  from memory or disk, passes over F are the cost: 4 here (the Gram, the vectors, one
  certifying product), against 2 per product for ``"krylov"`` (``(1 + 3)`` products of a
  block per restart cycle, plus one to certify). ``"auto"`` takes it whenever it applies
  (``P <= GRAM_LIMIT``, largest, ``k <= P``).
- ``"features"``: for an operator ``A = F F^T`` that offers ``feature_kernel()`` (``F^T F``
  as an operator ``[P, P]`` whose product reads F once) and ``feature_matmul(U)``: block
  Krylov on ``F^T F`` (same nonzero eigenvalues, each certified there), then the vectors
  ``F u / sqrt(theta)`` (one pass) certified on A (one product: two passes). Passes over F:
  one per product against two for ``"krylov"`` on A, plus three. ``"auto"`` takes it where
  ``"gram"`` does not apply (P above ``GRAM_LIMIT``, or ``P >= n``), largest, ``k <= P``.

Three steps are torch ops of the C++/CUDA extension (``torch.ops.linft``): ``symm_matmul``,
``orthonormalize`` and ``rayleigh_ritz``. The functions of the same names here are their
pure-torch twins (same signatures, same algorithms) used when the extension is absent.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ConvergenceWarning",
    "Eig",
    "orthonormalize",
    "rayleigh_ritz",
    "symm_matmul",
    "topk_eigh",
]

_METHODS = ("auto", "krylov", "nystrom", "dense", "gram", "features")
# Largest P whose P x P Gram (float64) and eigh the "gram" method takes on (2 GiB).
GRAM_LIMIT = 16384
_BACKENDS = ("auto", "extension", "torch")
_DEPTH = 3  # Krylov blocks added per restart cycle: basis of at most (1 + _DEPTH) * b columns
_NOISE = 64  # eps(dtype) ||A||_2: residuals below this may be the products' rounding


class ConvergenceWarning(UserWarning):
    """``topk_eigh`` stopped before every pair met ``tol``."""


@dataclass
class Eig:
    """Eigenpairs found by :func:`topk_eigh`.

    ``values`` [k] (descending for ``largest=True``, ascending for ``largest=False``),
    ``vectors`` [n, k] orthonormal, ``residuals`` [k] = ``||A v - lambda v|| / ||A||_2`` with
    ``A v`` recomputed for the returned pairs and ``||A||_2`` estimated by ``norm`` (the largest
    |Ritz value| seen, a lower bound, so residuals are never understated by it),
    ``errors`` [k] (fp64): a bound on ``|lambda - value| / |value|`` for the eigenvalue
    ``lambda`` of A nearest each value (``inf`` for a value 0 with a nonzero residual; see
    :func:`topk_eigh`), ``iterations`` (restart cycles; 1 for ``"dense"``), ``converged``
    (every pair met ``tol``, see :func:`topk_eigh`),
    ``matmuls`` (products with A, one per block of columns), ``method`` and ``backend`` used,
    and ``product``: how A was multiplied (``"symmetric"``, ``"triton"``, ``"gemm"``,
    ``"operator"``, or ``"none"`` when no product was taken).
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    iterations: int
    converged: bool
    matmuls: int = 0
    norm: float = 0.0
    method: str = ""
    backend: str = ""
    product: str = ""
    errors: Tensor | None = None


# ---------------------------------------------------------------- pure-torch twins of the ops


def symm_matmul(A: Tensor, X: Tensor, tile: int = 256) -> Tensor:
    """``A @ X`` for symmetric A, reading only tiles on or above the diagonal.

    Each off-diagonal tile ``A_IJ`` (I < J) gives ``Y_I += A_IJ X_J`` and ``Y_J += A_IJ^T X_I``;
    tiles below the diagonal are never read. Twin of ``torch.ops.linft.symm_matmul``.
    """
    _check_matmul_inputs(A, X, tile)
    n = A.shape[0]
    Y = torch.zeros_like(X)
    for i0 in range(0, n, tile):
        i1 = min(n, i0 + tile)
        Y[i0:i1] += A[i0:i1, i0:i1] @ X[i0:i1]
        for j0 in range(i1, n, tile):
            j1 = min(n, j0 + tile)
            a = A[i0:i1, j0:j1]
            Y[i0:i1] += a @ X[j0:j1]
            Y[j0:j1] += a.T @ X[i0:i1]
    return Y


def _check_matmul_inputs(A: Tensor, X: Tensor, tile: int) -> None:
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"symm_matmul: A must be a square matrix [n, n], got {tuple(A.shape)}")
    if X.dim() != 2 or X.shape[0] != A.shape[0]:
        raise ValueError(f"symm_matmul: X must be [n, m] with n = {A.shape[0]}, got {X.shape}")
    if A.dtype != X.dtype or A.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"symm_matmul: A, X must share float32/float64, got {A.dtype}, {X.dtype}")
    if tile <= 0:
        raise ValueError(f"symm_matmul: tile must be positive, got {tile}")


def _project_out(W: Tensor, V: Tensor) -> Tensor:
    return W if V.shape[1] == 0 else W - V @ (V.T @ W)


def _cholesky_qr(W: Tensor, min_diag: float, max_cond: float) -> Tensor | None:
    wd = W.double()
    L, info = torch.linalg.cholesky_ex(wd.T @ wd)
    if int(info) != 0:
        return None
    d = L.diagonal()
    dmin, dmax = float(d.min()), float(d.max())
    if not dmin > min_diag or dmax > max_cond * dmin:
        return None
    return torch.linalg.solve_triangular(L.T, wd, upper=True, left=False).to(W.dtype)


def _householder_drop(W: Tensor, V: Tensor, min_diag: float) -> Tensor:
    Q, R = torch.linalg.qr(W, mode="reduced")
    Q = Q[:, R.diagonal().abs() > min_diag]
    # Dividing by small R_ii amplifies what was left of span(V): keep the columns that are
    # mostly new after projecting once more, and re-orthonormalize them; twice, since the
    # re-orthonormalization divides again.
    for _ in range(2):
        Q = _project_out(Q, V)
        Q = Q[:, torch.linalg.vector_norm(Q, dim=0) > 0.5]
        if Q.shape[1] == 0:
            return Q
        Q = torch.linalg.qr(Q, mode="reduced")[0]
    return Q[:, : W.shape[0] - V.shape[1]]  # the complement of span(V) holds no more


def orthonormalize(W: Tensor, V: Tensor, drop_tol: float) -> Tensor:
    """Orthonormal basis of the part of span(W) orthogonal to span(V).

    Two block Gram-Schmidt passes against the orthonormal V ("twice is enough"), then
    CholeskyQR2 (Yamamoto et al. 2015) with the Gram matrix and the solve in fp64; when that is
    unsafe (cond > 1e6 or a direction below ``drop_tol * max_j ||W_j||``) Householder QR, keeping
    only directions with ``|R_ii| > drop_tol * max_j ||W_j||`` that keep more than half their
    norm when projected against V once more. May return fewer columns than W (none when span(W)
    lies in span(V)). Twin of ``torch.ops.linft.orthonormalize``.
    """
    if W.dim() != 2 or V.dim() != 2 or W.shape[0] != V.shape[0]:
        raise ValueError(f"orthonormalize: W [n, b], V [n, c] expected, got {W.shape}, {V.shape}")
    n = W.shape[0]
    if W.shape[1] == 0 or V.shape[1] >= n:
        return W.new_empty(n, 0)
    scale = float(torch.linalg.vector_norm(W, dim=0).max())
    if not scale > 0.0:
        return W.new_empty(n, 0)
    w = _project_out(_project_out(W, V), V)
    min_diag = drop_tol * scale
    q = _cholesky_qr(w, min_diag, 1e6)
    if q is not None:
        q2 = _cholesky_qr(_project_out(q, V), 0.5, 2.0)
        if q2 is not None:
            return q2
    return _householder_drop(w, V, min_diag)


def rayleigh_ritz(
    V: Tensor, AV: Tensor, k: int, largest: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ritz pairs of A on span(V): ``H = V^T (A V)`` in fp64, ``H = S diag(theta) S^T``.

    Returns the ``k`` largest (or smallest) Ritz values ``theta`` (fp64, in that order),
    ``U = V S_k``, ``A U = (A V) S_k`` (no product with A) and ``max |theta|`` over all Ritz
    values (fp64 scalar). Twin of ``torch.ops.linft.rayleigh_ritz``.
    """
    c = V.shape[1]
    if c == 0 or k <= 0:
        raise ValueError(f"rayleigh_ritz: need a non-empty basis and k > 0, got {c} columns, k={k}")
    kk = min(k, c)
    H = V.double().T @ AV.double()
    theta, S = torch.linalg.eigh((H + H.T) * 0.5)
    norm_est = theta.abs().max()
    idx = torch.arange(c - 1, c - 1 - kk, -1) if largest else torch.arange(kk)
    idx = idx.to(theta.device)
    sel = S[:, idx].to(V.dtype)
    return theta[idx], V @ sel, AV @ sel, norm_est


# ---------------------------------------------------------------- the operator A


_SYMM_TILE = 256  # CPU tile of the extension's symmetric product (the CUDA kernel's is fixed)
_PROBE_MIN_N = 2048  # below this the products are cheap: one GEMM, no timing
_PRODUCT_CHOICE: dict[tuple, str] = {}  # (device, dtype, n and m size classes) -> product
_PRODUCT_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # a candidate's error vs GEMM


def _timed(mm, X: Tensor) -> tuple[float, Tensor]:
    """(wall time, result) of one ``mm(X)`` after a warm-up call (allocations, compiling)."""
    sync = torch.cuda.synchronize if X.is_cuda else (lambda: None)
    mm(X)
    sync()
    start = time.perf_counter()
    Y = mm(X)
    sync()
    return time.perf_counter() - start, Y


def _faster_product(A: Tensor, X: Tensor, products: dict) -> str:
    """The fastest accurate dense product for A's device, dtype and size, timed once on A.

    The symmetric products (the extension's op; on CUDA also the Triton kernel, on
    tensor cores) read only half of A, which pays where the product is bound by reading
    A; where it is bound by arithmetic (fp32 on CUDA cores, or a CPU:
    ``benchmarks/RESULTS.md``) one BLAS GEMM is as fast or faster. Timing settles it per
    machine, and a candidate whose result strays from the GEMM's (relative error over
    1e-5 in fp32) is never chosen. The choice is remembered for matrices of the same
    size class.
    """
    if len(products) == 1 or A.shape[0] < _PROBE_MIN_N:
        return "gemm"
    key = (str(A.device), A.dtype, A.shape[0].bit_length(), X.shape[1].bit_length())
    if key not in _PRODUCT_CHOICE:
        seconds, reference = _timed(products["gemm"], X)
        times = {"gemm": seconds}
        scale = float(torch.linalg.norm(reference)) or 1.0
        for name, mm in products.items():
            if name != "gemm":
                seconds, Y = _timed(mm, X)
                if float(torch.linalg.norm(Y - reference)) <= _PRODUCT_RTOL[A.dtype] * scale:
                    times[name] = seconds
        _PRODUCT_CHOICE[key] = min(times, key=times.get)
    return _PRODUCT_CHOICE[key]


def _triton_symm_matmul(A: Tensor):
    """The Triton symmetric product (tensor cores, tf32x3) for a float32 CUDA matrix."""
    if not (A.is_cuda and A.dtype == torch.float32):
        return None
    from .backends import triton_kernels, triton_unavailable_reason

    if triton_unavailable_reason(A.device) is not None:
        return None
    return triton_kernels().symm_matmul


class _Operator:
    """``X -> A X`` in the working dtype, counting the products."""

    def __init__(self, A: Any, backend: str, product: str = "gemm"):
        self.count = 0
        self.product = ""
        if isinstance(A, Tensor):
            self._init_dense(A, backend, product)
        else:
            self._init_operator(A)
            self.product = "operator"

    def _init_dense(self, A: Tensor, backend: str, product: str) -> None:
        _check_dense(A)
        self.dense = A if A.dtype in (torch.float32, torch.float64) else A.float()
        self.n = A.shape[0]
        self.dtype, self.device = self.dense.dtype, A.device
        products = {"gemm": lambda X: self.dense @ X}  # one BLAS call over the whole matrix
        if backend == "extension":
            ops = torch.ops.linft
            products["symmetric"] = lambda X: ops.symm_matmul(self.dense, X, _SYMM_TILE)
        triton_mm = _triton_symm_matmul(self.dense) if product == "auto" else None
        if triton_mm is not None:
            products["triton"] = lambda X: triton_mm(self.dense, X)
        if product != "auto":
            self.product, self._mm = product, products[product]
            return

        def first(X: Tensor) -> Tensor:
            self.product = _faster_product(self.dense, X, products)
            self._mm = products[self.product]
            return self._mm(X)

        self._mm = first

    def _init_operator(self, A: Any) -> None:
        shape = tuple(getattr(A, "shape", ()))
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(
                f"topk_eigh: A must be a square matrix [n, n] or an operator with shape (n, n) "
                f"and matmul(X); got shape {shape}"
            )
        if not callable(getattr(A, "matmul", None)):
            raise TypeError("topk_eigh: an operator A needs a method matmul(X) -> A @ X")
        self.dense = None
        self.n = int(shape[0])
        op_dtype = getattr(A, "dtype", None)
        self.dtype = torch.float64 if op_dtype == torch.float64 else torch.float32
        self.device = torch.device(getattr(A, "device", "cpu"))
        cast = op_dtype if isinstance(op_dtype, torch.dtype) else self.dtype
        self._mm = lambda X: A.matmul(X.to(cast)).to(self.dtype)

    def __call__(self, X: Tensor) -> Tensor:
        self.count += 1
        Y = self._mm(X)
        if tuple(Y.shape) != tuple(X.shape):
            raise ValueError(f"topk_eigh: A.matmul(X) returned {tuple(Y.shape)}, not {X.shape}")
        return Y

    def materialize(self) -> Tensor:
        """A in fp64 (dense path); an operator is applied to the identity, in column blocks."""
        if self.dense is not None:
            M = self.dense.double()
        else:
            eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
            M = torch.cat([self(eye[:, j : j + 1024]) for j in range(0, self.n, 1024)], 1)
            M = M.double()
        return (M + M.T) * 0.5


def _check_dense(A: Tensor) -> None:
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(
            f"topk_eigh: A must be a square matrix [n, n], got shape {tuple(A.shape)}; "
            "reshape a [N, C, N, C] kernel with K.reshape(N * C, N * C)"
        )
    if not A.is_floating_point():
        raise TypeError(f"topk_eigh: A must be a floating-point tensor, got {A.dtype}; cast it")
    amax = float(A.abs().max()) if A.numel() else 0.0
    if not math.isfinite(amax):
        raise ValueError("topk_eigh: A contains NaN or Inf")
    # Row blocks bound the temporary memory of A - A^T.
    asym = 0.0
    for i0 in range(0, A.shape[0], 4096):
        blk = A[i0 : i0 + 4096] - A[:, i0 : i0 + 4096].T
        asym = max(asym, float(blk.abs().max()))
    eps = torch.finfo(A.dtype).eps
    if asym > 1e3 * eps * amax:
        raise ValueError(
            f"topk_eigh: A is not symmetric (max |A - A^T| = {asym:.3g}, max |A| = {amax:.3g}); "
            "pass (A + A.T) / 2"
        )


# ---------------------------------------------------------------- solver

# The start block's seed when none is given (the same K gives the same spectrum every call).
_DEFAULT_SEED = 0


def topk_eigh(
    A: Any,
    k: int,
    *,
    largest: bool = True,
    tol: float = 1e-4,
    method: str = "auto",
    max_iters: int | None = None,
    seed: int | None = None,
    backend: str = "auto",
    oversample: int | None = None,
) -> Eig:
    """The k largest (or smallest) eigenpairs of a symmetric ``A`` to residual ``tol``.

    ``A``: a symmetric tensor [n, n] (float32/float64; others are computed in float32) or an
    object with ``shape == (n, n)`` and ``matmul(X) -> A @ X`` (an optional ``dtype`` attribute
    says which dtype X is cast to; the work is float32 unless it is float64).
    Converged means, for each returned pair ``(theta_j, v_j)``:

    - ``||A v_j - theta_j v_j|| / ||A||_2 <= tol`` (``residuals``), and
    - ``|lambda - theta_j| <= errors_j |theta_j| <= tol |theta_j|`` for the eigenvalue
      ``lambda`` of A nearest ``theta_j``: each value certified to ``tol`` relative to itself,
      unless the working precision stops it short: a pair whose residual norm has stalled
      (not halved since the previous check; always, for ``"dense"``) below
      ``64 max(eps, sqrt(n) eps64) ||A||_2`` is taken as it is (``eps`` of the working dtype:
      float32 residuals bottom out at 2-13 ``eps ||A||_2``; ``sqrt(n) eps64``: the fp64
      evaluation), and its ``errors_j`` says what is certified.

    ``theta_j`` is the Rayleigh quotient of ``v_j``, with ``A v_j`` recomputed in fp64 for a
    dense A (an operator's own product otherwise), and ``errors_j * |theta_j|`` bounds
    ``|lambda - theta_j|`` by ``min(r_j, r_j^2 / delta_j)`` (Kato-Temple; ``r_j`` the residual
    norm, ``delta_j`` the gap from ``theta_j`` to the other Ritz values less their residuals:
    the usual estimate, exact once those bracket the rest of the spectrum), plus the
    product's asymmetry in the basis, the fp64 evaluation (``sqrt(n) eps64 ||A||_2``) and the
    rounding of ``theta_j`` to the working dtype.
    When ``max_iters`` restart cycles (default 50) do not get there a
    :class:`ConvergenceWarning` is raised and ``converged=False``.

    ``method``: ``"auto"`` (``"gram"`` where it applies, else Krylov, or dense ``eigh`` when
    the Krylov basis would exceed n / 2), ``"krylov"``, ``"nystrom"`` (PSD ``A``, ``largest``
    only), ``"dense"``, ``"gram"`` (an operator ``F F^T`` with ``P < n``: module docstring). ``backend``:
    ``"auto"`` (the C++/CUDA extension when loaded, else pure torch), ``"extension"`` (an error
    if it is not loaded) or ``"torch"``. A dense ``A`` is multiplied by the extension's
    symmetric product (half of A read) under ``"extension"``, by one GEMM under ``"torch"``, and
    under ``"auto"`` by the fastest accurate one of these and, for float32 on CUDA, the Triton
    symmetric product, timed once on this device for matrices of this size (``Eig.product`` says
    which). ``oversample``: extra block columns ``p`` (default ``max(10, k // 2)``). ``seed``:
    of the random start block (default 0: the same ``A`` gives the same pairs on every call).
    Values are always sorted: descending for ``largest``, ascending otherwise. See the
    module docstring for the algorithms.
    """
    requested = backend
    backend = _resolve_backend(backend)
    if method not in _METHODS:
        raise ValueError(f"topk_eigh: method must be one of {_METHODS}, got {method!r}")
    product = {"auto": "auto", "extension": "symmetric", "torch": "gemm"}[requested]
    op = _Operator(A, backend, product)
    n = op.n
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"topk_eigh: k must be a positive integer, got {k!r}")
    if k > n:
        raise ValueError(f"topk_eigh: k = {k} exceeds the size n = {n}; ask for k <= {n}")
    if not tol > 0:
        raise ValueError(f"topk_eigh: tol must be positive, got {tol}")
    p = max(10, k // 2) if oversample is None else int(oversample)
    b = min(n, k + max(p, 0))
    gram = gram_route(A, n)
    features = features_route(A) and largest and k <= A.num_features
    if method == "auto":
        if gram and largest and k <= A.num_features:
            method = "gram"
        elif features and 2 * (1 + _DEPTH) * b <= A.num_features:
            method = "features"
        else:
            method = "dense" if n <= 256 or 2 * (1 + _DEPTH) * b > n else "krylov"
    if method == "gram" and not (gram and largest and k <= A.num_features):
        raise ValueError(
            "topk_eigh: method='gram' needs largest=True, k <= P and an operator A = F F^T "
            f"with num_features P < n and P <= {GRAM_LIMIT}, feature_gram() and "
            "feature_matmul(U) (linft.ntk_operator gives one); use method='krylov'"
        )
    if method == "features" and not features:
        raise ValueError(
            "topk_eigh: method='features' needs largest=True, k <= P and an operator A = F F^T "
            "with num_features P, feature_kernel() (F^T F as an operator) and "
            "feature_matmul(U) (linft.ntk_operator gives one); use method='krylov'"
        )
    if method == "nystrom" and not largest:
        raise ValueError("topk_eigh: method='nystrom' finds the largest eigenpairs only")
    max_iters = 50 if max_iters is None else int(max_iters)
    if max_iters <= 0:
        raise ValueError(f"topk_eigh: max_iters must be positive, got {max_iters}")
    # One matrix, one spectrum: the start block is drawn from a fixed seed unless one is given.
    gen = torch.Generator(device=op.device)
    gen.manual_seed(_DEFAULT_SEED if seed is None else int(seed))
    if method == "dense":
        out = _dense(op, k, largest, tol)
    elif method == "gram":
        out = _gram(A, op, k, tol)
    elif method == "features":
        out = _features(A, op, k, tol, max_iters, gen, p, backend)
    else:
        Q0 = torch.randn(n, b, generator=gen, dtype=op.dtype, device=op.device)
        solve = _krylov if method == "krylov" else _nystrom
        out = solve(op, Q0, k, largest, tol, max_iters, _ops(backend))
    out = _ordered(out, largest)
    # "features": the products with F^T F (one pass over F each), then A's own
    out.matmuls = op.count + (out.matmuls if method == "features" else 0)
    out.method, out.backend = method, backend
    out.product = op.product if op.count else "none"  # none: eigh of the matrix itself
    if not out.converged:
        warnings.warn(
            f"topk_eigh: not converged after {out.iterations} iterations ({method}): max "
            f"residual {float(out.residuals.max()):.3g}, max relative eigenvalue error bound "
            f"{float(out.errors.max()):.3g} (tol {tol:g}); raise max_iters or "
            "oversample, loosen tol, or use method='dense'",
            ConvergenceWarning,
            stacklevel=2,
        )
    return out


def _ordered(out: Eig, largest: bool) -> Eig:
    """The pairs by value, descending for ``largest`` (else ascending): the recomputed
    Rayleigh quotients of a (near-)degenerate tail need not keep the Ritz order."""
    order = torch.sort(out.values.double(), descending=largest, stable=True).indices
    if bool((order == torch.arange(order.numel(), device=order.device)).all()):
        return out
    out.values, out.vectors = out.values[order], out.vectors[:, order]
    out.residuals = out.residuals[order]
    if out.errors is not None:
        out.errors = out.errors[order.to(out.errors.device)]
    return out


def _resolve_backend(backend: str) -> str:
    from linft import _ext

    if backend not in _BACKENDS:
        raise ValueError(f"topk_eigh: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "extension" if _ext.available() else "torch"
    if backend == "extension":
        _ext.ops()  # raises with how to build it
    return backend


class _TorchOps:
    symm_matmul = staticmethod(symm_matmul)
    orthonormalize = staticmethod(orthonormalize)
    rayleigh_ritz = staticmethod(rayleigh_ritz)


def _ops(backend: str):
    return torch.ops.linft if backend == "extension" else _TorchOps


def _drop_tol(dtype: torch.dtype) -> float:
    # Keep every nonzero direction: restarted residual blocks are close to rank-deficient and
    # their small directions are what the last digits converge through. NOTE: dropping those
    # below 8 eps stalled fp32 power-law (alpha 0.3) runs at residual 2e-4 for 20+ cycles,
    # keeping them converged in 3. Directions that are only noise are harmless once orthogonal.
    return 0.0


def _residuals(U: Tensor, AU: Tensor, theta: Tensor, norm: float) -> Tensor:
    r = torch.linalg.vector_norm(AU.double() - U.double() * theta.double(), dim=0)
    if norm > 0:
        return r / norm
    return torch.where(r == 0, 0.0, math.inf).to(r)


def _evaluation(n: int, norm: float) -> float:
    """Rounding of ``u^T (A u)`` evaluated in fp64 (``sqrt(n)`` growth of the sums)."""
    return math.sqrt(n) * torch.finfo(torch.float64).eps * norm


def _noise(dtype: torch.dtype, norm: float, n: int) -> float:
    # NOTE: float32 pairs bottom out at residuals of 2-13 eps ||A||_2 (Krylov with products
    # refined in fp64: 2-9; Nystrom: 5-13), set by the rounding of the stored vectors and
    # products rather than by the iteration.
    return _NOISE * max(torch.finfo(dtype).eps * norm, _evaluation(n, norm))


def _value_bounds(theta: Tensor, r: Tensor, other: Tensor, other_r: Tensor) -> Tensor:
    """``min(r_j, r_j^2 / delta_j)``: a bound on ``|lambda - theta_j|`` (Kato-Temple).

    ``delta_j`` is the distance from ``theta_j`` to the nearest other Ritz value (the other
    returned ones, then ``other``) less that value's residual; where it does not exceed
    ``r_j`` only the linear bound holds (Parlett, *The Symmetric Eigenvalue Problem*, 11.5-11.7).
    """
    values = torch.cat([theta, other.to(theta)])
    res = torch.cat([r, other_r.to(r)])
    D = (theta[:, None] - values[None, :]).abs() - res[None, :]
    k = theta.numel()
    D[torch.arange(k), torch.arange(k)] = math.inf
    gap = D.min(1).values if values.numel() > 1 else torch.full_like(theta, math.inf)
    return torch.where(gap > r, r * r / gap.clamp_min(1e-300), r)


def _accepted(
    theta: Tensor, r: Tensor, bound: Tensor, norm: float, tol: float, dtype, n: int, stalled
) -> Tensor:
    """Per pair: residual ``r / ||A|| <= tol``, and value bound ``<= tol |theta|`` unless the
    residual has stalled at the working precision's noise (no iteration certifies more)."""
    res_ok = r <= tol * norm if norm > 0 else r == 0
    at_noise = stalled & (r <= _noise(dtype, norm, n))
    return res_ok & ((bound <= tol * theta.abs()) | at_noise)


def _cheap_check(
    theta, U, AU, k: int, norm: float, tol: float, dtype, prev: Tensor | None
) -> tuple[bool, Tensor, Tensor]:
    """The test on the Ritz pairs as the iteration has them (``A U`` accumulated as
    ``(A V) S``): (passed, residual norms of the first k, which of them stalled: not halved
    since ``prev``, the previous check's)."""
    r = torch.linalg.vector_norm(AU.double() - U.double() * theta.double(), dim=0)
    theta = theta.double().to(r.device)
    bound = _value_bounds(theta[:k], r[:k], theta[k:], r[k:])
    rk = r[:k]
    stalled = rk > 0.5 * prev if prev is not None and prev.shape == rk.shape else rk == 0
    ok = bool(_accepted(theta[:k], rk, bound, norm, tol, dtype, U.shape[0], stalled).all())
    return ok, rk, stalled


def _product64(op, U: Tensor) -> Tensor:
    """``A U`` in float64: a dense A row block by row block (no fp64 copy of A), else ``op``."""
    if op.dense is None:
        return op(U).double()
    op.count += 1
    A, Ud = op.dense, U.double()
    if A.dtype == torch.float64:
        return A @ Ud
    rows = max(1, (1 << 22) // max(1, A.shape[1]))
    return torch.cat([A[i : i + rows].double() @ Ud for i in range(0, A.shape[0], rows)])


def _finish(
    op,
    U: Tensor,
    norm: float,
    iters: int,
    tol: float,
    other: tuple[Tensor, Tensor] | None = None,
    AU: Tensor | None = None,
    AU64: Tensor | None = None,
    stalled: Tensor | None = None,
) -> tuple[Eig, Tensor]:
    """The returned pairs, certified; and ``A U`` in the working dtype (for a restart).

    Values are the Rayleigh quotients ``u^T A u / u^T u`` of the returned vectors with ``A u``
    in fp64 (a dense A; an operator's own product otherwise), which the quadratic bound needs.
    ``other``: the remaining Ritz values and their residuals (gaps); ``AU``: a true product of
    an operator with U, reused instead of a new one; ``AU64``: ``A U`` in fp64, given;
    ``stalled``: which pairs no longer improve (None: all, for a direct solve).
    """
    if AU64 is None:
        AU64 = _product64(op, U) if AU is None or op.dense is not None else AU.double()
    Ud = U.double()
    scale = torch.linalg.vector_norm(Ud, dim=0).clamp_min(1e-300)
    theta = (Ud * AU64).sum(0) / scale**2
    r = torch.linalg.vector_norm(AU64 - Ud * theta, dim=0) / scale
    norm = max(norm, float(theta.abs().max()))
    values = theta.to(op.dtype)
    # A product in the working dtype is not symmetric in the basis: its asymmetry is the part
    # of the product's rounding that enters the Rayleigh quotient.
    H = (Ud / scale).T @ (AU64 / scale)
    asym = (H - H.T).abs().amax(1) if theta.numel() > 1 else torch.zeros_like(theta)
    if other is None:
        other = (theta.new_zeros(0), theta.new_zeros(0))
    bound = _value_bounds(theta, r, other[0].double().to(theta.device), other[1].double())
    bound = bound + asym + _evaluation(U.shape[0], norm) + (theta - values.double()).abs()
    errors = torch.where(bound == 0, 0.0, bound / theta.abs().clamp_min(1e-300))
    errors = torch.where((theta == 0) & (bound > 0), math.inf, errors)
    out = Eig(values, U, _residuals(U, AU64, theta, norm).to(op.dtype), iters, False, norm=norm)
    out.errors = errors  # fp64: a bound is not rounded down to the working dtype
    stalled = torch.ones_like(r, dtype=torch.bool) if stalled is None else stalled.to(r.device)
    accepted = _accepted(theta, r, bound, norm, tol, op.dtype, U.shape[0], stalled)
    out.converged = bool(accepted.all())
    return out, AU64.to(op.dtype)


def _ritz_residuals(U: Tensor, AU: Tensor, theta: Tensor) -> Tensor:
    return torch.linalg.vector_norm(AU.double() - U.double() * theta.double(), dim=0)


def _krylov(op, Q0: Tensor, k: int, largest: bool, tol: float, max_iters: int, ops) -> Eig:
    n, b = Q0.shape
    drop = _drop_tol(op.dtype)
    norm = 0.0
    if not largest:
        # ||A||_2 normalises the residuals: the basis grown towards the bottom of the spectrum
        # underestimates it, so take it from a short solve for the top eigenvalue.
        top = _krylov(op, Q0[:, : min(n, 8)], 1, True, 1e-4, 20, ops)
        norm = max(top.norm, float(top.values.abs().max()))
    Q = ops.orthonormalize(Q0, Q0.new_empty(n, 0), drop)
    AQ = op(Q)
    prev = None
    for it in range(1, max_iters + 1):
        V, AV, cols = [Q], [AQ], Q.shape[1]
        for _ in range(_DEPTH):
            if cols >= n:
                break
            W = ops.orthonormalize(AV[-1], torch.cat(V, 1), drop)
            if W.shape[1] == 0:  # invariant subspace: Rayleigh-Ritz is exact on it
                break
            V.append(W)
            AV.append(op(W))
            cols += W.shape[1]
        theta, U, AU, nrm = ops.rayleigh_ritz(torch.cat(V, 1), torch.cat(AV, 1), b, largest)
        norm = max(norm, float(nrm))
        kk = min(k, U.shape[1])
        passed, prev, stalled = _cheap_check(theta, U, AU, kk, norm, tol, op.dtype, prev)
        if kk == k and (passed or it == max_iters):
            # Rounding accumulated in (A V) S must not pass as converged: certify on A U itself.
            rest = (theta[k:], _ritz_residuals(U[:, k:], AU[:, k:], theta[k:]))
            out, AU_k = _finish(op, U[:, :k], norm, it, tol, rest, stalled=stalled)
            if out.converged or it == max_iters:
                out.rest = rest
                return out
            AU = torch.cat([AU_k, AU[:, k:]], 1)
        Q, AQ = U, AU
    rest = (theta[kk:], _ritz_residuals(U[:, kk:], AU[:, kk:], theta[kk:]))
    out = _finish(op, U[:, :k], norm, it, tol, rest, stalled=stalled)[0]
    out.rest = rest  # the other Ritz values and residuals: gaps for a caller's bounds
    return out


def _nystrom(op, Q0: Tensor, k: int, largest: bool, tol: float, max_iters: int, ops) -> Eig:
    n = Q0.shape[0]
    Omega = ops.orthonormalize(Q0, Q0.new_empty(n, 0), _drop_tol(op.dtype))
    Y = op(Omega)
    eps = torch.finfo(op.dtype).eps
    norm, prev = 0.0, None
    for it in range(1, max_iters + 1):
        lam, U = _nystrom_step(Omega, Y, eps, n)
        norm = max(norm, float(lam[0]))
        AU = op(U)
        lam = lam.to(U.device)
        passed, prev, stalled = _cheap_check(lam, U, AU, k, norm, tol, op.dtype, prev)
        if passed or it == max_iters:
            rest = (lam[k:], _ritz_residuals(U[:, k:], AU[:, k:], lam[k:]))
            out, AU_k = _finish(op, U[:, :k], norm, it, tol, rest, AU[:, :k], stalled=stalled)
            if out.converged or it == max_iters:
                return out
            AU = torch.cat([AU_k, AU[:, k:]], 1)
        Omega, Y = U, AU
    raise AssertionError("unreachable: the last iteration returns")


def _nystrom_step(Omega: Tensor, Y: Tensor, eps: float, n: int) -> tuple[Tensor, Tensor]:
    """Stable Nystrom (Tropp et al. 2017, Alg. 3) from ``Y = A Omega``: (Lambda desc, U)."""
    Yd, Od = Y.double(), Omega.double()
    nu = math.sqrt(n) * eps * float(torch.linalg.matrix_norm(Yd))
    if nu == 0.0:  # A Omega = 0: A vanishes on the sketch
        return Yd.new_zeros(Y.shape[1]), Omega
    Ynu = Yd + nu * Od
    G = Od.T @ Ynu
    L, info = torch.linalg.cholesky_ex((G + G.T) * 0.5)
    if int(info) != 0:
        raise ValueError(
            "topk_eigh: method='nystrom' needs a positive semidefinite A (Cholesky of "
            "Omega^T A Omega failed); use method='krylov'"
        )
    B = torch.linalg.solve_triangular(L.T, Ynu, upper=True, left=False)
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    lam = (S * S - nu).clamp_min(0.0)
    return lam, U.to(Y.dtype)


def _dense(op, k: int, largest: bool, tol: float) -> Eig:
    M = op.materialize()
    w, Vv = torch.linalg.eigh(M)
    n = w.shape[0]
    norm = float(w.abs().max()) if n else 0.0
    idx = torch.arange(n - 1, n - 1 - k, -1) if largest else torch.arange(k)
    idx = idx.to(w.device)
    U = Vv[:, idx].to(op.dtype)
    keep = torch.ones(n, dtype=torch.bool, device=w.device)
    keep[idx] = False
    AU64 = M @ U.double()
    # eigh is backward stable in fp64: the other eigenvalues are as exact as these residuals.
    r = float(torch.linalg.vector_norm(AU64 - U.double() * w[idx], dim=0).max())
    other = (w[keep], torch.full_like(w[keep], r))
    return _finish(op, U, norm, 1, tol, other, AU64=AU64)[0]


def gram_route(A: Any, n: int) -> bool:
    """Whether ``A = F F^T`` offers its ``P x P`` Gram ``F^T F`` (``num_features``,
    ``feature_gram``, ``feature_matmul``) with ``P < n`` and ``P <= GRAM_LIMIT``: then one
    pass over F and one ``eigh`` of ``P x P`` give every nonzero eigenvalue of A."""
    P = getattr(A, "num_features", None)
    return (
        isinstance(P, int)
        and 0 < P < n
        and P <= GRAM_LIMIT
        and callable(getattr(A, "feature_gram", None))
        and callable(getattr(A, "feature_matmul", None))
    )


def _gram(A: Any, op, k: int, tol: float) -> Eig:
    """Top-k pairs of ``A = F F^T`` from ``G = F^T F = U W U^T`` (fp64 eigh): values ``W``,
    vectors ``F u / sqrt(w)``. Passes over F: one for G, one for the vectors, and one
    product with A (two passes) to certify them as every method does (``_finish``)."""
    G = A.feature_gram().double()
    w, U = torch.linalg.eigh((G + G.T) * 0.5)
    w, U = w.flip(0), U.flip(1)
    norm = float(w[0]) if w.numel() else 0.0
    top = w[:k].clamp_min(0.0)
    V = A.feature_matmul(U[:, :k].contiguous()).double()
    V = V / torch.where(top > 0, top.sqrt(), 1.0)
    V = V / torch.linalg.vector_norm(V, dim=0).clamp_min(1e-300)
    # eigh is backward stable in fp64: the other eigenvalues (and the n - P zeros of A) are
    # known to P eps64 ||G||.
    others = torch.cat([w[k:], w.new_zeros(1)])
    spread = torch.full_like(others, w.numel() * torch.finfo(torch.float64).eps * norm)
    return _finish(op, V.to(op.dtype), norm, 1, tol, (others, spread))[0]


def features_route(A: Any) -> bool:
    """Whether ``A = F F^T`` offers ``F^T F`` as an operator (``feature_kernel()``, one pass
    over F per product) and ``feature_matmul(U)`` for the vectors."""
    P = getattr(A, "num_features", None)
    return (
        isinstance(P, int)
        and P > 0
        and callable(getattr(A, "feature_kernel", None))
        and callable(getattr(A, "feature_matmul", None))
    )


def _features(A: Any, op, k: int, tol: float, max_iters: int, gen, p: int, backend: str) -> Eig:
    """Top-k pairs of ``A = F F^T`` by block Krylov on ``G = F^T F`` (one pass over F per
    product): G's Ritz values are A's eigenvalues, its vectors u give A's ``F u / sqrt(theta)``,
    certified on A itself by one product (``_finish``)."""
    G = A.feature_kernel()
    inner = _Operator(G, backend)
    P = inner.n
    Q0 = torch.randn(P, min(P, k + max(p, 0)), generator=gen, dtype=inner.dtype, device=inner.device)
    found = _krylov(inner, Q0, k, True, tol, max_iters, _ops(backend))
    top = found.values.double().clamp_min(0.0)
    V = A.feature_matmul(found.vectors.to(op.dtype).contiguous()).double()
    V = V / torch.where(top > 0, top.sqrt(), 1.0)
    V = V / torch.linalg.vector_norm(V, dim=0).clamp_min(1e-300)
    # The gaps to the rest of the spectrum: G's other Ritz values and their residuals.
    out = _finish(op, V.to(op.dtype), found.norm, found.iterations, tol, found.rest)[0]
    out.matmuls = inner.count  # products with F^T F
    return out
