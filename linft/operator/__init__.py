"""The kernel as an operator: ``K X = J (J^T X)`` over J kept in memory, in checksummed files,
or recomputed, for spectra of kernels too large to form (``linft.ntk_operator``)."""

from .build import ntk_operator
from .kernel import NTKOperator

__all__ = ["NTKOperator", "ntk_operator"]
