"""``ntk_operator``: one pass of the model over the inputs, J kept where ``store`` says, and the
kernel handed out as an ``NTKOperator``."""

from __future__ import annotations

import torch

from ..backends import matmul_precision
from ..kernel import run
from ..kernel.batches import blocks
from ..kernel.model_state import run_context
from .jacobian import RecomputedJacobian, StoredJacobian, available_memory, stderr_line
from .kernel import NTKOperator

STORES = ("auto", "recompute")
KERNELS = ("sgd", "signgd")
ACCUMULATE = ("fp32", "fp64")


def _check(kernel, store, accumulate, memory, checkpoint) -> None:
    if kernel not in KERNELS:
        raise ValueError(
            f"ntk_operator: kernel={kernel!r}; the operator is a symmetric kernel, one of "
            f"{KERNELS} (asym_signgd is not symmetric: use linft.ntk for it)"
        )
    if store not in STORES:
        raise ValueError(f"ntk_operator: store={store!r}; choose one of {STORES}")
    if accumulate not in ACCUMULATE:
        raise ValueError(f"ntk_operator: accumulate={accumulate!r}; choose one of {ACCUMULATE}")
    if memory is not None and (
        isinstance(memory, bool) or not isinstance(memory, int | float) or not memory >= 0
    ):
        raise ValueError(
            f"ntk_operator: memory must be a number of bytes >= 0 (0: every block of J in "
            f"the files of checkpoint=DIR), or None for half of the available memory; got "
            f"{memory!r}"
        )
    if store == "recompute" and checkpoint is not None:
        raise ValueError(
            "ntk_operator: store='recompute' keeps no J, so checkpoint= has nothing to keep; "
            "pass one of them"
        )


def ntk_operator(
    model,
    inputs,
    *,
    output=None,
    params="trainable",
    kernel: str = "sgd",
    precision: str = "fp32",
    batch_size=None,
    store: str = "auto",
    checkpoint=None,
    memory: float | None = None,
    accumulate: str = "fp32",
    backend: str = "auto",
    device=None,
    verify: bool = True,
    group=None,
    progress=None,
) -> NTKOperator:
    _check(kernel, store, accumulate, memory, checkpoint)
    from ..kernel import distributed

    if distributed.resolve_group(group) is not None:
        raise ValueError(
            "ntk_operator runs in one process; with several, each rank's rows of J are "
            "linft.jacobian(..., out='shard') and .kernel() is their operator"
        )
    with run_context(model, matmul_precision(precision)):
        job, batches, n, _, _ = run.prepare(
            model, inputs, None, params=params, output=output, precision=precision,
            backend=backend, batch_size=batch_size, device=device, verify=verify,
        )  # fmt: skip
    ckpt, size = None, job.block_size
    if checkpoint is not None:
        settings = dict(kernel=kernel, operator="J", precision=precision, rows=n, cols=n,
                        cross=False)  # fmt: skip
        ckpt = run._open_checkpoint(checkpoint, job, settings, batches, output)
        size = ckpt.block_size
    listed = blocks(batches, size)
    say = stderr_line(progress)
    if store == "recompute":
        J = RecomputedJacobian(job, listed, kernel, n, progress=None)
    else:
        budget = 0.5 * available_memory() if memory is None else float(memory)
        bar = run._progress(progress, n)
        try:
            J = StoredJacobian(job, listed, kernel, n, memory=budget, ckpt=ckpt, progress=bar)
        finally:
            if bar is not None:
                bar.close()
    acc = torch.float64 if accumulate == "fp64" or job.dtype == torch.float64 else torch.float32
    op = NTKOperator(J, acc, kernel, progress)
    nbytes = op.shape[0] * op.num_features * J.dtype.itemsize
    say(
        f"linft: ntk_operator J [{op.shape[0]} x {op.num_features}] {str(J.dtype)[6:]} "
        f"({nbytes / 2**30:.2f} GiB): {op.store}"
    )
    return op
