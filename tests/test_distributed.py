"""The kernel on several processes (gloo on the CPU): the same numbers as one process.

Each test forks its ranks from the test process (the models are built here, so the
ranks import nothing) and joins them with a deadline, so a hang fails the test instead
of stalling the suite. One process group per world size runs every kernel case once
(``_ranks`` fixture); the single-process reference is computed inside rank 0 with
``group=False``, with the same one thread per process.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import multiprocessing
import os
import signal
import time
import traceback

import pytest
import torch
from checks import assert_rel_close
from models import architecture_batch, gpt2, random_lengths, roberta_classifier, token_batch

import linft

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

_DEADLINE = 180  # seconds for one group of ranks; a hang fails the test here
_GROUP_TIMEOUT = 60  # the process group's own timeout (gloo waits)


def _worker(rank: int, world: int, store: str | None, target, out: str) -> None:
    torch.set_num_threads(1)  # 2 cores shared by every rank and other tests
    try:
        if store is not None:
            dist.init_process_group(
                "gloo",
                store=dist.FileStore(store, world),
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=_GROUP_TIMEOUT),
            )
        result = {"value": target(rank, world)}
    except BaseException as e:  # reported to the test, which asserts on it
        result = {
            "error": type(e).__name__,
            "message": str(e),
            "rank": getattr(e, "rank", None),
            "traceback": traceback.format_exc(),
        }
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    os._exit(0)  # no teardown inherited from the test process


def _spawn(world: int, target, where, init: bool = True) -> list[dict]:
    """Run ``target(rank, world)`` on ``world`` forked ranks (in a gloo process group unless
    ``init`` is False); their results (or errors) in rank order. A rank that was killed or
    hangs gives ``{"exit": code}``."""
    where.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    store = str(where / f"store{time.monotonic_ns()}") if init else None
    procs = [
        ctx.Process(target=_worker, args=(r, world, store, target, str(where)))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + _DEADLINE
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    results = []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
            results.append({"exit": "hung"})
            continue
        path = where / f"rank{r}.pt"
        results.append(
            torch.load(path, weights_only=False) if path.exists() else {"exit": p.exitcode}
        )
        path.unlink(missing_ok=True)
    return results


def _value(result: dict):
    assert "value" in result, result.get("traceback", result)
    return result["value"]


def _seed(name: str) -> None:
    digest = hashlib.sha256(f"test_distributed::{name}".encode()).digest()
    torch.manual_seed(
        int.from_bytes(digest[:4], "little") + int(os.environ.get("LINFT_TEST_SEED", "0"))
    )


# --------------------------------------------------------------------- kernel cases


def _cases(world: int, tmp) -> dict:
    """name -> (function, args, kwargs): N = 7 in blocks of 2 splits 2+2+3 (3 ranks) or
    4+3 (2 ranks); the last case leaves rank 0 without samples."""
    roberta = roberta_classifier()
    gpt, last_token = gpt2()
    a, b = token_batch(random_lengths(7), pad_id=1), token_batch(random_lengths(5), pad_id=1)
    g = architecture_batch("gpt2", 7)
    few = token_batch(random_lengths({2: 2, 3: 3}[world]), pad_id=1)
    return {
        "sgd": (linft.ntk, (roberta, a), {}),
        "cross": (linft.ntk, (roberta, a, b), {}),
        "cross asym_signgd": (linft.ntk, (roberta, a, b), dict(kernel="asym_signgd")),
        "trace": (linft.ntk, (gpt, g), dict(output=last_token, outputs="trace")),
        "signgd": (linft.ntk, (gpt, g), dict(output=last_token, kernel="signgd")),
        "asym_signgd": (linft.ntk, (roberta, a), dict(kernel="asym_signgd")),
        "layers": (linft.layer_ntks, (gpt, g), dict(output=last_token, groups="layer")),
        "rank without samples": (linft.ntk, (roberta, few), {}),
        "checkpoint": (linft.ntk, (roberta, a), dict(checkpoint=str(tmp / "sym"))),
        "checkpoint again": (linft.ntk, (roberta, a), dict(checkpoint=str(tmp / "sym"))),
        "checkpoint cross": (linft.ntk, (roberta, a, b), dict(checkpoint=str(tmp / "cross"))),
        "layers checkpoint": (
            linft.layer_ntks,
            (gpt, g),
            dict(output=last_token, kernel="asym_signgd", checkpoint=str(tmp / "layers")),
        ),
    }


def _shard_case(rank: int, world: int, model, batch, tmp) -> dict:
    """out="shard" (also checkpointed), the sharded spectra, J on rank 0 and the Jacobian
    operator, on every rank."""
    shard = linft.ntk(model, batch, batch_size=2, out="shard")
    kept = linft.ntk(model, batch, batch_size=2, out="shard", checkpoint=str(tmp / "shard"))
    full = shard.full()
    spec = linft.spectrum(shard, k=3)
    dense = linft.spectrum(shard)
    top = linft.topk_eigh(shard, 3, method="krylov", seed=0, tol=1e-6)
    J = linft.jacobian(model, batch, batch_size=2, out="shard")
    op_spec = linft.spectrum(J.kernel(), k=3)
    op_trace = linft.spectrum(J.kernel(outputs="trace"), k=2)
    # Krylov on J^T J: one all-reduce per product, vectors gathered and certified on K
    op_features = linft.topk_eigh(J.kernel(), 3, method="features", tol=1e-6)
    try:  # a different start block on each rank: refused on every rank
        linft.topk_eigh(shard, 2, method="krylov", tol=1e-3, seed=rank)
        mismatch = None
    except ValueError as e:
        mismatch = str(e)
    out = dict(
        rows=(shard.rows.start, shard.rows.stop),
        local=shard.local.clone(),
        kept=kept.local.clone(),
        J=linft.jacobian(model, batch, batch_size=2),
        full=full,
        spec=spec,
        dense=dense,
        top=top.values,
        op_spec=op_spec,
        op_trace=op_trace,
        op_features=(op_features.values, op_features.vectors, J.kernel().num_features),
        mismatch=mismatch,
    )
    if rank == 0:
        out["K"] = linft.ntk(model, batch, batch_size=2, group=False)
        out["K_trace"] = linft.ntk(model, batch, batch_size=2, group=False, outputs="trace")
        out["J_ref"] = linft.jacobian(model, batch, batch_size=2, group=False)
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request, tmp_path_factory):
    """Every case on one process group: {case: (distributed results per rank, reference)}."""
    world = request.param
    tmp = tmp_path_factory.mktemp(f"ranks{world}")
    _seed(f"ranks{world}")
    cases = _cases(world, tmp)
    model, batch = cases["sgd"][1]

    def target(rank, world):
        from linft.kernel import distributed

        distributed._CHUNK = 512  # rows travel to rank 0 in many messages
        got = {}
        for name, (fn, args, kw) in cases.items():
            K = fn(*args, batch_size=2, **kw)
            ref = None
            if rank == 0:
                kw = {k: v for k, v in kw.items() if k != "checkpoint"}
                ref = fn(*args, batch_size=2, group=False, **kw)
            got[name] = (K, ref)
        got["shard"] = _shard_case(rank, world, model, batch, tmp)
        fn, args, kw = cases["layers"]
        pick = {**kw, "budget": 2, "batch_size": 2}  # per-layer kernels, as in "layers"
        got["select"] = linft.select_layers(*args, **pick).to_dict()
        if rank == 0:
            got["select_ref"] = linft.select_layers(*args, group=False, **pick).to_dict()
        return got

    started = time.perf_counter()
    results = _spawn(world, target, tmp)
    return world, [_value(r) for r in results], time.perf_counter() - started


CASES = [
    "sgd",
    "cross",
    "cross asym_signgd",
    "trace",
    "signgd",
    "asym_signgd",
    "layers",
    "rank without samples",
    "checkpoint",
    "checkpoint again",
    "checkpoint cross",
    "layers checkpoint",
]


@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_single_process(ranks, case):
    """Bit-identical: every tile is computed from the same J blocks in the same order."""
    world, results, _ = ranks
    K, ref = results[0][case]
    assert all(r[case][0] is None for r in results[1:]), "K is returned on rank 0 only"
    if isinstance(ref, dict):
        assert K.keys() == ref.keys() and len(ref) > 1
        for name in ref:
            assert torch.equal(K[name], ref[name]), name
    else:
        assert K.shape == ref.shape
        assert torch.equal(K, ref), float((K - ref).abs().max())
    assert torch.isfinite(ref if not isinstance(ref, dict) else ref[next(iter(ref))]).all()


def test_layer_selection_is_rank_zeros_on_every_rank(ranks):
    _, results, _ = ranks
    expected = results[0]["select_ref"]
    assert len(expected["groups"]) == 2
    for r in results:
        assert r["select"] == expected


def test_shards_and_sharded_spectrum(ranks):
    world, results, _ = ranks
    K = results[0]["shard"]["K"]
    M = K.reshape(K.shape[0] * K.shape[1], -1).double()
    exact = torch.linalg.eigvalsh(M).flip(0)
    scale = float(exact[0])
    rows = [r["shard"]["rows"] for r in results]
    assert rows[0][0] == 0 and rows[-1][1] == M.shape[0]
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
    for r in results:
        s = r["shard"]
        lo, hi = s["rows"]
        assert torch.equal(s["local"], K.reshape(M.shape)[lo:hi])
        assert torch.equal(s["kept"], s["local"])
        assert torch.equal(s["full"], K.reshape(M.shape))
        for spec in (s["spec"], s["op_spec"]):
            err = (spec.eigenvalues[:3] - exact[:3]).abs().max() / scale
            assert err < 1e-5, err
            assert abs(spec.trace - float(M.trace())) <= 1e-5 * float(M.trace())
            assert abs(spec.lambda_min - float(exact[-1])) <= 1e-4 * scale
        assert s["dense"].rank == linft.spectrum(K).rank
        assert torch.allclose(s["dense"].eigenvalues, exact, rtol=0, atol=1e-5 * scale)
        assert float((s["top"].double() - exact[:3]).abs().max()) <= 1e-5 * scale
        Kt = results[0]["shard"]["K_trace"].double()
        exact_t = torch.linalg.eigvalsh(Kt).flip(0)
        err_t = (s["op_trace"].eigenvalues[:2] - exact_t[:2]).abs().max() / exact_t[0]
        assert err_t < 1e-5, err_t
        assert s["mismatch"] is not None and "different X" in s["mismatch"]
        values, vectors, P = s["op_features"]
        assert P > M.shape[0] and s["op_spec"].method == ("features" if P > 256 else "krylov")
        assert float((values.double() - exact[:3]).abs().max()) <= 1e-5 * scale
        r = M @ vectors.double() - vectors.double() * exact[:3]
        assert float(r.norm(dim=0).max()) <= 1e-4 * scale
        assert torch.equal(values, results[0]["shard"]["op_features"][0])  # the same everywhere
    assert torch.equal(results[0]["shard"]["J"], results[0]["shard"]["J_ref"])
    assert all(r["shard"]["J"] is None for r in results[1:])
    # every rank found the same eigenvalues
    for r in results[1:]:
        assert torch.equal(r["shard"]["spec"].eigenvalues, results[0]["shard"]["spec"].eigenvalues)


# ------------------------------------------------------------------- failures, resume


def _patch_block(counter: list, fail_at=None, kill_at=None):
    """Count the Jacobian blocks this rank computes; raise or die at one of them."""
    from linft.kernel.engine import JacobianEngine

    real = JacobianEngine.block

    def block(self, batch, start):
        counter.append(start)
        if fail_at is not None and len(counter) == fail_at:
            raise ValueError(f"boom in block {start}")
        if kill_at is not None and len(counter) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, batch, start)

    JacobianEngine.block = block


def test_a_raising_rank_stops_every_rank(tmp_path):
    """Rank 2 raises on its second block; ranks 0 and 1 raise RankFailed naming it."""
    _seed("raise")
    model = roberta_classifier()
    a = token_batch(random_lengths(9), pad_id=1)

    def target(rank, world):
        if rank == 2:
            _patch_block([], fail_at=2)
        return linft.ntk(model, a, batch_size=1)

    start = time.monotonic()
    results = _spawn(3, target, tmp_path)
    assert time.monotonic() - start < _GROUP_TIMEOUT, "the ranks waited for the timeout"
    assert results[2]["error"] == "ValueError" and "boom" in results[2]["message"]
    for r in results[:2]:
        assert r.get("error") == "RankFailed", r
        assert r["rank"] == 2 and "rank 2 of 3 failed" in r["message"] and "boom" in r["message"]


def _finished_blocks(directory) -> int:
    count = 0
    for path in directory.glob("meta.rank*.json"):
        count += len(json.loads(path.read_text())["done"]["rows"])
    return count


def test_killed_rank_resumes_to_the_uninterrupted_kernel(tmp_path):
    """Rank 1 is killed (SIGKILL) during the ring step; the others raise instead of
    waiting; the same call resumes, recomputes only unfinished blocks and tiles, and
    gives the uninterrupted kernel bit for bit."""
    _seed("kill")
    model = roberta_classifier()
    a = token_batch(random_lengths(7), pad_id=1)
    ckpt = tmp_path / "ckpt"
    from linft.kernel import distributed

    def first(rank, world):
        if rank == 1:  # dies at its second ring tile: after one visiting block was done
            real = distributed.kernel_tile
            calls = []

            def tile(*args):
                calls.append(1)
                if len(calls) == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args)

            distributed.kernel_tile = tile
        return linft.ntk(model, a, batch_size=1, checkpoint=str(ckpt))

    start = time.monotonic()
    killed = _spawn(3, first, tmp_path / "first")
    assert time.monotonic() - start < _GROUP_TIMEOUT, "the ranks waited for the timeout"
    assert killed[1] == {"exit": -signal.SIGKILL}
    for r in (killed[0], killed[2]):
        assert r.get("error") == "RankFailed" and "rank 1" in r["message"], r
    finished = _finished_blocks(ckpt)
    assert finished >= 2  # rank 1's own blocks were done before its ring step
    # blocks 0-1, 2-3, 4-6 on ranks 0, 1, 2; at step 1 rank r computes the tiles of its
    # blocks with each block of rank r+1, which sends back their mirror images: a pair
    # (r, b) is finished when r marked its tiles and rank r+1 the mirror of b
    done = [json.loads((ckpt / f"meta.rank{r}.json").read_text())["done"] for r in range(3)]
    own = [2, 2, 3]
    skipped = sum(
        own[r]
        for r in range(3)
        for b in done[r].get("tiles", {})
        if b in done[(r + 1) % 3].get("mirror1", {})
    )
    assert skipped >= 2  # rank 1 finished its tiles with block 4 before it died

    def again(rank, world):
        computed, tiles = [], []
        _patch_block(computed)
        real = distributed.kernel_tile
        distributed.kernel_tile = lambda *args: (tiles.append(1), real(*args))[1]
        K = linft.ntk(model, a, batch_size=1, checkpoint=str(ckpt))
        n = len(computed)
        ref = linft.ntk(model, a, batch_size=1, group=False) if rank == 0 else None
        return K, ref, n, len(tiles)

    resumed = [_value(r) for r in _spawn(3, again, tmp_path / "again")]
    K, ref, _, _ = resumed[0]
    assert sum(r[2] for r in resumed) == 7 - finished  # only the unfinished blocks
    assert sum(r[3] for r in resumed) == 2 * 2 + 2 * 3 + 3 * 2 - skipped  # and tiles
    assert torch.equal(K, ref)


# ------------------------------------------------------------------- the command line


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_analyze_under_torchrun_writes_once(tmp_path, monkeypatch):
    """``torchrun --nproc_per_node=2 -m linft analyze``: the ranks start the process group
    from torchrun's environment, compute together, and rank 0 alone prints and writes the
    report, whose kernels equal a single-process run's bit for bit."""
    import contextlib
    import io

    from models import roberta_base_classifier
    from safetensors.torch import load_file
    from test_cli import labelled_rows, save_tokenizer, write_data
    from transformers import AutoModelForSequenceClassification

    cli = importlib.import_module("linft.cli.main")  # the module, not linft.cli's main()

    _seed("cli")
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    roberta_base_classifier().save_pretrained(base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    roberta_classifier(base=base).save_pretrained(adapter_dir)
    save_tokenizer(base_dir, base.config.vocab_size)
    data = tmp_path / "data.tsv"
    write_data(data, labelled_rows(9))

    def command(out):
        return ["analyze", "--model", str(base_dir), "--adapter", str(adapter_dir), "--data",
                str(data), "--label-field", "label", "--out", str(out), "--batch-size", "2",
                "--no-plot", "--steps", "20", "--device", "cpu"]  # fmt: skip

    def single(rank, world):  # one process with one thread, as each rank has
        with contextlib.redirect_stdout(io.StringIO()):
            return cli.main(command(tmp_path / "single"))

    assert _value(_spawn(1, single, tmp_path / "one", init=False)[0]) == 0
    port = _free_port()

    def target(rank, world):
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )  # fmt: skip
        finished = []
        real = cli.finish
        cli.finish = lambda *a: (finished.append(rank), real(*a))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = cli.main(command(tmp_path / "ranks"))
        return code, finished, printed.getvalue()

    results = [_value(r) for r in _spawn(2, target, tmp_path / "spawn", init=False)]
    assert [code for code, _, _ in results] == [0, 0]
    assert [f for _, f, _ in results] == [[0], []]  # rank 0 alone writes
    assert "wrote" in results[0][2] and results[1][2] == ""
    single = load_file(str(tmp_path / "single" / "kernel.safetensors"))
    ranks = load_file(str(tmp_path / "ranks" / "kernel.safetensors"))
    assert single.keys() == ranks.keys() and "kernel_signgd" in single
    for name in single:
        assert torch.equal(single[name], ranks[name]), name
    one = json.loads((tmp_path / "single" / "report.json").read_text())
    two = json.loads((tmp_path / "ranks" / "report.json").read_text())
    assert one["spectrum"] == two["spectrum"] and one["regression"] == two["regression"]


# ------------------------------------------------------------- one process, arguments


def test_shard_of_one_process_is_an_operator(one_thread):
    """Without a process group, ``out="shard"`` is the whole kernel as one shard: the same
    spectrum as the dense kernel; the Jacobian operator gives it matrix-free."""
    model = roberta_classifier()
    a = token_batch(random_lengths(6), pad_id=1)
    K = linft.ntk(model, a, batch_size=4)
    shard = linft.ntk(model, a, batch_size=4, out="shard")
    assert isinstance(shard, linft.KernelShard) and shard.rows == slice(0, 18)
    assert torch.equal(shard.local, K.reshape(18, 18))
    exact = torch.linalg.eigvalsh(K.reshape(18, 18).double()).flip(0)
    for op in (shard, linft.jacobian(model, a, batch_size=4, out="shard").kernel()):
        s = linft.spectrum(op, k=4)
        assert float((s.eigenvalues - exact[:4]).abs().max()) <= 1e-5 * float(exact[0])
        assert abs(s.lambda_min - float(exact[-1])) <= 1e-4 * float(exact[0])
        assert s.complete is False
        if s.rank is None:  # lambda_min not resolved above the floor: no rank claimed
            assert s.lambda_min <= s.rank_threshold and s.condition_number == float("inf")
        else:
            assert s.rank == 18
            assert abs(s.condition_number * float(exact[-1] / exact[0]) - 1) < 1e-2
    parts = linft.layer_ntks(model, a, batch_size=4, groups="layer", out="shard")
    assert_rel_close(sum(p.local for p in parts.values()).reshape(K.shape), K, 1e-6, "layers")
    cross = linft.ntk(model, a, token_batch(random_lengths(6), pad_id=1), out="shard")
    with pytest.raises(ValueError, match="not symmetric"):
        linft.spectrum(cross, k=2)
    with pytest.raises(ValueError, match="not symmetric"):
        linft.spectrum(linft.ntk(model, a, kernel="asym_signgd", out="shard"), k=2)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(group=True), ValueError, "init_process_group"),
        (dict(group="world"), TypeError, "ProcessGroup"),
        (dict(out="rows"), ValueError, "unknown out"),
    ],
)
def test_bad_group_or_out(kw, error, match):
    model = roberta_classifier()
    with pytest.raises(error, match=match):
        linft.ntk(model, token_batch([3, 2], pad_id=1), **kw)


def _classes_reversed(out, batch):
    return out.logits.flip(-1)


@pytest.mark.parametrize("call", ["ntk", "jacobian"])
def test_ranks_with_another_output_function_refuse_on_every_rank(tmp_path, call):
    """Rank 1 reads the classes in another order: K would be off with no error. The ranks
    compare one fingerprint of the computation (the checkpoint's), and every rank raises
    naming output=."""
    _seed("output")
    model = roberta_classifier()
    a = token_batch(random_lengths(6), pad_id=1)

    def target(rank, world):
        output = _classes_reversed if rank == 1 else linft.outputs.logits()
        return getattr(linft, call)(model, a, output=output, batch_size=2)

    results = _spawn(2, target, tmp_path)
    for r in results:  # each rank raises it, or hears it first from the other (RankFailed)
        assert r.get("error") in ("ValueError", "RankFailed"), r
        assert "rank 1 and rank 0 differ in the output function (output=)" in r["message"]


def test_ranks_with_other_weights_refuse_on_every_rank(tmp_path):
    _seed("weights")
    model = roberta_classifier()
    a = token_batch(random_lengths(6), pad_id=1)

    def target(rank, world):
        if rank == 1:  # a frozen weight, hashed by its moments
            with torch.no_grad():
                model.base_model.model.roberta.embeddings.word_embeddings.weight[3, 0] += 1e-3
        return linft.ntk(model, a, batch_size=2)

    results = _spawn(2, target, tmp_path)
    for r in results:
        assert r.get("error") in ("ValueError", "RankFailed"), r
        assert "differ in the model's parameter or buffer values" in r["message"]
