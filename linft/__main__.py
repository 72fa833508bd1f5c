"""``python -m linft`` and ``torchrun --nproc_per_node=G -m linft analyze ...``."""

import sys

from .cli.main import main

sys.exit(main())
