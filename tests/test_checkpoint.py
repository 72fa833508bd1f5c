"""A checkpointed kernel resumes after an interruption and gives the same numbers."""

from __future__ import annotations

import pytest
import torch
from checks import assert_rel_close
from interrupts import Interrupt, stop_after_blocks
from models import random_lengths, roberta_classifier, token_batch

import linft
from linft.kernel import run


@pytest.mark.parametrize("cross", [False, True])
def test_resume_after_interruption(tmp_path, monkeypatch, cross):
    model = roberta_classifier()
    a = token_batch(random_lengths(7), pad_id=1)
    b = token_batch(random_lengths(5), pad_id=1) if cross else None
    expected = linft.ntk(model, a, b, batch_size=2)

    stop_after_blocks(monkeypatch, 3)
    with pytest.raises(Interrupt):
        linft.ntk(model, a, b, batch_size=2, checkpoint=tmp_path)
    calls = stop_after_blocks(monkeypatch, None)
    K = linft.ntk(model, a, b, batch_size=2, checkpoint=tmp_path)
    # the first run finished 3 blocks; the second computes only the rest
    total_blocks = 4 + (3 if cross else 0)
    assert len(calls) == total_blocks - 3
    assert torch.equal(K, expected)


def test_finished_checkpoint_computes_nothing(tmp_path, monkeypatch):
    model = roberta_classifier()
    a = token_batch(random_lengths(4), pad_id=1)
    first = linft.ntk(model, a, batch_size=3, checkpoint=tmp_path).clone()
    calls = stop_after_blocks(monkeypatch, None)
    again = linft.ntk(model, a, checkpoint=tmp_path)
    assert calls == [] and torch.equal(first, again)


def test_checkpoint_of_another_computation_is_refused(tmp_path):
    model = roberta_classifier()
    a = token_batch(random_lengths(4), pad_id=1)
    linft.ntk(model, a, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="different computation"):
        linft.ntk(model, a, kernel="signgd", checkpoint=tmp_path)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(ValueError, match="different computation"):
        linft.ntk(model, a, checkpoint=tmp_path)


def test_out_of_memory_block_is_split_and_retried(monkeypatch):
    """A block that runs out of GPU memory is halved until it fits; K is unchanged."""
    from linft.kernel.engine import JacobianEngine

    model = roberta_classifier()
    a = token_batch(random_lengths(7), pad_id=1)
    expected = linft.ntk(model, a, batch_size=7)
    real_block = JacobianEngine.block
    sizes = []

    def tight_memory(self, batch, start):
        n = batch["input_ids"].shape[0]
        sizes.append(n)
        if n > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_block(self, batch, start)

    monkeypatch.setattr(JacobianEngine, "block", tight_memory)
    with pytest.warns(UserWarning, match="out of GPU memory on a block of") as caught:
        K = linft.ntk(model, a, batch_size=7)
    assert sizes[:3] == [7, 3, 1]
    assert "block of 7 samples; retrying with 3" in str(caught[0].message)
    assert_rel_close(K, expected, 1e-6, "after OOM retries")


def test_automatic_block_size_follows_free_gpu_memory(monkeypatch):
    from linft.kernel.run import block_size as _block_size

    gib = 2**30
    cuda = torch.device("cuda")
    for free, expected in [(80 * gib, 512), (1 * gib, 1 * gib // 5 // (8 * 300_000 * 2))]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free: (f, 141 * gib))
        assert _block_size(None, cuda, 300_000, torch.bfloat16) == expected
    assert _block_size(None, torch.device("cpu"), 300_000, torch.float32) == 32
    assert _block_size(5, cuda, 300_000, torch.float32) == 5


def test_signgd_keeps_int8_signs(tmp_path):
    from safetensors.torch import load_file

    model = roberta_classifier()
    a = token_batch(random_lengths(4), pad_id=1)
    K = linft.ntk(model, a, kernel="signgd", batch_size=2, checkpoint=tmp_path)
    stored = load_file(str(tmp_path / "J_rows_0.safetensors"))["J"]
    assert stored.dtype == torch.int8 and set(stored.unique().tolist()) <= {-1, 0, 1}
    S = torch.sign(
        run.jacobian(
            model,
            a,
            output=None,
            params="trainable",
            precision="fp32",
            batch_size=None,
            backend="auto",
            device=None,
            sign_rows=True,
        )
    )
    S = S.double()
    assert torch.equal(K.double(), torch.einsum("icp,jdp->icjd", S, S))


def test_jacobian_store_parks_blocks_past_its_budget():
    from linft.kernel.store import JacobianStore

    blocks = [(3 * i, torch.randn(3, 2, 10)) for i in range(5)]
    asked = []

    def budget():
        asked.append(1)
        return 2 * 3 * 2 * 10 * 4  # two blocks of float32

    store = JacobianStore(torch.device("cpu"), budget)
    for start, J in blocks:
        store.add(start, J)
    assert len(asked) == 1, "the budget is worked out once, at the first block"
    assert store.parked == 3 and store.used == 2 * 3 * 2 * 10 * 4
    got = list(store)
    assert [s for s, _ in got] == [s for s, _ in blocks]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, blocks, strict=True))


@pytest.mark.parametrize("cross", [False, True])
def test_kernel_with_every_jacobian_block_in_host_memory(monkeypatch, cross):
    """jacobian_memory=0 on a GPU: every stored block waits in host memory and is
    copied back for each tile; the kernel is the same, bit for bit."""
    from linft.kernel import run as api

    model = roberta_classifier()
    a = token_batch(random_lengths(7), pad_id=1)
    b = token_batch(random_lengths(5), pad_id=1) if cross else None
    expected = linft.ntk(model, a, b, batch_size=2)
    stores = []

    class RecordedStore(api.JacobianStore):
        def __init__(self, device, budget):
            super().__init__(device, budget)
            stores.append(self)

    monkeypatch.setattr(api, "JacobianStore", RecordedStore)
    monkeypatch.setattr(api, "store_budget", lambda device, cap: lambda: float(cap))
    K = linft.ntk(model, a, b, batch_size=2, jacobian_memory=0)
    assert stores[0].parked == (3 if cross else 4) and stores[0].used == 0
    assert torch.equal(K, expected)


def test_store_budget_is_three_quarters_of_free_gpu_memory_at_most_the_cap(monkeypatch):
    from linft.kernel.store import store_budget as _store_budget

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * gib, 141 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 10 * gib)
    cuda = torch.device("cuda")
    assert _store_budget(cuda, None)() == 0.75 * 60 * gib  # cached blocks count as free
    assert _store_budget(cuda, 8 * gib)() == 8 * gib
    assert _store_budget(cuda, 0)() == 0
    assert _store_budget(torch.device("cpu"), 0)() == float("inf")  # J is in host memory
