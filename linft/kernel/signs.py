"""Signs for the SignGD kernels: Jacobian parts that are rounding noise count as zero.

``sign J`` is discontinuous at 0. Where the exact Jacobian is zero for a sample (the
query and key projections of a one-token sample: softmax over one key has zero
derivative), the computed entries are rounding noise whose signs change with the batch
size and the padding. Such noise comes in whole structural parts: every row of a module
for that sample and output (Llama's ``q_proj``), or the rows of some of a fused module's
output features (the query and key thirds of GPT-2's ``c_attn``). So the decision is
made per sample ``i`` and output ``a`` on such parts:

- the module: ``||J_{i,a,m}||`` against the largest module of the row;
- the rows and columns of a matrix parameter and the entries of a vector (a bias), in runs
  of ``_RUN`` or more consecutive ones: against their module (the key bias of an attention
  layer has an exact zero gradient: softmax does not see a shift of every score);
- and a single entry against its module: one that nearly cancels (a sum over tokens of
  terms of both signs) has a sign float32 may not know; it is taken from float64, and
  zeroed only where float64 puts it at its rounding level too.

Where no part is at or below the band (``_BAND``: 2^-14 in float32, 2^9 unit roundoffs
above the largest noise measured) float32 determines the row, and it is left exactly as
computed. Otherwise the sample is recomputed in float64 (the same rules, the pure-torch
ops) and the parts in doubt take their float64 values, zero where the float64 part is at
float64 rounding level (``_ZERO``) of the row's largest module: exact zeros. Every sign
float32 determines stays as float32 gives it; a float64 run decides at once. Every
per-group kernel reads the same decided J, so the groups still sum to the full kernel.

NOTE: measured on the test Llama (one-token samples, float32): noise modules reach 7.1e-8
of their row's largest module; the smallest real module of a RoBERTa classifier with a
trainable head (query LoRA) 6.3e-6, below the band, so such runs recompute their samples
in float64. Real parts inside the band exist too: a nearly saturated attention head of the
pretrained MiniLM has query gradients 1e-6 to 1e-4 of its module's, where float32 keeps
only a few digits (the cost is in ``benchmarks/RESULTS.md``, ``bench_signs.py``).
"""

from __future__ import annotations

import warnings

import torch

from ..backends import TORCH_OPS
from ..params import module_group
from .batches import slice_batch

# The share below which a part may be rounding noise, per precision. bf16/tf32 products
# accumulate in float32 but their inputs carry 2^-8 / 2^-11 rounding.
_BAND = {"fp32": 2.0**-14, "tf32": 2.0**-5, "bf16": 2.0**-5}
# Features in doubt only in runs this long: a head's width is 32 or more in real models.
_RUN = 8
# A float64 part at or below this share of its row's largest module is float64 rounding
# noise: 2^12 unit roundoffs.
_ZERO = 2.0**-40


class _Param:
    """One selected parameter: its columns in J, its module, and for a matrix (``[out, in]``
    Linear, ``[in, out]`` Conv1D, LoRA factors) its rows and columns, ``grid``."""

    def __init__(self, cols: slice, shape: torch.Size, module: int):
        self.cols, self.module, self.length = cols, module, shape.numel()
        self.grid = (shape[:-1].numel(), shape[-1]) if len(shape) >= 2 else None


class SignRows:
    """Decides, in each J block of a run, which parts are rounding noise (module docstring).

    ``block_list``: the run's ``(start, batch)`` blocks, to recompute samples from.
    ``recomputed`` counts the samples re-evaluated in float64 (the decision's cost).
    """

    def __init__(self, job, block_list: list):
        self.job, self.block_list = job, block_list
        modules: dict[str, int] = {}
        self.params: list[_Param] = []
        col = 0
        for name, p in job.selected:
            m = modules.setdefault(module_group(name), len(modules))
            self.params.append(_Param(slice(col, col + p.numel()), p.shape, m))
            col += p.numel()
        self.num_modules = len(modules)
        self.float64 = job.dtype == torch.float64
        self.band = _ZERO if self.float64 else _BAND[job.precision]
        self.recomputed = 0
        self._engine64 = None
        # Once a block had most of its samples in doubt, the next ones are computed in
        # float64 at once (``in_float64_when_in_doubt``): one pass instead of two.
        self.direct = False

    # --- the parts and their sizes

    def _sizes(self, J: torch.Tensor):
        """``(modules [n, C, G], parts)``: each module's norm, and per matrix parameter the
        norms of its rows ``[n, C, lead]`` and columns ``[n, C, last]`` (None otherwise)."""
        acc = torch.float64 if J.dtype == torch.float64 else torch.float32
        n, C = J.shape[:2]
        sq = torch.zeros(n, C, self.num_modules, dtype=acc, device=J.device)
        parts = []
        for p in self.params:
            block = J[..., p.cols].to(acc)
            sq[:, :, p.module] += block.square().sum(-1)
            if p.grid is None:
                parts.append(None)
                continue
            m = block.reshape(n, C, *p.grid)
            rows = torch.linalg.vector_norm(m, dim=-1)
            cols = torch.linalg.vector_norm(m, dim=-2)
            parts.append((rows, cols))
        return sq.sqrt(), parts

    def _doubtful(self, J: torch.Tensor) -> torch.Tensor:
        """``[n, C, P]`` bool: the columns of parts at or below the band (module docstring)."""
        modules, parts = self._sizes(J)
        top = modules.amax(dim=-1, keepdim=True)
        low_module = (modules > 0) & (modules <= self.band * top)
        n, C = J.shape[:2]
        doubt = torch.zeros(J.shape, dtype=torch.bool, device=J.device)
        for p, part in zip(self.params, parts, strict=True):
            here = low_module[:, :, p.module, None].expand(n, C, p.length)
            limit = self.band * modules[:, :, p.module, None]
            size = J[..., p.cols].abs()
            if part is None:  # a vector (a bias): its entries are output features
                here = here | _in_runs(size, limit)
            else:
                rows, cols = (_in_runs(x, limit) for x in part)
                here = here | (rows[..., :, None] | cols[..., None, :]).reshape(n, C, -1)
            # A single entry that nearly cancels: float32 may not know its sign either.
            here = here | ((size > 0) & (size <= limit))
            doubt[..., p.cols] = here
        return doubt

    def _exact_zeros(self, J: torch.Tensor) -> torch.Tensor:
        """``[n, C, P]`` bool: the columns of float64 parts at float64 rounding level (the
        entries of a vector: at that level themselves)."""
        modules, parts = self._sizes(J)
        floor = _ZERO * modules.amax(dim=-1, keepdim=True)
        n, C = J.shape[:2]
        zero = torch.zeros(J.shape, dtype=torch.bool, device=J.device)
        for p, part in zip(self.params, parts, strict=True):
            here = (modules[:, :, p.module, None] <= floor).expand(n, C, p.length)
            here = here | (J[..., p.cols].abs() <= floor)
            if part is not None:
                rows, cols = part
                grid = (rows <= floor)[..., :, None] | (cols <= floor)[..., None, :]
                here = here | grid.reshape(n, C, -1)
            zero[..., p.cols] = here
        return zero

    # --- the decision

    def decided(self, start: int, J: torch.Tensor) -> torch.Tensor:
        """J ``[n, C, P]`` (global first sample ``start``) with its noise parts zeroed and the
        parts float32 cannot tell taken from float64."""
        if self.float64 or J.dtype == torch.float64:  # a float64 run, or a direct block
            zero = self._exact_zeros(J)
            J = J.masked_fill(zero, 0) if bool(zero.any()) else J
            return J.to(self.job.dtype)
        doubt = self._doubtful(J)
        picked = torch.nonzero(doubt.flatten(1).any(dim=1)).flatten()
        self.direct = 2 * picked.numel() >= J.shape[0] and J.shape[0] > 1
        if picked.numel() == 0:
            return J
        exact = self._float64_rows(start, J.shape[0], picked)
        exact = exact.masked_fill(self._exact_zeros(exact), 0)
        J = J.clone()
        J[picked] = torch.where(doubt[picked], exact.to(J.dtype), J[picked])
        return J

    def in_float64_when_in_doubt(self, engine):
        """``engine`` for the run's blocks, computing a block in float64 at once after a
        block whose samples were mostly in doubt (on real sentences nearly all are: some
        entry of every sample nearly cancels). For SignGD only: its kernel is the float64
        signs however a block was computed."""
        return _Float64WhenInDoubt(engine, self)

    def _float64_rows(self, start: int, n: int, picked: torch.Tensor) -> torch.Tensor:
        """``[len(picked), C, P]``: the block's samples ``picked`` recomputed in float64."""
        batch = _block_batch(self.block_list, start, n)
        chosen = {
            k: v[picked.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
            for k, v in batch.items()
        }
        self.recomputed += len(picked)
        return self._engine().block(chosen, start + int(picked[0]))

    def _engine(self):
        if self._engine64 is None:
            from .engine import JacobianEngine

            job = self.job
            with warnings.catch_warnings():  # the run's own engine has said it already
                warnings.simplefilter("ignore")
                self._engine64 = JacobianEngine(
                    job.model, job.output, job.selected, job.plan, TORCH_OPS,
                    torch.float64, job.device,
                )  # fmt: skip
        return self._engine64


class _Float64WhenInDoubt:
    def __init__(self, engine, rows: SignRows):
        self._engine, self._rows = engine, rows

    def block(self, batch, start: int) -> torch.Tensor:
        if not self._rows.direct:
            return self._engine.block(batch, start)
        J = self._rows._engine().block(batch, start)
        self._rows.recomputed += J.shape[0]
        return J

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def _in_runs(size: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """``[n, C, L]``: the non-zero features at or below ``limit`` that lie in a run of at
    least ``_RUN`` consecutive ones at or below it (exact zeros count towards a run: float32
    rounds some noise to 0). Noise fills whole parts of a fused module's outputs (a third of
    GPT-2's ``c_attn``), while a real feature that happens to be tiny stands alone."""
    low = size <= limit
    if low.shape[-1] < _RUN:
        return torch.zeros_like(low)
    starts = low.unfold(-1, _RUN, 1).all(dim=-1).to(torch.float32)  # [n, C, L - _RUN + 1]
    # a feature is in a run when one of the windows covering it is all low
    covered = torch.nn.functional.conv1d(
        starts.reshape(-1, 1, starts.shape[-1]), torch.ones(1, 1, _RUN, device=low.device),
        padding=_RUN - 1,
    ).reshape(low.shape)  # fmt: skip
    return (covered > 0) & (size > 0)


def _block_batch(block_list: list, start: int, n: int):
    for s, batch in block_list:
        b = next(iter(v for v in batch.values() if isinstance(v, torch.Tensor))).shape[0]
        if s <= start < s + b:
            return slice_batch(batch, start - s, start - s + n)
    raise AssertionError(f"no block holds sample {start}")


def for_kernel(stream, kernel: str, rows: SignRows):
    """The J blocks as the kernel reads them: noise parts zeroed for the sign kernels, and
    for SignGD only int8 signs kept (4x less memory than fp32, exact, and the int8
    tensor-core path of the Triton Gram). Finished blocks loaded from a checkpoint were
    saved decided."""
    if kernel == "sgd":
        return stream
    return (_signed(start, J, done, kernel, rows) for start, J, done in stream)


def _signed(start: int, J, done: bool, kernel: str, rows: SignRows) -> tuple:
    if J is not None and not done and J.is_floating_point():
        J = rows.decided(start, J)
        if kernel == "signgd":
            J = torch.sign(J).to(torch.int8)
    return start, J, done
