"""``last_token`` on encoder-decoder models (T5, BART): the decoder's last real token, exact
against float64 autograd on each sample alone, also when the decoder is shorter than the
encoder (its logits have the decoder's length, not the encoder mask's)."""

from __future__ import annotations

import copy

import pytest
import torch
from checks import assert_rel_close
from peft import LoraConfig, get_peft_model
from torch.func import functional_call, jacrev
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

import linft

WORDS = [5, 7, 11]


def t5():
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    return get_peft_model(
        T5ForConditionalGeneration(cfg), LoraConfig(r=4, target_modules=["q", "v"])
    )


def bart():
    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1,
                     decoder_start_token_id=2)  # fmt: skip
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    return get_peft_model(BartForConditionalGeneration(cfg), lora)


def lora_model(build, seed):
    torch.manual_seed(seed)
    model = build().eval()
    for p in model.parameters():
        if p.requires_grad:  # LoRA's B starts at zero: give both factors a gradient
            torch.nn.init.normal_(p, std=0.1)
    return model


def reference(model, samples: list[dict]) -> torch.Tensor:
    """[N, C, P] float64: each sample alone, unpadded, logits at its last decoder token."""
    m64 = copy.deepcopy(model).double()
    params = dict(m64.named_parameters())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    chosen = {n: params[n].detach() for n in names}
    rest = {n: p.detach() for n, p in params.items() if n not in chosen}
    rows = []
    for sample in samples:

        def f(theta, sample=sample):
            out = functional_call(m64, {**rest, **theta}, args=(), kwargs=sample)
            return out.logits[0, -1, WORDS]

        jac = jacrev(f)(chosen)
        rows.append(torch.cat([jac[n].reshape(len(WORDS), -1) for n in names], dim=1))
    return torch.stack(rows)


def padded_batch(seed, n=4, encoder=9, decoder=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (n, encoder), generator=g)
    mask = torch.ones(n, encoder, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 2:] = 0
    dec = torch.randint(3, 64, (n, decoder), generator=g)
    dec_mask = torch.ones(n, decoder, dtype=torch.long)
    dec_mask[0, 3:] = 0
    dec_mask[2, 1:] = 0  # one decoder token only
    return ids, mask, dec, dec_mask


@pytest.mark.parametrize("build", [t5, bart])
@pytest.mark.parametrize("seed", [0, 1])
def test_last_token_reads_the_decoder_inputs(build, seed):
    model = lora_model(build, seed)
    ids, mask, dec, dec_mask = padded_batch(seed)
    batch = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                 decoder_attention_mask=dec_mask)  # fmt: skip
    J = linft.jacobian(model, batch, output=linft.outputs.last_token(WORDS))
    samples = [
        dict(
            input_ids=ids[i : i + 1][:, mask[i].bool()],
            decoder_input_ids=dec[i : i + 1][:, dec_mask[i].bool()],
        )  # fmt: skip
        for i in range(ids.shape[0])
    ]
    assert_rel_close(J, reference(model, samples), 1e-5)


@pytest.mark.parametrize("build", [t5, bart])
def test_last_token_reads_the_labels(build):
    """With ``labels`` the model shifts them right into the decoder: the last label that is
    not -100 is the last real decoder position."""
    model = lora_model(build, 2)
    ids, mask, dec, dec_mask = padded_batch(2)
    labels = dec.masked_fill(dec_mask == 0, -100)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    J = linft.jacobian(model, batch, output=linft.outputs.last_token(WORDS))
    samples = [
        dict(
            input_ids=ids[i : i + 1][:, mask[i].bool()],
            labels=labels[i : i + 1][:, dec_mask[i].bool()],
        )  # fmt: skip
        for i in range(ids.shape[0])
    ]
    assert_rel_close(J, reference(model, samples), 1e-5)


def test_decoder_without_real_tokens_is_named():
    model = lora_model(t5, 0)
    ids, mask, dec, dec_mask = padded_batch(0)
    dec_mask[1] = 0
    batch = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                 decoder_attention_mask=dec_mask)  # fmt: skip
    with pytest.raises(ValueError, match="sample 1 has no real decoder token"):
        linft.jacobian(model, batch, output=linft.outputs.last_token(WORDS))
