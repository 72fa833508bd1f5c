"""The kernel run: wires the stages of ``linft.kernel`` together, data flowing one way.

batches -> validate -> params -> layouts -> capture -> engine (J blocks) -> verify
-> signs -> store -> gram (tiles -> K) -> checkpoint.

``Job`` holds what every entry point needs (device, dtypes, ops, selected
parameters, capture plan, block size); ``prepare`` builds it and the checked
batches, ``kernels`` and ``jacobian`` run it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..backends import compute_dtype, kernel_dtype, matmul_precision, resolve_ops
from ..outputs import default_output
from ..params import ParamSpec, column_offsets, group_columns, parameter_dtype, select_params
from . import layouts, validate, verify
from .batches import Batch, blocks, check_same_keys, split
from .capture import build_plan
from .checkpoint import Checkpoint, fingerprint
from .engine import JacobianEngine, iterate_blocks
from .gram import OUTPUTS, assemble, kernel_signs
from .model_state import evaluation_mode
from .store import JacobianStore, store_budget

Inputs = Batch | Iterable[Batch]

_CPU_BLOCK = 32
_MAX_GPU_BLOCK = 512


def model_device(model: nn.Module, device) -> torch.device:
    here = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device is not None and torch.device(device) != here:
        want = torch.device(device)
        if not (want.type == here.type and want.index is None):
            raise ValueError(
                f"device={want} but the model is on {here}; move the model with model.to(device)"
            )
    return here


def block_size(batch_size, device: torch.device, num_columns: int, dtype: torch.dtype) -> int:
    if batch_size is not None:
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return int(batch_size)
    if device.type != "cuda":
        return _CPU_BLOCK
    free, _ = torch.cuda.mem_get_info(device)
    # J takes n*C*P elements; leave room for C <= 8 outputs and the activations.
    per_sample = 8 * num_columns * torch.finfo(dtype).bits // 8
    return int(max(1, min(_MAX_GPU_BLOCK, 0.2 * free // max(per_sample, 1))))


def _as_signs(stream, kernel: str):
    """SignGD reads only signs: keep J as int8 signs (4x less memory than fp32, exact, and
    the int8 tensor-core path of the Triton Gram)."""
    if kernel != "signgd":
        return stream
    return ((s, None if J is None else torch.sign(J).to(torch.int8), d) for s, J, d in stream)


def _progress(progress, total: int):
    if progress is False:
        return None
    return tqdm(
        total=total, unit="sample", desc="linft", disable=None if progress is None else False
    )


@dataclass
class Job:
    """What every entry point needs: where and how to compute, which columns, block size."""

    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    ops: object
    selected: list
    plan: object
    block_size: int
    precision: str
    output: Callable
    backend: str = "auto"  # as asked: "auto" may move off a fast path that fails its check

    @classmethod
    def create(cls, model, *, params, output, precision, backend, batch_size, device) -> Job:
        dev = model_device(model, device)
        dtype = compute_dtype(precision, parameter_dtype(model))
        ops = resolve_ops(backend, dev)
        selected = select_params(model, params)
        validate.check_model(model, selected)
        offsets, num_columns = column_offsets(selected)
        plan = build_plan(model, selected, offsets)
        size = block_size(batch_size, dev, num_columns, dtype)
        return cls(
            model, dev, dtype, ops, selected, plan, size, precision, output or default_output
        )

    def engine(self) -> JacobianEngine:
        return JacobianEngine(
            self.model, self.output, self.selected, self.plan, self.ops, self.dtype, self.device
        )


def prepare(
    model: nn.Module,
    inputs: Inputs,
    inputs2: Inputs | None,
    *,
    params,
    output,
    precision,
    backend,
    batch_size,
    device,
) -> tuple[Job, list[Batch], int, list[Batch] | None, int]:
    """The job and the checked batches: ``(job, batches, N, batches2, M)`` (M = N without
    ``inputs2``). The layout of every hooked module is learned from the first batch."""
    job = Job.create(
        model, params=params, output=output, precision=precision, backend=backend,
        batch_size=batch_size, device=device,
    )  # fmt: skip
    job.backend = backend
    batches, n_rows = split(inputs, "inputs")
    validate.check_batches(model, batches, "inputs")
    batches2, n_cols = None, n_rows
    if inputs2 is not None:
        batches2, n_cols = split(inputs2, "inputs2")
        validate.check_batches(model, batches2, "inputs2")
        check_same_keys(batches, batches2)
    job.plan = layouts.probe(job, batches[0])
    return job, batches, n_rows, batches2, n_cols


def _open_checkpoint(directory, job: Job, settings: dict, batches: list) -> Checkpoint:
    """The checkpoint of exactly this computation: settings, inputs and every parameter value."""
    tensors = [t for b in batches for t in b.values() if isinstance(t, torch.Tensor)]
    settings = {**settings, "params": [n for n, _ in job.selected]}
    key = fingerprint(settings, tensors + list(job.model.parameters()))
    return Checkpoint(directory, key, job.block_size)


def kernels(
    model: nn.Module,
    inputs: Inputs,
    inputs2: Inputs | None,
    *,
    output,
    params: ParamSpec,
    kernel: str,
    outputs: str,
    precision: str,
    backend: str,
    batch_size,
    device,
    out_device,
    progress,
    checkpoint,
    jacobian_memory,
    groups: str | Callable[[str], str] | None,
) -> dict[str, torch.Tensor]:
    """The kernel of each column group (one group ``"all"`` when ``groups`` is None)."""
    kernel_signs(kernel)  # validate before any work
    if outputs not in OUTPUTS:
        raise ValueError(f"unknown outputs {outputs!r}; choose one of {OUTPUTS}")
    job, batches, n_rows, batches2, n_cols = prepare(
        model, inputs, inputs2, params=params, output=output, precision=precision,
        backend=backend, batch_size=batch_size, device=device,
    )  # fmt: skip
    kdtype = kernel_dtype(parameter_dtype(model))
    num_columns = job.plan.num_columns
    spans = (
        {"all": [slice(0, num_columns)]} if groups is None else group_columns(job.selected, groups)
    )
    out_dev = job.device if out_device is None else torch.device(out_device)
    ckpt, size = None, job.block_size
    if checkpoint is not None:
        settings = dict(kernel=kernel, outputs=outputs, precision=precision, groups=spans,
                        rows=n_rows, cols=n_cols, cross=inputs2 is not None)  # fmt: skip
        ckpt = _open_checkpoint(checkpoint, job, settings, batches + (batches2 or []))
        size = ckpt.block_size  # the block boundaries of the first run
        out_dev = torch.device("cpu")  # the memory-mapped file

    def allocate(name: str, per: int) -> torch.Tensor:
        if ckpt is not None:
            return ckpt.kernel(name, n_rows * per, n_cols * per, kdtype)
        return torch.empty(n_rows * per, n_cols * per, dtype=kdtype, device=out_dev)

    store = JacobianStore(job.device, store_budget(job.device, jacobian_memory))
    bar = _progress(progress, n_rows + (n_cols if inputs2 is not None else 0))
    with evaluation_mode(model), matmul_precision(precision):
        engine = job.engine()

        def stream(side: str, parts, keep: bool):
            if ckpt is None:
                found = iterate_blocks(engine, blocks(parts, size), bar)
            else:
                load = (lambda s: ckpt.load(side, s)) if keep else None
                found = iterate_blocks(engine, blocks(parts, size), bar, ckpt.finished(side), load)
            return _as_signs(verify.checked(found, engine, job), kernel)

        rows = stream("rows", batches, keep=inputs2 is None)
        cols = None if batches2 is None else stream("cols", batches2, keep=True)
        finish = None if ckpt is None else ckpt.finish
        try:
            K, C = assemble(
                rows, cols, spans, kernel, outputs, job.ops, kdtype, store, allocate, finish
            )
        finally:
            if bar is not None:
                bar.close()
    shape = (n_rows, n_cols) if outputs == "trace" or C == 1 else (n_rows, C, n_cols, C)
    return {name: k.view(shape) for name, k in K.items()}


def jacobian(
    model: nn.Module,
    inputs: Inputs,
    *,
    output,
    params: ParamSpec,
    precision: str,
    batch_size,
    backend: str,
    device,
) -> torch.Tensor:
    """The per-sample Jacobian ``[N, C, P]`` of every input, in input order."""
    job, batches, _, _, _ = prepare(
        model, inputs, None, params=params, output=output, precision=precision,
        backend=backend, batch_size=batch_size, device=device,
    )  # fmt: skip
    with evaluation_mode(model), matmul_precision(precision):
        engine = job.engine()
        found = verify.checked(iterate_blocks(engine, blocks(batches, job.block_size)), engine, job)
        return torch.cat([J for _, J, _ in found], dim=0)
