"""linft.spectrum against float64 eigh-derived values on kernels with known spectra."""

import math

import pytest
import torch

import linft
from linft.spectrum import Spectrum, spectrum

# dense_threshold: 8192 = dense eigvalsh path; 64 = top-k + Cholesky inverse iteration path.
PATHS = [8192, 64]


pytestmark = pytest.mark.usefixtures("one_thread")


def with_spectrum(lam: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    n = lam.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    A = (Q * lam.double()) @ Q.T
    return ((A + A.T) / 2).to(dtype)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
@pytest.mark.parametrize("k", [None, 10])
@pytest.mark.parametrize("n", [97, 256])
def test_fields_match_eigh(n, k, dtype, rtol):
    lam = torch.arange(1, n + 1, dtype=torch.float64) ** -1.3 + 1e-3
    K = with_spectrum(lam, dtype)
    w = torch.linalg.eigvalsh(K.double()).flip(0)
    s = spectrum(K, k=k)
    assert isinstance(s, Spectrum) and s.complete and s.n == n
    expect = w if k is None else w[:k]
    assert s.eigenvalues.dtype == torch.float64 and s.eigenvalues.shape == expect.shape
    assert float((s.eigenvalues - expect).abs().max()) <= rtol * float(w[0])
    assert rel(s.lambda_max, float(w[0])) <= rtol and rel(s.lambda_min, float(w[-1])) <= rtol
    assert rel(s.condition_number, float(w[0] / w[-1])) <= rtol
    assert s.rank == n
    assert rel(s.trace, float(w.sum())) <= rtol
    p = w / w.sum()
    assert rel(s.effective_rank, float(torch.exp(-(p * p.log()).sum()))) <= rtol
    assert rel(s.stable_rank, float(w.sum() / w[0])) <= rtol


def test_full_kernel_layout():
    N, C, P = 40, 3, 500
    J = torch.randn(N * C, P, dtype=torch.float64)
    M = J @ J.T
    s4, s2 = spectrum(M.reshape(N, C, N, C)), spectrum(M)
    assert torch.equal(s4.eigenvalues, s2.eigenvalues) and s4.n == N * C
    # Public name: the function, reached through the package however linft.spectrum was imported.
    assert torch.equal(linft.spectrum(M).eigenvalues, s2.eigenvalues)
    assert isinstance(linft.spectrum(M, k=3), linft.Spectrum)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kappa", [10.0, 1e4, 1e8])
@pytest.mark.parametrize("n", [150, 301])
def test_condition_number_known_kappa(n, kappa, path):
    lam = torch.logspace(0, -math.log10(kappa), n, dtype=torch.float64)
    s = spectrum(with_spectrum(lam), k=5, dense_threshold=path)
    assert rel(s.condition_number, kappa) <= 1e-6
    assert rel(s.lambda_min, float(lam[-1])) <= 1e-6 and s.rank == n
    assert s.complete == (path == 8192)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n, p", [(200, 60), (301, 150)])
def test_singular_kernel(n, p, path):
    J = torch.randn(n, p, dtype=torch.float64)  # K = J J^T has rank p < n
    K = J @ J.T
    s = spectrum(K, k=5, dense_threshold=path)
    assert s.condition_number == math.inf and s.rank == p
    assert abs(s.lambda_min) <= s.rank_threshold
    w = torch.linalg.eigvalsh(K).flip(0)
    for ridge in (1e-3, 1.0):
        r = spectrum(K, k=5, ridge=ridge, dense_threshold=path)
        assert rel(r.condition_number, float((w[0] + ridge) / ridge)) <= 1e-6
        assert r.ridge == ridge


@pytest.mark.parametrize("path", PATHS)
def test_ridge_on_definite_kernel(path):
    lam = torch.logspace(0, -6, 200, dtype=torch.float64)
    s = spectrum(with_spectrum(lam), k=3, ridge=1e-4, dense_threshold=path)
    assert rel(s.condition_number, (1 + 1e-4) / (1e-6 + 1e-4)) <= 1e-6


@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.0])
def test_decay_exponent(alpha):
    n = 300
    lam = torch.arange(1, n + 1, dtype=torch.float64) ** -alpha
    s = spectrum(with_spectrum(lam))
    assert abs(s.decay_exponent - alpha) <= 1e-6 and s.decay_fit_range == (1, n)
    s = spectrum(with_spectrum(lam), fit_range=(5, 50))
    assert abs(s.decay_exponent - alpha) <= 1e-6 and s.decay_fit_range == (5, 50)


def test_decay_fit_stops_at_numerical_rank():
    J = torch.randn(120, 30, dtype=torch.float64) * torch.arange(1, 31) ** -1.0
    s = spectrum(J @ J.T)
    assert s.decay_fit_range == (1, 30) and math.isfinite(s.decay_exponent)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_kernel(dtype, k, path):
    n = 97 if path == 8192 else 131  # top-k path: n > dense_threshold
    s = spectrum(torch.zeros(n, n, dtype=dtype), k=k, dense_threshold=path)
    assert torch.equal(s.eigenvalues, torch.zeros(n if k is None else k, dtype=torch.float64))
    assert s.rank == 0 and s.condition_number == math.inf and s.effective_rank == 0.0
    assert s.lambda_max == s.lambda_min == s.trace == s.rank_threshold == 0.0
    assert math.isnan(s.stable_rank) and s.complete
    assert math.isnan(s.decay_exponent) and s.decay_fit_range == (0, 0)
    assert spectrum(torch.zeros(n, n, dtype=dtype), k=k, ridge=0.5).condition_number == 1.0


def rounding_error_norm(K32: torch.Tensor, K64: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(K32.double() - K64, 2))


@pytest.mark.parametrize("path", [8192, 512])
@pytest.mark.parametrize("shape", ["logspace", "flat"])
def test_float32_condition_above_n_eps(shape, path):
    # cond 2^15 at n = 1024 lies past the old 1 / (n eps32) = 8192 threshold (the issue's
    # cond 4096 at n = 4096, scaled down), yet float32 rounding moves lambda_min by far less.
    n, kappa = 1024, 2.0**15
    lam = torch.logspace(0, -math.log10(kappa), n, dtype=torch.float64)
    if shape == "flat":
        lam = torch.ones(n, dtype=torch.float64)
        lam[-1] = 1 / kappa
    K64 = with_spectrum(lam)
    K = K64.float()
    w = torch.linalg.eigvalsh(K.double())
    s = spectrum(K, k=4, dense_threshold=path)
    assert math.isfinite(s.condition_number) and s.rank == n
    assert n * torch.finfo(torch.float32).eps * kappa > 1  # past the n eps threshold
    assert rel(s.condition_number, float(w[-1] / w[0])) <= 2e-4
    # The floor bounds what rounding to float32 did (Weyl), and sits below lambda_min.
    assert rounding_error_norm(K, K64) <= s.rank_threshold < float(w[0])
    assert "float32" in s.rank_threshold_source and "rounding" in s.rank_threshold_source


@pytest.mark.parametrize("path", [8192, 128])
@pytest.mark.parametrize("kind", ["iid", "shared"])
@pytest.mark.parametrize("n, p", [(300, 120), (257, 200)])
def test_float32_gram_singular(n, p, kind, path):
    # K = J J^T accumulated in float32 has rank p < n; its null eigenvalues are rounding noise.
    J = torch.randn(n, p) + (3.0 if kind == "shared" else 0.0)
    K = J @ J.T
    w = torch.linalg.eigvalsh(K.double()).flip(0)
    s = spectrum(K, k=5, dense_threshold=path)
    assert s.condition_number == math.inf and s.rank == p
    assert float(w[p]) <= s.rank_threshold < float(w[p - 1])
    assert s.lambda_min <= s.rank_threshold
    # Judged at float64's epsilon, the rounding noise would count as rank.
    assert float(w[p]) > n * torch.finfo(torch.float64).eps * float(w[0])
    r = spectrum(K, k=5, ridge=1e-2, dense_threshold=path)
    assert rel(r.condition_number, float((w[0] + 1e-2) / (max(float(w[-1]), 0) + 1e-2))) <= 1e-4


@pytest.mark.parametrize("path", PATHS)
def test_negative_eigenvalue_raises_floor(path):
    # A PSD kernel of rank 40 with symmetric noise of 1e-6: the negative eigenvalues show
    # the error K carries, far above its rounding.
    n, r = 150, 40
    lam = torch.cat([torch.linspace(1.0, 0.1, r), torch.zeros(n - r)]).double()
    E = 1e-6 * torch.randn(n, n, dtype=torch.float64)
    K = with_spectrum(lam) + (E + E.T) / 2
    w = torch.linalg.eigvalsh(K).flip(0)
    s = spectrum(K, k=3, dense_threshold=path)
    assert s.rank == r and s.condition_number == math.inf
    assert rel(s.rank_threshold, -2 * float(w[-1])) <= 1e-4
    assert s.rank_threshold_source.startswith("negative eigenvalue")


@pytest.mark.parametrize("path", PATHS)
def test_rtol_override_and_low_precision_input(path):
    lam = torch.logspace(0, -5, 200, dtype=torch.float64)
    K = with_spectrum(lam)
    s = spectrum(K, k=3, rtol=1e-3, dense_threshold=path)
    assert rel(s.rank_threshold, 1e-3 * float(lam[0])) <= 1e-6
    assert s.rank_threshold_source.startswith("rtol")
    assert s.rank == int((lam > 1e-3).sum()) and s.condition_number == math.inf
    # bfloat16 K is judged at bfloat16's unit roundoff 2^-8, not float32's.
    b = spectrum(K.bfloat16(), k=3, dense_threshold=path)
    assert "bfloat16" in b.rank_threshold_source
    assert b.rank_threshold >= 8 * 2.0**-8 * 0.99 * float(lam[0]) and b.condition_number == math.inf


@pytest.mark.parametrize(
    "K, kwargs, match",
    [
        (torch.ones(3, 4), {}, r"square matrix \[n, n\]"),
        (torch.ones(2, 3, 4, 3), {}, r"\[N, C, N, C\]"),
        (torch.triu(torch.ones(5, 5)), {}, r"not symmetric.*\(A \+ A.T\) / 2"),
        (torch.eye(5), {"k": 6}, r"k must be an integer in \[1, n = 5\]"),
        (torch.eye(5), {"k": 0}, r"k must be an integer"),
        (torch.eye(5), {"ridge": -1.0}, "ridge must be >= 0"),
        (torch.eye(5), {"fit_range": (3, 2)}, "fit_range"),
    ],
)
def test_bad_input(K, kwargs, match):
    with pytest.raises(ValueError, match=match):
        spectrum(K, **kwargs)
