"""How does linft.ntk scale over the ranks of a process group, and what does it send?

Setup: a RoBERTa-shaped classifier (random weights), LoRA on query and value, 2 labels,
N samples in blocks of ``--block``. For each number of processes G, every rank times the
same ``linft.ntk`` call and reports (``linft.kernel.distributed.last_stats``): seconds,
bytes sent and received, seconds spent waiting for transfers, and the tile entries it
computed. Printed per G (rank maxima): time, speed-up and scaling efficiency
``T_1 / (G T_G)`` against one process, the CPU seconds of each rank and of all ranks
together against one process (the work division, whatever else the machine runs), bytes
sent per rank (and by the README's formula), the ratio of waiting to computing, and
whether K equals the single-process K bit for bit.

    PYTHONPATH=. python benchmarks/bench_distributed.py            # CPU, gloo, 1 2 3 processes
    torchrun --nproc_per_node=8 benchmarks/bench_distributed.py --device cuda   # NCCL

Then the model: bytes per rank and Gram seconds for N = 100,000, C = 2, G = 8 and three
(P, bytes per J entry) cases, at the link bandwidths and throughputs stated with the table
(the figures README.md quotes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import sys
import tempfile
import time

import torch


def build(args, device):
    """bench_ntk.py's RoBERTa-shaped LoRA model (4 heads) and random ids, same seeds."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_ntk import build_model, inputs

    args.heads = 4
    return build_model(args, device), inputs(args.n, args, device)


def measure(args, device, group_wanted: bool) -> dict:
    """One timed ``ntk`` (after a warm-up on a few samples) on this rank."""
    import linft
    from linft.kernel import distributed

    model, batch = build(args, device)
    group = None if group_wanted else False
    small = {k: v[: 2 * args.block] for k, v in batch.items()}
    linft.ntk(model, small, batch_size=args.block, group=group, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, cpu = time.perf_counter(), time.process_time()
    K = linft.ntk(model, batch, batch_size=args.block, group=group, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    stats = distributed.last_stats() if group_wanted else distributed.Stats()
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(
        seconds=seconds,
        cpu=cpu,
        sent=stats.bytes_sent,
        received=stats.bytes_received,
        waiting=stats.seconds_waiting,
        tiles=stats.tiles,
        P=P,
        K=None if K is None else K.cpu(),
    )


def _rank(rank, world, store, args, out):
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    if world > 1:
        dist.init_process_group(
            "gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=600),
        )  # fmt: skip
    torch.save(measure(args, torch.device("cpu"), world > 1), os.path.join(out, f"{rank}.pt"))
    os._exit(0)


def run_local(args) -> list[dict]:
    """1, 2, ... processes forked here (gloo on the CPU), one row per G."""
    ctx = multiprocessing.get_context("fork")
    rows, base = [], None
    for world in args.procs:
        with tempfile.TemporaryDirectory() as tmp:
            procs = [
                ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "store"), args, tmp))
                for r in range(world)
            ]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            ranks = [
                torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(world)
            ]
        rows.append(summarize(world, ranks, base, args))
        if base is None:
            base = ranks[0]
    return rows


def sent_formula(world: int, n: int, C: int, P: int, bJ: int) -> float:
    """Bytes a rank other than 0 sends (README.md, "Several GPUs and nodes")."""
    if world == 1:
        return 0.0
    share = n / world
    return (world // 2) * (share * C * P * bJ + share**2 * C**2 * 4) + share * n * C**2 * 4


def summarize(world: int, ranks: list[dict], base: dict | None, args) -> dict:
    t = max(r["seconds"] for r in ranks)
    t1 = t if base is None else base["seconds"]
    waiting = max(r["waiting"] for r in ranks)
    compute = max(r["seconds"] - r["waiting"] for r in ranks)
    same = None if base is None else bool(torch.equal(ranks[0]["K"], base["K"]))
    cpu1 = ranks[0]["cpu"] if base is None else base["cpu"]
    return {
        "G": world,
        "time (s)": t,
        "speed-up": t1 / t,
        "efficiency": t1 / (world * t),
        "compute / rank (s)": compute,
        "CPU s / rank (max)": max(r["cpu"] for r in ranks),
        "CPU s, all ranks / 1 process": sum(r["cpu"] for r in ranks) / cpu1,
        "MB sent / rank (max)": max(r["sent"] for r in ranks) / 1e6,
        "MB by the formula": sent_formula(world, args.n, 2, ranks[0]["P"], 4) / 1e6,
        "MB received / rank (max)": max(r["received"] for r in ranks) / 1e6,
        "waiting / computing": waiting / max(compute, 1e-12),
        "tile entries / rank (max)": max(r["tiles"] for r in ranks),
        "K == 1 process": "-" if same is None else ("yes" if same else "NO"),
    }


def model_rows(N: int, C: int, cases: dict, G: int, links: dict, rates: dict) -> list[dict]:
    """Bytes per rank (formulas of linft.kernel.distributed) and Gram seconds per rank."""
    rows = []
    steps = G // 2
    share = N / G
    for name, (P, bJ) in cases.items():
        j_sent = steps * share * C * P * bJ
        mirrors = steps * share**2 * C**2 * 4
        slab = share * N * C**2 * 4
        flops = (N * C) ** 2 * P / G  # 2 flops per multiply-add over the N C (N C + 1) / 2 entries
        gram = flops / rates["bf16" if bJ == 2 else "fp32"]
        for link, bw in links.items():
            comm = (j_sent + mirrors) / bw
            rows.append({
                "case": name, "P": P, "J bytes/entry": bJ, "link": link,
                "J share / rank (GB)": share * C * P * bJ / 1e9,
                "K slab / rank (GB)": slab / 1e9,
                "J sent / rank (GB)": j_sent / 1e9,
                "tiles sent / rank (GB)": mirrors / 1e9,
                "slab to rank 0 (GB)": slab / 1e9,
                "Gram / rank (s)": gram,
                "transfers / rank (s)": comm,
                "transfers / Gram": comm / gram,
            })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    head = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in head) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    p.add_argument("--samples", dest="n", type=int, default=192)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if os.environ.get("RANK", "0") == "0":
        print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} cores")
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        import torch.distributed as dist

        device = torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        one = measure(args, device, False) if dist.get_rank() == 0 else None
        dist.barrier()
        mine = measure(args, device, True)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, {k: v for k, v in mine.items() if k != "K"})
        if dist.get_rank() == 0:
            everyone[0]["K"] = mine["K"]
            print(table([summarize(dist.get_world_size(), everyone, one, args)]))
        dist.destroy_process_group()
        return 0
    rows = run_local(args)
    print(
        f"N = {args.n}, blocks of {args.block}, sequence {args.seq}, hidden {args.hidden}, "
        f"{args.layers} layers, LoRA r = {args.rank}, C = 2, {args.threads} thread(s) per rank"
    )
    print(table(rows))
    links = {"NVLink 4 (350 GB/s)": 350e9, "InfiniBand NDR (50 GB/s)": 50e9}
    rates = {"bf16": 700e12, "fp32": 47e12}  # ~70% of an H100 SXM's dense bf16 / fp32 peaks
    cases = {
        "RoBERTa-base LoRA r=8 q,v, fp32": (294_912, 4),
        "RoBERTa-base LoRA r=8 q,v, bf16": (294_912, 2),
        "Llama-2-7B LoRA r=8 q,v, bf16": (4_194_304, 2),
    }
    modelled = model_rows(100_000, 2, cases, 8, links, rates)
    print("\nModel: N = 100,000, C = 2, G = 8 (Gram at 700 TFLOP/s bf16, 47 TFLOP/s fp32)")
    print(table(modelled))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"measured": rows, "modelled": modelled}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
