"""Triton kernels of linft (installed as ``linft.triton_kernels``).

One op per module, each with a pure-torch twin of the same signature in ``linft``:

- ``lora_jacobian`` / ``linear_jacobian``: per-sample Jacobian rows of LoRA and linear
  modules written into the block's ``[n, C, P]`` buffer (twin: ``linft.ops.jacobian``);
- ``gram_tile`` / ``gram_symmetric``: Gram tiles with fp32 accumulation, sign on load
  and int8 SignGD (twin: ``linft.ops.gram``);
- ``symm_matmul``: ``A @ X`` for symmetric A reading half of it, the eigensolver's
  product on tensor cores (twin: ``linft.eig.symm_matmul``).

Importing this package needs Triton; launching needs a CUDA tensor, or CPU tensors
under ``TRITON_INTERPRET=1``.
"""

from .gram import gram_symmetric, gram_tile
from .lora_jacobian import linear_jacobian, lora_jacobian
from .symm_matmul import symm_matmul

__all__ = ["gram_symmetric", "gram_tile", "linear_jacobian", "lora_jacobian", "symm_matmul"]
