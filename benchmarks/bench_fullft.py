"""Full fine-tuning kernels: linft's rules against Opacus' per-sample gradients and the floor.

Setup: a BERT classifier (random weights; 2 layers, hidden 128, 4 heads, feed-forward 512,
vocabulary ``--vocab``), T = 24 tokens (every sample full length), C = ``--outputs``, N = 128,
fp32, CPU. Parameters: every one trainable except the position and token-type embeddings
(``bert``), where Opacus is right; then every one of them (``bert, all``), where Opacus'
per-sample gradient of the position and token-type embeddings is that of the whole batch
(their ids broadcast from ``[1, T]``). Providers:

- ``linft``: ``linft.ntk(model, batch)`` (K ``[N, C, N, C]``);
- ``opacus``: ``GradSampleModule`` per-sample gradients, one backward per output, then one
  GEMM ``J J^T`` (``pip install --no-deps opacus==1.6.0 opt-einsum``, benchmark only);
- ``dattri-llm``: its hooks' factorized per-sample gradients and its cross-gram per pair of
  outputs (``pip install --no-deps dattri-llm``, benchmark only);
- ``floor``: one forward and C backward passes of the same batch (summed weight gradients):
  what any method pays before forming per-sample rows.

and LoRA (r = 8, query/value) with the head and every LayerNorm trainable beside it against
LoRA alone of about the same number of parameters (r raised to match). Each row: the best of
``--repeats`` times and the relative error against float64 per-sample ``torch.func``.

    PYTHONPATH=. python benchmarks/bench_fullft.py --outputs 2
    PYTHONPATH=. python benchmarks/bench_fullft.py --outputs 1
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from timing import timed  # benchmarks/, on the path when a script runs
from torch.func import functional_call, jacrev, vmap

import linft

N, T = 128, 24


def bert(vocab: int, outputs: int):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=512, max_position_embeddings=64, num_labels=outputs,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     attn_implementation="eager")  # fmt: skip
    return BertForSequenceClassification(cfg).eval()


def logits(model, batch):
    return model(**batch).logits


def reference(model, batch, names) -> torch.Tensor:
    """``[N, C, P]`` float64 per-sample Jacobian (every sample full length: vmap is exact)."""
    m64 = copy.deepcopy(model).double()
    params = dict(m64.named_parameters())
    chosen = {n: params[n].detach() for n in names}
    rest = {n: p.detach() for n, p in params.items() if n not in chosen}

    def f(theta, ids):
        return functional_call(m64, {**rest, **theta}, args=(), kwargs={"input_ids": ids[None]})

    jac = vmap(jacrev(lambda th, ids: f(th, ids).logits[0]), (None, 0))(chosen, batch["input_ids"])
    return torch.cat([jac[n].flatten(2) for n in names], dim=2)


def opacus_kernel(model, batch, names) -> torch.Tensor:
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm.train()  # Opacus records activations in training mode only (dropout is 0 here)
    params = dict(gsm._module.named_parameters())
    rows = []
    try:
        for a in range(_outputs(gsm, batch)):
            # Opacus frees a layer's activations at its backward: one forward per output.
            gsm.zero_grad(set_to_none=True)
            gsm(**batch).logits[:, a].sum().backward()
            got = [params[n].grad_sample for n in names]
            wrong = [n for n, g in zip(names, got, strict=True) if g.shape[0] != batch_size(batch)]
            if wrong:  # ids broadcast from [1, T]: the batch's gradient, not per sample
                raise NotPerSample(f"batch size 1 for {wrong[0]}")
            rows.append(torch.cat([g.flatten(1) for g in got], dim=1))
    finally:
        gsm.zero_grad(set_to_none=True)
        gsm._close()  # its hooks off the model again
        model.eval()
    J = torch.stack(rows, dim=1)  # [N, C, P]
    flat = J.flatten(0, 1)
    return (flat @ flat.T).view(J.shape[0], J.shape[1], J.shape[0], J.shape[1])


class NotPerSample(Exception):
    pass


def batch_size(batch) -> int:
    return batch["input_ids"].shape[0]


def _outputs(gsm, batch) -> int:
    with torch.no_grad():
        return gsm._module.config.num_labels


def dattri_kernel(model, batch) -> torch.Tensor:
    """dattri-llm's hooks (factorized per-sample gradients, ghost or materialized products
    chosen per layer by its cost model): one forward and backward per output, then its
    cross-gram of every pair of outputs (``pip install --no-deps dattri-llm``)."""
    from dattri_llm import CaptureCallback, HookManager

    model.train()  # dropout is 0 here
    capture, grads = CaptureCallback(), []
    manager = HookManager(model, callbacks=[capture])
    try:
        with manager.collect(deregister_on_exit=False):
            for a in range(model.config.num_labels):
                model.zero_grad(set_to_none=True)
                model(**batch).logits[:, a].sum().backward()
                grads.append(capture.record.gradient)
    finally:
        manager.remove()
        model.zero_grad(set_to_none=True)
        model.eval()
    C, n = len(grads), batch_size(batch)
    K = torch.zeros(n, C, n, C)
    for a in range(C):
        for b in range(a, C):
            K[:, a, :, b] = grads[a].similarity(grads[b], reduce="all")
            if b != a:
                K[:, b, :, a] = K[:, a, :, b].T
    return K


def floor(model, batch) -> None:
    out = model(**batch).logits
    for a in range(out.shape[1]):
        torch.autograd.grad(out[:, a].sum(), [p for p in model.parameters() if p.requires_grad],
                            retain_graph=a < out.shape[1] - 1, allow_unused=True)  # fmt: skip


def error(K, exact) -> float:
    """Relative error; linft gives K of one output as ``[N, N]``."""
    K = K.double().reshape(exact.shape)
    return float((K - exact).norm() / exact.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--outputs", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1, args.vocab, (N, T))}
    print(f"BERT 2x128, vocabulary {args.vocab}, N={N}, T={T}, C={args.outputs}; CPU, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"linft {linft.__version__}")  # fmt: skip
    print("| parameters | P | provider | time (s) | vs linft | error vs float64 |")
    print("|---|---:|---|---:|---:|---:|")
    lora_rank = 8
    for case in ("bert", "bert, all", "lora + head + norms", "lora alone"):
        model = bert(args.vocab, args.outputs)
        for n, p in model.named_parameters():
            shared = "position_embeddings" in n or "token_type_embeddings" in n
            p.requires_grad_(not (case == "bert" and shared))
        if case.startswith("lora"):
            from peft import LoraConfig, get_peft_model

            extra = case != "lora alone"
            r = 8 if extra else lora_rank
            cfg = LoraConfig(r=r, target_modules=["query", "value"], init_lora_weights=False,
                             modules_to_save=["classifier"] if extra else None)  # fmt: skip
            model = get_peft_model(model, cfg).eval()
            if extra:
                for n, p in model.named_parameters():
                    if "LayerNorm" in n:
                        p.requires_grad_(True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        P = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if case == "lora + head + norms":  # the rank whose LoRA alone has about this P
            per_rank = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) // 8
            lora_rank = max(1, round(P / per_rank))
        J = reference(model, batch, names)
        exact = torch.einsum("nap,mbp->namb", J, J)
        del J
        t_linft, K = timed(lambda m=model: linft.ntk(m, batch), args.repeats)
        rows = [("linft", t_linft, error(K, exact))]
        if not case.startswith("lora"):
            try:
                t, K = timed(lambda m=model, nm=names: opacus_kernel(m, batch, nm), args.repeats)
                rows.append(("opacus", t, error(K, exact)))
            except NotPerSample as why:
                print(f"| {case} | {P} | opacus | no per-sample rows ({why}) | | |")
            t, K = timed(lambda m=model: dattri_kernel(m, batch), args.repeats)
            rows.append(("dattri-llm", t, error(K, exact)))
        t, _ = timed(lambda m=model: floor(m, batch), args.repeats)
        rows.append(("floor", t, float("nan")))
        for name, t, err in rows:
            print(f"| {case} | {P} | {name} | {t:.3f} | {t / t_linft:.2f} | {err:.1e} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
