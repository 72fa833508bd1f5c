"""linft: empirical neural tangent kernels of (LoRA) fine-tuned language models.

The public names of ``shared/design/api.md`` are loaded on first use, so
``import linft`` is cheap and needs neither a GPU, Triton nor the compiled
extension.
"""

from importlib import import_module

# Bound after their modules load: linft.jacobian / linft.ntk are functions here,
# not the modules of the same name.
from . import outputs, params
from .api import jacobian, layer_ntks, ntk

__version__ = "0.1.0"

_PUBLIC = {
    "topk_eigh": "linft.eig",
    "Eig": "linft.eig",
    "spectrum": "linft.spectrum",
    "Spectrum": "linft.spectrum",
    "select_layers": "linft.select",
    "Selection": "linft.select",
    "kernel_regression": "linft.dynamics",
    "linearized_loss": "linft.dynamics",
    "steps_to_loss": "linft.dynamics",
    "min_lora_rank": "linft.dynamics",
}

__all__ = sorted([*_PUBLIC, "jacobian", "layer_ntks", "ntk", "outputs", "params"])


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'linft' has no attribute {name!r}")
    module = import_module(_PUBLIC[name])
    value = module if module.__name__ == f"linft.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
