"""peft prompt learning: the logits carry the virtual tokens, the batch does not; the output
helpers read the batch's tokens, and the kernel over the prompt parameters is the reference's."""

from __future__ import annotations

import warnings

import pytest
import torch
from checks import assert_rel_close, gram
from models import (
    LABEL_WORDS,
    MASK_ID,
    _roberta_config,
    gpt2_base,
    llama_base,
    random_lengths,
    token_batch,
    trainable_names,
)
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from reference import reference_jacobian
from transformers import RobertaForMaskedLM

import linft

FP32_REL = 1e-5
VIRTUAL = 3


def _base(name: str):
    return gpt2_base() if name == "gpt2" else llama_base()


METHODS = {
    "prompt tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL),
    "p-tuning": lambda: PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL, encoder_hidden_size=8
    ),
    "prefix tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL),
}


def _with_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "base, method",
    [
        ("gpt2", "prompt tuning"),
        ("llama", "prompt tuning"),
        ("gpt2", "p-tuning"),
        ("llama", "prefix tuning"),
    ],  # fmt: skip
)
def test_last_token_over_prompt_parameters(base, method):
    """The reference differentiates each sample alone without a mask, so ``last_token`` reads
    the last logits there: independent of how the virtual tokens are skipped in a batch."""
    model = get_peft_model(_base(base), METHODS[method]())
    output = linft.outputs.last_token(LABEL_WORDS)
    batch = token_batch(random_lengths(4, high=7), pad_id=0)  # right padded, with a mask
    K, found = _with_warnings(lambda: linft.ntk(model, batch, output=output, batch_size=3))
    J = reference_jacobian(model, batch, output, trainable_names(model))
    assert_rel_close(K, gram(J, J), FP32_REL, f"{base}, {method}")
    assert not [m for m in found if "padded" in m], found


def test_mask_token_over_prompt_parameters():
    """A masked LM with prompt tuning: the label words at the mask token, the logits
    ``VIRTUAL`` tokens longer than the ids; the reference reads the position itself."""
    model = get_peft_model(
        RobertaForMaskedLM(_roberta_config()),
        PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=VIRTUAL),
    )
    batch = token_batch(random_lengths(3), pad_id=1, mask_token=True)

    def at_the_mask(out, sample):
        (pos,) = torch.nonzero(sample["input_ids"][0] == MASK_ID)[0].tolist()
        return out.logits[:, VIRTUAL + pos, LABEL_WORDS]

    with pytest.warns(UserWarning, match="exact but slow per-sample"):
        K = linft.ntk(model, batch, output=linft.outputs.mask_token(LABEL_WORDS, MASK_ID))
    J = reference_jacobian(model, batch, at_the_mask, trainable_names(model))
    assert_rel_close(K, gram(J, J), FP32_REL, "roberta mlm, prompt tuning")


def test_left_padding_with_virtual_tokens_is_warned():
    """Left pads sit between the virtual and the real tokens, so even rotary positions see
    them: the kernel differs from the samples alone, and linft says so."""
    model = get_peft_model(_base("llama"), METHODS["prompt tuning"]())
    output = linft.outputs.last_token(LABEL_WORDS)
    batch = token_batch([6, 2, 4], pad_id=0, left=True)
    K, found = _with_warnings(lambda: linft.ntk(model, batch, output=output))
    found = [m for m in found if "padded" in m]
    assert len(found) == 1 and "padding_side = 'right'" in found[0], found
    right = token_batch([6, 2, 4], pad_id=0)
    for i, length in enumerate([6, 2, 4]):  # the same samples, right padded
        right["input_ids"][i, :length] = batch["input_ids"][i, -length:]
    K_right, _ = _with_warnings(lambda: linft.ntk(model, right, output=output))
    J = reference_jacobian(model, right, output, trainable_names(model))
    assert_rel_close(K_right, gram(J, J), FP32_REL, "right padded")
    assert (K[1] - K_right[1]).norm() > 1e-3 * K_right[1].norm(), "left padding should differ"
