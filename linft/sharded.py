"""Kernels held in pieces by the ranks of a process group, as operators for the eigensolver.

``KernelShard``: rank r's rows of K (``ntk(..., out="shard")``). As an operator,
``K X`` is each rank's ``K_r X`` gathered: one all-gather of ``[N C, m]`` per product.

``JacobianShard``: rank r's rows of J (``jacobian(..., out="shard")``); ``.kernel()`` is
the matrix-free operator ``K X = J (J^T X)`` (Jacot et al. 2018; the empirical NTK of
Malladi et al. 2023): one all-reduce of ``J^T X`` (``[P, m]``) and one all-gather of the
rows ``J_r (J^T X)`` per product, so K is never formed anywhere. It also offers
``J^T J`` (``feature_kernel()``: one all-reduce of ``[P, m]`` per product, no all-gather;
``feature_gram()``: one all-reduce of ``[P, P]``), where ``linft.spectrum`` and
``topk_eigh`` find K's nonzero eigenvalues at half the communication.

Every rank gets the same product, so every rank runs the same deterministic solver
(``topk_eigh`` with a seed) and finds the same eigenpairs; ``linft.spectrum`` takes either
as it takes any operator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _product_check(Y: Tensor, X: Tensor, comm, counts: list[int], what: str) -> Tensor:
    """The rows of every rank gathered, checking that every rank multiplied the same X
    (the column sums of X travel as one extra row)."""
    if comm is None:
        return Y
    sums = X.sum(0, keepdim=True).to(Y.dtype).to(Y.device)
    full = comm.all_gather_rows(torch.cat([Y, sums]), [c + 1 for c in counts], what)
    ends = torch.tensor([c + 1 for c in counts]).cumsum(0).tolist()
    tags = full[[e - 1 for e in ends]]
    if not bool((tags == tags[0]).all()):
        raise ValueError(
            "the ranks multiplied a sharded kernel by different X: call topk_eigh / spectrum "
            "on every rank with the same arguments and seed= (linft.spectrum passes seed=0)"
        )
    keep = torch.ones(full.shape[0], dtype=torch.bool)
    keep[[e - 1 for e in ends]] = False
    return full[keep.to(full.device)]


@dataclass
class KernelShard:
    """Rank ``comm.rank``'s rows of a kernel matrix ``[N*per, M*per]`` (``per`` = C, or 1
    for traces and C = 1): ``local`` holds rows ``rows`` (samples ``start`` ..). A
    symmetric one is an operator (``shape``, ``dtype``, ``device``, ``matmul``) for
    ``topk_eigh`` and ``spectrum``; ``full()`` gathers K on every rank."""

    local: Tensor
    start: int
    n_rows: int
    n_cols: int
    per: int
    counts: list[int]  # rows of each rank
    comm: object = None
    symmetric: bool = True

    @classmethod
    def whole(cls, K: Tensor, symmetric: bool) -> KernelShard:
        """The kernel of one process (``[N, C, M, C]`` or ``[N, M]``) as its only shard."""
        per = K.shape[1] if K.dim() == 4 else 1
        M = K.reshape(K.shape[0] * per, -1)
        n_cols = M.shape[1] // per
        return cls(M, 0, K.shape[0], n_cols, per, [M.shape[0]], None, symmetric)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows * self.per, self.n_cols * self.per)

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def rows(self) -> slice:
        """This rank's rows of the kernel matrix."""
        r0 = self.start * self.per
        return slice(r0, r0 + self.local.shape[0])

    def _square(self) -> None:
        if not self.symmetric or self.shape[0] != self.shape[1]:
            raise ValueError(
                "this kernel is not symmetric (a cross kernel K(X, X2), or asym_signgd); the "
                "spectrum needs a symmetric K(X, X)"
            )

    def matmul(self, X: Tensor) -> Tensor:
        """``K @ X`` (X ``[N*per, m]``, the same on every rank), the same on every rank."""
        self._square()
        Y = self.local @ X.to(self.local.device, self.local.dtype)
        return _product_check(Y, X, self.comm, self.counts, "multiplying a sharded kernel")

    def trace(self) -> float:
        self._square()
        r = self.rows
        t = self.local[:, r].diagonal().double().sum().reshape(1)
        if self.comm is not None:
            t = self.comm.all_reduce(t, "summing the trace")
        return float(t)

    def full(self) -> Tensor:
        """The whole kernel matrix on every rank (one all-gather: for kernels that fit)."""
        if self.comm is None:
            return self.local
        return self.comm.all_gather_rows(self.local, self.counts, "gathering the kernel")

    def to_dense(self) -> Tensor:
        """``full()`` of a symmetric kernel (what ``linft.spectrum`` reads)."""
        self._square()
        return self.full()


@dataclass
class JacobianShard:
    """Rank ``comm.rank``'s rows of the Jacobian ``[N, C, P]``: samples ``start`` ..
    ``start + local.shape[0]`` (``jacobian(..., out="shard")``)."""

    local: Tensor
    start: int
    n_samples: int
    counts: list[int]  # samples of each rank
    comm: object = None

    def kernel(self, kernel: str = "sgd", outputs: str = "full") -> KernelOperator:
        """The matrix-free kernel ``K X = J (J^T X)`` (``"sgd"``) or ``sign J (sign J^T X)``
        (``"signgd"``); ``outputs="trace"`` sums the outputs' kernels."""
        if kernel not in ("sgd", "signgd"):
            raise ValueError(
                f"kernel={kernel!r} is not symmetric (or unknown); the operator is 'sgd' or "
                "'signgd'"
            )
        if outputs not in ("full", "trace"):
            raise ValueError(f"unknown outputs {outputs!r}; choose 'full' or 'trace'")
        return KernelOperator(self, kernel, outputs)


class KernelOperator:
    """``X -> K X`` from row-sharded Jacobians, never forming K (see the module docstring).

    ``matmul``: ``Z = sum_r J_r^T X_r`` (one all-reduce of ``[P, m]``, or ``[C, P, m]`` for
    traces), then every rank's ``J_r Z`` gathered (one all-gather of ``[N*per, m]``)."""

    def __init__(self, J: JacobianShard, kernel: str, outputs: str):
        local = J.local
        if kernel == "signgd":
            local = torch.sign(local)
        acc = torch.float64 if local.dtype == torch.float64 else torch.float32
        self.J = local.to(acc)
        self.shard, self.kernel, self.outputs = J, kernel, outputs
        C = local.shape[1]
        self.per = 1 if outputs == "trace" or C == 1 else C
        self.traced = outputs == "trace" and C > 1

    @property
    def shape(self) -> tuple[int, int]:
        n = self.shard.n_samples * self.per
        return (n, n)

    @property
    def dtype(self) -> torch.dtype:
        return self.J.dtype

    @property
    def device(self) -> torch.device:
        return self.J.device

    def matmul(self, X: Tensor) -> Tensor:
        sh, J = self.shard, self.J
        r0 = sh.start * self.per
        Xr = X[r0 : r0 + J.shape[0] * self.per].to(J.device, J.dtype)
        if self.traced:
            Z = torch.einsum("ncp,nm->cpm", J, Xr)
        else:
            Z = J.reshape(-1, J.shape[-1]).t() @ Xr
        if sh.comm is not None:
            Z = sh.comm.all_reduce(Z, "summing J^T X over the ranks")
        if self.traced:
            Y = torch.einsum("ncp,cpm->nm", J, Z)
        else:
            Y = J.reshape(-1, J.shape[-1]) @ Z
        counts = [c * self.per for c in sh.counts]
        return _product_check(Y, X, sh.comm, counts, "multiplying a sharded Jacobian")

    # A = F F^T with F = J (not the traced kernel): the P-space routes of linft.eig
    @property
    def num_features(self) -> int | None:
        return None if self.traced else int(self.J.shape[-1])

    def feature_kernel(self) -> SharedFeatureKernel:
        """``J^T J`` ``[P, P]`` as an operator: ``sum_r J_r^T (J_r V)``, one all-reduce of
        ``[P, m]`` per product and no all-gather (``matmul`` needs both)."""
        self._features("feature_kernel")
        return SharedFeatureKernel(self)

    def feature_gram(self) -> Tensor:
        """``J^T J`` ``[P, P]`` in float64: one all-reduce of ``P^2`` floats."""
        self._features("feature_gram")
        J = self._rows().double()
        G = J.T @ J
        if self.shard.comm is not None:
            G = self.shard.comm.all_reduce(G, "summing J^T J over the ranks")
        return (G + G.T) * 0.5

    def feature_matmul(self, U: Tensor) -> Tensor:
        """``J U`` ``[N C, b]`` on every rank (one all-gather of its rows)."""
        self._features("feature_matmul")
        Y = self._rows().to(U.dtype) @ U.to(self.device)
        if self.shard.comm is None:
            return Y
        counts = [c * self.per for c in self.shard.counts]
        return self.shard.comm.all_gather_rows(Y, counts, "gathering J U")

    def _rows(self) -> Tensor:
        return self.J.reshape(-1, self.J.shape[-1])

    def _features(self, what: str) -> None:
        if self.traced:
            raise ValueError(f"{what}: the traced kernel (outputs='trace') is not J J^T")

    def trace(self) -> float:
        t = (self.J.double() ** 2).sum().reshape(1)
        if self.shard.comm is not None:
            t = self.shard.comm.all_reduce(t, "summing the trace")
        return float(t)

    def full(self) -> Tensor:
        """The whole kernel matrix on every rank, by products with the identity."""
        n = self.shape[0]
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        M = torch.cat([self.matmul(eye[:, j : j + 1024]) for j in range(0, n, 1024)], 1)
        return (M + M.T) * 0.5  # J (J^T I) is symmetric up to rounding

    to_dense = full


class SharedFeatureKernel:
    """``J^T J`` ``[P, P]`` of row-sharded Jacobians (``KernelOperator.feature_kernel``): the
    same product on every rank, from one all-reduce."""

    def __init__(self, kernel: KernelOperator):
        self.kernel = kernel
        P = kernel.num_features
        self.shape = (P, P)
        self.dtype, self.device = kernel.dtype, kernel.device

    def matmul(self, V: Tensor) -> Tensor:
        K = self.kernel
        J = K._rows()
        Y = J.T @ (J @ V.to(J.device, J.dtype))
        if K.shard.comm is not None:
            Y = K.shard.comm.all_reduce(Y, "summing J^T J V over the ranks")
        return Y

    def trace(self) -> float:
        return self.kernel.trace()
