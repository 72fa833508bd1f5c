"""The command line: demo and analyze write reports whose numbers match the kernel."""

from __future__ import annotations

import json

import pytest
import torch
from checks import assert_rel_close
from models import (
    LABEL_WORDS,
    MASK_ID,
    gpt2,
    roberta_base_classifier,
    roberta_classifier,
    roberta_mlm,
)
from safetensors.torch import load_file

import linft
from linft.cli import main


def _eigenvalues(K: torch.Tensor) -> torch.Tensor:
    n = K.shape[0] * (K.shape[1] if K.dim() == 4 else 1)
    return torch.linalg.eigvalsh(K.reshape(n, n).double()).flip(0)


def _check_report(out_dir) -> dict:
    report = json.loads((out_dir / "report.json").read_text())
    K = load_file(str(out_dir / "kernel.safetensors"))["kernel"]
    assert list(K.shape) == report["kernel_shape"]
    eig = _eigenvalues(K)
    s = report["spectrum"]
    top = torch.tensor(s["top_eigenvalues"], dtype=torch.float64)
    assert_rel_close(top, eig[: top.numel()], 1e-8, "top eigenvalues")
    assert abs(s["lambda_min"] - float(eig[-1])) <= 1e-8 * float(eig[0])
    if isinstance(s["condition_number"], float):
        assert abs(s["condition_number"] / float(eig[0] / eig[-1]) - 1) < 1e-6
    conds = [report["layers"][n]["condition_number"] for n in report["layer_ranking"]]
    finite = [c for c in conds if isinstance(c, float)]
    assert finite == sorted(finite) and conds[: len(finite)] == finite
    return report


def test_demo_prints_and_writes_a_consistent_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "top eigenvalues" in printed and "condition number" in printed
    report = _check_report(tmp_path)
    assert report["kernel_shape"] == [64, 2, 64, 2]
    assert isinstance(report["spectrum"]["condition_number"], float)  # full rank
    assert (tmp_path / "spectrum.png").stat().st_size > 0


def _save_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": MASK_ID}
    vocab.update({f"w{i}": i for i in range(5, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    fast.save_pretrained(path)
    return fast


def test_analyze_a_local_model_with_an_adapter(tmp_path):
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    base = roberta_base_classifier()
    base.save_pretrained(base_dir)
    peft_model = roberta_classifier(base=base)
    peft_model.save_pretrained(adapter_dir)
    tokenizer = _save_tokenizer(base_dir, peft_model.config.vocab_size)
    texts = [
        " ".join(f"w{int(i)}" for i in torch.randint(4, 90, (int(n),)))
        for n in torch.randint(2, 9, (6,))
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts))

    code = main(
        [
            "analyze",
            "--model",
            str(base_dir),
            "--adapter",
            str(adapter_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--no-plot",
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    _check_report(out)
    # the same kernel computed directly on the in-memory model
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    expected = linft.ntk(peft_model, batch)
    K = load_file(str(out / "kernel.safetensors"))["kernel"]
    assert_rel_close(K, expected, 1e-5, "analyze kernel")
    # the run left a finished checkpoint: all 6 samples done in blocks of 4
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["done"]["rows"] == {"0": 4, "4": 2}


def _texts(n: int, mask: bool) -> list[str]:
    texts = []
    for length in torch.randint(3, 9, (n,)).tolist():
        words = [f"w{int(i)}" for i in torch.randint(5, 90, (length,))]
        if mask:
            words[int(torch.randint(0, length, ()))] = "<mask>"
        texts.append(" ".join(words))
    return texts


@pytest.mark.parametrize("kind", ["last-token", "mask-token"])
def test_analyze_language_model_outputs(tmp_path, kind):
    from transformers import GPT2Config, GPT2LMHeadModel, RobertaForMaskedLM

    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    if kind == "last-token":
        cfg = GPT2Config(vocab_size=97, n_positions=40, n_embd=24, n_layer=2, n_head=2)
        base = GPT2LMHeadModel(cfg)
        base.save_pretrained(base_dir)
        peft_model, output = gpt2(base=base)
    else:
        base = RobertaForMaskedLM(roberta_base_classifier().config)
        base.save_pretrained(base_dir)
        peft_model, output = roberta_mlm(base=base)
    peft_model.save_pretrained(adapter_dir)
    tokenizer = _save_tokenizer(base_dir, 97)
    texts = _texts(5, mask=kind == "mask-token")
    data = tmp_path / "data.tsv"
    data.write_text("text\n" + "\n".join(texts) + "\n")
    words = ",".join(f"w{i}" for i in LABEL_WORDS)
    args = ["analyze", "--model", str(base_dir), "--adapter", str(adapter_dir), "--data", str(data)]
    args += ["--out", str(out), "--output", kind, "--label-words", words, "--no-plot"]
    assert main(args + ["--device", "cpu"]) == 0
    report = _check_report(out)
    assert report["kernel_shape"] == [5, len(LABEL_WORDS), 5, len(LABEL_WORDS)]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    expected = linft.ntk(peft_model, batch, output=output)
    K = load_file(str(out / "kernel.safetensors"))["kernel"]
    assert_rel_close(K, expected, 1e-5, kind)
