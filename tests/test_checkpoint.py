"""A checkpointed kernel resumes after an interruption and gives the same numbers."""

from __future__ import annotations

import pytest
import torch
from models import random_lengths, roberta_classifier, token_batch

import linft


class Interrupt(Exception):
    pass


def _counting_output(stop_after: int | None):
    calls = []

    def output(out, batch):
        calls.append(batch["input_ids"].shape[0])
        if stop_after is not None and len(calls) > stop_after:
            raise Interrupt
        return out.logits

    return output, calls


@pytest.mark.parametrize("cross", [False, True])
def test_resume_after_interruption(tmp_path, cross):
    model = roberta_classifier()
    a = token_batch(random_lengths(7), pad_id=1)
    b = token_batch(random_lengths(5), pad_id=1) if cross else None
    expected = linft.ntk(model, a, b, batch_size=2)

    output, _ = _counting_output(stop_after=3)
    with pytest.raises(Interrupt):
        linft.ntk(model, a, b, output=output, batch_size=2, checkpoint=tmp_path)
    output, calls = _counting_output(stop_after=None)
    K = linft.ntk(model, a, b, output=output, batch_size=2, checkpoint=tmp_path)
    # the first run finished 3 blocks; the second computes only the rest
    total_blocks = 4 + (3 if cross else 0)
    assert len(calls) == total_blocks - 3
    assert torch.equal(K, expected)


def test_finished_checkpoint_computes_nothing(tmp_path):
    model = roberta_classifier()
    a = token_batch(random_lengths(4), pad_id=1)
    first = linft.ntk(model, a, batch_size=3, checkpoint=tmp_path).clone()
    output, calls = _counting_output(stop_after=None)
    again = linft.ntk(model, a, output=output, checkpoint=tmp_path)
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
