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
from . import layouts, signs, validate
from .batches import Batch, blocks, check_same_keys, positional_names, split
from .capture import build_plan
from .checkpoint import Checkpoint
from .engine import JacobianEngine, iterate_blocks
from .gram import OUTPUTS, assemble, kernel_signs
from .identity import computation_parts
from .model_state import run_context
from .store import JacobianStore, store_budget
from .verify import checked as self_checked

Inputs = Batch | Iterable[Batch]

_CPU_BLOCK = 32
_MAX_GPU_BLOCK = 512


def model_device(model: nn.Module, device) -> torch.device:
    here = next((p.device for p in model.parameters()), torch.device("cpu"))
    want = None if device is None else validate.usable_device(device, "device")
    if want is not None and want != here:
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
    verify: bool = True  # the self-check of the first block (verify.py)

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
    verify: bool = True,
) -> tuple[Job, list[Batch], int, list[Batch] | None, int]:
    """The job and the checked batches: ``(job, batches, N, batches2, M)`` (M = N without
    ``inputs2``). The layout of every hooked module is learned from a few samples
    (``layouts.probe``)."""
    job = Job.create(
        model, params=params, output=output, precision=precision, backend=backend,
        batch_size=batch_size, device=device,
    )  # fmt: skip
    job.backend, job.verify = backend, bool(verify)
    pad, names = validate.pad_token_id(model), positional_names(model)
    batches, n_rows = split(inputs, "inputs", pad, names)
    validate.check_batches(model, batches, "inputs")
    batches2, n_cols = None, n_rows
    if inputs2 is not None:
        batches2, n_cols = split(inputs2, "inputs2", pad, names)
        validate.check_batches(model, batches2, "inputs2")
        check_same_keys(batches, batches2)
    batches = _without_inference_tensors(batches)
    batches2 = None if batches2 is None else _without_inference_tensors(batches2)
    job.plan = layouts.probe(job, batches + (batches2 or []))
    return job, batches, n_rows, batches2, n_cols


def _without_inference_tensors(batches: list[Batch]) -> list[Batch]:
    """Copies of tensors made under ``torch.inference_mode()``: autograd cannot save those."""
    return [
        {
            k: v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v
            for k, v in b.items()
        }
        if any(isinstance(v, torch.Tensor) and v.is_inference() for v in b.values())
        else b
        for b in batches
    ]


def _open_checkpoint(
    directory, job: Job, settings: dict, batches: list, output, meta_name: str | None = None
) -> Checkpoint:
    """The checkpoint of exactly this computation: settings, output function, model (class,
    config, modules, LoRA state, weights), inputs and linft's version. ``meta_name``: this
    process's meta file when several share the directory (``distributed.py``)."""
    settings = {
        **settings,
        "params": [n for n, _ in job.selected],
        "dtype": str(job.dtype),
        "rules": {unit.name: unit.rule.identity() for unit in job.plan.units},
    }
    parts = computation_parts(settings, output or default_output, job.model, batches)
    meta = {} if meta_name is None else {"meta_name": meta_name}
    return Checkpoint(directory, parts, job.block_size, cross=settings["cross"], **meta)


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
    verify: bool = True,
    group=None,
    out: str = "full",
) -> dict[str, torch.Tensor] | None:
    """The kernel of each column group (one group ``"all"`` when ``groups`` is None).
    ``group``/``out``: the ranks of a process group share the run (``distributed.py``;
    None on ranks other than 0 for ``out="full"``)."""
    kernel_signs(kernel)  # validate before any work
    if outputs not in OUTPUTS:
        raise ValueError(f"unknown outputs {outputs!r}; choose one of {OUTPUTS}")
    if out_device is not None and out_device != "checkpoint":
        out_device = validate.usable_device(out_device, "out_device")
    from . import distributed  # it imports this module

    pg = distributed.resolve_group(group)
    if pg is not None or out != "full":
        return distributed.kernels(
            model, inputs, inputs2, group=pg, out=out, output=output, params=params,
            kernel=kernel, outputs=outputs, precision=precision, backend=backend,
            batch_size=batch_size, device=device, out_device=out_device, progress=progress,
            checkpoint=checkpoint, jacobian_memory=jacobian_memory, groups=groups, verify=verify,
        )  # fmt: skip
    with run_context(model, matmul_precision(precision)):
        return _kernels(
            model, inputs, inputs2, output=output, params=params, kernel=kernel,
            outputs=outputs, precision=precision, backend=backend, batch_size=batch_size,
            device=device, out_device=out_device, progress=progress, checkpoint=checkpoint,
            jacobian_memory=jacobian_memory, groups=groups, verify=verify,
        )  # fmt: skip


class _CurrentOps:
    """The job's ops as they are at each call: the self-check may move a run off a fast
    path after the tiles' consumer was set up."""

    def __init__(self, job: Job):
        self._job = job

    def __getattr__(self, name: str):
        return getattr(self._job.ops, name)


def _kernels(
    model,
    inputs,
    inputs2,
    *,
    output,
    params,
    kernel,
    outputs,
    precision,
    backend,
    batch_size,
    device,
    out_device,
    progress,
    checkpoint,
    jacobian_memory,
    groups,
    verify,
) -> dict[str, torch.Tensor]:
    job, batches, n_rows, batches2, n_cols = prepare(
        model, inputs, inputs2, params=params, output=output, precision=precision,
        backend=backend, batch_size=batch_size, device=device, verify=verify,
    )  # fmt: skip
    kdtype = kernel_dtype(parameter_dtype(model))
    num_columns = job.plan.num_columns
    spans = (
        {"all": [slice(0, num_columns)]} if groups is None else group_columns(job.selected, groups)
    )
    in_file = isinstance(out_device, str) and out_device == "checkpoint"
    if in_file and checkpoint is None:
        raise ValueError("out_device='checkpoint' is K in the file of checkpoint=DIR; pass both")
    out_dev = job.device if out_device is None or in_file else out_device
    ckpt, size = None, job.block_size
    if checkpoint is not None:
        settings = dict(kernel=kernel, outputs=outputs, precision=precision, groups=spans,
                        rows=n_rows, cols=n_cols, cross=inputs2 is not None,
                        kernel_dtype=str(kdtype))  # fmt: skip
        ckpt = _open_checkpoint(checkpoint, job, settings, batches + (batches2 or []), output)
        size = ckpt.block_size  # the block boundaries of the first run

    def allocate(name: str, per: int) -> torch.Tensor:
        if ckpt is not None:
            return ckpt.kernel(name, n_rows * per, n_cols * per, kdtype, per)
        return torch.empty(n_rows * per, n_cols * per, dtype=kdtype, device=out_dev)

    store = JacobianStore(job.device, store_budget(job.device, jacobian_memory))
    bar = _progress(progress, n_rows + (n_cols if inputs2 is not None else 0))
    engine = job.engine()

    def stream(side: str, parts, keep: bool):
        listed = blocks(parts, size)
        decide = signs.SignRows(job, listed)
        # SignGD reads signs only, which float64 decides either way; A-SignGD keeps float32
        # values where float32 determines them, so its blocks stay float32 first.
        source = decide.in_float64_when_in_doubt(engine) if kernel == "signgd" else engine
        if ckpt is None:
            found = iterate_blocks(source, listed, bar)
        else:
            load = (lambda s: ckpt.load(side, s)) if keep else None
            found = iterate_blocks(source, listed, bar, ckpt.finished(side), load)
        found = self_checked(found, engine, job, listed, n_rows + n_cols, kernel)
        return signs.for_kernel(found, kernel, decide)

    rows = stream("rows", batches, keep=inputs2 is None)
    cols = None if batches2 is None else stream("cols", batches2, keep=True)
    finish = None if ckpt is None else ckpt.finish
    ops = _CurrentOps(job)
    try:
        K, C = assemble(rows, cols, spans, kernel, outputs, ops, kdtype, store, allocate, finish)
    finally:
        if bar is not None:
            bar.close()
    shape = (n_rows, n_cols) if outputs == "trace" or C == 1 else (n_rows, C, n_cols, C)
    if ckpt is not None and not in_file:  # a copy: editing K must not edit the checkpoint
        K = {name: k.to(out_dev, copy=True) for name, k in K.items()}
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
    verify: bool = True,
    group=None,
    out: str = "full",
    sign_rows: bool = False,
) -> torch.Tensor:
    """The per-sample Jacobian ``[N, C, P]`` of every input, in input order (``group``,
    ``out``: as for ``kernels``; ``out="shard"`` gives a ``linft.sharded.JacobianShard``).
    ``sign_rows``: J as the sign kernels read it, its rounding-noise rows zeroed
    (``signs.SignRows``; one process only)."""
    from . import distributed  # it imports this module

    pg = distributed.resolve_group(group)
    if sign_rows and (pg is not None or out != "full"):
        raise ValueError("sign_rows=True is for one process and out='full'")
    if pg is not None or out != "full":
        return distributed.jacobian(
            model, inputs, group=pg, out=out, output=output, params=params,
            precision=precision, batch_size=batch_size, backend=backend, device=device,
            verify=verify,
        )  # fmt: skip
    with run_context(model, matmul_precision(precision)):
        job, batches, n, _, _ = prepare(
            model, inputs, None, params=params, output=output, precision=precision,
            backend=backend, batch_size=batch_size, device=device, verify=verify,
        )  # fmt: skip
        engine = job.engine()
        listed = blocks(batches, job.block_size)
        found = self_checked(iterate_blocks(engine, listed), engine, job, listed, n)
        if sign_rows:
            decide = signs.SignRows(job, listed)
            found = ((s, decide.decided(s, J), done) for s, J, done in found)
        return torch.cat([J for _, J, _ in found], dim=0)
