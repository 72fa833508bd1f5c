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
    return run.kernels(
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
) -> torch.Tensor:
    """The per-sample Jacobian ``d f_a(x_i) / d theta`` as ``[N, C, P]``.

    Columns follow ``model.named_parameters()`` order, each parameter flattened
    row-major. dtype: the computation's (bfloat16 for ``precision="bf16"``).
    """
    return run.jacobian(
        model, inputs, output=output, params=params, precision=precision,
        batch_size=batch_size, backend=backend, device=device,
    )  # fmt: skip
