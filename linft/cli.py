"""``linft`` command line: ``demo`` and ``analyze``."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo_task
    from .report import analyze, format_report, write_report

    start = time.perf_counter()
    model, batch, _ = demo_task(seed=args.seed)
    n = batch["input_ids"].shape[0]
    print(
        f"linft demo: {n} sentences, 2 labels; RoBERTa-shaped classifier (4 layers, random "
        "weights), LoRA r=4 on query/value; kernel over the LoRA weights"
    )
    report, K = analyze(model, batch, ridge=args.ridge, top=args.top, params="lora", progress=False)
    print(format_report(report))
    if args.out:
        for path in write_report(report, K, args.out):
            print(f"wrote {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _read_rows(path: Path, text_field: str, label_field: str | None) -> tuple[list[str], list]:
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix in (".csv", ".tsv"):
        records = list(
            csv.DictReader(
                path.read_text().splitlines(), delimiter="\t" if path.suffix == ".tsv" else ","
            )
        )
    else:
        raise SystemExit(f"linft analyze: {path} is not .jsonl, .csv or .tsv")
    if not records or text_field not in records[0]:
        raise SystemExit(f"linft analyze: {path} has no field {text_field!r}; pass --text-field")
    labels = [r.get(label_field) for r in records] if label_field else []
    return [r[text_field] for r in records], labels


def _output_helper(args, tokenizer):
    from . import outputs

    if args.output == "logits":
        return outputs.logits()
    words = [w for w in (args.label_words or "").split(",") if w]
    ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(w))[0] for w in words] or None
    if args.output == "last-token":
        return outputs.last_token(ids)
    if ids is None:
        raise SystemExit("linft analyze: --output mask-token needs --label-words")
    return outputs.mask_token(ids, tokenizer.mask_token_id)


def _load_model(args):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    classes = {
        "logits": AutoModelForSequenceClassification,
        "last-token": AutoModelForCausalLM,
        "mask-token": AutoModelForMaskedLM,
    }
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = classes[args.output].from_pretrained(args.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter, is_trainable=True)
    elif args.lora_r:
        from peft import LoraConfig, get_peft_model

        targets = args.target_modules.split(",") if args.target_modules else None
        model = get_peft_model(
            model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=targets)
        )
    return model.to(args.device), tokenizer


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .report import analyze, format_report, write_report

    out = Path(args.out)
    model, tokenizer = _load_model(args)
    texts, _ = _read_rows(Path(args.data), args.text_field, None)
    texts = texts[: args.max_samples] if args.max_samples else texts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = dict(
        tokenizer(
            texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"
        )
    )
    params = args.params if args.params in ("trainable", "lora") else args.params.split(",")
    checkpoint = None if args.no_checkpoint else out / "checkpoint"
    report, K = analyze(
        model,
        batch,
        checkpoint=checkpoint,
        ridge=args.ridge,
        top=args.top,
        output=_output_helper(args, tokenizer),
        params=params,
        precision=args.precision,
        batch_size=args.batch_size,
        progress=None,
    )
    report["model"], report["data"], report["samples"] = args.model, args.data, len(texts)
    print(format_report(report))
    for path in write_report(report, K, out, plot=not args.no_plot):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linft", description="Empirical NTKs of LoRA fine-tuned language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="kernel, spectrum and layer ranking of a small built-in model and task (offline)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--ridge", type=float, default=0.0)
    demo.add_argument("--top", type=int, default=8, help="how many top eigenvalues to print")
    demo.add_argument("--out", help="also write report.json, kernel.safetensors, spectrum.png here")
    demo.set_defaults(func=_cmd_demo)

    an = sub.add_parser(
        "analyze", help="kernel, spectrum and layer ranking of a model on a data file"
    )
    an.add_argument(
        "--model", required=True, help="local Hugging Face model directory (with its tokenizer)"
    )
    an.add_argument("--data", required=True, help=".jsonl, .csv or .tsv file with a text field")
    an.add_argument("--out", required=True, help="report directory")
    an.add_argument("--text-field", default="text")
    an.add_argument("--output", choices=["logits", "last-token", "mask-token"], default="logits")
    an.add_argument("--label-words", help="comma-separated label words for last-token / mask-token")
    an.add_argument("--adapter", help="peft adapter directory to load")
    an.add_argument("--lora-r", type=int, default=0, help="add a fresh LoRA adapter of this rank")
    an.add_argument("--target-modules", help="comma-separated module names for --lora-r")
    an.add_argument(
        "--params", default="trainable", help='"trainable", "lora" or comma-separated globs'
    )
    an.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    an.add_argument("--batch-size", type=int)
    an.add_argument("--max-length", type=int, default=128)
    an.add_argument("--max-samples", type=int)
    an.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    an.add_argument("--ridge", type=float, default=0.0)
    an.add_argument("--top", type=int, default=10)
    an.add_argument("--no-plot", action="store_true")
    an.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="do not keep OUT/checkpoint (by default a stopped run resumes from it)",
    )
    an.set_defaults(func=_cmd_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
