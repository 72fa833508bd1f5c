"""linft.topk_eigh against float64 torch.linalg.eigh on matrices with known spectra."""

import math
import time

import pytest
import torch

import linft
from linft import _ext
from linft.eig import ConvergenceWarning, topk_eigh

BACKENDS = ["extension", "torch"]
# (dtype, tol): the tolerance asked of the solver, also the bound checked on the results.
DTYPE_TOL = [(torch.float32, 1e-4), (torch.float64, 1e-8)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _extension():
    # CI builds the C++ part: build it here (JIT) when no prebuilt linft._C is installed.
    assert _ext.load(jit=True) in ("prebuilt", "jit")


def with_spectrum(lam: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Q diag(lam) Q^T with Q Haar-random orthogonal, exactly symmetric."""
    n = lam.numel()
    Q, R = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    Q = Q * R.diagonal().sign()
    A = (Q * lam.double()) @ Q.T
    return ((A + A.T) / 2).to(dtype)


def spectra(kind: str, n: int) -> torch.Tensor:
    j = torch.arange(1, n + 1, dtype=torch.float64)
    if kind.startswith("power"):
        return j ** -float(kind[5:])
    if kind == "exp":
        return torch.exp(-0.05 * (j - 1))
    if kind == "geometric":
        return 10 ** (-(j - 1) / 4)
    raise ValueError(kind)


def assert_small(x: torch.Tensor, bound: float, what: str) -> None:
    """All |x| <= bound; on failure name the worst element and any NaN."""
    x = x.detach().double().abs().cpu()
    if x.numel() == 0:
        return
    assert not torch.isnan(x).any(), f"{what}: NaN at {torch.isnan(x).nonzero().tolist()[:5]}"
    worst = int(x.argmax())
    assert float(x.max()) <= bound, f"{what}: worst {float(x.max()):.3g} at {worst} > {bound:.3g}"


def check_eig(A: torch.Tensor, e, lam_true: torch.Tensor, tol: float, k: int) -> None:
    """Values vs the known spectrum, residuals, orthonormality, honest reported residuals."""
    Ad = A.double()
    lam_max = float(lam_true.abs().max())
    assert e.values.shape == (k,) and e.vectors.shape == (A.shape[0], k)
    assert_small(e.values.double() - lam_true[:k], tol * lam_max, "eigenvalue error")
    V = e.vectors.double()
    eps = torch.finfo(e.vectors.dtype).eps
    assert_small(
        V.T @ V - torch.eye(k, dtype=torch.float64), 50 * eps * math.sqrt(A.shape[0]), "VtV - I"
    )
    res = torch.linalg.vector_norm(Ad @ V - V * e.values.double(), dim=0) / max(lam_max, 1e-300)
    assert_small(res, tol, "recomputed residual")
    assert_small(
        e.residuals.double() - res,
        20 * eps * math.sqrt(A.shape[0]) + 1e-3 * tol,
        "reported vs recomputed residual",
    )
    assert e.converged


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPE_TOL)
@pytest.mark.parametrize("kind", ["power0.3", "power1", "power2", "exp"])
@pytest.mark.parametrize("n, k", [(301, 7), (512, 16)])
def test_known_spectrum(n, k, kind, dtype, tol, backend):
    lam = spectra(kind, n)
    A = with_spectrum(lam, dtype)
    e = topk_eigh(A, k, tol=tol, method="krylov", backend=backend)
    check_eig(A, e, lam, tol, k)
    assert e.backend == backend and e.method == "krylov" and e.values.dtype == dtype


@pytest.mark.parametrize("method", ["krylov", "nystrom", "dense"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind, n, k", [("power3", 601, 20), ("geometric", 512, 24)])
def test_default_certifies_each_value(kind, n, k, dtype, backend, method):
    # Fast decay: the smaller top-k eigenvalues are far below tol * lambda_max, and each is
    # certified relative to itself unless its residual stalled at the precision's noise.
    tol = 1e-4  # the default
    A = with_spectrum(spectra(kind, n), dtype)
    w = torch.linalg.eigvalsh(A.double()).flip(0)[:k]  # the stored matrix's eigenvalues
    e = topk_eigh(A, k, method=method, backend=backend)
    assert e.converged and e.errors.dtype == torch.float64 and e.errors.shape == (k,)
    theta, err = e.values.double(), (e.values.double() - w).abs()
    # eigvalsh's own error, a few eps64 ||A||, is the only slack.
    slack = 8 * math.sqrt(n) * 2**-52 * float(w[0])
    assert_small((err - e.errors * theta.abs()).clamp_min(0), slack, "error beyond its bound")
    noise = 64 * max(torch.finfo(dtype).eps, math.sqrt(n) * 2**-52) * e.norm
    short = e.errors > tol
    assert_small(e.residuals.double()[short] * e.norm, noise, "uncertified pair above noise")
    # Well above the noise every value is certified, and right, to tol relative to itself.
    clear = w >= 1e-3 * w[0]
    assert not short[clear].any() and int(clear.sum()) >= 9
    assert_small((err / w)[clear], tol, "relative error")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPE_TOL)
def test_repeated_top_eigenvalue(dtype, tol, backend):
    n, k = 400, 12
    lam = torch.cat([torch.ones(10), 0.5 * torch.arange(1, n - 9) ** -1.0]).double()
    A = with_spectrum(lam, dtype)
    e = topk_eigh(A, k, tol=tol, method="krylov", backend=backend)
    check_eig(A, e, lam, tol, k)
    # The ten vectors span the eigenspace of 1: ||(I - P) V_10|| small.
    V = e.vectors[:, :10].double()
    AV = A.double() @ V
    assert_small(AV - V, 10 * tol, "A V - V on the repeated eigenspace")


@pytest.mark.parametrize("backend", BACKENDS)
def test_clustered_top_eigenvalues(backend):
    n, k = 350, 6
    lam = torch.cat([1 - 1e-6 * torch.arange(8.0), 0.3 * torch.rand(n - 8)]).double()
    lam = lam.sort(descending=True).values
    A = with_spectrum(lam)
    e = topk_eigh(A, k, tol=1e-8, method="krylov", backend=backend)
    check_eig(A, e, lam, 1e-8, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPE_TOL)
def test_rank_below_k(dtype, tol, backend):
    n, r, k = 333, 5, 12
    lam = torch.cat([torch.arange(r, 0, -1).double(), torch.zeros(n - r, dtype=torch.float64)])
    A = with_spectrum(lam, dtype)
    e = topk_eigh(A, k, tol=tol, method="krylov", backend=backend)
    check_eig(A, e, lam, tol, k)


@pytest.mark.parametrize("method", ["auto", "krylov", "dense"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_k_equals_n(method, backend):
    n = 37
    lam = spectra("power1", n)
    A = with_spectrum(lam)
    e = topk_eigh(A, n, tol=1e-10, method=method, backend=backend)
    check_eig(A, e, lam, 1e-10, n)


class GramOperator:
    """K = J J^T applied as J (J^T X), never formed."""

    def __init__(self, J):
        self.J, self.shape, self.dtype, self.device = J, (J.shape[0], J.shape[0]), J.dtype, J.device
        self.calls = 0

    def matmul(self, X):
        self.calls += 1
        return self.J @ (self.J.T @ X)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPE_TOL)
@pytest.mark.parametrize("n, p", [(513, 200), (300, 700)])
def test_operator_gram(n, p, dtype, tol, backend):
    # Decaying column scales so the top of the spectrum is separated.
    J = (torch.randn(n, p, dtype=torch.float64) * torch.arange(1, p + 1) ** -0.75).to(dtype)
    K = J.double() @ J.double().T
    lam = torch.linalg.eigvalsh(K).flip(0)
    op = GramOperator(J)
    e = topk_eigh(op, 10, tol=tol, method="krylov", backend=backend)
    check_eig(K, e, lam, tol, 10)
    assert op.calls == e.matmuls > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPE_TOL)
@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_extreme_scales(scale, dtype, tol, backend):
    lam = scale * spectra("power1", 300)
    A = with_spectrum(lam, dtype)
    e = topk_eigh(A, 8, tol=tol, method="krylov", backend=backend)
    check_eig(A, e, lam, tol, 8)


@pytest.mark.parametrize("method", ["krylov", "nystrom", "dense"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_and_identity(dtype, backend, method):
    n, k = 300, 9
    Z = torch.zeros(n, n, dtype=dtype)
    e = topk_eigh(Z, k, method=method, backend=backend)
    assert e.converged and float(e.values.abs().max()) == 0.0 and float(e.residuals.max()) == 0.0
    eye = torch.eye(n, dtype=dtype)
    e = topk_eigh(eye, k, method=method, backend=backend)
    check_eig(eye, e, torch.ones(n, dtype=torch.float64), 1e-4, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smallest(backend):
    n, k = 300, 5
    lam = torch.linspace(1.0, 10.0, n, dtype=torch.float64).flip(0)
    A = with_spectrum(lam)
    e = topk_eigh(A, k, largest=False, tol=1e-6, method="krylov", backend=backend, max_iters=200)
    assert torch.all(e.values[1:] >= e.values[:-1])  # ascending
    check_eig(A, e, lam.flip(0), 1e-6, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPE_TOL)
def test_nystrom(dtype, tol, backend):
    lam = spectra("power2", 400)
    A = with_spectrum(lam, dtype)
    e = topk_eigh(A, 6, tol=tol, method="nystrom", backend=backend)
    check_eig(A, e, lam, tol, 6)
    assert e.method == "nystrom"


def test_nystrom_rejects_indefinite():
    lam = torch.linspace(-1.0, 1.0, 300, dtype=torch.float64)
    with pytest.raises(ValueError, match="positive semidefinite"):
        topk_eigh(with_spectrum(lam), 4, method="nystrom")


def test_not_converged_warns():
    A = with_spectrum(spectra("power0.3", 400), torch.float32)
    with pytest.warns(ConvergenceWarning, match="not converged"):
        e = topk_eigh(A, 10, tol=1e-12, method="krylov", max_iters=2)
    assert not e.converged and e.iterations == 2


@pytest.mark.parametrize(
    "method, largest",
    [("krylov", True), ("krylov", False), ("nystrom", True), ("dense", True), ("dense", False)],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_sorted_in_a_rank_deficient_tail(method, backend, largest):
    """Rank 8, k = 12: the tail's Rayleigh quotients are rounding noise, and still sorted
    (the returned pairs permuted together: each vector's residual belongs to its value)."""
    n, r, k = 600, 8, 12
    X = torch.randn(n, r)
    A = X @ X.T
    if not largest:
        A = -A
    for _ in range(3):  # each draw used to come out of order (5 of 6 on main)
        seed = int(torch.randint(1 << 30, ()))
        e = topk_eigh(A, k, largest=largest, method=method, backend=backend, seed=seed)
        step = e.values[:-1] - e.values[1:]
        assert bool((step >= 0).all() if largest else (step <= 0).all()), e.values
        AV = A.double() @ e.vectors.double()
        res = torch.linalg.vector_norm(AV - e.vectors.double() * e.values.double(), dim=0)
        assert bool((res / e.norm <= e.residuals.double() + 1e-5).all())


@pytest.mark.parametrize("method", ["krylov", "nystrom"])
def test_default_seed_gives_one_spectrum_per_matrix(method):
    A = with_spectrum(spectra("power1", 400), torch.float32)
    a, b = topk_eigh(A, 10, method=method), topk_eigh(A, 10, method=method)
    assert torch.equal(a.values, b.values) and torch.equal(a.vectors, b.vectors)
    torch.randn(5)  # the caller's global generator is neither read nor moved
    c = topk_eigh(A, 10, method=method)
    assert torch.equal(a.vectors, c.vectors)
    d = topk_eigh(A, 10, method=method, seed=7)  # an explicit seed is another start
    assert not torch.equal(a.vectors, d.vectors)


def test_spectrum_is_the_same_on_every_call():
    X = torch.randn(300, 8)
    K = X @ X.T
    a, b = (linft.spectrum(K, k=12, dense_threshold=100) for _ in range(2))
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert bool((a.eigenvalues[:-1] >= a.eigenvalues[1:]).all())


def test_backends_agree_and_seed_reproducible():
    lam = spectra("power1", 400)
    A = with_spectrum(lam, torch.float32)
    a = topk_eigh(A, 10, seed=3, method="krylov", backend="extension")
    b = topk_eigh(A, 10, seed=3, method="krylov", backend="torch")
    c = topk_eigh(A, 10, seed=3, method="krylov", backend="torch")
    assert_small(a.values - b.values, 1e-4, "extension vs torch values")
    assert torch.equal(b.values, c.values) and torch.equal(b.vectors, c.vectors)


def test_product_follows_backend():
    A = with_spectrum(spectra("power1", 300), torch.float32)
    assert topk_eigh(A, 5, method="krylov", backend="extension").product == "symmetric"
    assert topk_eigh(A, 5, method="krylov", backend="torch").product == "gemm"
    assert topk_eigh(A, 5, method="krylov").product == "gemm"  # small: no timing
    assert topk_eigh(A, 5, method="dense").product == "none"

    class Gram:
        shape, dtype = (300, 300), torch.float32

        def matmul(self, X):
            return A @ X

    assert topk_eigh(Gram(), 5, method="krylov").product == "operator"


def test_auto_product_is_the_faster_one_and_remembered(monkeypatch):
    from linft import eig

    monkeypatch.setattr(eig, "_PRODUCT_CHOICE", {})

    def products(A, slow_one):
        def product(name):
            def mm(X):
                if name == slow_one:
                    time.sleep(0.02)
                return A @ X

            return mm

        return {name: product(name) for name in ("gemm", "symmetric")}

    A, X = torch.randn(2048, 2048), torch.randn(2048, 7)
    assert eig._faster_product(A, X, products(A, "gemm")) == "symmetric"
    # the same size class on the same device: remembered, not timed again
    assert eig._faster_product(A, X, products(A, "symmetric")) == "symmetric"
    B, Y = torch.randn(4096, 4096), torch.randn(4096, 7)  # another size class is timed
    assert eig._faster_product(B, Y, products(B, "symmetric")) == "gemm"
    assert eig._faster_product(A.double(), X.double(), {"gemm": lambda X: X}) == "gemm"


def test_auto_product_never_picks_a_fast_wrong_one(monkeypatch):
    from linft import eig

    monkeypatch.setattr(eig, "_PRODUCT_CHOICE", {})
    A, X = torch.randn(2048, 2048), torch.randn(2048, 9)

    def slow(X):
        time.sleep(0.02)
        return A @ X

    def close(X):  # off by 1e-6 relative: accepted
        return (A @ X) * (1 + 1e-6)

    def wrong(X):  # off by 1e-4 relative: refused however fast
        return (A @ X) * (1 + 1e-4)

    assert eig._faster_product(A, X, {"gemm": slow, "triton": wrong}) == "gemm"
    monkeypatch.setattr(eig, "_PRODUCT_CHOICE", {})
    assert eig._faster_product(A, X, {"gemm": slow, "triton": close}) == "triton"


def test_auto_product_end_to_end_matches_eigh():
    n, k = 2048, 6
    lam = spectra("power1.5", n)
    A = with_spectrum(lam, torch.float32)
    e = topk_eigh(A, k, tol=1e-4, method="krylov", seed=1)
    assert e.product in ("symmetric", "gemm") and e.converged
    check_eig(A, e, lam, 1e-4, k)


def test_public_names():
    assert linft.topk_eigh is topk_eigh and linft.Eig is type(topk_eigh(torch.eye(3), 1))


@pytest.mark.parametrize(
    "A, k, kwargs, match",
    [
        (torch.ones(3, 4), 1, {}, r"square.*\[n, n\]"),
        (torch.eye(5), 6, {}, r"k = 6 exceeds.*k <= 5"),
        (torch.eye(5), 0, {}, "positive integer"),
        (torch.eye(5), -2, {}, "positive integer"),
        (torch.triu(torch.ones(5, 5)), 2, {}, r"not symmetric.*\(A \+ A.T\) / 2"),
        (torch.eye(5), 2, {"method": "lanczos"}, "method must be one of"),
        (torch.eye(5), 2, {"tol": 0.0}, "tol must be positive"),
        (torch.eye(5), 2, {"method": "nystrom", "largest": False}, "largest eigenpairs only"),
        (torch.full((4, 4), float("nan")), 2, {}, "NaN"),
    ],
)
def test_bad_input(A, k, kwargs, match):
    with pytest.raises(ValueError, match=match):
        topk_eigh(A, k, **kwargs)


def test_bad_operator():
    class NoMatmul:
        shape = (4, 4)

    with pytest.raises(TypeError, match="matmul"):
        topk_eigh(NoMatmul(), 2)
    with pytest.raises(TypeError, match="floating-point"):
        topk_eigh(torch.eye(4, dtype=torch.int64), 2)
