"""linft: empirical neural tangent kernels of (LoRA) fine-tuned language models.

``import linft`` needs neither a GPU, Triton nor the compiled extension: each
fast path is loaded when first used, and pure torch serves when it is absent.
"""

# Submodules first, then the functions: linft.jacobian, linft.ntk and
# linft.spectrum name the public functions, not the modules of the same name.
from . import outputs, params, rules
from .api import jacobian, layer_ntks, ntk, ntk_operator
from .dynamics import kernel_regression, linearized_loss, min_lora_rank, steps_to_loss
from .eig import Eig, topk_eigh
from .operator import NTKOperator
from .kernel.verify import SelfCheckError
from .rules import Rule, register_rule, unregister_rule
from .select import Selection, select_layers
from .sharded import JacobianShard, KernelShard
from .spectrum import Spectrum, spectrum

__version__ = "0.1.0"

__all__ = [
    "Eig",
    "JacobianShard",
    "KernelShard",
    "NTKOperator",
    "Rule",
    "SelfCheckError",
    "Selection",
    "Spectrum",
    "jacobian",
    "kernel_regression",
    "layer_ntks",
    "linearized_loss",
    "min_lora_rank",
    "ntk",
    "ntk_operator",
    "outputs",
    "params",
    "register_rule",
    "rules",
    "select_layers",
    "spectrum",
    "steps_to_loss",
    "topk_eigh",
    "unregister_rule",
]
