"""Where the kernel operator's Jacobian lives: rows ``[n C, P]`` of J, block by block.

``StoredJacobian``: J computed once, each block held in memory while a byte budget lasts and
in a checksummed file of ``checkpoint=DIR`` after that (the run's ``Checkpoint``: a killed
J pass resumes at the first block it had not finished). A block read from its file is
checked against its CRC-32 the first time this process reads it.

``RecomputedJacobian``: nothing stored; every pass over J runs the model again (one forward
and C backward passes per block), refusing a model whose weights changed since the
operator was built (the operator would no longer be one matrix).

Both count ``passes`` (reads of all of J, or recomputations of it): the cost the
eigensolvers minimise.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch

from ..kernel import signs
from ..kernel.engine import iterate_blocks
from ..kernel.model_state import run_context
from ..kernel.verify import checked as self_checked


_CHUNK_BYTES = 1 << 28  # J rows per GEMM of a product: 256 MiB


def available_memory() -> float:
    """Bytes of host memory available now (``MemAvailable``; total memory elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


class _Pass:
    """The J blocks of a run as the kernel reads them (signs decided for SignGD)."""

    def __init__(self, job, listed, kernel: str, n: int):
        self.job, self.listed, self.kernel, self.n = job, listed, kernel, n

    def stream(self, engine, progress=None, finished=None, verify=True):
        decide = signs.SignRows(self.job, self.listed)
        source = decide.in_float64_when_in_doubt(engine) if self.kernel == "signgd" else engine
        found = iterate_blocks(source, self.listed, progress, finished)
        if verify:
            found = self_checked(found, engine, self.job, self.listed, self.n, self.kernel)
        return signs.for_kernel(found, self.kernel, decide)


class StoredJacobian:
    """J's blocks after one pass of the model: ``(first row, tensor or file)`` each."""

    def __init__(self, job, listed, kernel: str, n: int, *, memory: float, ckpt, progress):
        self.num_rows = None
        self.num_columns = job.plan.num_columns
        self.device = job.device
        self.passes = 0
        self._ckpt, self._checked = ckpt, set()
        self.blocks: list[tuple[int, int, torch.Tensor | None]] = []  # (row0, rows, J or None)
        self.in_memory = self.in_file = 0
        diagonal = []  # K's diagonal |J_i|^2 while each block passes: no pass of its own later
        used, pending = 0.0, []
        engine = job.engine()
        stream = _Pass(job, listed, kernel, n).stream(
            engine, progress, None if ckpt is None else ckpt.finished("rows")
        )
        with run_context(job.model, _precision(job)):
            for start, J, done in stream:
                if done:  # finished by an earlier run: its file holds it, checked once here
                    J = ckpt.load("rows", start).to(self.device)
                    self._checked.add(start)
                elif ckpt is not None:
                    ckpt.finish("rows", start, J, keep=True)
                C = self.num_outputs = J.shape[1]
                self.dtype = J.dtype
                rows = J.reshape(-1, J.shape[-1])
                diagonal.append((start, rows.double().square().sum(1)))
                size = rows.numel() * rows.element_size()
                if used + size <= memory:
                    used += size
                    pending.append((start * C, rows))
                    self.in_memory += 1
                    if sum(r.numel() * r.element_size() for _, r in pending) >= _CHUNK_BYTES:
                        self._flush(pending)
                elif ckpt is None:
                    need = n * C * self.num_columns * rows.element_size()
                    raise MemoryError(
                        f"ntk_operator: J takes {_gb(need)} ({n} samples x {C} outputs x "
                        f"{self.num_columns} parameters), more than the {_gb(memory)} of "
                        "memory it may use; pass checkpoint=DIR to keep J on disk there, "
                        "store='recompute' to keep nothing, or a larger memory="
                    )
                else:
                    self._flush(pending)
                    self.blocks.append((start * C, rows.shape[0], None))
                    self.in_file += 1
        self._flush(pending)
        self.num_rows = n * self.num_outputs
        self.diagonal = torch.cat([d for _, d in sorted(diagonal, key=lambda e: e[0])])

    def _flush(self, pending: list) -> None:
        """Consecutive blocks in memory as one chunk: products then run a few large GEMMs
        rather than one small one per block (each of which reads and writes all of J^T X)."""
        if pending:
            rows = pending[0][1] if len(pending) == 1 else torch.cat([r for _, r in pending])
            self.blocks.append((pending[0][0], rows.shape[0], rows))
            pending.clear()

    def _block(self, i: int) -> torch.Tensor:
        row0, rows, J = self.blocks[i]
        if J is not None:
            return J
        C = self.num_outputs
        start = row0 // C
        if start in self._checked:
            J = self._ckpt.load("rows", start, check=False)
        else:
            J = self._ckpt.load("rows", start)
            self._checked.add(start)
        return J.reshape(rows, -1).to(self.device)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, J rows [rows, P])`` per chunk: one pass over J (blocks read from
        files are joined into chunks of about ``_CHUNK_BYTES``)."""
        self.passes += 1
        group: list[tuple[int, torch.Tensor]] = []
        for i, (row0, _, J) in enumerate(self.blocks):
            if J is not None:
                if group:
                    yield _joined(group)
                    group = []
                yield row0, J
                continue
            group.append((row0, self._block(i)))
            if sum(r.numel() * r.element_size() for _, r in group) >= _CHUNK_BYTES:
                yield _joined(group)
                group = []
        if group:
            yield _joined(group)

    def describe(self) -> str:
        where = f"{self.in_memory} blocks in memory"
        if self.in_file:
            where += f", {self.in_file} in files of {self._ckpt.dir}"
        return where


class RecomputedJacobian:
    """J recomputed block by block on every pass (nothing stored)."""

    def __init__(self, job, listed, kernel: str, n: int, *, progress):
        self.job, self.listed, self.kernel, self.n = job, listed, kernel, n
        self.num_columns = job.plan.num_columns
        self.device = job.device
        self.passes = 0
        self._weights = _weights(job.model)
        self._engine, self._verify = job.engine(), job.verify
        stream = self._stream(progress)  # the first block: self-check, C and the dtype
        _, first = next(stream)
        stream.close()
        self.num_outputs = self._C
        self.num_rows = n * self.num_outputs
        self.dtype = first.dtype

    def _stream(self, progress=None):
        if _weights(self.job.model) != self._weights:
            raise RuntimeError(
                "ntk_operator(store='recompute'): the model's weights changed since the "
                "operator was built, so its products would mix two kernels; build a new "
                "operator (or store J: store='auto')"
            )
        verify, self._verify = self._verify, False
        stream = _Pass(self.job, self.listed, self.kernel, self.n).stream(
            self._engine, progress, None, verify
        )
        with run_context(self.job.model, _precision(self.job)):
            for start, J, _ in stream:
                self._C = J.shape[1]
                yield start * J.shape[1], J.reshape(-1, J.shape[-1])

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        self.passes += 1
        yield from self._stream()

    def describe(self) -> str:
        return "recomputed on every pass (one forward and C backward passes per block)"


def _joined(group: list[tuple[int, torch.Tensor]]) -> tuple[int, torch.Tensor]:
    rows = group[0][1] if len(group) == 1 else torch.cat([r for _, r in group])
    return group[0][0], rows


def _weights(model) -> list:
    """What tells that a weight was replaced or edited in place: identity and version."""
    return [(n, p.data_ptr(), p._version) for n, p in model.named_parameters()]


def _precision(job):
    from ..backends import matmul_precision

    return matmul_precision(job.precision)


def stderr_line(progress):
    """How the operator says its choice of store in one line (silent for progress=False)."""
    if progress is False:
        return lambda line: None
    return lambda line: print(line, file=sys.stderr)
