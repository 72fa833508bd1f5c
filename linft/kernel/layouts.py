"""Where the samples are in each hooked module's activations, learned before the run.

The fused Jacobian rules read per-sample rows off a module's input ``x`` and output
gradient ``g`` once their samples lead (``[n, tokens, d]``). Models do not all keep them
there: XLNet runs sequence-first (``[T, n, d]``), OPT flattens to ``[n*T, d]`` before its
feed-forward layers, DeBERTa-v2/v3 with ``share_att_key`` runs the same projections on a
relative-position tensor ``[1, 2k, d]`` shared by every sample. Reading the wrong
dimension as samples gives a wrong kernel without an error when the sizes happen to
agree (``n == T``).

``probe`` runs two forwards with hooks only (no backward): on one sample and on two
(that sample and another, both padded as in their batch), and learns each call's layout
from the shapes: the one dimension that doubles holds the samples (``[n, ...]``,
``[T, n, d]``: it goes 1 -> 2; merged ``[n*T, d]``: k -> 2k), a shape that does not change
is shared by all samples. Only the number of samples changes between the two forwards,
so ``n == T``, ``T == 1`` or ``T == 2`` cannot pass a token dimension off as samples. The
values then confirm it: the part of the 2-sample activation that the layout assigns to
the first sample must equal the 1-sample activation (checked on a random projection of
the features), which also tells sample-major ``n*T`` rows from token-major ``T*n`` rows.

A module without an exact fused rule (an input shared across samples, where the summed
backward of ``f[:, a].sum()`` mixes the samples' gradients; a shape change no layout
explains; calls with different layouts; values that do not match) moves to the exact
per-sample path of ``capture.py``, with one warning naming it and why. At block time
``capture.samples_first`` checks every call against the learned layout and raises, naming
the module, on any shape that contradicts it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..backends import matmul_precision
from ..params import column_offsets, parameter_dtype
from .batches import Batch, batch_size, call, slice_batch, to_device
from .capture import LEADING, Capture, Layout, Plan, samples_first, sequence_length
from .model_state import evaluation_mode

# Relative difference between the 1-sample activation and the first sample's part of the
# 2-sample one under the right layout: batched and single forwards round differently.
# A wrong layout is off by O(1): it reads other tokens' or another sample's features.
_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}
_LOW_PRECISION_TOLERANCE = 5e-2
SHARED = Layout(shared=True)


@dataclass
class _Seen:
    """One call of a hooked module in a probe forward."""

    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    print_: torch.Tensor  # x @ v for a fixed random v: x.shape[:-1], float32 or float64


def probe(job, batches: Batch | list[Batch]) -> Plan:
    """The capture plan for ``job``, every hooked module's sample layout learned from
    ``batches`` (the run's inputs; two of their samples are used)."""
    plan = job.plan
    if not plan.units:
        return plan
    if isinstance(batches, Mapping):
        batches = [batches]
    one, two, seq_len = _probe_inputs(batches)
    seen_one = _observe(job, plan, one)
    seen_two = _observe(job, plan, two)
    tol = _TOLERANCE.get(parameter_dtype(job.model), _LOW_PRECISION_TOLERANCE)
    units, fallback = [], {}
    for unit, calls_one, calls_two in zip(plan.units, seen_one, seen_two, strict=True):
        found = _unit_layout(calls_one, calls_two, seq_len, tol)
        if isinstance(found, Layout):
            units.append(dataclasses.replace(unit, layout=found))
        else:
            fallback[unit.name] = found
    mixed = _shared_routing(job, dataclasses.replace(plan, units=units), two)
    units = [u for u in units if u.name not in mixed]
    fallback.update(mixed)
    if not fallback:
        return dataclasses.replace(plan, units=units)
    moved = [u for u in plan.units if u.name in fallback]
    listed = "; ".join(f"{name}: {why}" for name, why in fallback.items())
    warnings.warn(
        f"no exact fused Jacobian rule reads the samples of {sorted(fallback)} ({listed}); "
        "their parameters take the exact but slow per-sample path (one forward and C "
        "backward passes per sample)",
        stacklevel=3,
    )
    return dataclasses.replace(
        plan,
        units=units,
        generic=plan.generic + _columns(job, moved),
        fallback={**plan.fallback, **fallback},
    )


def _shared_routing(job, plan: Plan, two: Batch) -> dict[str, str]:
    """Units with a shared activation whose expanded output does not keep the samples
    apart (the model reads it in a way that mixes them): name -> why. One forward of the two
    probe samples with the expansion, and one backward per sample: sample j's output must
    reach only slot j of each expanded output."""
    shared = [i for i, u in enumerate(plan.units) if u.layout.shared]
    if not shared:
        return {}
    batch = to_device(two, job.device, parameter_dtype(job.model))
    names = [plan.units[i].name for i in shared]
    with evaluation_mode(job.model), matmul_precision("fp32"), torch.no_grad():
        plain = job.output(call(job.model, batch), batch)
    capture = Capture(plan, samples=batch_size(batch))
    try:
        with evaluation_mode(job.model), matmul_precision("fp32"), torch.enable_grad(), capture:
            f = job.output(call(job.model, batch), batch)
    except Exception as err:  # the model reads the shared output by its shape
        why = f"its output is shared by all samples and expanding it fails ({type(err).__name__})"
        return dict.fromkeys(names, why)
    tol = _TOLERANCE.get(parameter_dtype(job.model), _LOW_PRECISION_TOLERANCE)
    if f.shape != plain.shape or not _close(f.detach(), plain, tol):
        return dict.fromkeys(names, "its output is shared and expanding it changes the model's")
    f = f.reshape(f.shape[0], -1)
    ys = [capture.calls[i][k].y for i in shared for k in range(len(capture.calls[i]))]
    owners = [i for i in shared for _ in capture.calls[i]]
    bad: dict[str, str] = {}
    for j in range(f.shape[0]):
        if not f[j].requires_grad:
            continue
        grads = torch.autograd.grad(f[j].sum(), ys, retain_graph=True, allow_unused=True)
        for i, g in zip(owners, grads, strict=True):
            if g is None:
                continue
            others = torch.cat([g[:j], g[j + 1 :]])
            if bool(others.ne(0).any()):
                name = plan.units[i].name
                bad[name] = "its output is shared by all samples and the model mixes them"
    return bad


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.double(), b.double()
    return bool(torch.isfinite(a).all()) and float((a - b).norm()) <= tol * float(b.norm())


def _probe_inputs(batches: list[Batch]) -> tuple[Batch, Batch, int | None]:
    """One sample and a pair (that sample first, then another), from the longest batch
    that holds two; the sample with the most padding first, so that padding is seen."""
    sizes = [batch_size(b) for b in batches]
    pairs = [b for b, n in zip(batches, sizes, strict=True) if n >= 2]
    batch = max(pairs, key=lambda b: sequence_length(b) or 0) if pairs else batches[0]
    n = batch_size(batch)
    mask = batch.get("attention_mask")
    if n == 1:  # the only pair there is: the sample twice (enough for the shapes)
        i = j = 0
    elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
        lengths = mask.bool().sum(dim=1)
        i, j = int(lengths.argmin()), int(lengths.argmax())
        j = j if j != i else (i + 1) % n
    else:
        i, j = 0, 1
    one, other = slice_batch(batch, i, i + 1), slice_batch(batch, j, j + 1)
    two = {
        k: torch.cat([v, other[k]]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
        for k, v in one.items()
    }
    return one, two, sequence_length(batch)


def _observe(job, plan: Plan, batch: Batch) -> list[list[_Seen]]:
    """The calls of every unit in one forward with hooks only, in full precision."""
    batch = to_device(batch, job.device, parameter_dtype(job.model))
    prints: dict[tuple, torch.Tensor] = {}

    def seen(call) -> _Seen:  # as the call happens: no activation outlives its module
        return _Seen(tuple(call.x.shape), tuple(call.y.shape), _print(call.x, prints))

    capture = Capture(plan, keep=seen)
    with evaluation_mode(job.model), matmul_precision("fp32"), torch.no_grad(), capture:
        call(job.model, batch)
    return capture.calls


def _print(x: torch.Tensor, cache: dict) -> torch.Tensor:
    """A random projection of the features: enough to tell tokens and samples apart,
    without keeping every activation of the probe."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    key = (x.shape[-1], x.device, dtype)
    if key not in cache:
        gen = torch.Generator().manual_seed(0)
        cache[key] = torch.randn(x.shape[-1], generator=gen, dtype=dtype).to(x.device)
    return torch.nan_to_num(x.to(dtype) @ cache[key], nan=0.0, posinf=0.0, neginf=0.0)


def _unit_layout(
    one: list[_Seen], two: list[_Seen], seq_len: int | None, tol: float
) -> Layout | str:
    """The layout shared by every call of a unit, or why there is no exact fused rule."""
    if len(one) != len(two):
        return f"called {len(one)} times for 1 sample and {len(two)} times for 2"
    if not one:
        return LEADING  # not called: warn_unused names it, its columns stay zero
    found = [_call_layout(a, b, seq_len, tol) for a, b in zip(one, two, strict=True)]
    for f in found:
        if isinstance(f, str):
            return f
    if len(set(found)) > 1:
        kinds = ", ".join(sorted({f.describe() for f in found}))
        return f"its calls have different layouts ({kinds})"
    return found[0]


def _call_layout(one: _Seen, two: _Seen, seq_len: int | None, tol: float) -> Layout | str:
    s1, s2 = one.x_shape, two.x_shape
    if one.y_shape[:-1] != s1[:-1] or two.y_shape[:-1] != s2[:-1]:
        return f"its output {two.y_shape} does not follow its input {s2} token by token"
    if len(s1) != len(s2) or len(s1) < 2 or s1[-1] != s2[-1]:
        return f"input shapes {s1} for 1 sample and {s2} for 2 that no layout explains"
    grown = [d for d in range(len(s1) - 1) if s1[d] != s2[d]]
    if not grown and s1[0] == 1 and one.y_shape[0] == 1 and len(s1) >= 2:
        return SHARED  # confirmed per sample by ``_shared_routing`` before it is used
    if not grown:
        return (
            f"an input of shape {s2} that does not follow the number of samples (shared by "
            "all of them), where the summed backward mixes the samples' gradients"
        )
    d = grown[0]
    if len(grown) > 1 or s2[d] != 2 * s1[d]:
        return f"input shapes {s1} for 1 sample and {s2} for 2 that no layout explains"
    k = s1[d]
    if k == 1:
        candidates = [Layout(d, None) if d == 0 else Layout(d, len(s1))]
    else:
        tokens = None if k == seq_len else k
        candidates = [Layout(d, len(s1), order, tokens) for order in ("sample", "token")]
    errors = [_mismatch(layout, one, two, seq_len) for layout in candidates]
    good = [c for c, e in zip(candidates, errors, strict=True) if e <= tol]
    if len(good) == 1:
        return good[0]
    if not good:
        return (
            f"its input for 1 sample differs from that sample's part of its input for 2 "
            f"(relative {min(errors):.1e}, shapes {s1} and {s2}): samples reordered or mixed"
        )
    return f"its {s2[d]} rows for 2 samples read alike in sample-major and token-major order"


def _mismatch(layout: Layout, one: _Seen, two: _Seen, seq_len: int | None) -> float:
    """Relative difference between the 1-sample activation and what ``layout`` calls the
    first sample of the 2-sample one."""
    a, _ = samples_first(one.print_.unsqueeze(-1), layout, 1, seq_len, "probe")
    b, _ = samples_first(two.print_.unsqueeze(-1), layout, 2, seq_len, "probe")
    a, b = a[0].double(), b[0].double()
    scale = float(a.norm())
    err = float((a - b).norm())
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def _columns(job, units: list) -> list[tuple[str, int, int]]:
    """(parameter name, first column, numel) of every selected parameter of ``units``."""
    offsets, _ = column_offsets(job.selected)
    by_column = {offsets[name]: (name, p.numel()) for name, p in job.selected}
    cols = [c for unit in units for c in unit.columns()]
    return [(by_column[c][0], c, by_column[c][1]) for c in cols]
