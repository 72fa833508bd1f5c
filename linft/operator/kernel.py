"""The kernel ``K = J J^T`` (``[n C, n C]``) as an operator over J's blocks, never formed.

What each method costs, in passes over J (a read of every stored block, or for
``store="recompute"`` one forward and C backward passes of the model per block):

- ``matmul(X)``: two. ``Z = J^T X`` needs every block before ``J Z`` can start, so the
  rows of J are read once for each half; ``4 n C P b`` multiply-adds for ``b`` columns.
- ``diagonal()``, ``trace()``: one, the first time (kept).
- ``feature_gram()``: one; ``G = J^T J`` ``[P, P]`` in float64, whose nonzero eigenvalues
  are K's (``J^T J`` and ``J J^T`` share them): for ``P < n C`` every eigenvalue of K from
  one pass and a ``P x P`` ``eigh``.
- ``feature_matmul(U)``: one; ``J U``, K's eigenvectors from G's (``v = J u / sqrt(lambda)``).
- ``feature_kernel()``: ``G = J^T J`` ``[P, P]`` as an operator whose product
  ``G V = sum_blocks J_b^T (J_b V)`` reads each block once: one pass per product where
  ``matmul`` takes two, with the same nonzero eigenvalues. Block Krylov on it
  (``topk_eigh``'s ``"features"``) halves the passes of Krylov on K.
- ``to_dense()``: one, and ``(n C)^2`` floats of memory (small n only).

Products accumulate in ``dtype`` (float32, or float64 with ``accumulate="fp64"``). The
spectrum code (``linft.eig``, ``linft.spectrum``) sees only these methods.
"""

from __future__ import annotations

import torch
from torch import Tensor

_DENSE_LIMIT = 1 << 31  # bytes of K that to_dense forms (2 GiB)


def _pieces(J: Tensor, row0: int, cols: int):
    """``(first row, rows)`` of a block of J for a product with ``cols`` columns. On the CPU
    the products run as ``X^T J`` on pieces of rows that stay in cache: with few columns a
    whole block's ``J^T Z`` took 7-15x longer (a 6,000 x 37,634 block, 2 to 8 columns:
    1.0-1.2 s against 0.10-0.16 s in pieces of 16 rows), and a product with 1 column reads J
    once rather than twice."""
    if J.device.type != "cpu":
        yield row0, J
        return
    step = 16 if cols <= 8 else 256
    for i in range(0, J.shape[0], step):
        yield row0 + i, J[i : i + step]


class NTKOperator:
    """``X -> K X`` for the kernel of ``linft.ntk_operator`` (see the module docstring).

    ``shape`` ``(n C, n C)`` with row ``i C + a`` for sample i and output a (the order of
    ``ntk(...).reshape(n C, n C)``), ``dtype`` (of the products), ``device``,
    ``num_features`` (P), ``passes`` (over J so far), ``store`` (where J lives, in words).
    """

    def __init__(self, jacobian, accumulate: torch.dtype, kernel: str, progress=None):
        self.J, self.dtype, self.kernel = jacobian, accumulate, kernel
        self._progress, self._bar = progress, None
        self.device = jacobian.device
        n = jacobian.num_rows
        self.shape = (n, n)
        self.num_features = jacobian.num_columns
        self.num_outputs = jacobian.num_outputs
        self._diagonal: Tensor | None = None

    def rows(self):
        """``(first row, J rows)`` of one pass over J, counted on a progress bar (a terminal,
        or ``progress=True``): a spectrum of a large kernel is tens of passes."""
        yield from self.J
        if self._progress is not False:
            if self._bar is None:
                from tqdm.auto import tqdm

                disable = None if self._progress is None else False
                self._bar = tqdm(desc="linft: passes over J", unit="pass", disable=disable)
            self._bar.update(1)

    @property
    def passes(self) -> int:
        return self.J.passes

    @property
    def store(self) -> str:
        return self.J.describe()

    def __repr__(self) -> str:
        n, P = self.shape[0], self.num_features
        return (
            f"NTKOperator(kernel={self.kernel!r}, shape={self.shape}, P={P}, "
            f"dtype={self.dtype}, J: {self.store})"
        )

    def _rows(self, J: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return J.to(self.dtype if dtype is None else dtype)

    def _check(self, X: Tensor, rows: int, what: str) -> tuple[Tensor, bool]:
        if not isinstance(X, Tensor):
            raise TypeError(f"NTKOperator.{what}: X must be a tensor, got {type(X).__name__}")
        vector = X.dim() == 1
        X = X[:, None] if vector else X
        if X.dim() != 2 or X.shape[0] != rows:
            raise ValueError(
                f"NTKOperator.{what}: X must be [{rows}, b] (or [{rows}]), got {tuple(X.shape)}"
            )
        return X.to(self.device, self.dtype), vector

    def matmul(self, X: Tensor) -> Tensor:
        """``K X`` for X ``[n C, b]`` (or a vector ``[n C]``): two passes over J."""
        X, vector = self._check(X, self.shape[0], "matmul")
        Xt = X.T.contiguous()  # [b, n C]: thin products as X^T J (see _pieces)
        Zt = torch.zeros(Xt.shape[0], self.num_features, dtype=self.dtype, device=self.device)
        for row0, J in self.rows():
            for r, piece in _pieces(self._rows(J), row0, Xt.shape[0]):
                Zt.addmm_(Xt[:, r : r + piece.shape[0]], piece)
        Yt = torch.empty_like(Xt)
        for row0, J in self.rows():
            for r, piece in _pieces(self._rows(J), row0, Xt.shape[0]):
                Yt[:, r : r + piece.shape[0]] = Zt @ piece.T
        Y = Yt.T.contiguous()
        return Y[:, 0] if vector else Y

    __matmul__ = matmul

    def diagonal(self) -> Tensor:
        """``K_ii = |J_i|^2`` ``[n C]`` (float64 sums, in ``dtype``): one pass, then kept."""
        if self._diagonal is None:
            self._diagonal = getattr(self.J, "diagonal", None)  # found in the J pass
        if self._diagonal is None:
            d = torch.empty(self.shape[0], dtype=torch.float64, device=self.device)
            for row0, J in self.rows():
                d[row0 : row0 + J.shape[0]] = self._rows(J, torch.float64).square().sum(1)
            self._diagonal = d
        return self._diagonal.to(self.dtype)

    def trace(self) -> float:
        """``sum_i K_ii`` (float64)."""
        self.diagonal()
        return float(self._diagonal.sum())

    def feature_gram(self) -> Tensor:
        """``J^T J`` ``[P, P]`` in float64 (products of float32 entries are exact in it):
        one pass; the nonzero eigenvalues of K."""
        P = self.num_features
        G = torch.zeros(P, P, dtype=torch.float64, device=self.device)
        for _, J in self.rows():
            J = self._rows(J, torch.float64)
            G.addmm_(J.T, J)
        return (G + G.T) * 0.5

    def feature_matmul(self, U: Tensor) -> Tensor:
        """``J U`` ``[n C, b]`` for U ``[P, b]``: one pass."""
        U, vector = self._check(U, self.num_features, "feature_matmul")
        Y = torch.empty(self.shape[0], U.shape[1], dtype=U.dtype, device=self.device)
        for row0, J in self.rows():
            J = self._rows(J, U.dtype)
            torch.mm(J, U, out=Y[row0 : row0 + J.shape[0]])
        return Y[:, 0] if vector else Y

    def feature_kernel(self) -> FeatureKernel:
        """``J^T J`` ``[P, P]`` as an operator: one pass over J per product."""
        return FeatureKernel(self)

    def to_dense(self) -> Tensor:
        """K ``[n C, n C]`` itself (one pass; for kernels that fit in memory)."""
        n = self.shape[0]
        size = n * n * torch.finfo(self.dtype).bits // 8
        if size > _DENSE_LIMIT:
            raise ValueError(
                f"NTKOperator.to_dense: K would take {size / 2**30:.1f} GiB; ask the operator "
                "for what is needed instead: linft.spectrum(op, k=...), linft.topk_eigh(op, k), "
                "op.matmul(X), op.diagonal()"
            )
        J = torch.cat([self._rows(J) for _, J in self.rows()])
        K = J @ J.T
        return (K + K.T) * 0.5


class FeatureKernel:
    """``G = J^T J`` ``[P, P]`` of an ``NTKOperator``: ``matmul(V) = sum_b J_b^T (J_b V)``, one
    pass over J per product (K's ``matmul`` needs all of ``J^T X`` before ``J Z`` can start:
    two). G and ``K = J J^T`` have the same nonzero eigenvalues with the same multiplicities,
    and ``trace(G) = trace(K)``; an eigenvector u of G gives K's ``J u / sqrt(lambda)``."""

    def __init__(self, kernel: NTKOperator):
        self.kernel = kernel
        P = kernel.num_features
        self.shape = (P, P)
        self.dtype, self.device = kernel.dtype, kernel.device

    def __repr__(self) -> str:
        return f"FeatureKernel(J^T J of {self.kernel!r})"

    def matmul(self, V: Tensor) -> Tensor:
        """``J^T (J V)`` for V ``[P, b]`` (or ``[P]``): one pass over J."""
        K = self.kernel
        V, vector = K._check(V, self.shape[0], "feature_kernel().matmul")
        Vt = V.T.contiguous()  # [b, P]: thin products as V^T J^T J (see _pieces)
        Yt = torch.zeros_like(Vt)
        for row0, J in K.rows():
            for _, piece in _pieces(K._rows(J), row0, Vt.shape[0]):
                Yt.addmm_(Vt @ piece.T, piece)
        Y = Yt.T.contiguous()
        return Y[:, 0] if vector else Y

    __matmul__ = matmul

    def trace(self) -> float:
        return self.kernel.trace()
