"""How fast is linft.ntk against the torch.func recipe and a per-sample backward loop?

Setup (issue 2/3): a RoBERTa-base-shaped classifier (random weights), LoRA r=8 on
query and value, sequence length 128, 2 labels, N = 256 ... 16384. Providers:

- ``linft-torch-{fp32,bf16}``: linft.ntk, pure-torch backend;
- ``linft-triton-{fp32,bf16}``: linft.ntk, Triton backend (when Triton runs here);
  a ``-lowmem`` suffix keeps J blocks in host memory, ``-noverify`` skips the self-check
  (the difference is its cost);
- ``torch.func``: ``vmap(jacrev(f))`` then ``J J^T`` as in the PyTorch NTK tutorial,
  on unpadded inputs without a mask (HF's mask builder breaks vmap);
- ``loop``: one backward per sample and output (timed on a prefix, reported per sample);
- ``floor-{fp32,bf16}``: one forward and C backward passes of the same model and
  precision with no capture, per sample: what any method must pay.

Every row reports time, ms per sample, peak GPU memory, the relative error against the
torch.func kernel on the same inputs (where torch.func ran) and against a float64
torch.func kernel of the first ``--fp64-samples`` samples, the speed-up over torch.func,
and time / (floor + Gram): the floor of the same precision plus the Gram GEMM's
(N C)^2 P multiply-adds at the GEMM rate measured in this run.

    python benchmarks/bench_ntk.py                       # GPU, full sizes
    python benchmarks/bench_ntk.py --device cpu --quick  # tiny, anywhere
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch.func import functional_call, jacrev, vmap

import linft


def build_model(args, device):
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=args.seq + 2,
        num_labels=2,
    )
    model = RobertaForSequenceClassification(cfg)
    lora = LoraConfig(
        r=args.rank, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False
    )
    return get_peft_model(model, lora).to(device).eval()


def inputs(n, args, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, args.vocab, (n, args.seq), generator=g)
    return {"input_ids": ids.to(device)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, *args, **kwargs):
    """(seconds, peak GiB, result) of one ``fn(*args, **kwargs)`` after the caller's warm-up."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak, out


def lora_params(model):
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}


def torch_func_kernel(model, batch, chunk):
    """The PyTorch NTK tutorial's recipe: per-sample Jacobians by vmap(jacrev), then J J^T."""
    params = lora_params(model)

    def f(theta, x):
        return functional_call(
            model, theta, args=(), kwargs={"input_ids": x.unsqueeze(0)}
        ).logits.squeeze(0)

    ids = batch["input_ids"]
    jac = [
        vmap(jacrev(f), (None, 0))(params, ids[s : s + chunk]) for s in range(0, len(ids), chunk)
    ]
    J = torch.cat([torch.cat([j[n].flatten(2) for n in params], dim=2) for j in jac])  # [N, C, P]
    return torch.einsum("Naf,Mbf->NaMb", J, J)


def loop_per_sample(model, batch, count):
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    rows = []
    for i in range(count):
        f = model(input_ids=batch["input_ids"][i : i + 1]).logits[0]
        for a in range(f.shape[0]):
            g = torch.autograd.grad(f[a], params, retain_graph=a < f.shape[0] - 1)
            rows.append(torch.cat([x.flatten() for x in g]))
    return torch.stack(rows)


def floor(model, batch, precision, block):
    """One forward + C backward passes per block, no capture: the cost floor."""
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    theta = {n: p.detach().to(dtype) for n, p in model.named_parameters()}
    for n in theta:
        if ".lora_" in n:
            theta[n].requires_grad_(True)
    leaves = [theta[n] for n, p in model.named_parameters() if ".lora_" in n]
    assert len(leaves) == len(params)
    ids = batch["input_ids"]
    for s in range(0, len(ids), block):
        f = functional_call(model, theta, args=(), kwargs={"input_ids": ids[s : s + block]}).logits
        for a in range(f.shape[1]):
            torch.autograd.grad(f[:, a].sum(), leaves, retain_graph=a < f.shape[1] - 1)


def gemm_rate(device, precision, P, rows=1024, reps=5):
    """Multiply-add rate (FLOP/s) of the Gram GEMM ``[rows, P] @ [P, rows]`` here."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(rows, P, device=device).to(dtype)
    b = torch.randn(rows, P, device=device).to(dtype)
    a @ b.T  # warm-up
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b.T
    sync(device)
    return 2 * rows * rows * P * reps / (time.perf_counter() - t)


def fp64_reference(model, batch):
    """The torch.func kernel of ``batch`` with the model and its inputs in float64."""
    model64 = copy.deepcopy(model).double()
    return torch_func_kernel(model64, batch, len(batch["input_ids"])).cpu()


def rel_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def add_ratios(rows, rates, P):
    """Speed-up over torch.func, and time over (floor + Gram GEMM at the measured rate)."""
    seconds = {(r["provider"], r["N"]): r["seconds"] for r in rows}
    for r in rows:
        func = seconds.get(("torch.func", r["N"]))
        r["speedup"] = func / r["seconds"] if func else float("nan")
        r["vs_floor_gram"] = float("nan")
        parts = r["provider"].split("-")
        prec = parts[2] if parts[0] == "linft" else parts[-1]
        floor_s = seconds.get((f"floor-{prec}", r["N"]))
        if r["provider"].startswith("linft-") and floor_s and prec in rates:
            rows_k = r["N"] * 2  # N C kernel rows, C = 2 labels
            gram_s = rows_k * rows_k * P / rates[prec]  # symmetric: half of 2 (NC)^2 P
            r["vs_floor_gram"] = r["seconds"] / (floor_s + gram_s)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ns", default="256,1024,4096,16384")
    p.add_argument(
        "--providers",
        default="floor-fp32,floor-bf16,linft-torch-fp32,linft-torch-bf16,linft-triton-fp32,"
        "linft-triton-bf16,linft-triton-bf16-lowmem,linft-triton-bf16-noverify,torch.func,loop",
    )
    p.add_argument("--func-max-n", type=int, default=16384, help="largest N for torch.func")
    p.add_argument("--loop-samples", type=int, default=64)
    p.add_argument("--fp64-samples", type=int, default=128, help="float64 reference prefix")
    p.add_argument("--block", type=int, default=None, help="linft batch_size (default: automatic)")
    p.add_argument("--out-device", default=None, help="where linft keeps K (cpu for N*C > ~90k)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50265)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="tiny model and sizes (CPU check)")
    p.add_argument("--json", help="write all rows here")
    args = p.parse_args()
    if args.quick:
        args.ns, args.seq, args.hidden, args.layers, args.heads, args.vocab = (
            "16,32",
            16,
            64,
            2,
            4,
            500,
        )
        args.loop_samples = 4
    device = torch.device(args.device)
    model = build_model(args, device)
    providers = args.providers.split(",")
    sizes = [int(n) for n in args.ns.split(",")]
    rows, reference = [], {}
    P = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    # inputs(n) draws the same first rows for every n: one float64 reference serves all N
    m64 = min(args.fp64_samples, min(sizes))
    ref64 = fp64_reference(model, inputs(m64, args, device))
    precisions = {q.split("-")[-1] for q in providers if q.startswith(("linft-", "floor-"))}
    rates = {q: gemm_rate(device, q, P) for q in precisions if q in ("fp32", "bf16")}
    print(f"LoRA parameters P = {P}; Gram GEMM rate (TFLOP/s): ", end="")
    print(", ".join(f"{q} {r / 1e12:.1f}" for q, r in sorted(rates.items())))

    def record(provider, n, secs, peak, err, K=None):
        err64 = float("nan") if K is None else rel_error(K[:m64, :, :m64].cpu(), ref64)
        rows.append(
            dict(provider=provider, N=n, seconds=secs, peak_gib=peak, rel_error=err,
                 rel_error_fp64=err64)
        )  # fmt: skip

    for n in sizes:
        batch = inputs(n, args, device)
        if "torch.func" in providers and n <= args.func_max_n:
            torch_func_kernel(model, inputs(4, args, device), 4)  # warm-up
            secs, peak, K = measure(torch_func_kernel, device, model, batch, min(n, 1024))
            reference[n] = K  # kept on the device: errors of 32768^2 kernels there, not on CPU
            record("torch.func", n, secs, peak, 0.0, K)
            del K
        for prov in providers:
            if prov.startswith("floor-"):
                prec = prov.split("-")[1]
                floor(model, inputs(8, args, device), prec, 8)
                secs, peak, _ = measure(floor, device, model, batch, prec, min(n, 512))
                record(prov, n, secs, peak, float("nan"))
            elif prov.startswith("linft-"):
                _, backend, prec, *flags = prov.split("-")
                kw = dict(params="lora", precision=prec, backend=backend, progress=False)
                kw.update(batch_size=args.block, out_device=args.out_device)
                if "lowmem" in flags:  # J blocks in host memory: GPU holds one block + K
                    kw["jacobian_memory"] = 0
                if "noverify" in flags:  # without the self-check: its cost, by difference
                    kw["verify"] = False
                try:
                    linft.ntk(model, inputs(8, args, device), **kw)  # warm-up
                except RuntimeError as err:  # backend not available here
                    print(f"skip {prov}: {err}")
                    continue
                secs, peak, K = measure(linft.ntk, device, model, batch, **kw)
                err = float("nan")
                if n in reference:
                    err = rel_error(K.to(reference[n].device), reference[n])
                record(prov, n, secs, peak, err, K)
                del K
            elif prov == "loop" and n == min(sizes):
                count = min(n, args.loop_samples)
                secs, peak, J = measure(loop_per_sample, device, model, batch, count)
                err = float("nan")
                if n in reference:
                    Jr = J.view(count, reference[n].shape[1], -1)
                    K = torch.einsum("iap,jbp->iajb", Jr, Jr)
                    err = rel_error(K, reference[n][:count, :, :count].to(K.device))
                record("loop", count, secs, peak, err)
        reference.pop(n, None)  # free the device before the next N
    add_ratios(rows, rates, P)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\ndevice: {name}, torch {torch.__version__}, fp64 reference: {m64} samples")
    print(
        "| provider | N | time (s) | ms/sample | peak GPU GiB | rel. error vs torch.func "
        "| rel. error vs fp64 | speed-up vs torch.func | time / (floor + Gram) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ms = 1e3 * r["seconds"] / r["N"]
        print(
            f"| {r['provider']} | {r['N']} | {r['seconds']:.3f} | {ms:.3f} | "
            f"{r['peak_gib']:.2f} | {r['rel_error']:.2e} | {r['rel_error_fp64']:.2e} | "
            f"{r['speedup']:.2f} | {r['vs_floor_gram']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
