"""The ``linft`` command line (``main``), its report and the built-in demo.

``main.py`` parses arguments and runs a command; ``load.py`` loads the model, the
tokenizer and the data; ``analysis.py`` computes what the report says; ``report.py``
prints it and writes report.json, kernel.safetensors and report.html (figures from
``plots.py``); ``demo.py`` builds the demo's model and data.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
