"""Did moving LoRA and Linear into ``linft/rules/`` change their numbers or speed?

One linft checkout per run: the same script times ``linft.ntk`` on the LoRA CPU case with
whichever linft ``PYTHONPATH`` points at, and saves K; ``--compare`` then reports both
checkouts' times side by side and the largest difference between their kernels. Setup: the
pretrained all-MiniLM-L6-v2 as a sequence classifier, peft LoRA r=8 on query/value of all
6 layers with the head trained beside it (``modules_to_save``: the Linear rule), the first
N sentences of SST-2's test split, fp32, torch backend, best of ``--repeats``.

    git worktree add /tmp/before <commit before the move>
    for i in 1 2; do
      PYTHONPATH=/tmp/before python benchmarks/bench_rules.py --save /tmp/K_before.pt
      PYTHONPATH=. python benchmarks/bench_rules.py --save /tmp/K_after.pt
    done
    python benchmarks/bench_rules.py --compare /tmp/K_before.pt /tmp/K_after.pt
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "sst2" / "test.tsv"


def run(args) -> None:
    import linft
    from linft.cli.demo import minilm_path

    sys.path.insert(0, str(HERE))
    from bench_verify import sentences
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    batch = dict(tok(sentences(args.samples, DATA), padding=True, truncation=True,
                     max_length=64, return_tensors="pt"))  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                     modules_to_save=["classifier"], init_lora_weights=False)  # fmt: skip
    model = get_peft_model(model, cfg).eval()
    best, K = float("inf"), None
    for _ in range(args.repeats):
        t = time.perf_counter()
        K = linft.ntk(model, batch, backend="torch", verify=False)
        best = min(best, time.perf_counter() - t)
    old = torch.load(args.save) if Path(args.save).exists() else {"times": []}
    torch.save({"K": K, "times": [*old["times"], best], "linft": linft.__file__}, args.save)
    print(f"{linft.__file__}: N={args.samples}, {best:.2f} s", flush=True)


def compare(before: str, after: str) -> None:
    a, b = torch.load(before), torch.load(after)
    diff = float((a["K"].double() - b["K"].double()).abs().max())
    scale = float(b["K"].double().abs().max())
    print("| checkout | runs (s) | best (s) |")
    print("|---|---|---:|")
    for name, r in (("before", a), ("after", b)):
        runs = ", ".join(f"{t:.2f}" for t in r["times"])
        print(f"| {name} | {runs} | {min(r['times']):.2f} |")
    print(f"\nlargest |K_after - K_before|: {diff:.1e} (of max |K| {scale:.2e})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", help="append this run's time and K to this file")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args()
    if args.compare:
        compare(*args.compare)
    else:
        run(args)


if __name__ == "__main__":
    main()
