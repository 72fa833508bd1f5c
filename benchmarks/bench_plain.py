"""linft.ntk on a plain PyTorch model against the PyTorch NTK tutorial's two recipes.

Setup: the tutorial's CNN (Conv2d 3-32-32-32 with 3x3 kernels and ReLU on 3x32x32 images,
then Linear to 10 outputs; random weights, ``forward(self, x, /)``), ``x_train`` of N and
``x_test`` of M images, K(x_train, x_test) with ``compute="full"`` ``[N, C, M, C]`` and
``"trace"`` ``[N, M]``. Providers, fp32:

- ``linft``: ``linft.ntk(net, x_train, x_test, outputs=...)`` (tensor inputs as they are);
- ``jacobian contraction``: the tutorial's ``vmap(jacrev(f))`` on both sets, then einsum;
- ``NTK-vector products``: the tutorial's ``vjp`` / ``jvp`` over the output basis.

Each row: best of ``--repeats`` times and the relative (Frobenius) error against the
jacobian contraction in float64.

    PYTHONPATH=. python benchmarks/bench_plain.py                    # 20 x 5 and 200 x 200
    PYTHONPATH=. python benchmarks/bench_plain.py --sizes 20x5       # one size
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from timing import timed  # benchmarks/, on the path when a script runs
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

import linft


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, (3, 3))
        self.conv2 = nn.Conv2d(32, 32, (3, 3))
        self.conv3 = nn.Conv2d(32, 32, (3, 3))
        self.fc = nn.Linear(21632, 10)

    def forward(self, x, /):
        x = self.conv1(x).relu()
        x = self.conv2(x).relu()
        x = self.conv3(x).relu()
        return self.fc(x.flatten(1))


def single(net):
    def f(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    return f


def jacobian_contraction(net, params, x1, x2, compute):
    f = single(net)
    jac1 = [j.flatten(2) for j in vmap(jacrev(f), (None, 0))(params, x1).values()]
    jac2 = [j.flatten(2) for j in vmap(jacrev(f), (None, 0))(params, x2).values()]
    expr = "Naf,Mbf->NaMb" if compute == "full" else "Naf,Maf->NM"
    return torch.stack([torch.einsum(expr, a, b) for a, b in zip(jac1, jac2, strict=True)]).sum(0)


def ntk_vector_products(net, params, x1, x2, compute):
    f = single(net)

    def get_ntk(a, b):
        out, vjp_fn = vjp(lambda p: f(p, a), params)

        def ntk_slice(vec):
            (vjps,) = vjp_fn(vec)
            return jvp(lambda p: f(p, b), (params,), (vjps,))[1]

        basis = torch.eye(out.numel(), dtype=out.dtype).view(out.numel(), -1)
        return vmap(ntk_slice)(basis)

    result = vmap(vmap(get_ntk, (None, 0)), (0, None))(x1, x2)  # [N, M, C, C]
    if compute == "full":
        return result.permute(0, 2, 1, 3)
    return torch.einsum("NMKK->NM", result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="20x5,200x200", help="NxM pairs, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="parameters of .* take the exact but slow")
    torch.manual_seed(0)
    net = CNN().eval()
    params = {k: v.detach() for k, v in net.named_parameters()}
    net64 = copy.deepcopy(net).double()
    params64 = {k: v.detach() for k, v in net64.named_parameters()}
    print(f"tutorial CNN ({sum(p.numel() for p in params.values())} parameters, C = 10), CPU, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"linft {linft.__version__}")  # fmt: skip
    print("| N x M | compute | provider | time (s) | error vs float64 |")
    print("|---|---|---|---:|---:|")
    for size in args.sizes.split(","):
        n, m = map(int, size.split("x"))
        x1, x2 = torch.randn(n, 3, 32, 32), torch.randn(m, 3, 32, 32)
        exact = {
            c: jacobian_contraction(net64, params64, x1.double(), x2.double(), c)
            for c in ("full", "trace")
        }
        providers = {  # slowest last, so that a long run shows the others first
            "linft": lambda c, a=x1, b=x2: linft.ntk(net, a, b, outputs=c),
            "jacobian contraction": lambda c, a=x1, b=x2: jacobian_contraction(
                net, params, a, b, c
            ),
            "NTK-vector products": lambda c, a=x1, b=x2: ntk_vector_products(net, params, a, b, c),
        }
        for name, fn in providers.items():
            for compute in ("full", "trace"):
                try:
                    t, K = timed(lambda f=fn, c=compute: f(c), args.repeats)
                except (MemoryError, RuntimeError) as err:  # the CPU allocator's refusal
                    if "allocate" not in str(err):
                        raise
                    asked = str(err).split("allocate ")[-1].split(".")[0]
                    print(f"| {n} x {m} | {compute} | {name} | out of memory ({asked}) | |")
                    continue
                err = float((K.double() - exact[compute]).norm() / exact[compute].norm())
                print(f"| {n} x {m} | {compute} | {name} | {t:.3f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
