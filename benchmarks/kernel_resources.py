"""Registers, spills and shared memory of every Triton kernel linft launches, compiled for sm_90.

Runs anywhere (no GPU): the launchers are called with the benchmark's shapes while a
recorder stands in for each ``@triton.jit`` kernel, so the exact tile configs,
specializations and constexprs the GPU would get are captured; each distinct launch
is then compiled offline by Triton for the H100/H200 target, and ``cuobjdump`` and the
PTX tell its registers, local (spill) memory, shared memory and product instruction.
A kernel that spills registers or asks for more shared memory than an sm_90 block may
use (227 KiB) is flagged, and the exit status is 1.

    python benchmarks/kernel_resources.py                  # RoBERTa-base bench shapes
    python benchmarks/kernel_resources.py --hidden 4096 --rank 16 --block 64

It must run with ``TRITON_INTERPRET`` unset: under the interpreter, ``@triton.jit``
makes interpreted functions, which cannot be compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from linft.backends import triton_kernels

triton_kernels()  # installed, or the source checkout's triton_kernels/
# the modules themselves (the package re-exports functions under the same names)
tgram = sys.modules["linft.triton_kernels.gram"]
tjac = sys.modules["linft.triton_kernels.lora_jacobian"]
tutils = sys.modules["linft.triton_kernels.utils"]
tsymm = sys.modules["linft.triton_kernels.symm_matmul"]

SM90_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
H200_SMS = 132

_PTR_TYPES = {
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.int8: "*i8",
    torch.uint8: "*u8",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.bool: "*i1",
}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` records the call."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.kernel, grid, args, kwargs))

        return launch


@contextlib.contextmanager
def recording(calls: list):
    """Launchers run their GPU code path on CPU tensors, kernels replaced by recorders."""
    saved_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    patches = [
        (tjac, "_token_sum_kernel", Recorder(tjac._token_sum_kernel, calls)),
        (tgram, "_gram_kernel", Recorder(tgram._gram_kernel, calls)),
        (tgram, "_gram_reduce_kernel", Recorder(tgram._gram_reduce_kernel, calls)),
        (tjac, "check_device", lambda *t: None),
        (tgram, "check_device", lambda *t: None),
        (tsymm, "_symm_matmul_kernel", Recorder(tsymm._symm_matmul_kernel, calls)),
        (tsymm, "check_device", lambda *t: None),
        (tutils, "num_sms", lambda index: H200_SMS),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


def specialization(kernel, args, kwargs):
    """Triton's launch-time view of the arguments: types, constants and divisibility hints."""
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    constexprs = {k: v for k, v in kwargs.items() if k not in options}
    signature, attrs = {}, {}
    for index, (name, value) in enumerate(zip(kernel.arg_names, args, strict=False)):
        if isinstance(value, torch.Tensor):
            signature[name] = _PTR_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # Triton folds integer arguments equal to 1 into constants
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"argument {name} of type {type(value).__name__}")
    for name in constexprs:
        signature[name] = "constexpr"
    return signature, constexprs, attrs, options


def cubin_resources(cubin: bytes) -> dict:
    """Registers and local memory (spills; the kernels use no stack) per thread, from
    ``cuobjdump -res-usage`` of the compiled binary."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"no resource line in cuobjdump's output:\n{out}")
    regs, stack, local = map(int, found.groups())
    return {"registers": regs, "local": stack + local}


def mma_kind(ptx: str) -> str:
    """The product instruction the compiled kernel uses: Hopper's asynchronous warpgroup
    MMA, the older per-warp MMA, or plain FMAs (true fp32 products)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "fma"


def compile_launch(kernel, args, kwargs) -> dict:
    signature, constexprs, attrs, options = specialization(kernel, args, kwargs)
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    report = cubin_resources(compiled.asm["cubin"])
    report["shared"] = compiled.metadata.shared
    report["mma"] = "-" if "reduce" in kernel.fn.__name__ else mma_kind(compiled.asm["ptx"])
    return report


def record(op, *args, **kwargs) -> list:
    """The kernel launches of one launcher call, recorded rather than run."""
    calls = []
    with recording(calls):
        op(*args, **kwargs)
    return calls


def bench_launches(args) -> list[tuple[str, list]]:
    """(case name, recorded launches) for the benchmark's module shapes and Gram tiles."""
    d, r, T, C, n = args.hidden, args.rank, args.seq, args.outputs, args.block
    P = args.layers * 2 * 2 * r * d  # LoRA on query and value: A [r, d] + B [d, r]
    rows = n * C
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        # Jacobian tiles do not depend on the number of samples: one sample is enough
        x = torch.zeros(1, T, d, dtype=dtype)
        g = torch.zeros(1, C, T, d, dtype=dtype)
        mask = torch.ones(1, T, dtype=torch.bool)
        A, B = torch.zeros(r, d, dtype=dtype), torch.zeros(d, r, dtype=dtype)
        out = torch.zeros(1, C, 2 * r * d + d * d + d, dtype=dtype)
        J = torch.zeros(1, P, dtype=dtype).expand(rows, P)  # shapes and strides only
        K = torch.zeros(rows, rows)
        cases += [
            (f"lora dA+dB {tag}", record(tjac.lora_jacobian, x, g, A, B, 2.0, mask, out, 0, r * d)),
            (
                f"lora dA+dB {tag} sign",
                record(tjac.lora_jacobian, x, g, A, B, 2.0, mask, out, 0, r * d, True),
            ),
            (
                f"linear dW+db {tag}",
                record(tjac.linear_jacobian, x, g, mask, out, 2 * r * d, 2 * r * d + d * d),
            ),
            (f"gram symmetric {tag}", record(tgram.gram_symmetric, J, K)),
            (f"gram tile {tag}", record(tgram.gram_tile, J, J, K)),
            (f"gram asym_signgd {tag}", record(tgram.gram_tile, J, J, K, True, False)),
        ]
    # the eigensolver's product: a 32768 kernel times a block of k + p = 110 vectors
    K, V = torch.zeros(1, 1).expand(32768, 32768), torch.zeros(32768, 110)
    for prec in ("tf32x3", "ieee"):
        cases.append((f"symm_matmul {prec}", record(tsymm.symm_matmul, K, V, input_precision=prec)))
    signs = torch.zeros(1, P, dtype=torch.int8).expand(rows, P)
    cases.append(
        ("gram signgd int8", record(tgram.gram_symmetric, signs, torch.zeros(rows, rows), True))
    )
    return cases


def resources(args) -> list[tuple[str, dict, dict]]:
    """(case, launch kwargs, compiled resources) of every launch; each distinct kernel
    is compiled once."""
    compiled, rows = {}, []
    for case, calls in bench_launches(args):
        for kernel, _, kargs, kwargs in calls:
            key = (kernel.fn.__name__, repr(sorted(kwargs.items())), len(kargs))
            if key not in compiled:
                compiled[key] = compile_launch(kernel, kargs, kwargs)
            rows.append((case, {"kernel": kernel.fn.__name__, **kwargs}, compiled[key]))
    return rows


def over_limits(rep: dict) -> bool:
    return rep["local"] > 0 or rep["shared"] > SM90_SHARED_LIMIT


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--outputs", type=int, default=2)
    p.add_argument("--block", type=int, default=512, help="samples per block")
    p.add_argument("--json", help="also write the rows here")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    if tutils.interpreting():
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    print(f"Triton {triton.__version__}, target sm_90 (H100/H200); shared limit 227 KiB\n")
    head = "| case | kernel | tiles (M, N, K, T) | warps | stages | product | regs | local B |"
    print(head + " shared KiB |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|")
    rows = resources(args)
    for case, kw, rep in rows:
        tiles = ", ".join(str(kw.get(f"BLOCK_{a}", "-")) for a in ("M", "N", "K", "T"))
        print(
            f"| {case} | {kw['kernel']} | {tiles} | {kw.get('num_warps', 4)} | "
            f"{kw.get('num_stages', 3)} | {rep['mma']} | {rep['registers']} | {rep['local']} | "
            f"{rep['shared'] / 1024:.1f}{' **over**' if over_limits(rep) else ''} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    bad = sum(over_limits(rep) for _, _, rep in rows)
    print(f"\n{len(rows)} launches; {bad} spill registers or exceed shared memory")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
