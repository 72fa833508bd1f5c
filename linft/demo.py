"""The built-in demo: a small RoBERTa-shaped classifier with LoRA and a shipped sentiment task.

Nothing is downloaded: the model is built from a config with seeded random
weights (a stand-in for a pretrained one), and the 64 labelled sentences in
``linft/data/demo_sentiment.tsv`` are tokenized by a word-level vocabulary
built from them.
"""

from __future__ import annotations

import csv
import warnings
from importlib import resources

import torch

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # RoBERTa's ids 0..3


def demo_rows() -> list[tuple[int, str]]:
    text = resources.files("linft").joinpath("data/demo_sentiment.tsv").read_text()
    reader = csv.DictReader(text.splitlines(), delimiter="\t")
    return [(int(r["label"]), r["text"]) for r in reader]


def word_vocab(texts: list[str]) -> dict[str, int]:
    words = sorted({w for t in texts for w in t.split()})
    return {w: i for i, w in enumerate(SPECIALS + words)}


def encode(texts: list[str], vocab: dict[str, int]) -> dict[str, torch.Tensor]:
    """``<s> words </s>``, right-padded, with the attention mask."""
    rows = [[0, *(vocab.get(w, 3) for w in t.split()), 2] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), 1, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def demo_task(seed: int = 0):
    """(peft model, batch, labels) of the demo."""
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    rows = demo_rows()
    vocab = word_vocab([t for _, t in rows])
    torch.manual_seed(seed)
    # A wider init than RoBERTa's 0.02 keeps random token representations distinguishable,
    # as a pretrained model's are; at 0.02 the kernel of this model is numerically rank 32.
    config = RobertaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=2,
        pad_token_id=1,
        initializer_range=0.2,
    )
    model = RobertaForSequenceClassification(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])  # peft's init: B = 0
    with warnings.catch_warnings():
        # peft asks transformers for a renamed attribute; nothing for a demo user to act on
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        model = get_peft_model(model, lora)
    labels = torch.tensor([y for y, _ in rows])
    return model, encode([t for _, t in rows], vocab), labels
