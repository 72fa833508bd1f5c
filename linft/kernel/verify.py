"""The self-check of every run: the fast path against plain autograd on the first block.

On the first block a run computes (not loads), the Jacobian rows of one or two of its
samples are recomputed by plain per-sample autograd of the same model (a forward on the
sample alone, as it sits in the block with its padding, and one ``autograd.grad`` per
output with respect to the selected parameters themselves: none of linft's hooks,
layouts or fused ops take part), and every parameter group's rows are compared. On a
fast Gram path, one tile of that block is compared with the pure-torch twin too.

A mismatch is a ``SelfCheckError`` that names the module, the sample and the relative
error; with ``backend="auto"`` on the Triton path it is a warning instead, and the run
goes on with the pure-torch ops (the block is recomputed). ``verify=False`` skips it.
Cost: one forward and C backward passes of one or two samples, plus one tile.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.func import functional_call

from ..backends import TORCH_OPS
from ..params import module_group
from ..rules.base import qualified_name
from .batches import arguments, batch_size, call, slice_batch, to_device
from .gram import kernel_signs
from .model_state import changing_message, changing_module

# (rtol, atol) per precision: a group's rows pass when ||fast - autograd|| <= rtol *
# ||autograd rows of the group|| + atol * ||autograd rows of the whole sample||. atol
# absorbs rounding noise where the exact entries are zero; a wrong rule (transposed,
# misscaled, another sample's tokens) is off by O(1). bf16 and tf32 runs are compared
# with float32 autograd, so their tolerance is their own rounding.
_TOLERANCE = {
    "fp64": (1e-7, 1e-11),
    "fp32": (1e-3, 1e-5),
    "tf32": (3e-2, 1e-3),
    "bf16": (1.5e-1, 3e-2),
}
_GRAM_RTOL = {"fp64": 1e-10, "fp32": 1e-4, "tf32": 1e-2, "bf16": 1e-4}
# One sample checks the path; a second (the longest) from this many samples on, where
# its cost is a small share of the run.
_SECOND_SAMPLE_FROM = 64


class SelfCheckError(RuntimeError):
    """The fast path disagrees with plain autograd: the kernel would be wrong."""


@dataclass
class Mismatch:
    what: str  # "module <name>" or "Gram tile"
    sample: int | None
    error: float
    tolerance: float
    source: str | None = None  # where the rows came from: a rule, or the generic path


def _precision_key(job) -> str:
    return "fp64" if job.dtype == torch.float64 else job.precision


def _checked_samples(batch, start: int, total: int) -> list[int]:
    """Indices (within the block) of the most padded sample and, for larger runs, the
    longest: padding and the longest reach of the fused rules are where they can go wrong."""
    n = batch_size(batch)
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return [0]
    lengths = mask.bool().sum(dim=1)
    picks = [int(lengths.argmin())]
    if total >= _SECOND_SAMPLE_FROM and n > 1:
        longest = int(lengths.argmax())
        if longest != picks[0]:
            picks.append(longest)
    return picks


def reference_dtype(job) -> torch.dtype:
    """The reference's dtype: at least as exact as the run it checks. float64 for a float64
    run, else float32 (whatever the weights' dtype: bf16 weights or adapters are cast up, as
    the run casts them; a bf16 reference would be off by its own rounding, a false alarm)."""
    return torch.float64 if job.dtype == torch.float64 else torch.float32


def autograd_rows(job, sample) -> torch.Tensor:
    """``[C, P]``: d f_a / d theta of one sample by plain autograd, in ``reference_dtype``."""
    model, names = job.model, [n for n, _ in job.selected]
    dtype = reference_dtype(job)
    chosen = set(names)
    tensors = {}
    for n, p in model.named_parameters():
        t = p.detach()
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        tensors[n] = t.requires_grad_(True) if n in chosen else t
    sample = to_device(sample, job.device, dtype)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in full precision
    try:
        args, kwargs = arguments(sample)
        out = functional_call(model, tensors, args=args, kwargs=kwargs)
        f = job.output(out, sample)
        f = f.reshape(1, -1) if f.dim() <= 1 else f
        leaves = [tensors[n] for n in names]
        rows = []
        for a in range(f.shape[1]):
            if not f[0, a].requires_grad:
                rows.append(torch.zeros(job.plan.num_columns, dtype=dtype, device=job.device))
                continue
            got = torch.autograd.grad(
                f[0, a], leaves, retain_graph=a < f.shape[1] - 1, allow_unused=True
            )
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(leaf) if g is None else g).reshape(-1)
                        for leaf, g in zip(leaves, got, strict=True)
                    ]
                )
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return torch.stack(rows)


def _group_spans(job) -> dict[str, list[slice]]:
    spans: dict[str, list[slice]] = {}
    col = 0
    for name, p in job.selected:
        spans.setdefault(module_group(name), []).append(slice(col, col + p.numel()))
        col += p.numel()
    return spans


def compare_rows(job, fast: torch.Tensor, exact: torch.Tensor, sample: int) -> Mismatch | None:
    """The worst parameter group whose rows ``fast`` ``[C, P]`` miss ``exact``, or None."""
    rtol, atol = _TOLERANCE[_precision_key(job)]
    fast, exact = fast.double(), exact.double()
    if not bool(torch.isfinite(fast).all()):
        return Mismatch("the rows", sample, math.inf, rtol)
    whole = float(exact.norm())
    worst = None
    rules = {c: unit.rule for unit in job.plan.units for c in unit.columns()}
    for group, spans in _group_spans(job).items():
        e = torch.cat([exact[:, s] for s in spans], dim=1)
        d = torch.cat([fast[:, s] for s in spans], dim=1) - e
        err, scale = float(d.norm()), float(e.norm())
        if err > rtol * scale + atol * whole:
            rel = err / scale if scale > 0 else math.inf
            if worst is None or rel > worst.error:
                found = {rules[sp.start] for sp in spans if sp.start in rules}
                worst = Mismatch(f"module {group}", sample, rel, rtol, _source(found))
    return worst


def _source(rules: set) -> str:
    if not rules:
        return "the generic per-sample autograd path"
    named = ", ".join(sorted(f"{r.name!r} ({qualified_name(type(r))})" for r in rules))
    return f"the rule {named}"


def _check_rows(job, engine, batch, start: int, J: torch.Tensor, total: int) -> Mismatch | None:
    for i in _checked_samples(batch, start, total):
        exact = autograd_rows(job, slice_batch(batch, i, i + 1))
        found = compare_rows(job, J[i], exact, start + i)
        if found is not None:
            return found
    return None


def _check_tile(job, J: torch.Tensor, kernel: str) -> Mismatch | None:
    """One Gram tile of the block by the run's ops against the pure-torch twin (on the
    block's raw signs for the sign kernels: the ops are checked, not the sign decisions)."""
    if job.ops is TORCH_OPS:
        return None
    sign_a, sign_b = kernel_signs(kernel)
    rows = J.reshape(-1, J.shape[-1])
    if kernel == "signgd":
        rows = torch.sign(rows).to(torch.int8)
    acc = torch.float64 if J.dtype == torch.float64 else torch.float32
    m = rows.shape[0]
    got, want = (torch.empty(m, m, dtype=acc, device=J.device) for _ in range(2))
    if sign_a == sign_b:
        job.ops.gram_symmetric(rows, got, sign_a)
        TORCH_OPS.gram_symmetric(rows, want, sign_a)
    else:
        job.ops.gram_tile(rows, rows, got, sign_a, sign_b)
        TORCH_OPS.gram_tile(rows, rows, want, sign_a, sign_b)
    rtol = _GRAM_RTOL[_precision_key(job)]
    err = float((got.double() - want.double()).norm())
    scale = float(want.double().norm())
    if not math.isfinite(err) or err > rtol * scale:
        return Mismatch("the Gram tile", None, err / scale if scale > 0 else math.inf, rtol)
    return None


def _describe(m: Mismatch, job) -> str:
    where = m.what if m.sample is None else f"{m.what} (sample {m.sample})"
    source = "" if m.source is None else f"; its rows come from {m.source}"
    return (
        f"linft's self-check failed: on the {job.ops.name} path, {where} differs from plain "
        f"autograd by {m.error:.2e} (relative; tolerance {m.tolerance:g} at "
        f"precision={job.precision!r}){source}"
    )


def checked(
    found: Iterator, engine, job, block_list: list, total: int, kernel: str = "sgd"
) -> Iterator:
    """``found``'s ``(start, J, finished)`` blocks, the first computed one checked.

    ``block_list``: the ``(start, batch)`` blocks ``found`` iterates over (to slice the
    checked samples from); ``total``: the number of samples in the run.
    """
    pending = job.verify
    for start, J, done in found:
        if pending and not done and J is not None:
            pending = False
            J = _verified(job, engine, block_list, start, J, total, kernel)
        yield start, J, done


def _refuse_a_changing_model(job, batch, start: int, found: Mismatch) -> None:
    """A model whose output changes between calls on the same input fails the check in
    whichever module its change reaches: name the module that changes instead."""
    if found.sample is None:
        return
    sample = slice_batch(batch, found.sample - start, found.sample - start + 1)
    dtype = next((p.dtype for p in job.model.parameters() if p.is_floating_point()), None)
    sample = dict(to_device(sample, job.device, dtype))
    name = changing_module(job.model, lambda: call(job.model, sample))
    if name is not None:
        raise SelfCheckError(f"linft's self-check failed: {changing_message(name)}")


def _batch_at(block_list: list, start: int, n: int):
    for s, batch in block_list:
        if s <= start < s + batch_size(batch):
            return slice_batch(batch, start - s, start - s + n)
    raise AssertionError(f"no block holds sample {start}")


def _verified(job, engine, block_list, start, J, total, kernel) -> torch.Tensor:
    batch = _batch_at(block_list, start, J.shape[0])
    found = _check_rows(job, engine, batch, start, J, total)
    if found is None:
        found = _check_tile(job, J, kernel)
    if found is None:
        return J
    _refuse_a_changing_model(job, batch, start, found)
    message = _describe(found, job)
    if job.backend == "auto" and job.ops is not TORCH_OPS:
        warnings.warn(
            f"{message}; the rest of this run uses the pure-torch ops (backend='torch'). "
            "Please report the GPU, the Triton version and the model class.",
            stacklevel=4,
        )
        job.ops = engine.ops = TORCH_OPS
        J = engine.block(batch, start)
        again = _check_rows(job, engine, batch, start, J, total)
        if again is None:
            return J
        message = _describe(again, job)
    raise SelfCheckError(
        f"{message}. The kernel would be wrong, so the run stops. If the module is unusual, "
        "leave it out with params=...; please report the model class and this message. "
        "verify=False skips the check (at your own risk)."
    )
