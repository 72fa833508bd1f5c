"""The Triton kernels as the GPU gets them, compiled offline for sm_90 (H100/H200).

No GPU needed: ``benchmarks/kernel_resources.py`` runs the launchers' GPU path with
recorders in place of the kernels, so the exact tiles and specializations of the
RoBERTa-base benchmark are compiled (in a subprocess: the tests' interpreter mode
makes kernels that cannot be compiled). Every kernel must keep its values in
registers (no local-memory spills), fit an sm_90 block's shared memory, and multiply
half, int8 and split-tf32 operands with Hopper's warpgroup MMA.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_resources.py"
SM90_SHARED_LIMIT = 227 * 1024


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "launches.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out)], env=env, capture_output=True, text=True
    )
    assert out.exists(), f"kernel_resources.py failed:\n{run.stdout}\n{run.stderr}"
    return json.loads(out.read_text())


def test_every_launch_of_the_benchmark_is_covered(launches):
    assert len({case for case, _, _ in launches}) == 15
    kernels = {kw["kernel"] for _, kw, _ in launches}
    assert kernels == {
        "_token_sum_kernel",
        "_gram_kernel",
        "_gram_reduce_kernel",
        "_symm_matmul_kernel",
    }


def test_no_spills_and_shared_memory_within_sm90(launches):
    for case, kw, rep in launches:
        assert rep["local"] == 0, f"{case}: {kw['kernel']} spills {rep['local']} B a thread"
        assert rep["shared"] <= SM90_SHARED_LIMIT, f"{case}: {rep['shared']} B shared"


def test_half_and_int8_products_use_hopper_tensor_cores(launches):
    for case, kw, rep in launches:
        if kw["kernel"] == "_gram_reduce_kernel":
            continue
        expected = "fma" if "fp32" in case or "ieee" in case else "wgmma"
        assert rep["mma"] == expected, f"{case}: {kw['kernel']} uses {rep['mma']}"
