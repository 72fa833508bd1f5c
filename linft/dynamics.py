"""What the kernel says about fine-tuning: loss curves, kernel regression, LoRA rank.

The linearized model ``f = f_0 + J (theta - theta_0)`` trained by full-batch
gradient descent on ``1/(2N) sum_i ||f(x_i) - y_i||^2 + (lambda/2) ||theta - theta_0||^2``
(Afzal et al., NeurIPS 2025; arXiv 2602.13942) has residuals ``r_t = f_t - y``
(flattened to ``N*C``, row index ``i*C + a``) that follow exactly

    r_{t+1} = [(1 - lr*lambda) I - (lr/N) K] r_t + lr*lambda*r_0,    K = J J^T.

Kernel regression (Malladi et al., ICML 2023) is its long-time limit. Everything
here runs in float64 on small dense kernels; inputs may be float32, and are judged
singular at the precision they came in (:func:`linft.spectrum.precision_floor`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .spectrum import precision_floor

__all__ = ["kernel_regression", "linearized_loss", "min_lora_rank", "steps_to_loss"]

# Kernels from linft are exactly symmetric; a caller's float32 kernel assembled in
# another order can differ from its transpose by a few ulps of its largest entry.
_SYMMETRY_RTOL = 1e-6
# Largest number of (step, mode) products evaluated at once when tabulating a curve.
_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------- inputs


def _as_tensor(K) -> Tensor:
    """K as a tensor; an operator (``linft.ntk_operator``) through its ``to_dense()``: small N."""
    if not isinstance(K, Tensor) and callable(getattr(K, "to_dense", None)):
        K = K.to_dense()
    return torch.as_tensor(K)


def _kernel_matrix(K: Tensor, name: str = "K") -> tuple[Tensor, int | None]:
    """``K`` as a float64 ``[N*C, N*C]`` matrix, and C when the 4-D layout tells it."""
    K = _as_tensor(K)
    if K.dim() == 4:
        n, c, n2, c2 = K.shape
        if n != n2 or c != c2:
            raise ValueError(f"{name} must have shape [N, C, N, C], got {list(K.shape)}")
        K, outputs = K.reshape(n * c, n * c), c
    elif K.dim() == 2 and K.shape[0] == K.shape[1]:
        outputs = None
    else:
        raise ValueError(
            f"{name} must be a square matrix [N*C, N*C] or a kernel [N, C, N, C], "
            f"got shape {list(K.shape)}"
        )
    if K.is_complex():
        raise ValueError(f"{name} must be real, got dtype {K.dtype}")
    K = K.detach().to(dtype=torch.float64)
    _check_finite(K, name)
    return K, outputs


def _check_finite(x: Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} has {bad} non-finite entries (NaN or inf)")


def _targets(y: Tensor, size: int, outputs: int | None, name: str) -> tuple[Tensor, bool]:
    """``y`` as float64 ``[N, C]`` with ``N*C == size``; the flag says it was given as ``[N]``."""
    y = torch.as_tensor(y).detach()
    if y.dim() == 1:
        y, flat = y[:, None], True
    elif y.dim() == 2:
        flat = False
    else:
        raise ValueError(f"{name} must have shape [N, C] or [N], got {list(y.shape)}")
    n, c = y.shape
    if n * c != size or (outputs is not None and outputs != c):
        want = f"[{size // outputs}, {outputs}]" if outputs else f"[N, C] with N*C = {size}"
        raise ValueError(
            f"{name} of shape {list(y.shape)} does not match the kernel: expected {want} "
            f"(a 1-D {name} means C = 1)"
        )
    y = y.to(torch.float64)
    _check_finite(y, name)
    return y, flat


def _symmetrized(K: Tensor) -> Tensor | None:
    """``(K + K^T)/2`` when K is symmetric up to rounding, else None."""
    scale = float(K.abs().max()) if K.numel() else 0.0
    if float((K - K.T).abs().max()) > _SYMMETRY_RTOL * scale:
        return None
    return 0.5 * (K + K.T)


def _check_ridge(ridge: float) -> float:
    ridge = float(ridge)
    if not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    return ridge


# ----------------------------------------------------------------------- loss curves


@dataclass
class _Modes:
    """The residual in the eigenbasis of K: ``c_i(t) = c*_i + q_i^t (c_i - c*_i)``."""

    q: Tensor  # 1 - lr*(lambda + mu_i/N), the per-mode contraction factor
    c_star: Tensor  # lambda / (lambda + mu_i/N) * c_i, the fixed point
    gap: Tensor  # c_i - c*_i
    n_samples: int

    def losses(self, t: Tensor) -> Tensor:
        """``1/(2N) sum_i c_i(t)^2`` for each step in ``t`` (float64)."""
        out = torch.empty(t.numel(), dtype=torch.float64)
        rows = max(1, _CHUNK_ELEMENTS // max(1, self.q.numel()))
        for s in range(0, t.numel(), rows):
            tt = t[s : s + rows, None].to(torch.float64)
            coeff = self.c_star + torch.pow(self.q, tt) * self.gap
            out[s : s + rows] = coeff.square().sum(1) / (2 * self.n_samples)
        return out

    def floor(self) -> float:
        """The limit of the loss for a stable step size."""
        return float(self.c_star.square().sum() / (2 * self.n_samples))


def _check_lr(lr: float) -> float:
    lr = float(lr)
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    return lr


def _warn_if_unstable(lr: float, ridge: float, mu_max: float, n: int) -> None:
    rate = ridge + mu_max / n
    if rate > 0 and lr > 2.0 / rate:
        warnings.warn(
            f"lr = {lr:.6g} makes the linearized dynamics diverge: the stable bound is "
            f"2/(lambda + mu_max/N) = {2.0 / rate:.6g} (lambda = {ridge:.6g}, "
            f"mu_max = {mu_max:.6g}, N = {n})",
            RuntimeWarning,
            stacklevel=3,
        )


def _modes(K: Tensor, residual0: Tensor, lr: float, ridge: float) -> _Modes | None:
    """Eigen-solution of the dynamics; None when K is not symmetric."""
    precision = torch.as_tensor(K).dtype
    K, outputs = _kernel_matrix(K)
    r0, _ = _targets(residual0, K.shape[0], outputs, "residual0")
    Ks = _symmetrized(K)
    if Ks is None:
        return None
    n = r0.shape[0]
    mu, V = torch.linalg.eigh(Ks)
    # An eigenvalue within the error K carries at its precision is not told apart from 0
    # (Weyl): its mode stays put instead of moving at a rate made of rounding (growing, for
    # a negative one, when ridge = 0).
    floor, _ = precision_floor(Ks, precision)
    mu = torch.where(mu.abs() <= floor, 0.0, mu)
    _warn_if_unstable(lr, ridge, float(mu[-1]), n)
    c = V.T @ r0.reshape(-1)
    rate = ridge + mu / n
    # With lambda = 0 a null mode never moves (q = 1), so its fixed point is irrelevant.
    shrink = torch.where(rate != 0, ridge / torch.where(rate != 0, rate, 1.0), 0.0)
    c_star = shrink * c
    return _Modes(q=1.0 - lr * rate, c_star=c_star, gap=c - c_star, n_samples=n)


def _iterate(K: Tensor, residual0: Tensor, lr: float, steps: int, ridge: float) -> Tensor:
    """The recursion itself, for non-symmetric kernels (e.g. asymmetric SignGD)."""
    K, outputs = _kernel_matrix(K)
    r0, _ = _targets(residual0, K.shape[0], outputs, "residual0")
    n = r0.shape[0]
    radius = float(torch.linalg.eigvals(K).abs().max()) if K.numel() else 0.0
    _warn_if_unstable(lr, ridge, radius, n)
    r0 = r0.reshape(-1)
    r, out = r0, torch.empty(steps + 1, dtype=torch.float64)
    for t in range(steps + 1):
        out[t] = r.square().sum() / (2 * n)
        r = (1 - lr * ridge) * r - (lr / n) * (K @ r) + lr * ridge * r0
    return out


def linearized_loss(
    K: Tensor, residual0: Tensor, *, lr: float, steps: int, ridge: float = 0.0
) -> Tensor:
    """Exact training-loss curve of gradient descent on the linearized model.

    Gradient descent with step ``lr`` on
    ``1/(2N) sum_i ||f(x_i) - y_i||^2 + (ridge/2) ||theta - theta_0||^2`` for
    ``f = f_0 + J (theta - theta_0)`` moves the residual ``r_t = f_t - y`` by
    ``r_{t+1} = [(1 - lr*ridge) I - (lr/N) K] r_t + lr*ridge*r_0`` (Afzal et al.,
    NeurIPS 2025). In the eigenbasis ``K = V diag(mu) V^T``, with ``c = V^T r_0``,
    ``c_i(t) = c*_i + (1 - lr*(ridge + mu_i/N))^t (c_i - c*_i)`` and
    ``c*_i = ridge / (ridge + mu_i/N) * c_i``.

    Args:
        K: the train kernel ``[N, C, N, C]`` or its matrix ``[N*C, N*C]`` (row ``i*C + a``).
        residual0: ``f_0(X) - Y`` as ``[N, C]``, or ``[N]`` when C = 1. N, the number
            of samples, normalizes the loss.
        lr: the step size, > 0. Above ``2/(ridge + mu_max/N)`` the dynamics diverge
            and a ``RuntimeWarning`` says so.
        steps: the number of steps.
        ridge: lambda, the weight of the Euclidean regularizer.

    Returns:
        float64 ``[steps + 1]``: the data loss ``1/(2N) sum r_t^2`` (without the
        regularizer term) after 0, 1, ..., ``steps`` steps. A non-symmetric K
        (asymmetric SignGD) is handled by running the recursion itself. Eigenvalues
        ``|mu_i| <= (8 u + n eps64) || |K| ||_2`` (the error K carries at its dtype's unit
        roundoff u; :mod:`linft.spectrum`) count as 0: K's precision does not tell
        them from 0.
    """
    lr, ridge = _check_lr(lr), _check_ridge(ridge)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps}")
    modes = _modes(K, residual0, lr, ridge)
    if modes is None:
        return _iterate(K, residual0, lr, int(steps), ridge)
    return modes.losses(torch.arange(int(steps) + 1))


def steps_to_loss(
    K: Tensor,
    residual0: Tensor,
    *,
    lr: float,
    target: float,
    ridge: float = 0.0,
    max_steps: int = 1_000_000,
) -> int | None:
    """The first step t at which ``linearized_loss(...)[t] <= target``.

    Returns None when the target is never reached: when the loss floor of the
    regularized dynamics, ``1/(2N) sum_i (ridge/(ridge + mu_i/N) * c_i)^2``
    (the loss of kernel regression with ridge ``N*ridge``), lies above ``target``,
    or when it is not reached within ``max_steps`` steps (slow modes, or a
    diverging ``lr``). Arguments are those of :func:`linearized_loss`.
    """
    lr, ridge = _check_lr(lr), _check_ridge(ridge)
    if int(max_steps) != max_steps or max_steps < 0:
        raise ValueError(f"max_steps must be an integer >= 0, got {max_steps}")
    modes = _modes(K, residual0, lr, ridge)
    if modes is None:
        hits = (_iterate(K, residual0, lr, int(max_steps), ridge) <= target).nonzero()
        return int(hits[0]) if hits.numel() else None
    stable = bool((modes.q.abs() < 1).all())
    if stable and modes.floor() > target:
        return None
    block = max(1, _CHUNK_ELEMENTS // max(1, modes.q.numel()))
    for start in range(0, int(max_steps) + 1, block):
        t = torch.arange(start, min(start + block, int(max_steps) + 1))
        hits = (modes.losses(t) <= target).nonzero()
        if hits.numel():
            return start + int(hits[0])
    return None


# -------------------------------------------------------------------- kernel regression


def _solve(A: Tensor, B: Tensor, ridge: float, K: Tensor, precision: torch.dtype) -> Tensor:
    """``A^-1 B`` for ``A = K + ridge I``: Cholesky when symmetric, LU otherwise.

    A is singular at K's precision when an eigenvalue (a singular value, for a non-symmetric
    K) of A lies within the error K carries, ``(8 u + n eps64) || |K| ||_2`` with ``u`` the
    unit roundoff of ``precision`` (Weyl; :mod:`linft.spectrum`): that raises.
    """
    sym = _symmetrized(A)
    floor, _ = precision_floor(K, precision, symmetric=sym is not None)
    if sym is not None:
        eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        # Cholesky of A - floor I succeeding certifies lambda_min(A) > floor.
        if int(torch.linalg.cholesky_ex(sym - floor * eye)[1]) == 0:
            L, info = torch.linalg.cholesky_ex(sym)
            if int(info) == 0:
                return torch.cholesky_solve(B, L)
        # Cholesky also fails on an indefinite but invertible matrix: LU handles that.
        ev = torch.linalg.eigvalsh(sym)
        if float(ev.abs().min()) <= floor:
            _raise_singular(ev.abs(), ridge, floor, precision, K, float(ev.min()) - ridge)
    else:
        sv = torch.linalg.svdvals(A)
        if float(sv.min()) <= floor:
            _raise_singular(sv, ridge, floor, precision, K, None)
    X, info = torch.linalg.solve_ex(A, B)
    if int(info) != 0 or not torch.isfinite(X).all():
        _raise_singular(torch.linalg.svdvals(A), ridge, floor, precision, K, None)
    return X


def _raise_singular(
    values: Tensor,
    ridge: float,
    floor: float,
    precision: torch.dtype,
    K: Tensor,
    k_min: float | None,
) -> None:
    """``values``: |eigenvalues| (symmetric) or singular values of K + ridge I; ``k_min``:
    lambda_min(K) when K is symmetric."""
    low, high = float(values.min()), float(values.max())
    cond = math.inf if low == 0 else high / low
    # The ridge that lifts lambda_min(K) + ridge to 10 times the floor.
    lift = 10 * (floor + max(0.0, -k_min)) if k_min is not None else 10 * floor
    diag = float(K.diagonal().abs().mean()) if K.numel() else 1.0
    suggest = max(1e-6 * diag, 10 * ridge, lift)
    name = str(precision).replace("torch.", "")
    what = "|eigenvalue|" if k_min is not None else "singular value"
    raise torch.linalg.LinAlgError(
        f"K + ridge I (ridge = {ridge:.3g}) is singular at the precision of K ({name}): "
        f"condition number {cond:.3g}, its smallest {what} {low:.3g} within the error K "
        f"carries in {name}, {floor:.3g}. Pass "
        f"a{' larger' if ridge > 0 else ''} ridge, e.g. ridge={suggest:.3g} (the largest of "
        f"1e-6 times the mean diagonal of K, 10 times the current ridge, and 10 times that "
        f"error plus K's most negative eigenvalue)."
    )


def _offsets(f: Tensor | None, rows: int, outputs: int, name: str) -> Tensor:
    if f is None:
        return torch.zeros(rows, outputs, dtype=torch.float64)
    f, _ = _targets(f, rows * outputs, outputs, name)
    return f


def _test_kernel(K_test: Tensor, n: int, outputs: int) -> tuple[Tensor, int]:
    """``K_test`` as a float64 ``[M*C, N*C]`` matrix, and M."""
    K_test = torch.as_tensor(K_test)
    if K_test.dim() == 4:
        m, c, n2, c2 = K_test.shape
        if (c, n2, c2) != (outputs, n, outputs):
            raise ValueError(
                f"K_test must have shape [M, {outputs}, {n}, {outputs}], got {list(K_test.shape)}"
            )
        K_test = K_test.reshape(m * c, n2 * c2)
    elif K_test.dim() != 2 or K_test.shape[1] != n * outputs or K_test.shape[0] % outputs:
        raise ValueError(
            f"K_test must have shape [M*{outputs}, {n * outputs}] or [M, {outputs}, {n}, "
            f"{outputs}], got {list(K_test.shape)}"
        )
    K_test = K_test.detach().to(torch.float64)
    _check_finite(K_test, "K_test")
    return K_test, K_test.shape[0] // outputs


def kernel_regression(
    K: Tensor,
    y: Tensor,
    *,
    K_test: Tensor | None = None,
    ridge: float = 0.0,
    f0: Tensor | None = None,
    f0_test: Tensor | None = None,
) -> Tensor:
    """Kernel (ridge) regression with the eNTK (Malladi et al., ICML 2023).

    ``alpha = (K + ridge I)^-1 (Y - f_0(X))`` and ``f(x) = f_0(x) + K(x, X) alpha``.
    This is the long-time limit of :func:`linearized_loss`'s dynamics with
    regularizer lambda when ``ridge = N * lambda`` (``ridge = 0``: lambda -> 0 with
    K invertible, i.e. interpolation).

    Args:
        K: train kernel ``[N, C, N, C]`` or ``[N*C, N*C]``.
        y: targets ``[N, C]``, or ``[N]`` when C = 1.
        K_test: cross kernel ``K(X_test, X)`` as ``[M, C, N, C]`` or ``[M*C, N*C]``.
        ridge: >= 0. K is symmetric: solved by Cholesky; a non-symmetric K
            (asymmetric SignGD) by LU. A system singular at the precision K came in
            raises ``torch.linalg.LinAlgError`` with its condition number and a ridge
            that fixes it: singular means an eigenvalue (singular value, for a
            non-symmetric K) of ``K + ridge I`` within ``(8 u + n eps64) || |K| ||_2``
            of 0, ``u`` the unit roundoff of K's dtype, the error K carries at that
            precision (Weyl; see :mod:`linft.spectrum`). A float32 K is judged at
            float32, not at the float64 the solve runs in.
        f0: the model's outputs at initialization on X (default 0), shaped like y.
        f0_test: the same on X_test; required when both f0 and K_test are given.

    Returns:
        Test predictions ``[M, C]`` when K_test is given, else the fitted train
        values ``[N, C]``; ``[M]`` / ``[N]`` when y is ``[N]``. Dtype of K when it
        is floating, float64 otherwise.
    """
    ridge = _check_ridge(ridge)
    if K_test is not None and f0 is not None and f0_test is None:
        raise ValueError("f0_test is required when f0 and K_test are given")
    K_in = _as_tensor(K)
    K, outputs = _kernel_matrix(K_in)
    Y, flat = _targets(y, K.shape[0], outputs, "y")
    n, c = Y.shape
    offset = _offsets(f0, n, c, "f0")
    A = K + ridge * torch.eye(n * c, dtype=K.dtype)
    alpha = _solve(A, (Y - offset).reshape(-1, 1), ridge, K, K_in.dtype)
    if K_test is None:
        pred = offset + (K @ alpha).reshape(n, c)
    else:
        Kt, m = _test_kernel(K_test, n, c)
        pred = _offsets(f0_test, m, c, "f0_test") + (Kt @ alpha).reshape(m, c)
    dtype = K_in.dtype if K_in.is_floating_point() else torch.float64
    return (pred[:, 0] if flat else pred).to(dtype)


# ------------------------------------------------------------------------- LoRA rank


def min_lora_rank(n_samples: int, n_outputs: int = 1) -> int:
    """Smallest LoRA rank r with ``r(r+1)/2 > N*C`` (Jang, Lee, Ryu, ICML 2024).

    In the NTK regime, LoRA of such a rank has no spurious local minima on N
    samples with C outputs each; roughly ``r ~ sqrt(2 N C)``.
    """
    for name, v in (("n_samples", n_samples), ("n_outputs", n_outputs)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    m = int(n_samples) * int(n_outputs)
    # Largest r with r(r+1)/2 <= m, in exact integer arithmetic.
    r = (math.isqrt(8 * m + 1) - 1) // 2
    return r + 1
