"""One product of the kernel operator against one read of J, by number of columns.

J is a random float32 ``[rows, P]`` held in blocks of ``--block`` rows (as ``ntk_operator``
keeps it in memory). For b columns: one read of every entry of J (a sum: the bandwidth floor
of a pass), ``NTKOperator.feature_kernel().matmul`` (``J^T (J V)``, one pass) and
``NTKOperator.matmul`` (``J (J^T X)``, two passes), each beside the same products written
plainly per whole block (``J.T @ (J @ V)``), with the largest error relative to a float64
product.

    PYTHONPATH=. python benchmarks/bench_operator_products.py --rows 12000 --features 37634
"""

from __future__ import annotations

import argparse
import time

import torch

from linft.operator.kernel import NTKOperator


class Blocks:
    """J in blocks, shaped as the operator reads a stored Jacobian."""

    def __init__(self, J: torch.Tensor, block: int):
        self.blocks = [(i, J[i : i + block]) for i in range(0, J.shape[0], block)]
        self.num_rows, self.num_columns = J.shape
        self.num_outputs, self.device, self.passes = 1, J.device, 0

    def __iter__(self):
        self.passes += 1
        yield from self.blocks

    def describe(self) -> str:
        return f"{len(self.blocks)} blocks in memory"


def best(f, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--features", type=int, default=37634)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--columns", default="1,2,8,32,75")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    J = torch.randn(args.rows, args.features)
    store = Blocks(J, args.block)
    op = NTKOperator(store, torch.float32, "sgd", progress=False)
    G = op.feature_kernel()
    read = best(lambda: [b.sum() for _, b in store], args.repeats)
    gib = J.numel() * 4 / 2**30
    print(f"J [{args.rows} x {args.features}] float32 {gib:.2f} GiB in blocks of {args.block} "
          f"rows, {args.threads} threads; one read {read:.4f} s ({gib / read:.1f} GiB/s)")  # fmt: skip
    print("| b | read | J^T (J V): linft | plain | error | J (J^T X): linft | plain | error |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    J64 = J.double()
    for b in [int(c) for c in args.columns.split(",")]:
        V = torch.randn(args.features, b)
        X = torch.randn(args.rows, b)

        def plain_features():
            Y = torch.zeros(args.features, b)
            for _, blk in store:
                Y.addmm_(blk.T, blk @ V)
            return Y

        def plain_kernel():
            Z = torch.zeros(args.features, b)
            for _, blk in store:
                Z.addmm_(blk.T, X[_ : _ + blk.shape[0]])
            return torch.cat([blk @ Z for _, blk in store])

        ref_f = J64.T @ (J64 @ V.double())
        ref_k = J64 @ (J64.T @ X.double())
        err_f = float((G.matmul(V).double() - ref_f).abs().max() / ref_f.abs().max())
        err_k = float((op.matmul(X).double() - ref_k).abs().max() / ref_k.abs().max())
        t_f = best(lambda: G.matmul(V), args.repeats)
        t_pf = best(plain_features, args.repeats)
        t_k = best(lambda: op.matmul(X), args.repeats)
        t_pk = best(plain_kernel, args.repeats)
        print(f"| {b} | {read:.3f} s | {t_f:.3f} s ({t_f / read:.1f}x read) | {t_pf:.3f} s | "
              f"{err_f:.1e} | {t_k:.3f} s ({t_k / read:.1f}x) | {t_pk:.3f} s | {err_k:.1e} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
