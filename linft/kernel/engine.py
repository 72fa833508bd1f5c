"""Per-block Jacobians: one forward and C backward passes, rows written into one buffer."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call

from ..backends import Ops
from .batches import Batch, arguments, batch_size, slice_batch, to_device
from .capture import Capture, Plan, sequence_length, unit_tensors, warn_unused


class JacobianEngine:
    """Computes ``J [n, C, P]`` for blocks of samples, the model's weights untouched.

    The model runs through ``torch.func.functional_call`` on detached (and, for
    bf16, cast) copies of its parameters, so neither its weights nor its
    ``requires_grad`` flags change; the selected copies require grad so that
    autograd reaches the hooked modules.
    """

    def __init__(
        self,
        model: nn.Module,
        output: Callable,
        selected: list[tuple[str, nn.Parameter]],
        plan: Plan,
        ops: Ops,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.model, self.output, self.plan, self.ops = model, output, plan, ops
        self.dtype, self.device = dtype, device
        chosen = {n for n, _ in selected}
        self.tensors: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            t = p.detach()
            if t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            self.tensors[name] = t.requires_grad_(True) if name in chosen else t
        self.num_outputs: int | None = None
        self._warned_unused = False
        if plan.generic_modules():
            warnings.warn(
                f"parameters of {plan.generic_modules()} have no rule (linft.register_rule): "
                "they take the exact but slow per-sample autograd path (one backward per "
                "sample and output)",
                stacklevel=4,
            )

    def _forward(self, batch: Batch) -> torch.Tensor:
        args, kwargs = arguments(batch)
        out = functional_call(self.model, self.tensors, args=args, kwargs=kwargs)
        f = self.output(out, batch)
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"output must return a tensor [n, C], got {type(f).__name__}")
        return f.unsqueeze(1) if f.dim() == 1 else f

    def _check_outputs(self, f: torch.Tensor, n: int, start: int) -> None:
        if f.dim() != 2 or f.shape[0] != n:
            raise ValueError(
                f"output returned shape {tuple(f.shape)} for a block of {n} samples; "
                "it must return [n, C] (or [n])"
            )
        if self.num_outputs is None:
            self.num_outputs = f.shape[1]
        elif f.shape[1] != self.num_outputs:
            raise ValueError(f"output returned C = {f.shape[1]} after C = {self.num_outputs}")
        finite = torch.isfinite(f.detach()).all(dim=1)
        if not bool(finite.all()):
            i = int(torch.nonzero(~finite)[0])
            raise FloatingPointError(
                f"the model output of sample {start + i} is NaN or inf: check that sample's "
                "inputs, or use precision='fp32'"
            )
        if not f.requires_grad:
            raise ValueError(
                "the output is not a function of the selected parameters: check params= "
                "(are the adapters active and unmerged? does output= read the right logits?)"
            )

    def block(self, batch: Batch, start: int) -> torch.Tensor:
        """``J [n, C, P]`` of one block; ``start`` is its first sample's global index."""
        batch = to_device(batch, self.device, self.dtype)
        capture = Capture(self.plan, samples=batch_size(batch))
        with capture, torch.enable_grad():
            f = self._forward(batch)
        n = f.shape[0]
        self._check_outputs(f, n, start)
        C = f.shape[1]
        J = torch.zeros(n, C, self.plan.num_columns, dtype=self.dtype, device=self.device)
        if self.plan.units:
            self._unit_rows(capture, f, batch, J)
        del f, capture
        if self.plan.generic:
            self._generic_rows(batch, J)
        finite = _finite_rows(J)
        if not bool(finite.all()):
            i = int(torch.nonzero(~finite)[0])
            raise FloatingPointError(
                f"the Jacobian of sample {start + i} holds NaN or inf; its output was finite, "
                "so an intermediate overflowed: try precision='fp32'"
            )
        return J

    def _unit_rows(self, capture: Capture, f: torch.Tensor, batch: Batch, J: torch.Tensor) -> None:
        n, C = f.shape
        if not self._warned_unused:
            warn_unused(self.plan, capture)
            self._warned_unused = True
        calls = [(u, c) for u, calls in enumerate(capture.calls) for c in calls]
        ys = [c.y for _, c in calls]
        needs = [y.requires_grad for y in ys]
        grads: list[list[torch.Tensor | None]] = [[] for _ in calls]
        for a in range(C):
            got = torch.autograd.grad(
                f[:, a].sum(),
                [y for y, need in zip(ys, needs, strict=True) if need],
                retain_graph=a < C - 1,
                allow_unused=True,
            )
            it = iter(got)
            for k, need in enumerate(needs):
                grads[k].append(next(it) if need else None)
        del ys
        mask = batch.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        seq_len = sequence_length(batch)
        for u, unit in enumerate(self.plan.units):
            idx = [k for k, (uu, _) in enumerate(calls) if uu == u]
            if not idx:
                continue
            x, g, m = unit_tensors(
                [calls[k][1] for k in idx],
                [grads[k] for k in idx],
                n,
                mask,
                unit.name,
                unit.layout,
                seq_len,
            )
            tags = {t for k in idx for t in calls[k][1].tags}
            unit.rule.rows(unit, x, g, m, J, tags, self.ops.rows_op(unit.rule))

    def _generic_rows(self, batch: Batch, J: torch.Tensor) -> None:
        """Exact per-sample gradients for parameters no fused rule covers."""
        leaves = [self.tensors[name] for name, _, _ in self.plan.generic]
        n, C = J.shape[:2]
        for i in range(n):
            sample = slice_batch(batch, i, i + 1)
            with torch.enable_grad():
                f = self._forward(sample)[0]
            for a in range(C):
                if not f[a].requires_grad:
                    continue
                got = torch.autograd.grad(f[a], leaves, retain_graph=a < C - 1, allow_unused=True)
                for (_, col, numel), g in zip(self.plan.generic, got, strict=True):
                    if g is not None:
                        J[i, a, col : col + numel] = g.reshape(-1)


def _plan(blocks: list[tuple[int, Mapping]], finished: dict[int, int]) -> list[tuple]:
    """("load", start, n) for finished blocks, ("compute", start, batch) for the gaps."""
    steps = []
    for start, batch in blocks:
        n = batch_size(batch)
        pos = start
        for s in sorted(k for k in finished if start <= k < start + n):
            if s > pos:
                steps.append(("compute", pos, slice_batch(batch, pos - start, s - start)))
            steps.append(("load", s, finished[s]))
            pos = s + finished[s]
        if pos < start + n:
            steps.append(
                ("compute", pos, slice_batch(batch, pos - start, n) if pos > start else batch)
            )
    return steps


def iterate_blocks(
    engine: JacobianEngine,
    blocks: list[tuple[int, Mapping]],
    progress=None,
    finished: dict[int, int] | None = None,
    load: Callable[[int], torch.Tensor] | None = None,
) -> Iterator[tuple[int, torch.Tensor | None, bool]]:
    """(start, J, finished) per block. Blocks finished in an earlier run come from ``load``
    (J None without it); a block that runs out of GPU memory is split and retried."""
    pending = list(reversed(_plan(blocks, finished or {})))
    while pending:
        kind, start, item = pending.pop()
        if kind == "load":
            if progress is not None:
                progress.update(item)
            yield start, (None if load is None else load(start).to(engine.device)), True
            continue
        try:
            J = engine.block(item, start)
        except torch.OutOfMemoryError:
            n = batch_size(item)
            if n == 1:
                raise
            torch.cuda.empty_cache()
            half = n // 2
            warnings.warn(
                f"out of GPU memory on a block of {n} samples; retrying with {half}", stacklevel=2
            )
            pending.append(("compute", start + half, slice_batch(item, half, n)))
            pending.append(("compute", start, slice_batch(item, 0, half)))
            continue
        if progress is not None:
            progress.update(J.shape[0])
        yield start, J, False


def _finite_rows(J: torch.Tensor) -> torch.Tensor:
    """``[n]``: whether each sample's rows are finite. One summing pass (a NaN or inf makes
    the sum non-finite); only a sum that overflowed, or a row that is not finite, is looked
    at entry by entry: ``isfinite`` on all of J costs three passes and two bool copies."""
    sums = J.flatten(1).sum(dim=1)
    finite = torch.isfinite(sums)
    if not bool(finite.all()):
        finite = torch.isfinite(J).flatten(1).all(dim=1)
    return finite
