"""How fast are the Triton kernels against their pure-torch twins?

Times every op of ``linft.triton_kernels`` next to its reference in ``linft.ops.jacobian`` /
``linft.ops.gram`` (same inputs, same device), with ``triton.testing.do_bench`` (median
after warm-up) on a GPU, and reports time, achieved GB/s and TFLOP/s from the
byte and flop counts written out below, the peak memory of one call, and the max
error against a float64 evaluation (``err``: max error relative to the largest
reference value; for sign outputs, the fraction of signs that differ from the
signs of the float64 values, which near-zero entries make nonzero).

Default shapes are RoBERTa-base's: n=512 samples, T=128 tokens, d_in=d_out=768,
r=8, C=2 outputs; Gram tiles of m=k=1024 rows with P=300,000 parameters.

    python benchmarks/bench_kernels.py                      # GPU, full shapes
    python benchmarks/bench_kernels.py --only gram          # one family
    python benchmarks/bench_kernels.py --device cpu --quick # tiny, Triton interpreter

Byte counts are the ideal traffic (each input read once, each output written once);
flop counts are the algorithmic ones (LoRA: the rank-r products once per sample and
output; Gram: 2 m k P, symmetric counted as the full GEMM it replaces).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BF16, FP32 = torch.bfloat16, torch.float32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny shapes (the interpreter's)")
    p.add_argument("--only", choices=["jacobian", "gram"], default=None)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--T", type=int, default=128)
    p.add_argument("--d", type=int, default=768, help="d_in = d_out")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--C", type=int, default=2)
    p.add_argument("--m", type=int, default=1024, help="Gram rows (n*C of a block)")
    p.add_argument("--P", type=int, default=300_000, help="Gram inner length (parameters)")
    p.add_argument("--no-error", action="store_true", help="skip the float64 references")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.T, args.d, args.r, args.C, args.m, args.P = 4, 24, 40, 4, 2, 24, 1000
    return args


ARGS = argparse.Namespace()
DEV = torch.device("cpu")
tk = ref_jac = ref_gram = None


def load_kernels() -> None:
    """Import the kernels after TRITON_INTERPRET is settled (Triton reads it at import)."""
    global tk, ref_jac, ref_gram
    if ARGS.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT))
    try:
        tk = importlib.import_module("linft.triton_kernels")
    except ImportError:
        tk = importlib.import_module("triton_kernels")
    ref_jac = importlib.import_module("linft.ops.jacobian")
    ref_gram = importlib.import_module("linft.ops.gram")


def timed(fn) -> float:
    """Median milliseconds of one call."""
    if DEV.type == "cuda":
        do_bench = importlib.import_module("triton.testing").do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn) -> float:
    if DEV.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel_err(result: torch.Tensor, ref: torch.Tensor | None, signs: bool) -> float:
    """Max error relative to max|ref|; for sign outputs, the fraction of wrong signs."""
    if ref is None:
        return float("nan")
    result = result.double()
    if signs:
        return float((result != torch.sign(ref)).double().mean())
    return float((result - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


ROWS: list[dict] = []


def record(op, provider, fn, out_of, nbytes, flops, ref, signs=False):
    ms = timed(fn)
    mem = peak_mib(fn)
    fn()
    ROWS.append(
        {
            "op": op,
            "provider": provider,
            "ms": ms,
            "GB/s": nbytes / ms / 1e6,
            "TFLOP/s": flops / ms / 1e9,
            "peak MiB": mem,
            "err": rel_err(out_of(), ref, signs),
        }
    )


# ----------------------------------------------------------------------------- Jacobians


def jacobian_inputs(dtype):
    n, T, d, C = ARGS.n, ARGS.T, ARGS.d, ARGS.C
    x = torch.randn(n, T, d, device=DEV).to(dtype)
    g = torch.randn(n, C, T, d, device=DEV).to(dtype)
    lengths = torch.randint(T // 2, T + 1, (n,), device=DEV)
    mask = torch.arange(T, device=DEV)[None, :] < lengths[:, None]
    return x, g, mask


def bench_lora(dtype, sign):
    n, T, d, r, C = ARGS.n, ARGS.T, ARGS.d, ARGS.r, ARGS.C
    x, g, mask = jacobian_inputs(dtype)
    A = (torch.randn(r, d, device=DEV) / d**0.5).to(dtype)
    B = (torch.randn(d, r, device=DEV) / r**0.5).to(dtype)
    P = r * 2 * d
    out = torch.empty(n, C, P, device=DEV)
    es = x.element_size()
    nbytes = (n * T * d + n * C * T * d) * es + n * T + n * C * P * 4
    flops = n * C * (2 * T * d * r * 2) + n * (2 * T * d * r) + n * C * (2 * T * d * r)
    ref = None
    if not ARGS.no_error:
        expected = torch.empty(n, C, P, device=DEV, dtype=torch.float64)
        args64 = (x.double(), g.double(), A.double(), B.double(), 2.0, mask)
        ref_jac.lora_jacobian(*args64, expected, 0, r * d, sign)
        ref = expected
    label = f"lora_jacobian {str(dtype)[6:]}{' sign' if sign else ''}"
    args = (x, g, A, B, 2.0, mask, out, 0, r * d, sign)
    for provider, fn in (("torch", ref_jac.lora_jacobian), ("triton", tk.lora_jacobian)):
        record(label, provider, lambda f=fn: f(*args), lambda: out, nbytes, flops, ref, sign)


def bench_linear(dtype):
    n, T, d, C = ARGS.n, ARGS.T, ARGS.d, ARGS.C
    x, g, mask = jacobian_inputs(dtype)
    P = d * d + d
    out = torch.empty(n, C, P, device=DEV)
    nbytes = (n * T * d + n * C * T * d) * x.element_size() + n * C * P * 4
    flops = 2 * n * C * T * d * d
    ref = None
    if not ARGS.no_error:
        ref = torch.empty(n, C, P, device=DEV, dtype=torch.float64)
        ref_jac.linear_jacobian(x.double(), g.double(), mask, ref, 0, d * d)
    args = (x, g, mask, out, 0, d * d)
    label = f"linear_jacobian {str(dtype)[6:]}"
    record(label, "torch", lambda: ref_jac.linear_jacobian(*args), lambda: out, nbytes, flops, ref)
    record(label, "triton", lambda: tk.linear_jacobian(*args), lambda: out, nbytes, flops, ref)


# ----------------------------------------------------------------------------- Gram


def bench_gram(dtype, kind, symmetric, **kw):
    m, P = ARGS.m, ARGS.P
    a = torch.randn(m, P, device=DEV).to(dtype)
    b = a if symmetric else torch.randn(m, P, device=DEV).to(dtype)
    sign_a, sign_b = {"sgd": (False, False), "signgd": (True, True), "asym": (True, False)}[kind]
    out = torch.empty(m, m, device=DEV)
    nbytes = (1 if symmetric else 2) * m * P * a.element_size() + m * m * 4
    flops = 2 * m * m * P
    ref = None
    if not ARGS.no_error:
        ref = torch.empty(m, m, device=DEV, dtype=torch.float64)
        ref_gram.gram_tile(a.double(), b.double(), ref, sign_a, sign_b)
    extra = "".join(f" {k}={v}" for k, v in kw.items())
    label = f"gram_{'symmetric' if symmetric else 'tile'} {str(dtype)[6:]} {kind}{extra}"
    if symmetric:

        def run_ref():
            ref_gram.gram_symmetric(a, out, sign_a)

        def run():
            tk.gram_symmetric(a, out, sign_a, **kw)

    else:

        def run_ref():
            ref_gram.gram_tile(a, b, out, sign_a, sign_b)

        def run():
            tk.gram_tile(a, b, out, sign_a, sign_b, **kw)

    record(label, "torch", run_ref, lambda: out, nbytes, flops, ref)
    record(label, "triton", run, lambda: out, nbytes, flops, ref)
    if dtype == BF16 and kind == "sgd" and not symmetric:
        # what the kernel replaces: cuBLAS bf16 GEMM, output rounded to bf16
        raw = {}

        def run_bf16():
            raw["out"] = a @ b.t()

        record(label, "torch bf16 out", run_bf16, lambda: raw["out"], nbytes, flops, ref)


def main() -> None:
    global ARGS, DEV
    ARGS = parse_args()
    DEV = torch.device(ARGS.device)
    load_kernels()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    if ARGS.only in (None, "jacobian"):
        bench_lora(BF16, False)
        bench_lora(FP32, False)
        bench_lora(BF16, True)
        bench_linear(BF16)
        bench_linear(FP32)
    if ARGS.only in (None, "gram"):
        bench_gram(BF16, "sgd", False)
        bench_gram(BF16, "sgd", True)
        bench_gram(BF16, "signgd", True)
        bench_gram(BF16, "signgd", True, int8=False)
        bench_gram(BF16, "asym", False)
        bench_gram(FP32, "sgd", True)
        bench_gram(FP32, "sgd", True, input_precision="tf32x3")
    report()


def report() -> None:
    gpu = torch.cuda.get_device_name() if DEV.type == "cuda" else f"CPU ({platform.processor()})"
    mode = "Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled"
    print(f"# bench_kernels: {gpu}, {mode}, {datetime.date.today()}")
    versions = f"torch {torch.__version__}, triton {importlib.metadata.version('triton')}"
    print(f"{versions}; command: {' '.join(sys.argv)}")
    print(
        f"shapes: n={ARGS.n} T={ARGS.T} d_in=d_out={ARGS.d} r={ARGS.r} C={ARGS.C}; "
        f"Gram m=k={ARGS.m} P={ARGS.P}\n"
    )
    cols = list(ROWS[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in ROWS:
        cells = []
        for c in cols:
            v = row[c]
            cells.append(v if isinstance(v, str) else (f"{v:.3g}" if c != "ms" else f"{v:.3f}"))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
