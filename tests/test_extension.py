"""The C++/CUDA ops (torch.ops.linft) against their pure-torch twins in linft.eig."""

import os
import subprocess
import sys

import pytest
import torch

from linft import _ext
from linft import eig as twin

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPE_TOL = [(torch.float32, 1e-5), (torch.float64, 1e-12)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ops():
    # CI builds the C++ part: JIT-build it here when no prebuilt linft._C is installed.
    assert _ext.load(jit=True) in ("prebuilt", "jit")
    return torch.ops.linft


def assert_close(actual, expected, tol, what):
    """max |actual - expected| <= tol * max(1, max |expected|); reports the worst element."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{what}: NaN at {torch.isnan(a).nonzero().tolist()[:5]}"
    err = (a - e).abs()
    bound = tol * max(1.0, float(e.abs().max()) if e.numel() else 0.0)
    if err.numel():
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        assert float(err.max()) <= bound, (
            f"{what}: worst {float(err.max()):.3g} at {idx} > {bound:.3g}"
        )


def symmetric_with_garbage_below(n: int, tile: int, dtype, device):
    """(A with NaN in every strictly-lower off-diagonal tile, the symmetric A in fp64)."""
    S = torch.randn(n, n, dtype=torch.float64)
    S = (S + S.T) / 2
    A = S.clone()
    t = torch.arange(n) // tile
    A[t[:, None] > t[None, :]] = float("nan")  # never read: only tiles I <= J are
    return A.to(dtype=dtype, device=device), S


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", DTYPE_TOL)
@pytest.mark.parametrize("tile", [16, 64, 256])
@pytest.mark.parametrize("n, m", [(1, 1), (63, 7), (257, 100), (300, 33)])
def test_symm_matmul(ops, n, m, tile, dtype, tol, device):
    if device == "cuda":
        tile = 64  # the CUDA kernel's tile; lower tiles are then never read there either
    A, S = symmetric_with_garbage_below(n, tile, dtype, device)
    X = torch.randn(n, m, dtype=dtype, device=device)
    ref = S @ X.double().cpu()
    assert_close(ops.symm_matmul(A, X, tile), ref, tol * n**0.5, "extension")
    assert_close(twin.symm_matmul(A, X, tile), ref, tol * n**0.5, "twin")


@pytest.mark.parametrize(
    "A, X, tile, match",
    [
        (torch.ones(3, 4), torch.ones(3, 1), 8, "square"),
        (torch.eye(3), torch.ones(4, 1), 8, r"\[n, m\]"),
        (torch.eye(3), torch.ones(3, 1, dtype=torch.float64), 8, "same dtype"),
        (torch.eye(3), torch.ones(3, 1), 0, "tile must be positive"),
    ],
)
def test_symm_matmul_errors(ops, A, X, tile, match):
    with pytest.raises(RuntimeError, match=match):
        ops.symm_matmul(A, X, tile)
    with pytest.raises(ValueError):
        twin.symm_matmul(A, X, tile)


def orthonormal(n, c, dtype):
    return torch.linalg.qr(torch.randn(n, c, dtype=torch.float64))[0].to(dtype)


@pytest.mark.parametrize("impl", ["extension", "twin"])
@pytest.mark.parametrize("dtype, tol", DTYPE_TOL)
@pytest.mark.parametrize("case", ["random", "ill_conditioned", "rank_deficient", "in_span", "zero"])
@pytest.mark.parametrize("n, b, c", [(301, 13, 0), (301, 13, 40), (64, 20, 50)])
def test_orthonormalize(ops, impl, n, b, c, case, dtype, tol):
    fn = ops.orthonormalize if impl == "extension" else twin.orthonormalize
    V = orthonormal(n, c, dtype)
    W = torch.randn(n, b, dtype=torch.float64)
    if case == "ill_conditioned":
        W = W * torch.logspace(0, -9, b, dtype=torch.float64)
    elif case == "rank_deficient":
        h = b // 2
        W[:, h:] = W[:, :h] @ torch.randn(h, b - h, dtype=torch.float64)
    elif case == "in_span":
        W = V.double() @ torch.randn(c, b, dtype=torch.float64)
    elif case == "zero":
        W.zero_()
    W = W.to(dtype)
    Q = fn(W, V, 0.0)
    r = Q.shape[1]
    assert r <= min(b, n - c)
    eps = torch.finfo(dtype).eps
    assert_close(Q.T @ Q, torch.eye(r), 100 * eps * n**0.5, "Q^T Q")
    assert_close(V.T @ Q, torch.zeros(c, r), 100 * eps * n**0.5, "V^T Q")
    if case == "zero":
        assert r == 0
    if case in ("random", "rank_deficient") and n - c >= b:
        # span(Q) holds the part of W orthogonal to V.
        Wp = W.double() - V.double() @ (V.double().T @ W.double())
        resid = Wp - Q.double() @ (Q.double().T @ Wp)
        assert_close(resid, torch.zeros_like(resid), 1e3 * eps, "W outside span(V, Q)")
    if case == "random" and n - c >= b:
        assert r == b


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dtype, tol", DTYPE_TOL)
def test_rayleigh_ritz(ops, largest, dtype, tol):
    n, c, k = 200, 30, 7
    S = torch.randn(n, n, dtype=torch.float64)
    A = (S + S.T).to(dtype)
    V = orthonormal(n, c, dtype)
    AV = A @ V
    got = ops.rayleigh_ritz(V, AV, k, largest)
    ref = twin.rayleigh_ritz(V, AV, k, largest)
    H = V.double().T @ AV.double()
    theta = torch.linalg.eigvalsh((H + H.T) / 2)
    expect = theta.flip(0)[:k] if largest else theta[:k]
    assert got[0].dtype == torch.float64 and got[3].dtype == torch.float64
    for g, r in zip(got, ref, strict=True):
        # Ritz vectors are defined up to sign: compare U S^T-invariant products instead.
        if g.dim() == 2:
            g, r = g * g[0].sign(), r * r[0].sign()
        assert_close(g, r, tol * 10, "extension vs twin")
    assert_close(got[0], expect, 1e-12, "Ritz values")
    assert_close(got[3], theta.abs().max(), 1e-12, "norm estimate")


def test_opcheck(ops):
    A = torch.randn(40, 40, dtype=torch.float64)
    A = A + A.T
    X = torch.randn(40, 5, dtype=torch.float64)
    torch.library.opcheck(ops.symm_matmul.default, (A, X, 16))
    V = orthonormal(40, 8, torch.float64)
    torch.library.opcheck(ops.rayleigh_ritz.default, (V, A @ V, 3, True))


def test_load_reports_source(ops):
    assert _ext.available() and _ext.load() in ("prebuilt", "jit")


def test_package_works_without_extension():
    # A fresh interpreter that cannot import linft._C and does not JIT-build: pure torch.
    code = (
        "import sys, torch; sys.modules['linft._C'] = None\n"
        "import linft; from linft import _ext\n"
        "assert not _ext.available() and not hasattr(torch.ops.linft, 'symm_matmul')\n"
        "A = torch.diag(torch.arange(1.0, 201.0))\n"
        "e = linft.topk_eigh(A, 3, method='krylov')\n"
        "assert e.backend == 'torch' and e.converged\n"
        "assert torch.allclose(e.values, torch.tensor([200.0, 199.0, 198.0]))\n"
        "assert linft.spectrum(A).rank == 200\n"
        "try:\n    linft.topk_eigh(A, 3, backend='extension')\nexcept RuntimeError as err:\n"
        "    assert 'LINFT_JIT=1' in str(err)\nelse:\n    raise SystemExit('no error')\n"
    )
    env = dict(os.environ, LINFT_JIT="0", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, check=False
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
