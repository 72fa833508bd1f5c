import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _seed(request):
    """A different seed per test (fresh inputs), reproducible from the test id;
    LINFT_TEST_SEED shifts them all."""
    digest = hashlib.sha256(request.node.nodeid.encode()).digest()
    seed = int.from_bytes(digest[:4], "little") + int(os.environ.get("LINFT_TEST_SEED", "0"))
    torch.manual_seed(seed)
    yield


@pytest.fixture
def one_thread():
    """Small matrices: one thread each, rather than oversubscribing shared CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
