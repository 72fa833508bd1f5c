"""How fast and how accurate is the top of a kernel's spectrum? linft vs torch and CuPy.

Cases (n = --n, k = --k):
- ``topk``: A = Q diag(i^-1.5) Q^T, n x n float32, Q from a fp64 QR of a Gaussian matrix; top k.
- ``cond``: a n x n PD kernel with eigenvalues logspace(0, -6) (kappa = 1e6) in float64;
  lambda_min and the condition number.
- ``product`` (with ``topk``): one product A X, X of k + 10 columns, by each dense product
  topk_eigh can choose (GEMM, the extension's symmetric op, the Triton symmetric kernel);
  error: relative Frobenius error against float64.
- ``matfree``: top k of K = J J^T, J (4n) x (1.53n) (131072 x 50000 at n = 32768), never
  forming K: J = H_1 D H_2 with Householder reflections H and D diagonal with entries
  i^-0.75, so the eigenvalues of K are i^-1.5 exactly.

Providers side by side: linft (C++/CUDA extension, pure-torch twin, Nystrom),
``torch.linalg.eigh`` / ``eigvalsh``, ``torch.lobpcg``, ``torch.svd_lowrank`` and
``cupyx.scipy.sparse.linalg.eigsh`` where CuPy is installed. Time: median of
``triton.testing.do_bench`` on CUDA (CUDA events without Triton), ``time.perf_counter`` on CPU.
Error: max_i |lambda_i - lambda_i^true| / lambda_1; residual: max_i ||A v - lambda v|| / lambda_1
(recomputed here for every provider).

    python benchmarks/bench_eig.py                             # n = 32768, k = 100, CUDA
    python benchmarks/bench_eig.py --device cpu --n 2048 --quick
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time
import warnings

import torch

import linft
from linft import _ext


def timed(fn, device: str, reps: int):
    """(median seconds, last result)."""
    if reps <= 1:  # --quick, or providers too slow to repeat: one cold run
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out
    out = fn()  # warm-up, and the result whose accuracy is reported
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=1, rep=reps, return_mode="median") / 1e3, out
        except ImportError:
            pass
    return statistics.median(_once(fn, device) for _ in range(reps)), out


def _once(fn, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def orthogonal(n: int, device: str, gen: torch.Generator) -> torch.Tensor:
    G = torch.randn(n, n, dtype=torch.float64, device=device, generator=gen)
    Q, R = torch.linalg.qr(G)
    return Q * R.diagonal().sign()


def accuracy(matmul, values, vectors, lam_true, k: int) -> tuple[float, float]:
    vals = values.double()[:k]
    V = vectors[:, :k]
    AV = matmul(V.to(torch.float32)).double()
    res = torch.linalg.vector_norm(AV - V.double() * vals, dim=0) / float(lam_true[0])
    err = (vals.cpu() - lam_true[:k].cpu()).abs().max() / float(lam_true[0])
    return float(err), float(res.max())


def linft_run(A, k: int, backend: str, method: str = "krylov"):
    """A provider: linft.topk_eigh on A (a matrix or an operator) -> (values desc, vectors)."""

    def run():
        e = linft.topk_eigh(A, k, method=method, backend=backend, seed=0, tol=1e-4)
        return e.values, e.vectors

    return run


def linft_providers(A, k: int) -> dict:
    """linft as ``auto`` picks, through the extension (when loaded), and through its twin."""
    provs = {}
    if _ext.available():
        # auto: the faster of the symmetric product and one GEMM, timed once per size class
        auto = linft.topk_eigh(A, k, method="krylov", seed=0, tol=1e-4)  # also warms up
        provs[f"linft (auto: {auto.product})"] = linft_run(A, k, "auto")
        provs["linft (extension)"] = linft_run(A, k, "extension")
    provs["linft (torch twin)"] = linft_run(A, k, "torch")
    return provs


def topk_providers(A: torch.Tensor, k: int, n: int, device: str, with_slow: bool, quick: bool):
    """name -> callable returning (values desc, vectors)."""

    provs = linft_providers(A, k)
    provs["linft nystrom (torch)"] = linft_run(A, k, "torch", "nystrom")
    if with_slow:
        provs["torch.linalg.eigh"] = lambda: _eigh_top(A, k)
    gen = torch.Generator(device=device).manual_seed(1)
    X0 = torch.randn(n, k, device=device, dtype=A.dtype, generator=gen)
    niter = 30 if quick else 200
    provs[f"torch.lobpcg (niter<={niter})"] = lambda: torch.lobpcg(
        A, k=k, X=X0, largest=True, tol=1e-4, niter=niter
    )
    provs["torch.svd_lowrank (q=k+10, niter=4)"] = lambda: _svd_top(A, k)
    cupy_run = _cupy_provider(A, k) if device == "cuda" else None
    if cupy_run is not None:
        provs["cupyx eigsh"] = cupy_run
    return provs


def _eigh_top(A, k):
    w, V = torch.linalg.eigh(A)
    return w.flip(0)[:k], V.flip(1)[:, :k]


def _svd_top(A, k):
    U, S, _ = torch.svd_lowrank(A, q=k + 10, niter=4)
    return S[:k], U[:, :k]


def _cupy_provider(A, k):
    try:
        import cupy
        from cupyx.scipy.sparse.linalg import eigsh
    except ImportError:
        return None
    Ac = cupy.from_dlpack(A)

    def run():
        w, V = eigsh(Ac, k=k, which="LA", tol=1e-6)
        order = cupy.argsort(-w)
        return torch.from_dlpack(w[order]), torch.from_dlpack(V[:, order])

    return run


def case_topk(args, gen, rows):
    n, k = args.n, args.k
    lam = torch.arange(1, n + 1, dtype=torch.float64, device=args.device) ** -1.5
    Q = orthogonal(n, args.device, gen)
    A = ((Q * lam) @ Q.T).float()
    A = (A + A.T) / 2
    del Q
    for name, fn in topk_providers(A, k, n, args.device, args.slow, args.quick).items():
        reps = 1 if ("eigh" in name or args.quick) else args.reps
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t, (vals, vecs) = timed(fn, args.device, reps)
            err, res = accuracy(lambda X: A @ X, vals, vecs, lam, k)
            rows.append(("topk", name, t, err, res, ""))
        except (RuntimeError, ValueError) as exc:  # a provider failing is a result
            rows.append(("topk", name, math.nan, math.nan, math.nan, type(exc).__name__))
    case_product(args, A, rows)
    return A


def product_providers(A: torch.Tensor) -> dict:
    """The dense products topk_eigh chooses from: name -> X -> A @ X."""
    provs = {"GEMM (torch)": lambda X: A @ X}
    if _ext.available():
        provs["symmetric (C++/CUDA extension)"] = lambda X: torch.ops.linft.symm_matmul(A, X, 256)
    if A.is_cuda:
        from linft.backends import triton_kernels

        tk = triton_kernels()
        for prec in ("tf32x3", "ieee", "tf32"):
            provs[f"symmetric (Triton, {prec})"] = lambda X, p=prec: tk.symm_matmul(
                A, X, input_precision=p
            )
    return provs


def case_product(args, A: torch.Tensor, rows) -> None:
    """One product A @ X with X of k + 10 columns: time, and error against float64."""
    gen = torch.Generator(device=args.device).manual_seed(2)
    X = torch.randn(A.shape[0], args.k + 10, device=args.device, generator=gen)
    exact = A.double() @ X.double()
    for name, mm in product_providers(A).items():
        t, Y = timed(lambda mm=mm: mm(X), args.device, 1 if args.quick else args.reps)
        err = float(torch.linalg.norm(Y.double() - exact) / torch.linalg.norm(exact))
        rows.append(("product", name, t, err, math.nan, f"X {tuple(X.shape)}"))


def case_cond(args, gen, rows):
    n = args.n
    lam = torch.logspace(0, -6, n, dtype=torch.float64, device=args.device)
    Q = orthogonal(n, args.device, gen)
    K = (Q * lam) @ Q.T
    K = (K + K.T) / 2
    del Q
    kappa = 1e6

    def linft_cond():
        return linft.spectrum(K, k=10, dense_threshold=min(4096, n - 1)).condition_number

    def eigvalsh_cond():
        w = torch.linalg.eigvalsh(K)
        return float(w[-1] / w[0])

    provs = {"linft.spectrum (top-10 + Cholesky)": linft_cond}
    if args.slow:
        provs["torch.linalg.eigvalsh (fp64)"] = eigvalsh_cond
    for name, fn in provs.items():
        t, c = timed(fn, args.device, 1 if args.quick or "eigvalsh" in name else 3)
        rows.append(("cond", name, t, abs(c - kappa) / kappa, math.nan, f"kappa={c:.6g}"))


class GramOperator:
    """K = J J^T as X -> J (J^T X); J never squared."""

    def __init__(self, J: torch.Tensor):
        self.J, self.shape = J, (J.shape[0], J.shape[0])
        self.dtype, self.device = torch.float32, J.device

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        J = self.J
        if J.dtype == torch.float32:
            return J @ (J.T @ X)
        # bf16 J: fp32 products on bf16 storage would need a fp32 copy; cast blockwise.
        out = torch.empty_like(X)
        JtX = torch.zeros(J.shape[1], X.shape[1], device=X.device, dtype=torch.float32)
        for i in range(0, J.shape[0], 16384):
            JtX += J[i : i + 16384].float().T @ X[i : i + 16384]
        for i in range(0, J.shape[0], 16384):
            out[i : i + 16384] = J[i : i + 16384].float() @ JtX
        return out


def case_matfree(args, gen, rows):
    n_rows, p = 4 * args.n, int(args.n * 50000 / 32768)
    k = min(args.k, p // 3)
    dev = args.device
    s = torch.arange(1, p + 1, dtype=torch.float32, device=dev) ** -0.75
    u = torch.randn(n_rows, device=dev, generator=gen)
    u /= u.norm()
    w = torch.randn(p, device=dev, generator=gen)
    w /= w.norm()
    # J = (I - 2uu^T) D (I - 2ww^T), D = [diag(s); 0]: singular values s, built in O(n p).
    D_w = torch.zeros(n_rows, device=dev)
    D_w[:p] = s * w
    J = torch.zeros(n_rows, p, device=dev, dtype=args.matfree_dtype)
    J[:p].copy_(torch.diag(s))
    J.add_(torch.outer(D_w, w).to(args.matfree_dtype), alpha=-2.0)  # D (I - 2ww^T)
    uJ = u @ J.float()
    J.add_(torch.outer(u, uJ).to(args.matfree_dtype), alpha=-2.0)  # (I - 2uu^T) [...]
    lam = (s.double() ** 2).sort(descending=True).values
    op = GramOperator(J)

    provs = linft_providers(op, k)

    def svd_run():
        U, S, _ = torch.svd_lowrank(J.float() if J.dtype != torch.float32 else J, q=k + 10, niter=4)
        return S[:k] ** 2, U[:, :k]

    if J.dtype == torch.float32:
        provs["torch.svd_lowrank(J) (q=k+10, niter=4)"] = svd_run
    for name, fn in provs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t, (vals, vecs) = timed(fn, dev, 1 if args.quick else 3)
        err, res = accuracy(op.matmul, vals, vecs, lam, k)
        note = f"J {n_rows}x{p} {str(args.matfree_dtype).split('.')[-1]}"
        rows.append(("matfree", name, t, err, res, note))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions (do_bench: ms)")
    ap.add_argument("--quick", action="store_true", help="one timed run per provider")
    ap.add_argument("--no-slow", dest="slow", action="store_false", help="skip full eigh")
    ap.add_argument("--cases", default="topk,cond,matfree")
    ap.add_argument("--matfree-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--jit", action="store_true", help="JIT-build the extension if not prebuilt")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (--quick: 1)")
    args = ap.parse_args()
    if args.threads or (args.quick and args.device == "cpu"):
        # One thread by default for quick CPU runs: oversubscribed shared cores made timings
        # swing by 10x between runs.
        torch.set_num_threads(args.threads or 1)
    args.matfree_dtype = getattr(torch, args.matfree_dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    source = _ext.load(jit=True if args.jit else None)
    gen = torch.Generator(device=args.device).manual_seed(0)
    rows: list[tuple] = []
    cases = args.cases.split(",")
    if "topk" in cases:
        case_topk(args, gen, rows)
    if "cond" in cases:
        case_cond(args, gen, rows)
    if "matfree" in cases:
        case_matfree(args, gen, rows)
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"\n{dev_name}, torch {torch.__version__}, extension: {source}, "
        f"{datetime.date.today()}, n={args.n}, k={args.k}\n"
    )
    print("| case | provider | time (ms) | eig. error | max residual | notes |")
    print("|---|---|---:|---:|---:|---|")
    for case, name, t, err, res, note in rows:
        print(f"| {case} | {name} | {t * 1e3:.2f} | {err:.2e} | {res:.2e} | {note} |")


if __name__ == "__main__":
    main()
