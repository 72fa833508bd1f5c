"""Small Hugging Face + peft models built from configs (nothing is downloaded)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
)

import linft

VOCAB = 97
MASK_ID = 4
LABEL_WORDS = [11, 23, 42]


def _roberta_config(**kw) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=29,
        max_position_embeddings=40,
        pad_token_id=1,
        **kw,
    )


def roberta_base_classifier(num_labels: int = 3):
    return RobertaForSequenceClassification(_roberta_config(num_labels=num_labels))


def roberta_classifier(num_labels: int = 3, base=None, lora_alpha: float = 6, **lora):
    model = roberta_base_classifier(num_labels) if base is None else base
    cfg = LoraConfig(
        r=3,
        lora_alpha=lora_alpha,
        target_modules=["query", "value"],
        init_lora_weights=False,
        modules_to_save=["classifier"],
        **lora,
    )
    return get_peft_model(model, cfg)


def roberta_mlm(base=None):
    model = RobertaForMaskedLM(_roberta_config()) if base is None else base
    cfg = LoraConfig(r=2, lora_alpha=5, target_modules=["query", "value"], init_lora_weights=False)
    return get_peft_model(model, cfg), linft.outputs.mask_token(LABEL_WORDS, MASK_ID)


def gpt2_base():
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=40, n_embd=24, n_layer=2, n_head=2)
    )


def gpt2(base=None, **lora):
    model = gpt2_base() if base is None else base
    cfg = LoraConfig(
        r=3,
        lora_alpha=4,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        init_lora_weights=False,
        **lora,
    )
    return get_peft_model(model, cfg), linft.outputs.last_token(LABEL_WORDS)


def llama_base():
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=45,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        # At the default 0.02 some random draws cancel in the residual stream so much that
        # fp32 rounding alone moves J by 1e-5 (any fp32 implementation would); at 0.1 the
        # worst of 30 draws is 9e-7, so the tests measure linft rather than the draw.
        initializer_range=0.1,
    )
    return LlamaForCausalLM(config)


def llama():
    cfg = LoraConfig(
        r=3, lora_alpha=7, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    return get_peft_model(llama_base(), cfg), linft.outputs.last_token(LABEL_WORDS)


def token_batch(
    lengths: list[int], *, pad_id: int = 1, left: bool = False, mask_token: bool = False
):
    """Random token ids padded to the longest length, with the attention mask."""
    n, t = len(lengths), max(lengths)
    ids = torch.full((n, t), pad_id, dtype=torch.long)
    mask = torch.zeros(n, t, dtype=torch.long)
    for i, length in enumerate(lengths):
        row = torch.randint(5, VOCAB, (length,))
        if mask_token:
            row[torch.randint(0, length, ()).item()] = MASK_ID
        cols = slice(t - length, t) if left else slice(0, length)
        ids[i, cols] = row
        mask[i, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


def random_lengths(n: int, low: int = 2, high: int = 9) -> list[int]:
    lengths = torch.randint(low, high + 1, (n,)).tolist()
    lengths[0] = high  # at least one full row, at least one padded (for n > 1)
    if n > 1:
        lengths[-1] = min(lengths[-1], high - 2)
    return lengths


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


ARCHITECTURES = ["roberta_cls", "roberta_mlm", "gpt2", "llama"]


def architecture(name: str):
    """(peft model, output helper) of one of ``ARCHITECTURES``."""
    if name == "roberta_cls":
        return roberta_classifier(), linft.outputs.logits()
    if name == "roberta_mlm":
        return roberta_mlm()
    if name == "gpt2":
        return gpt2()
    if name == "llama":
        return llama()
    raise KeyError(name)


def architecture_batch(name: str, n: int, left: bool = False):
    """A padded batch of n random samples that ``name``'s output helper can read."""
    pad = 1 if name.startswith("roberta") else 0
    return token_batch(random_lengths(n), pad_id=pad, left=left, mask_token=name == "roberta_mlm")
