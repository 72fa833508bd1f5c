"""The public kernel functions of api.md: ``ntk``, ``layer_ntks``, ``jacobian``.

``K[(i,a),(j,b)] = <d f_a(x_i)/d theta, d f_b(x_j)/d theta>`` over the selected
parameters theta (Malladi et al. 2023; Afzal et al. 2025), computed blockwise:
one forward and C backward passes per block of samples, per-sample Jacobian
rows from the captured activations and output gradients, Gram tiles by GEMM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .backends import compute_dtype, kernel_dtype, matmul_precision, resolve_ops
from .batches import Batch, blocks, check_same_keys, split
from .blocks import JacobianEngine, iterate_blocks
from .capture import build_plan
from .checkpoint import Checkpoint, fingerprint
from .gram import OUTPUTS, JacobianStore, assemble, kernel_signs
from .model_state import evaluation_mode
from .outputs import default_output
from .params import ParamSpec, column_offsets, group_columns, parameter_dtype, select_params

Inputs = Batch | Iterable[Batch]

_CPU_BLOCK = 32
_MAX_GPU_BLOCK = 512


def _model_device(model: nn.Module, device) -> torch.device:
    here = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device is not None and torch.device(device) != here:
        want = torch.device(device)
        if not (want.type == here.type and want.index is None):
            raise ValueError(
                f"device={want} but the model is on {here}; move the model with model.to(device)"
            )
    return here


def _block_size(batch_size, device: torch.device, num_columns: int, dtype: torch.dtype) -> int:
    if batch_size is not None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        return int(batch_size)
    if device.type != "cuda":
        return _CPU_BLOCK
    free, _ = torch.cuda.mem_get_info(device)
    # J takes n*C*P elements; leave room for C <= 8 outputs and the activations.
    per_sample = 8 * num_columns * torch.finfo(dtype).bits // 8
    return int(max(1, min(_MAX_GPU_BLOCK, 0.2 * free // max(per_sample, 1))))


def _store_budget(device: torch.device, cap) -> Callable[[], float]:
    """Device bytes for stored J blocks, worked out once the first block is done (K is
    allocated by then): three quarters of what is free, cached blocks of the allocator
    included, the rest left for the next blocks' work; at most ``cap``. Blocks past it
    wait in host memory and are copied back for each later tile, so a budget that holds
    all of J is much faster; ``cap=0`` bounds device memory by one block plus K."""
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int | float) or cap < 0):
        raise ValueError(
            f"jacobian_memory must be a number of bytes >= 0 (0: every Jacobian block waits "
            f"in host memory), or None to use what the GPU has free; got {cap!r}"
        )
    if device.type != "cuda":
        return lambda: float("inf")  # J is in host memory already

    def budget() -> float:
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        room = 0.75 * (free + cached)
        return room if cap is None else min(room, float(cap))

    return budget


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
class _Job:
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

    @classmethod
    def create(cls, model, *, params, output, precision, backend, batch_size, device) -> _Job:
        dev = _model_device(model, device)
        dtype = compute_dtype(precision, parameter_dtype(model))
        ops = resolve_ops(backend, dev)
        selected = select_params(model, params)
        offsets, num_columns = column_offsets(selected)
        plan = build_plan(model, selected, offsets)
        size = _block_size(batch_size, dev, num_columns, dtype)
        return cls(
            model, dev, dtype, ops, selected, plan, size, precision, output or default_output
        )

    def engine(self) -> JacobianEngine:
        return JacobianEngine(
            self.model, self.output, self.selected, self.plan, self.ops, self.dtype, self.device
        )


def _open_checkpoint(directory, job: _Job, settings: dict, batches: list) -> Checkpoint:
    """The checkpoint of exactly this computation: settings, inputs and every parameter value."""
    tensors = [t for b in batches for t in b.values() if isinstance(t, torch.Tensor)]
    settings = {**settings, "params": [n for n, _ in job.selected]}
    key = fingerprint(settings, tensors + list(job.model.parameters()))
    return Checkpoint(directory, key, job.block_size)


def _kernels(
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
    kernel_signs(kernel)  # validate before any work
    if outputs not in OUTPUTS:
        raise ValueError(f"unknown outputs {outputs!r}; choose one of {OUTPUTS}")
    job = _Job.create(
        model, params=params, output=output, precision=precision, backend=backend,
        batch_size=batch_size, device=device,
    )  # fmt: skip
    kdtype = kernel_dtype(parameter_dtype(model))
    batches, n_rows = split(inputs, "inputs")
    batches2, n_cols = (None, n_rows)
    if inputs2 is not None:
        batches2, n_cols = split(inputs2, "inputs2")
        check_same_keys(batches, batches2)
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

    store = JacobianStore(job.device, _store_budget(job.device, jacobian_memory))
    bar = _progress(progress, n_rows + (n_cols if inputs2 is not None else 0))
    with evaluation_mode(model), matmul_precision(precision):
        engine = job.engine()

        def stream(side: str, parts, keep: bool):
            if ckpt is None:
                return _as_signs(iterate_blocks(engine, blocks(parts, size), bar), kernel)
            load = (lambda s: ckpt.load(side, s)) if keep else None
            found = iterate_blocks(engine, blocks(parts, size), bar, ckpt.finished(side), load)
            return _as_signs(found, kernel)

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


def ntk(
    model: nn.Module,
    inputs: Inputs,
    inputs2: Inputs | None = None,
    *,
    output: Callable | None = None,
    params: ParamSpec = "trainable",
    kernel: str = "sgd",
    outputs: str = "full",
    precision: str = "fp32",
    backend: str = "auto",
    batch_size: int | None = None,
    device=None,
    out_device=None,
    progress: bool | None = None,
    checkpoint: str | None = None,
    jacobian_memory: float | None = None,
) -> torch.Tensor:
    """The empirical NTK ``K(X, X)`` (or the cross kernel ``K(X, X2)``).

    ``kernel``: ``"sgd"`` ``<J_ia, J_jb>``, ``"signgd"`` ``<sign J_ia, sign J_jb>``,
    ``"asym_signgd"`` ``<sign J_ia, J_jb>`` (Malladi et al. 2023). ``outputs="full"``
    gives ``[N, C, M, C]``, ``"trace"`` the sum over ``a`` of ``K[(i,a),(j,a)]`` as
    ``[N, M]``; with C = 1 both give ``[N, M]``. float32 (float64 for a float64
    model); the symmetric kernel is exactly symmetric. See api.md for the rest.

    ``checkpoint``: a directory; K is kept there in a memory-mapped file with
    the finished Jacobian blocks, and a run that was stopped resumes from it
    (same model, inputs and settings; the returned K then lives in that file).
    ``progress``: a progress bar (None: only on a terminal).
    ``jacobian_memory``: GPU bytes for the Jacobian blocks kept for later tiles (None:
    three quarters of what is free once K is allocated). Blocks past it wait in host
    memory and are copied back for each later tile: slower, but with 0 the GPU holds
    only one block plus K, whatever N. (On the CPU, J is in host memory anyway.)
    """
    return _kernels(
        model,
        inputs,
        inputs2,
        output=output,
        params=params,
        kernel=kernel,
        outputs=outputs,
        precision=precision,
        backend=backend,
        batch_size=batch_size,
        device=device,
        out_device=out_device,
        progress=progress,
        checkpoint=checkpoint,
        jacobian_memory=jacobian_memory,
        groups=None,
    )["all"]


def layer_ntks(
    model: nn.Module,
    inputs: Inputs,
    *,
    groups: str | Callable[[str], str] = "module",
    inputs2: Inputs | None = None,
    **ntk_kwargs,
) -> dict[str, torch.Tensor]:
    """One kernel per parameter group, from one pass over the data; they sum to ``ntk(...)``.

    ``groups``: ``"module"`` (one per adapted module), ``"layer"`` (per transformer
    block) or a callable ``name -> group``. ``K = sum_l K_l`` (Afzal et al. 2025).
    """
    defaults = dict(
        output=None,
        params="trainable",
        kernel="sgd",
        outputs="full",
        precision="fp32",
        backend="auto",
        batch_size=None,
        device=None,
        out_device=None,
        progress=None,
        checkpoint=None,
        jacobian_memory=None,
    )
    unknown = set(ntk_kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"layer_ntks got unknown arguments {sorted(unknown)}")
    return _kernels(model, inputs, inputs2, groups=groups, **{**defaults, **ntk_kwargs})


def jacobian(
    model: nn.Module,
    inputs: Inputs,
    *,
    output: Callable | None = None,
    params: ParamSpec = "trainable",
    precision: str = "fp32",
    batch_size: int | None = None,
    backend: str = "auto",
    device=None,
) -> torch.Tensor:
    """The per-sample Jacobian ``d f_a(x_i) / d theta`` as ``[N, C, P]``.

    Columns follow ``model.named_parameters()`` order, each parameter flattened
    row-major. dtype: the computation's (bfloat16 for ``precision="bf16"``).
    """
    job = _Job.create(
        model, params=params, output=output, precision=precision, backend=backend,
        batch_size=batch_size, device=device,
    )  # fmt: skip
    batches, _ = split(inputs, "inputs")
    with evaluation_mode(model), matmul_precision(precision):
        found = iterate_blocks(job.engine(), blocks(batches, job.block_size))
        return torch.cat([J for _, J, _ in found], dim=0)
