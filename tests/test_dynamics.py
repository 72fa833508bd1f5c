"""linft.dynamics against explicit gradient descent and closed forms, in float64."""

import math
import re
import warnings

import pytest
import torch

import linft


def assert_close(actual, expected, *, rtol, atol=0.0, what=""):
    """allclose that names the worst element and any NaNs."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in result"
    err = (actual - expected).abs() - (atol + rtol * expected.abs())
    worst = int(err.argmax())
    assert err.max() <= 0, (
        f"{what}: worst element {worst}: {actual.flatten()[worst].item()!r} vs "
        f"{expected.flatten()[worst].item()!r}"
    )


def problem(n, c, p, *, scale=1.0):
    """Random linear model f = f0 + J (theta - theta0) with N*C outputs and P parameters."""
    J = scale * torch.randn(n * c, p, dtype=torch.float64) / math.sqrt(p)
    f0 = torch.randn(n, c, dtype=torch.float64)
    y = torch.randn(n, c, dtype=torch.float64)
    return J, f0, y


def explicit_gd(J, f0, y, *, lr, steps, ridge, direction=None):
    """Gradient descent on theta for 1/(2N)||f - y||^2 + ridge/2 ||theta - theta0||^2.

    ``direction`` replaces J^T in the update (a sign-like preconditioner), which
    gives the non-symmetric kernel J direction^T.
    """
    n = y.shape[0]
    D = J if direction is None else direction
    delta = torch.zeros(J.shape[1], dtype=torch.float64)
    losses = []
    for _ in range(steps + 1):
        r = f0.reshape(-1) + J @ delta - y.reshape(-1)
        losses.append(r.square().sum() / (2 * n))
        delta = delta - lr * (D.T @ r / n + ridge * delta)
    return torch.stack(losses)


def stable_lr(K, n, ridge, fraction):
    mu_max = torch.linalg.eigvalsh(K)[-1].item()
    return fraction * 2.0 / (ridge + mu_max / n)


def as_layout(K, n, c, layout):
    return K.reshape(n, c, n, c) if layout == "full" else K


@pytest.mark.parametrize(
    "n, c, p, ridge, layout",
    [
        (7, 1, 5, 0.0, "matrix"),  # rank-deficient K: the loss stalls at the null space
        (7, 1, 20, 0.1, "matrix"),
        (5, 3, 11, 0.05, "full"),
        (6, 2, 40, 0.0, "full"),
        (9, 3, 13, 0.7, "matrix"),
    ],
)
@pytest.mark.parametrize("fraction", [0.3, 0.95])
def test_linearized_loss_matches_explicit_gd(n, c, p, ridge, layout, fraction):
    J, f0, y = problem(n, c, p, scale=3.0)
    K = J @ J.T
    lr = stable_lr(K, n, ridge, fraction)
    steps = 80
    expected = explicit_gd(J, f0, y, lr=lr, steps=steps, ridge=ridge)
    got = linft.linearized_loss(as_layout(K, n, c, layout), f0 - y, lr=lr, steps=steps, ridge=ridge)
    assert got.dtype == torch.float64 and got.shape == (steps + 1,)
    assert_close(got, expected, rtol=1e-10, atol=1e-13 * expected[0].item(), what="loss curve")


def test_linearized_loss_vector_residual_and_float32_kernel():
    J, f0, y = problem(8, 1, 6)
    K = J @ J.T
    two_d = linft.linearized_loss(K, f0 - y, lr=0.5, steps=20, ridge=0.01)
    one_d = linft.linearized_loss(K, (f0 - y)[:, 0], lr=0.5, steps=20, ridge=0.01)
    assert torch.equal(two_d, one_d)
    low = linft.linearized_loss(K.float(), (f0 - y).float(), lr=0.5, steps=20, ridge=0.01)
    assert_close(low, two_d, rtol=1e-5, what="float32 input")


def test_linearized_loss_non_symmetric_kernel_matches_gd():
    # An update along sign(J) instead of J (SignGD-like) gives K = J sign(J)^T.
    n, c, p, ridge = 6, 2, 9, 0.05
    J, f0, y = problem(n, c, p)
    S = torch.sign(J) / math.sqrt(p)
    K = J @ S.T
    assert not torch.allclose(K, K.T)
    lr = 0.2
    expected = explicit_gd(J, f0, y, lr=lr, steps=40, ridge=ridge, direction=S)
    got = linft.linearized_loss(K.reshape(n, c, n, c), f0 - y, lr=lr, steps=40, ridge=ridge)
    assert_close(got, expected, rtol=1e-10, atol=1e-13 * expected[0].item(), what="asym")


def test_steps_to_loss_is_first_crossing():
    J, f0, y = problem(10, 2, 30)
    K, r0 = J @ J.T, f0 - y
    lr, ridge = stable_lr(K, 10, 0.01, 0.5), 0.01
    curve = linft.linearized_loss(K, r0, lr=lr, steps=3000, ridge=ridge)
    for target in (curve[0].item(), curve[5].item(), 1.01 * curve[-1].item()):
        t = linft.steps_to_loss(K, r0, lr=lr, target=target, ridge=ridge, max_steps=3000)
        assert t == int((curve <= target).nonzero()[0])
    # The regularized floor sits above a target of 0: never reached.
    assert linft.steps_to_loss(K, r0, lr=lr, target=0.0, ridge=ridge) is None
    # Reachable only later than max_steps.
    late = linft.steps_to_loss(K, r0, lr=lr, target=1.01 * curve[-1].item(), ridge=ridge)
    assert (
        linft.steps_to_loss(
            K, r0, lr=lr, target=curve[-1].item() * 1.01, ridge=ridge, max_steps=late - 1
        )
        is None
    )


def kr_closed_form(K, y, ridge, f0, Kt=None, f0t=None):
    alpha = torch.linalg.solve(
        K + ridge * torch.eye(K.shape[0], dtype=K.dtype), (y - f0).reshape(-1)
    )
    if Kt is None:
        return f0 + (K @ alpha).reshape(f0.shape)
    return f0t + (Kt @ alpha).reshape(f0t.shape)


@pytest.mark.parametrize("c, layout", [(1, "matrix"), (3, "full"), (2, "matrix")])
def test_kernel_regression_closed_form(c, layout):
    n, m, p, ridge = 11, 5, 50, 0.3
    J, f0, y = problem(n, c, p)
    Jt = torch.randn(m * c, p, dtype=torch.float64) / math.sqrt(p)
    f0t = torch.randn(m, c, dtype=torch.float64)
    K, Kt = J @ J.T, Jt @ J.T
    Kt_in = Kt.reshape(m, c, n, c) if layout == "full" else Kt
    fit = linft.kernel_regression(as_layout(K, n, c, layout), y, ridge=ridge, f0=f0)
    assert_close(fit, kr_closed_form(K, y, ridge, f0), rtol=1e-10, atol=1e-12, what="train")
    test = linft.kernel_regression(
        as_layout(K, n, c, layout), y, K_test=Kt_in, ridge=ridge, f0=f0, f0_test=f0t
    )
    want = kr_closed_form(K, y, ridge, f0, Kt, f0t)
    assert_close(test, want, rtol=1e-10, atol=1e-12, what="test")


def test_kernel_regression_shapes_and_dtype():
    J, _, y = problem(6, 1, 20)
    K = (J @ J.T).float()
    out = linft.kernel_regression(K, y[:, 0].float(), K_test=K[:4], ridge=1e-3)
    assert out.shape == (4,) and out.dtype == torch.float32
    assert linft.kernel_regression(K, y.float(), ridge=1e-3).shape == (6, 1)
    # Without ridge and a full-rank kernel the fit interpolates.
    assert_close(linft.kernel_regression(J @ J.T, y), y, rtol=0, atol=1e-9, what="interpolation")


def test_kernel_regression_non_symmetric_uses_lu():
    n, p = 7, 30
    J, f0, y = problem(n, 1, p)
    K = J @ (torch.sign(J) / math.sqrt(p)).T
    got = linft.kernel_regression(K, y, ridge=0.1, f0=f0)
    assert_close(got, kr_closed_form(K, y, 0.1, f0), rtol=1e-10, atol=1e-12, what="LU")


@pytest.mark.parametrize("n, c, p, lam", [(8, 1, 30, 0.05), (6, 3, 10, 0.2), (9, 2, 12, 0.0)])
def test_long_time_limit_is_kernel_regression(n, c, p, lam):
    # The fixed point of the regularized dynamics is kernel regression with ridge N*lambda;
    # with lambda = 0 and rank-deficient K it is the limit ridge -> 0.
    J, f0, y = problem(n, c, p, scale=2.0)
    K = J @ J.T
    lr = stable_lr(K, n, lam, 0.9)
    mu, vecs = torch.linalg.eigh(K)
    live = mu > 1e-9 * mu[-1]
    # Enough steps for the slowest live mode, |1 - lr (lambda + mu/N)| nearest 1, to decay by 1e-14.
    rate = float((1 - lr * (lam + mu[live] / n)).abs().max())
    steps = math.ceil(math.log(1e-14) / math.log(rate))
    assert steps < 5_000_000, "degenerate draw: a live eigenvalue far below the others"
    curve = linft.linearized_loss(K.reshape(n, c, n, c), f0 - y, lr=lr, steps=steps, ridge=lam)
    if lam > 0:
        fit = linft.kernel_regression(K, y, ridge=n * lam, f0=f0)
        limit = (fit - y).square().sum() / (2 * n)
    else:  # the ridge -> 0 limit: what of the residual lies in K's null space stays
        r0 = (f0 - y).reshape(-1)
        stay = r0 - vecs[:, live] @ (vecs[:, live].T @ r0)
        limit = stay.square().sum() / (2 * n)
    assert_close(curve[-1], limit, rtol=1e-6, atol=1e-12, what="limit")
    assert curve[-1] < curve[0]


def test_errors():
    J, f0, y = problem(5, 2, 7)
    K, r0 = J @ J.T, f0 - y
    with pytest.raises(ValueError, match="does not match"):
        linft.linearized_loss(K, r0[:4], lr=0.1, steps=3)
    with pytest.raises(ValueError, match="does not match"):
        linft.linearized_loss(K.reshape(5, 2, 5, 2), r0.reshape(10, 1), lr=0.1, steps=3)
    with pytest.raises(ValueError, match="square"):
        linft.linearized_loss(K[:, :9], r0, lr=0.1, steps=3)
    with pytest.raises(ValueError, match="non-finite"):
        linft.linearized_loss(K.clone().fill_diagonal_(math.nan), r0, lr=0.1, steps=3)
    with pytest.raises(ValueError, match="non-finite"):
        linft.kernel_regression(K, y.clone().fill_(math.inf), ridge=1.0)
    with pytest.raises(ValueError, match="ridge"):
        linft.linearized_loss(K, r0, lr=0.1, steps=3, ridge=-1.0)
    with pytest.raises(ValueError, match="ridge"):
        linft.kernel_regression(K, y, ridge=-1.0)
    with pytest.raises(ValueError, match="lr"):
        linft.linearized_loss(K, r0, lr=0.0, steps=3)
    with pytest.raises(ValueError, match="f0_test"):
        linft.kernel_regression(K, y, K_test=K, f0=f0)
    with pytest.raises(ValueError, match="K_test"):
        linft.kernel_regression(K, y, K_test=K[:, :3], ridge=1.0)


def test_diverging_lr_warns_with_bound():
    J, f0, y = problem(5, 1, 9)
    K = J @ J.T
    bound = 2.0 / (0.1 + torch.linalg.eigvalsh(K)[-1].item() / 5)
    with pytest.warns(RuntimeWarning, match=f"{bound:.6g}"):
        curve = linft.linearized_loss(K, f0 - y, lr=1.5 * bound, steps=50, ridge=0.1)
    assert curve[-1] > curve[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linft.linearized_loss(K, f0 - y, lr=0.99 * bound, steps=5, ridge=0.1)


def test_kernel_regression_indefinite_symmetric():
    # Cholesky fails on an indefinite matrix; an invertible one is still solved.
    n = 6
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    K = Q @ torch.diag(torch.tensor([3.0, 2.0, 1.0, -0.5, -1.0, 0.7], dtype=torch.float64)) @ Q.T
    y, f0 = torch.randn(n, 1, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
    got = linft.kernel_regression(K, y)
    assert_close(got, kr_closed_form(K, y, 0.0, f0), rtol=1e-10, atol=1e-12, what="indefinite")


def test_singular_system_error_names_condition_and_ridge():
    J, _, y = problem(8, 1, 3)  # rank 3 < 8
    with pytest.raises(torch.linalg.LinAlgError, match=r"condition number .*ridge"):
        linft.kernel_regression(J @ J.T, y)
    linft.kernel_regression(J @ J.T, y, ridge=1e-3)  # the suggested fix works


def suggested_ridge(err: Exception) -> float:
    return float(re.search(r"ridge=([0-9.e+-]+)", str(err)).group(1))


@pytest.mark.parametrize("kind", ["iid", "shared"])
@pytest.mark.parametrize("n, c, p, layout", [(60, 1, 20, "matrix"), (33, 3, 50, "full")])
def test_kernel_regression_singular_float32_raises(n, c, p, layout, kind):
    # K = J J^T accumulated in float32 (as linft.ntk returns it) has rank p < N*C: singular.
    J = torch.randn(n * c, p) + (2.0 if kind == "shared" else 0.0)
    K = J @ J.T
    y = torch.randn(n, c)
    ev = torch.linalg.eigvalsh(K.double())
    # Judged at float64's epsilon the noise eigenvalues pass as invertible.
    assert float(ev.abs().min()) > n * c * torch.finfo(torch.float64).eps * float(ev[-1])
    with pytest.raises(torch.linalg.LinAlgError, match=r"precision of K \(float32\).*condition"):
        linft.kernel_regression(as_layout(K, n, c, layout), y)
    try:
        linft.kernel_regression(K, y)
    except torch.linalg.LinAlgError as err:
        ridge = suggested_ridge(err)
    got = linft.kernel_regression(as_layout(K, n, c, layout), y, ridge=ridge)
    want = kr_closed_form(K.double(), y.double(), ridge, torch.zeros(n, c, dtype=torch.float64))
    assert got.dtype == torch.float32
    assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), what="ridge")


@pytest.mark.parametrize("n, c, p, layout", [(40, 1, 200, "matrix"), (37, 2, 300, "full")])
def test_kernel_regression_well_conditioned_float32(n, c, p, layout):
    J = torch.randn(n * c, p)
    K = J @ J.T  # float32, full rank
    y, f0 = torch.randn(n, c), torch.randn(n, c)
    got = linft.kernel_regression(as_layout(K, n, c, layout), y, f0=f0)
    want = kr_closed_form(K.double(), y.double(), 0.0, f0.double())
    assert got.dtype == torch.float32
    assert_close(got.double(), want, rtol=1e-5, atol=1e-5, what="float32 interpolation")


@pytest.mark.parametrize("n, p", [(40, 15), (55, 30)])
def test_linearized_loss_float32_null_modes_stay(n, p):
    # Rank-deficient float32 K without ridge: the residual in J's null space never moves.
    # Left to the rounding-level eigenvalues of K it would drift (0.2% after 2e5 steps).
    J = torch.randn(n, p)
    K, r0 = J @ J.T, torch.randn(n, dtype=torch.float64)
    lr = 0.9 * 2 / (torch.linalg.eigvalsh(K.double())[-1].item() / n)
    curve = linft.linearized_loss(K, r0, lr=lr, steps=200_000)
    Q, _ = torch.linalg.qr(J.double())
    stay = r0 - Q @ (Q.T @ r0)
    assert_close(curve[-1], stay.square().sum() / (2 * n), rtol=1e-6, what="null-space floor")


def test_min_lora_rank():
    for m in range(1, 300):
        r = next(r for r in range(1, 100) if r * (r + 1) // 2 > m)
        assert linft.min_lora_rank(m) == r
    assert linft.min_lora_rank(64, 2) == linft.min_lora_rank(128)
    assert linft.min_lora_rank(10**12) == next(
        r for r in range(1_414_000, 1_415_000) if r * (r + 1) // 2 > 10**12
    )
    for bad in ((0,), (3, 0), (2.5,), (True,)):
        with pytest.raises(ValueError):
            linft.min_lora_rank(*bad)
