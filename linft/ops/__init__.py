"""Pure-torch twins of the fast ops in ``linft.triton_kernels``: same names, same
signatures. They are the CPU path and the oracle every fast path is tested against."""

from .gram import gram_symmetric, gram_tile
from .jacobian import linear_jacobian, lora_jacobian

__all__ = ["gram_symmetric", "gram_tile", "linear_jacobian", "lora_jacobian"]
