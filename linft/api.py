"""The public kernel functions of api.md: ``ntk``, ``layer_ntks``, ``jacobian``.

``K[(i,a),(j,b)] = <d f_a(x_i)/d theta, d f_b(x_j)/d theta>`` over the selected
parameters theta (Malladi et al. 2023; Afzal et al. 2025), computed blockwise:
one forward and C backward passes per block of samples, per-sample Jacobian
rows from the captured activations and output gradients, Gram tiles by GEMM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .kernel import run
from .kernel.run import Inputs
from .params import ParamSpec


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
    verify: bool = True,
    group=None,
    out: str = "full",
) -> torch.Tensor:
    """The empirical NTK ``K(X, X)`` (or the cross kernel ``K(X, X2)``).

    ``kernel``: ``"sgd"`` ``<J_ia, J_jb>``, ``"signgd"`` ``<sign J_ia, sign J_jb>``,
    ``"asym_signgd"`` ``<sign J_ia, J_jb>`` (Malladi et al. 2023). ``outputs="full"``
    gives ``[N, C, M, C]``, ``"trace"`` the sum over ``a`` of ``K[(i,a),(j,a)]`` as
    ``[N, M]``; with C = 1 both give ``[N, M]``. float32 (float64 for a float64
    model); the symmetric kernel is exactly symmetric. See api.md for the rest.

    ``out_device``: where the returned K lives (None: the model's device).
    ``checkpoint``: a directory; K is kept there in a preallocated memory-mapped file
    with the finished Jacobian blocks, and a run that was stopped resumes from it. It
    resumes only the same computation (output function, model class, config, LoRA
    scaling and variant, weights, dtypes, inputs, settings, linft version; anything
    else is refused, naming what changed); every finished block is checksummed, so a
    kernel or Jacobian file cut short, deleted or damaged is an error naming it. The
    returned K is a copy on ``out_device``; ``out_device="checkpoint"`` returns the
    memory-mapped file itself (for kernels larger than memory; editing it edits the
    checkpoint). A disk without room for K raises ``OSError`` before any tile.
    ``progress``: a progress bar (None: only on a terminal).
    ``jacobian_memory``: GPU bytes for the Jacobian blocks kept for later tiles (None:
    three quarters of what is free once K is allocated). Blocks past it wait in host
    memory and are copied back for each later tile: slower, but with 0 the GPU holds
    only one block plus K, whatever N. (On the CPU, J is in host memory anyway.)
    ``verify``: the self-check (``linft.kernel.verify``): on the first block, the Jacobian
    rows of one or two samples against plain per-sample autograd of the same model, and
    one Gram tile against the pure-torch ops; a mismatch raises ``SelfCheckError`` naming
    the module (``backend="auto"`` on Triton: a warning, and the run goes on in pure torch).
    Sign kernels count entries at most ``tau`` times their row's largest magnitude as zero
    (rounding noise where the exact entry is 0; ``tau`` = 2^-17 in fp32, 2^-46 in fp64,
    2^-10 in bf16 and tf32: ``linft.kernel.signs``).

    Several processes (``torchrun``): ``group`` is a ``torch.distributed`` process group
    whose ranks share the run (None: the default group when ``torch.distributed`` is
    initialized with more than one process; False: this process alone). Every rank
    passes the same model and inputs; each computes the Jacobian blocks of its share of
    the samples and its share of the tiles (``linft.kernel.distributed``). ``out="full"``:
    K on rank 0, None on the other ranks; ``out="shard"``: every rank gets its rows as a
    ``linft.KernelShard``, an operator ``topk_eigh`` and ``spectrum`` accept (K is never
    in one place). With ``checkpoint=DIR`` (a directory every rank sees) each rank
    resumes its own share.
    """
    K = run.kernels(
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
        verify=verify,
        group=group,
        out=out,
    )
    return None if K is None else K["all"]


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
    ``group`` and ``out`` as for ``ntk`` (None on ranks other than 0 for ``out="full"``).
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
        verify=True,
        group=None,
        out="full",
    )
    unknown = set(ntk_kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"layer_ntks got unknown arguments {sorted(unknown)}")
    return run.kernels(model, inputs, inputs2, groups=groups, **{**defaults, **ntk_kwargs})


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
    verify: bool = True,
    group=None,
    out: str = "full",
) -> torch.Tensor:
    """The per-sample Jacobian ``d f_a(x_i) / d theta`` as ``[N, C, P]``.

    Columns follow ``model.named_parameters()`` order, each parameter flattened
    row-major. dtype: the computation's (bfloat16 for ``precision="bf16"``).
    ``group`` as for ``ntk``: ``out="full"`` gives J on rank 0 (None elsewhere),
    ``out="shard"`` each rank's rows as a ``linft.JacobianShard``, whose ``.kernel()`` is
    the matrix-free ``K X = J (J^T X)`` for ``topk_eigh`` and ``spectrum``.
    """
    return run.jacobian(
        model, inputs, output=output, params=params, precision=precision,
        batch_size=batch_size, backend=backend, device=device, verify=verify,
        group=group, out=out,
    )  # fmt: skip


def ntk_operator(
    model: nn.Module,
    inputs: Inputs,
    *,
    output: Callable | None = None,
    params: ParamSpec = "trainable",
    kernel: str = "sgd",
    precision: str = "fp32",
    batch_size: int | None = None,
    store: str = "auto",
    checkpoint: str | None = None,
    memory: float | None = None,
    accumulate: str = "fp32",
    backend: str = "auto",
    device=None,
    verify: bool = True,
    group=None,
    progress: bool | None = None,
):
    """The kernel ``K(X, X)`` ``[N C, N C]`` as an operator that never forms K.

    One pass of the model computes J (``[N C, P]``, the rows of ``jacobian``, self-checked
    as in ``ntk``); the operator (``linft.operator.NTKOperator``) then answers ``shape``,
    ``dtype``, ``matmul(X)`` (``K X = J (J^T X)``, two passes over J), ``trace()`` and
    ``diagonal()`` (kept from the J pass), ``to_dense()`` (small N), ``feature_gram()``
    (``J^T J`` ``[P, P]``, one pass) and ``feature_kernel()`` (``J^T J`` as an operator: one
    pass per product), which ``linft.topk_eigh``, ``linft.spectrum`` and
    ``linft.kernel_regression`` use: ``spectrum(op, k=...)`` takes every eigenvalue from one
    ``eigh`` of ``J^T J`` when P < N C (and P <= 16384), else block Krylov on ``J^T J`` at one
    pass over J per product. ``kernel``: ``"sgd"`` or ``"signgd"`` (the symmetric ones).
    Passes over J show on a progress bar (a terminal, or ``progress=True``).

    ``store``: where J lives. ``"auto"``: in memory while it fits ``memory`` bytes (None: half
    of the memory available now), the rest in checksummed files under ``checkpoint=DIR``
    (an error naming the fix when J outgrows memory without one); with ``checkpoint`` every
    finished block is also saved there, so a killed run resumes the J pass at the block it
    was on (the same resume rules as ``ntk``). ``"recompute"``: nothing stored, every pass
    over J runs the model again (one forward and C backward passes per block); a model
    whose weights change afterwards is refused. Where J went is said in one line on stderr
    (not with ``progress=False``). ``accumulate``: ``"fp32"`` products, or ``"fp64"``.
    """
    from .operator import ntk_operator as build

    return build(
        model, inputs, output=output, params=params, kernel=kernel, precision=precision,
        batch_size=batch_size, store=store, checkpoint=checkpoint, memory=memory,
        accumulate=accumulate, backend=backend, device=device, verify=verify, group=group,
        progress=progress,
    )  # fmt: skip
