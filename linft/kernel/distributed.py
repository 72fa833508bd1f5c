"""The kernel on several processes: ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Every rank is given the same inputs. The blocks of samples (``batches.blocks``: the
boundaries of a single-process run) are cut into G contiguous shares of whole blocks;
rank r computes the Jacobian blocks of share r once and keeps them (``JacobianStore``).
K's rows of share r are rank r's *slab*. The tiles ``I <= J`` are divided so that each
is computed once across the group, every rank doing ``N^2/(2G)`` of the ``N^2/2`` tile
entries (for shares of equal size):

- step 0: each rank assembles the tiles among its own blocks (``gram.assemble``, the
  single-process code, run on its share);
- steps s = 1 .. floor(G/2): rank r receives the J blocks of rank ``r+s`` (mod G) one at a
  time, the next block's transfer overlapping the current block's tiles, and sends its
  own to rank ``r-s``. It computes the tiles between its blocks and each visiting block,
  writes them into its slab and sends their mirror images (rows of rank ``r+s``) back to
  their owner. For even G the pair of ranks at s = G/2 splits its tiles by parity.

The cross kernel ``K(X, X2)`` splits the blocks of X and of X2 the same way; the X2
blocks of rank ``r+s`` visit rank r at steps s = 1 .. G-1 (every rank then holds its
whole slab: no mirrors). Each tile is computed with the earlier block first, as in
the single-process run, so K is bit-identical to it.

Per rank, for the symmetric kernel (b_J bytes per Jacobian entry, 4 per K entry, P
columns): ``floor(G/2) (N/G) C P b_J`` bytes of J sent, about as many received,
``floor(G/2) (N/G)^2 C^2 4`` bytes of mirrored tiles, then its slab ``(N/G) N C^2 4`` to
rank 0 when K is returned there. README.md ("Several GPUs") works the numbers out.

A rank that fails records its error in the process group's store before it raises;
the other ranks check the store while they wait for any transfer, so every rank
raises (``RankFailed``, naming the rank and its error) instead of waiting forever. A
rank that was killed closes its connections; whoever waited on it names it. Waits
are bounded by the process group's own timeout (``init_process_group(timeout=...)``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import torch

from ..backends import kernel_dtype, matmul_precision
from ..params import group_columns, parameter_dtype
from . import run, signs
from .batches import batch_size as samples_in
from .batches import blocks
from .engine import iterate_blocks
from .gram import assemble, kernel_signs, kernel_tile
from .identity import PARTS, computation_parts
from .model_state import run_context
from .store import JacobianStore, store_budget
from .verify import checked as self_checked

try:
    import torch.distributed as dist
except ImportError:  # a torch built without distributed support
    dist = None

OUTS = ("full", "shard")
_POLL = (0.002, 0.2)  # first and longest pause between checks of the store while waiting
_GRACE = 2.0  # seconds a rank that lost a peer waits for that peer's own error report
_CHUNK = 1 << 26  # bytes per message when slabs travel to rank 0


class RankFailed(RuntimeError):
    """Another rank of the process group failed; ``rank`` is that rank, ``cause`` its error."""

    def __init__(self, message: str, rank: int | None, cause: str):
        super().__init__(message)
        self.rank, self.cause = rank, cause


# ----------------------------------------------------------------------- process group


def available() -> bool:
    return dist is not None and dist.is_available()


def resolve_group(group):
    """The process group a run uses, or None for this process alone.

    ``None``: the default group when ``torch.distributed`` is initialized with more than
    one process; ``False``: this process alone; ``True``: the default group (an error
    when there is none); or a ``ProcessGroup`` this process belongs to."""
    if group is False:
        return None
    if group is None or group is True:
        if not (available() and dist.is_initialized()):
            if group is True:
                raise ValueError(
                    "group=True needs an initialized torch.distributed: launch with torchrun, "
                    "or call torch.distributed.init_process_group first"
                )
            return None
        if group is None and dist.get_world_size() == 1:
            return None
        return dist.group.WORLD
    if available() and isinstance(group, dist.ProcessGroup):
        if dist.get_rank(group) < 0:
            raise ValueError(
                "this process is not a member of group=; call linft on the ranks of the group "
                "only, or pass group=False for a kernel of this process alone"
            )
        return group
    raise TypeError(
        "group must be None (the default process group when torch.distributed is "
        "initialized), False (this process alone), True or a torch.distributed "
        f"ProcessGroup; got {type(group).__name__}"
    )


def check_out(out: str) -> None:
    if out not in OUTS:
        raise ValueError(
            f"unknown out {out!r}; choose 'full' (K on rank 0) or 'shard' (each rank's rows)"
        )


_RUNS: dict[str, int] = {}  # runs per group in this process: the same on every rank


@dataclass
class Stats:
    """What one rank sent and received, and how long it waited, in the last run."""

    rank: int = 0
    world: int = 1
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds_waiting: float = 0.0
    seconds_total: float = 0.0
    tiles: int = 0  # tile entries (one group, per output pair) this rank computed


_LAST = Stats()


def last_stats() -> Stats:
    """The ``Stats`` of this process's last distributed run (bytes, waits, tiles)."""
    return _LAST


class Comm:
    """Transfers and collectives of one run on ``group`` that never wait forever: while a
    transfer is pending, the store is checked for another rank's failure."""

    def __init__(self, group, device: torch.device):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        self.nccl = "nccl" in backend and device.type == "cuda"
        if "nccl" in backend and not self.nccl and "gloo" not in backend:
            raise ValueError(
                f"the process group uses NCCL but the model is on {device}; NCCL moves CUDA "
                "tensors only: init_process_group('gloo') (or 'cpu:gloo,cuda:nccl') for CPU runs"
            )
        self.device = device if self.nccl else torch.device("cpu")
        self.store = _default_store()
        name = str(getattr(group, "group_name", "") or "world")
        _RUNS[name] = _RUNS.get(name, 0) + 1
        # a torchrun restart may keep the store: its keys must not carry the failed attempt's
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"linft/{attempt}/{name}/{_RUNS[name]}"
        self.run_id = _RUNS[name] % 16
        self.stats = Stats(rank=self.rank, world=self.world)

    def peer(self, r: int) -> int:
        """The global rank of group rank ``r`` (what P2POp wants)."""
        if self.group is dist.group.WORLD:
            return r
        return dist.get_global_rank(self.group, r)

    # --- transfers

    def tag(self, step: int, kind: int, index: int) -> int:
        """The message's tag, the same on both sides (gloo matches messages by tag, a 31-bit
        int; messages of one tag between two ranks arrive in order)."""
        return (self.run_id << 27) | (step % 256 << 19) | (kind << 17) | (index % (1 << 17))

    def exchange(self, sends: list, recvs: list, what: str):
        """Post ``(tensor, rank, tag)`` sends and receives together; returns a handle for
        ``wait``. Tensors must live on ``self.device``, contiguous."""
        ops = []
        for t, r, tag in sends:
            ops.append(dist.P2POp(dist.isend, t, self.peer(r), self.group, tag))
            self.stats.bytes_sent += t.numel() * t.element_size()
        for t, r, tag in recvs:
            ops.append(dist.P2POp(dist.irecv, t, self.peer(r), self.group, tag))
            self.stats.bytes_received += t.numel() * t.element_size()
        works = dist.batch_isend_irecv(ops) if ops else []
        peers = [x[1] for x in sends] + [x[1] for x in recvs]
        if len(works) != len(peers):  # coalesced into fewer works
            peers = [sorted(set(peers))] * len(works)
        return works, what, [p if isinstance(p, list) else [p] for p in peers]

    def wait(self, handle) -> None:
        works, what, peers = handle
        if works:
            self._wait(works, what, peers)

    def _wait(self, works: list, what: str, peers: list[list[int]]) -> None:
        """Wait for ``works`` on a helper thread (a gloo wait cannot be interrupted) while
        this thread checks the store; raise as soon as another rank has failed.
        ``peers[i]``: the ranks that ``works[i]`` waits on (named if it fails)."""
        done, box = threading.Event(), []
        poll_gpu = self.nccl  # NCCL's wait only orders streams; completion is polled

        def run_waits():
            try:
                for i, w in enumerate(works):
                    box[:] = [None, peers[i]]
                    w.wait()
                    pause = 1e-5
                    while poll_gpu and not w.is_completed():
                        time.sleep(pause)
                        pause = min(2 * pause, 1e-3)
                box.clear()
            except BaseException as e:  # handed to the waiting thread
                box[0] = e
            finally:
                done.set()

        start = time.perf_counter()
        threading.Thread(target=run_waits, daemon=True, name="linft-wait").start()
        pause = _POLL[0]
        while not done.wait(pause):
            self.check()
            pause = min(2 * pause, _POLL[1])
        self.stats.seconds_waiting += time.perf_counter() - start
        if box:
            raise self._lost(box[0], what, box[1])

    def all_gather_object(self, obj, what: str) -> list:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        self._collective(dist.all_gather(sizes, size, self.group, async_op=True), what, size)
        longest = int(max(int(s) for s in sizes))
        buf = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        buf[: data.numel()] = data.to(self.device)
        bufs = [torch.empty_like(buf) for _ in range(self.world)]
        self._collective(dist.all_gather(bufs, buf, self.group, async_op=True), what, buf)
        return [
            pickle.loads(b[: int(s)].cpu().numpy().tobytes())
            for b, s in zip(bufs, sizes, strict=True)
        ]

    def all_gather_rows(self, local: torch.Tensor, counts: list[int], what: str) -> torch.Tensor:
        """The row-wise concatenation of every rank's ``local`` ([counts[r], m]) on every rank."""
        m = local.shape[1]
        longest = max(counts)
        buf = torch.zeros(longest, m, dtype=local.dtype, device=self.device)
        buf[: local.shape[0]] = local.to(self.device)
        bufs = [torch.empty_like(buf) for _ in range(self.world)]
        self._collective(dist.all_gather(bufs, buf, self.group, async_op=True), what, buf)
        return torch.cat([b[:c] for b, c in zip(bufs, counts, strict=True)])

    def all_reduce(self, t: torch.Tensor, what: str, op=None) -> torch.Tensor:
        buf = t.to(self.device).contiguous()
        work = dist.all_reduce(buf, dist.ReduceOp.SUM if op is None else op, self.group, True)
        self._collective(work, what, buf, 2.0 / self.world)
        return buf.to(t.device)

    def barrier(self, what: str) -> None:
        self.all_reduce(torch.zeros(1, device=self.device), what)

    def _collective(self, work, what: str, buf: torch.Tensor, share: float = 1.0) -> None:
        """Wait for a collective; counted as a ring algorithm moves it: ``share * (G-1)``
        times ``buf`` sent and received (all-gather 1, all-reduce 2/G, broadcast 1/(G-1))."""
        n = int(share * (self.world - 1) * buf.numel() * buf.element_size())
        self.stats.bytes_sent += n
        self.stats.bytes_received += n
        self._wait([work], what, [[r for r in range(self.world) if r != self.rank]])

    # --- failures

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def failed(self, err: BaseException) -> None:
        """Record this rank's error for the others (a ``RankFailed`` was recorded already)."""
        if isinstance(err, RankFailed) or self.store is None:
            return
        text = " ".join(f"{type(err).__name__}: {err}".split())
        self._record("cause", text)

    def _record(self, kind: str, text: str) -> None:
        try:
            self.store.set(self._key(f"error/{self.rank}"), f"{kind}|{text}")
            self.store.set(self._key("failed"), str(self.rank))
        except Exception:  # the store itself is gone: the others find out from their own waits
            pass
        if self.nccl and hasattr(self.group, "abort"):
            # NCCL kernels waiting for a peer that is gone never finish on their own
            try:
                self.group.abort()
            except Exception:
                pass

    def check(self) -> None:
        """Raise ``RankFailed`` if another rank recorded an error."""
        if self.store is None:
            return
        try:
            failed = self.store.check([self._key("failed")])
        except Exception as e:
            raise RankFailed(
                f"linft: rank {self.rank} lost the process group's store ({e}); the rank or "
                "agent that hosts it stopped",
                None,
                str(e),
            ) from None
        if failed:
            raise self._report()

    def _report(self) -> RankFailed:
        found = []
        for r in range(self.world):
            key = self._key(f"error/{r}")
            try:
                if self.store.check([key]):
                    kind, _, text = self.store.get(key).decode().partition("|")
                    found.append((kind != "cause", r, text))
            except Exception:
                continue
        if not found:
            return RankFailed(f"linft: another rank failed; rank {self.rank} stopped too", None, "")
        _, r, text = min(found)
        return RankFailed(
            f"linft: rank {r} of {self.world} failed ({text}); rank {self.rank} stopped too",
            r,
            text,
        )

    def _lost(self, err: BaseException, what: str, peers: list[int]) -> RankFailed:
        """A transfer raised: a peer's own report if it made one, else name the peers."""
        deadline = time.monotonic() + _GRACE
        while self.store is not None and time.monotonic() < deadline:
            try:
                if self.store.check([self._key("failed")]):
                    return self._report()
            except Exception:
                break
            time.sleep(0.05)
        text = " ".join(str(err).split())
        names = f"rank {peers[0]}" if len(peers) == 1 else f"one of ranks {peers}"
        message = (
            f"rank {self.rank} lost {names} while {what} (killed, crashed or timed out: {text})"
        )
        self._record("lost", message)
        return RankFailed(f"linft: {message}", peers[0] if len(peers) == 1 else None, message)


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: failures surface as transfer errors
        return None


# ------------------------------------------------------------------------------ shares


def shares(num_blocks: int, world: int) -> list[range]:
    """Contiguous block ranges per rank, as even as whole blocks allow (some may be empty)."""
    return [range(r * num_blocks // world, (r + 1) * num_blocks // world) for r in range(world)]


def parity_owner(r: int, q: int, ia: int, ib: int) -> bool:
    """At the half step of an even group, whether rank r (own block ``ia``) computes the
    tile with block ``ib`` of rank q; exactly one of the pair does."""
    return (ia + ib + (r > q)) % 2 == 0


@dataclass
class _Share:
    """One rank's blocks: ``(start, n)`` in sample order, and its sample range."""

    blocks: list[tuple[int, int]]
    first: int
    end: int

    @property
    def n(self) -> int:
        return self.end - self.first


def _listed_shares(listed: list, world: int, total: int) -> list[_Share]:
    out = []
    for rng in shares(len(listed), world):
        own = [(listed[i][0], samples_in(listed[i][1])) for i in rng]
        first = own[0][0] if own else (listed[rng.start][0] if rng.start < len(listed) else total)
        out.append(_Share(own, first, first + sum(n for _, n in own)))
    return out


# --------------------------------------------------------------------------- consistency


_SAME = (
    "every rank must pass the same model, inputs and settings (linft splits the samples "
    "across ranks itself: give each rank the whole data set, not a DistributedSampler's "
    "shard, and seed new adapter weights identically), or pass group=False for a kernel of "
    "each rank's own data"
)


def _check_same(comm: Comm, job, settings: dict, batches: list) -> None:
    """The same computation on every rank (``identity.computation_parts``: settings, output
    function, model, weights, inputs), or the same ``ValueError`` on every rank naming the
    first part that differs."""
    try:
        mine = computation_parts(
            settings, job.output, job.model, batches, use="ranks",
            exact={n for n, _ in job.selected},
        )  # fmt: skip
    except TypeError as err:  # a part with no stable description: every rank must hear it
        mine = {"error": str(err)}
    gathered = comm.all_gather_object(mine, "comparing the computations")
    for r, d in enumerate(gathered):
        if "error" in d:
            raise TypeError(f"rank {r}: {d['error']}")
    for part in gathered[0]:
        differ = [r for r, d in enumerate(gathered) if d[part] != gathered[0][part]]
        if differ:
            raise ValueError(
                f"rank {differ[0]} and rank 0 differ in {PARTS.get(part, part)}; {_SAME}"
            )


# ------------------------------------------------------------------------------- runs


def kernels(model, inputs, inputs2, *, group, out: str, **kw) -> dict | None:
    """``run.kernels`` on the ranks of ``group`` (None: this process alone, for
    ``out="shard"``). Returns the kernels on rank 0 and None elsewhere (``out="full"``),
    or every rank's ``KernelShard`` per group (``out="shard"``)."""
    from ..sharded import KernelShard

    check_out(out)
    if group is None:
        full = run.kernels(model, inputs, inputs2, group=False, out="full", **kw)
        symmetric = inputs2 is None and kw["kernel"] != "asym_signgd"
        return {name: KernelShard.whole(K, symmetric) for name, K in full.items()}
    kernel_signs(kw["kernel"])
    with run_context(model, matmul_precision(kw["precision"])):
        comm = None
        try:
            comm = Comm(group, _where(model))
            result = _Run(comm, model, inputs, inputs2, out, kw).run()
            return _everywhere(comm, result) if _REPLICATED and out == "full" else result
        except BaseException as err:
            if comm is not None:
                comm.failed(err)
            raise


# ---------------------------------------------------------------------- command line

_REPLICATED = False  # command_line(): results of out="full" on every rank


def _everywhere(comm: Comm, result: dict | None) -> dict:
    """Rank 0's tensors broadcast to every rank."""
    meta = comm.all_gather_object(
        None if result is None else {k: (tuple(v.shape), v.dtype) for k, v in result.items()},
        "sharing the result",
    )[0]
    out = {}
    for name, (shape, dtype) in meta.items():
        here = result[name] if comm.rank == 0 else None
        buf = here.to(comm.device).contiguous() if here is not None else None
        if buf is None:
            buf = torch.empty(shape, dtype=dtype, device=comm.device)
        work = dist.broadcast(buf, comm.peer(0), comm.group, True)
        comm._collective(work, "sharing the result", buf, 1 / max(1, comm.world - 1))
        out[name] = here if here is not None else buf
    return out


def writes() -> bool:
    """Whether this process writes reports and prints: rank 0, or a process on its own."""
    return not (available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def command_line(device: str | None):
    """The command line on every rank of a ``torchrun`` launch: the process group started
    from torchrun's environment (NCCL for CUDA devices, gloo otherwise) and ended after;
    kernels of ``out="full"`` on every rank, so that every rank can run the same analysis;
    standard output and warnings only on rank 0 (``writes()``: the one that writes)."""
    global _REPLICATED
    started = False
    if available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = str(device or "").startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda and dist.is_nccl_available() else "gloo")
        started = True
    saved, _REPLICATED = _REPLICATED, available() and dist.is_initialized()
    try:
        with contextlib.ExitStack() as stack:
            if not writes():
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
                sink = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(sink))
            yield
            sys.stdout.flush()
    finally:
        _REPLICATED = saved
        if started:
            dist.destroy_process_group()


def _where(model) -> torch.device:
    """The model's device, unchecked: the transfers must be set up before anything that
    may raise on one rank only (``run.prepare`` checks the device)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _prepare(comm: Comm, model, inputs, inputs2, kw: dict):
    """``run.prepare`` on every rank, with the smallest block size of the ranks (it follows
    each GPU's free memory)."""
    job, batches, n_rows, batches2, n_cols = run.prepare(
        model, inputs, inputs2, params=kw["params"], output=kw["output"],
        precision=kw["precision"], backend=kw["backend"], batch_size=kw["batch_size"],
        device=kw["device"], verify=kw["verify"],
    )  # fmt: skip
    size = torch.tensor([job.block_size], dtype=torch.int64)
    job.block_size = int(comm.all_reduce(size, "agreeing on the block size", dist.ReduceOp.MIN))
    return job, batches, n_rows, batches2, n_cols


def jacobian(model, inputs, *, group, out: str, **kw):
    """``run.jacobian`` on the ranks of ``group``: each rank computes the J blocks of its
    share; ``out="full"``: J ``[N, C, P]`` on rank 0 (None elsewhere), ``"shard"``: every
    rank's ``JacobianShard``."""
    from ..sharded import JacobianShard

    check_out(out)
    if group is None:
        J = run.jacobian(model, inputs, group=False, **kw)
        return JacobianShard(J, 0, J.shape[0], [J.shape[0]], None)
    with run_context(model, matmul_precision(kw["precision"])):
        comm = None
        try:
            comm = Comm(group, _where(model))
            result = _jacobian(comm, model, inputs, out, kw)
            if _REPLICATED and out == "full":
                result = _everywhere(comm, {"J": result})["J"]
            return result
        except BaseException as err:
            if comm is not None:
                comm.failed(err)
            raise


def _jacobian(comm: Comm, model, inputs, out: str, kw: dict):
    from ..sharded import JacobianShard

    job, batches, n, _, _ = _prepare(comm, model, inputs, None, kw)
    _check_same(comm, job, {"precision": kw["precision"], "rows": n}, batches)
    listed = blocks(batches, job.block_size)
    every = _listed_shares(listed, comm.world, n)
    share = every[comm.rank]
    mine = [(s, b) for s, b in listed if share.first <= s < share.end]
    engine = job.engine()
    found = self_checked(iterate_blocks(engine, mine), engine, job, mine, n)
    parts = [J for _, J, _ in found]
    got = sorted({int(J.shape[1]) for J in parts})
    C = max(c for cs in comm.all_gather_object(got, "agreeing on the outputs") for c in cs)
    P = job.plan.num_columns
    local = torch.cat(parts) if parts else torch.empty(0, C, P, dtype=job.dtype, device=job.device)
    if local.shape[1] != C:
        raise ValueError(f"the output gave C = {local.shape[1]} on one rank and C = {C} on another")
    if out == "shard":
        return JacobianShard(local, share.first, n, [sh.n for sh in every], comm)
    starts = [sh.first for sh in every] + [n]
    dest = None
    if comm.rank == 0:
        dest = torch.empty(n, C * P, dtype=local.dtype, device=local.device)
        dest[: share.n] = local.reshape(share.n, C * P)
    gather_rows(comm, local.reshape(share.n, C * P), starts, dest, 0)
    return None if dest is None else dest.view(n, C, P)


class _Run:
    """One distributed kernel run (see the module docstring)."""

    def __init__(self, comm: Comm, model, inputs, inputs2, out: str, kw: dict):
        self.comm, self.model, self.out, self.kw = comm, model, out, kw
        self.inputs, self.inputs2 = inputs, inputs2
        self.rank, self.world = comm.rank, comm.world
        self.cross = inputs2 is not None

    # --- set-up

    def run(self):
        t0 = time.perf_counter()
        kw, comm = self.kw, self.comm
        job, batches, n_rows, batches2, n_cols = _prepare(
            comm, self.model, self.inputs, self.inputs2, kw
        )
        self.job, self.n_rows, self.n_cols = job, n_rows, n_cols
        self.kdtype = kernel_dtype(parameter_dtype(self.model))
        groups = kw["groups"]
        cols = job.plan.num_columns
        self.spans = (
            {"all": [slice(0, cols)]} if groups is None else group_columns(job.selected, groups)
        )
        settings = dict(
            kernel=kw["kernel"], outputs=kw["outputs"], precision=kw["precision"],
            groups=self.spans, rows=n_rows, cols=n_cols, cross=self.cross,
            kernel_dtype=str(self.kdtype), ranks=self.world,
        )  # fmt: skip
        _check_same(comm, job, settings, batches + (batches2 or []))
        self._open_checkpoint(settings, batches + (batches2 or []))
        size = self.block_size
        self.listed_rows = blocks(batches, size)
        self.rows = _listed_shares(self.listed_rows, self.world, n_rows)
        if self.cross:
            self.listed_cols = blocks(batches2, size)
            self.cols = _listed_shares(self.listed_cols, self.world, n_cols)
        self.ops = run._CurrentOps(job)
        self.engine = job.engine()
        self.jdtype = torch.int8 if kw["kernel"] == "signgd" else job.dtype
        budget = store_budget(job.device, kw["jacobian_memory"])
        self.store = JacobianStore(job.device, budget)
        self.store2 = JacobianStore(job.device, budget) if self.cross else None
        own = self.rows[self.rank].n + (self.cols[self.rank].n if self.cross else 0)
        self.bar = run._progress(kw["progress"], own) if self.rank == 0 else None
        try:
            self._compute()
        finally:
            if self.bar is not None:
                self.bar.close()
        result = self._result()
        comm.stats.seconds_total = time.perf_counter() - t0
        global _LAST
        _LAST = comm.stats
        return result

    def _open_checkpoint(self, settings: dict, batches: list) -> None:
        kw, comm = self.kw, self.comm
        self.ckpt = None
        self.block_size = self.job.block_size
        self.in_file = isinstance(kw["out_device"], str) and kw["out_device"] == "checkpoint"
        if self.in_file and kw["checkpoint"] is None:
            raise ValueError(
                "out_device='checkpoint' is K in the file of checkpoint=DIR; pass both"
            )
        if kw["checkpoint"] is not None:
            self.ckpt = run._open_checkpoint(
                kw["checkpoint"], self.job, settings, batches, kw["output"],
                meta_name=f"meta.rank{self.rank}.json",
            )  # fmt: skip
            sizes = comm.all_gather_object(self.ckpt.block_size, "opening the checkpoint")
            if len(set(sizes)) > 1:
                raise ValueError(
                    f"checkpoint {kw['checkpoint']}: the ranks' meta files disagree on the block "
                    f"size ({sizes}); delete the directory to start over"
                )
            self.block_size = sizes[0]
        marks = (
            {} if self.ckpt is None else {s: self.ckpt.finished(s) for s in self.ckpt.meta["done"]}
        )
        self.marks = comm.all_gather_object(marks, "reading the checkpoint")

    def _done(self, rank: int, side: str, start: int) -> bool:
        return start in self.marks[rank].get(side, {})

    # --- the J streams and K's slabs

    def _stream(self, side: str, listed: list, share: _Share):
        mine = [(s, b) for s, b in listed if share.first <= s < share.end]
        ckpt = self.ckpt
        if ckpt is None:
            found = iterate_blocks(self.engine, mine, self.bar)
        else:
            load = lambda s: ckpt.load(side, s)  # noqa: E731
            found = iterate_blocks(self.engine, mine, self.bar, ckpt.finished(side), load)
        total = self.n_rows + (self.n_cols if self.cross else 0)
        found = self_checked(found, self.engine, self.job, mine, total, self.kw["kernel"])
        return signs.for_kernel(found, self.kw["kernel"], signs.SignRows(self.job, mine))

    def _agree_outputs(self, firsts: list) -> int:
        """C from the first block of each rank (ranks without samples have none)."""
        mine = [int(J.shape[1]) for f in firsts if f is not None for _, J, _ in [f]]
        found = self.comm.all_gather_object(sorted(set(mine)), "agreeing on the outputs")
        seen = sorted({c for cs in found for c in cs})
        if not seen:
            raise ValueError("no rank computed a Jacobian block: the inputs hold no sample")
        if len(seen) > 1:
            raise ValueError(
                f"the output gave C = {seen[1]} on one rank and C = {seen[0]} on another"
            )
        return seen[0]

    def _allocate(self, C: int) -> None:
        kw = self.kw
        self.C = C
        self.per = per = 1 if kw["outputs"] == "trace" or C == 1 else C
        width = self.n_cols * per
        share = self.rows[self.rank]
        lo, hi = share.first * per, share.end * per
        out_dev = (
            self.job.device
            if kw["out_device"] is None or self.in_file
            else torch.device(kw["out_device"])
        )
        self.out_dev = out_dev
        self.K, self.slab = {}, {}
        if self.ckpt is not None:
            # rank 0 creates and reserves the files before anyone writes into them
            for turn in (0, 1):
                if (self.rank == 0) == (turn == 0):
                    for name in self.spans:
                        self.K[name] = self.ckpt.kernel(
                            name, self.n_rows * per, self.n_cols * per, self.kdtype, per
                        )
                self.comm.barrier("creating the kernel files")
            self.slab = {name: K[lo:hi] for name, K in self.K.items()}
            return
        for name in self.spans:
            if self.rank == 0 and self.out == "full":
                self.K[name] = torch.empty(
                    self.n_rows * per, width, dtype=self.kdtype, device=out_dev
                )
                self.slab[name] = self.K[name][lo:hi]
            else:
                self.slab[name] = torch.empty(hi - lo, width, dtype=self.kdtype, device=out_dev)

    def _finisher(self, base_rows: int, base_cols: int):
        """``assemble``'s on_finish for this rank's share: the checkpoint marks, with the
        regions its tiles wrote (global sample ranges) and J always kept (later steps and
        a resume need it)."""
        ckpt = self.ckpt
        if ckpt is None:
            return None
        share = self.rows[self.rank]

        def finish(side, start, J, keep):
            start += base_rows if side == "rows" else base_cols
            end = start + int(J.shape[0])
            if side == "cols":
                region = []
            elif self.cross:
                c = self.cols[self.rank]
                region = [[start, end, c.first, c.end]]
            else:
                region = [[share.first, end, start, end]]
                if start > share.first:
                    region.append([start, end, share.first, start])
            ckpt.finish(side, start, J, True, region)

        return finish

    # --- the steps

    def _compute(self) -> None:
        r = self.rank
        rows = self._stream("rows", self.listed_rows, self.rows[r])
        first = next(rows, None)
        cols = first2 = None
        if self.cross:
            cols = self._stream("cols", self.listed_cols, self.cols[r])
            first2 = next(cols, None)
        self._allocate(self._agree_outputs([first, first2]))
        rows = itertools.chain([first], rows) if first is not None else iter(())
        if self.cross:
            cols = itertools.chain([first2], cols) if first2 is not None else iter(())
        self._step0(rows, cols)
        # the blocks each rank actually holds (a block that ran out of GPU memory was split)
        held = [s for s, _ in self.store.blocks]
        held2 = [s for s, _ in self.store2.blocks] if self.cross else []
        sizes = {s: int(J.shape[0]) for s, J in self.store.blocks}
        sizes2 = {s: int(J.shape[0]) for s, J in self.store2.blocks} if self.cross else {}
        everyone = self.comm.all_gather_object(
            ([(s, sizes[s]) for s in held], [(s, sizes2[s]) for s in held2]), "listing the blocks"
        )
        self.held = [e[0] for e in everyone]
        self.held2 = [e[1] for e in everyone]
        if self.cross:
            for s in range(1, self.world):
                self._ring_step(s, half=False)
        else:
            for s in range(1, self.world // 2 + 1):
                self._ring_step(s, half=self.world % 2 == 0 and s == self.world // 2)

    def _step0(self, rows, cols) -> None:
        """The tiles among this rank's own blocks: ``gram.assemble`` on its share."""
        r, kw = self.rank, self.kw
        base = self.rows[r].first
        if self.cross:
            base2 = self.cols[r].first
            c = self.cols[r]
            view = {
                name: S[:, c.first * self.per : c.end * self.per] for name, S in self.slab.items()
            }
            kept = self._keep(rows, self.store, base)
            shifted2 = ((s - base2, J, d) for s, J, d in cols)
            assemble(
                kept, shifted2, self.spans, kw["kernel"], kw["outputs"], self.ops, self.kdtype,
                _Shifted(self.store2, base2), lambda name, per: view[name],
                self._finisher(base, base2),
            )  # fmt: skip
            self.comm.stats.tiles += self.rows[r].n * c.n
            return
        share = self.rows[r]
        view = {
            name: S[:, share.first * self.per : share.end * self.per]
            for name, S in self.slab.items()
        }
        shifted = ((s - base, J, d) for s, J, d in rows)
        assemble(
            shifted, None, self.spans, kw["kernel"], kw["outputs"], self.ops, self.kdtype,
            _Shifted(self.store, base), lambda name, per: view[name], self._finisher(base, 0),
        )  # fmt: skip
        self.comm.stats.tiles += share.n * (share.n + 1) // 2

    def _keep(self, stream, store: JacobianStore, base: int):
        """The cross kernel's X blocks, kept for the later steps (``assemble`` drops them)."""
        for s, J, d in stream:
            store.add(s, J)
            yield s - base, J, d

    def _ring_step(self, s: int, half: bool) -> None:
        """Step s: the blocks of rank r+s visit rank r (see the module docstring)."""
        r, G = self.rank, self.world
        src, dst = (r + s) % G, (r - s) % G
        mine = self.held2[r] if self.cross else self.held[r]
        theirs = self.held2[src] if self.cross else self.held[src]
        rows_mine, rows_dst = self.held[r], self.held[dst]
        mirror = f"mirror{s}"

        def needed(x: int, owner: int, start: int) -> bool:
            if not self.held[x]:
                return False  # no rows: nothing to compute
            done = self._done(x, "tiles", start)
            return not (done and (self.cross or self._done(owner, mirror, start)))

        recv = [(b, n) for b, n in theirs if needed(r, src, b)]
        send = [(b, n) for b, n in mine if needed(dst, r, b)]
        store = self.store2 if self.cross else self.store
        by_start = dict(store.blocks)
        P = self.job.plan.num_columns
        C = self.C

        tag = self.comm.tag

        def post_j(t: int):
            sends, recvs, bufs = [], [], None
            if t < len(send):
                J = by_start[send[t][0]].to(self.comm.device).contiguous()
                sends.append((J.view(-1).view(torch.uint8), dst, tag(s, 0, t)))
            if t < len(recv):
                nbytes = recv[t][1] * C * P * self.jdtype.itemsize
                bufs = torch.empty(nbytes, dtype=torch.uint8, device=self.comm.device)
                recvs.append((bufs, src, tag(s, 0, t)))
            return self.comm.exchange(sends, recvs, f"exchanging Jacobian blocks (step {s})"), bufs

        pending = post_j(0)
        for t in range(max(len(recv), len(send))):
            handle, buf = pending
            self.comm.wait(handle)
            if t + 1 < max(len(recv), len(send)):
                pending = post_j(t + 1)
            strip = None
            if t < len(recv):
                b, n = recv[t]
                Jb = buf.view(self.jdtype).view(n, C, P).to(self.job.device)
                strip = self._visit(b, Jb, src, rows_mine, half)
            if self.cross:
                continue
            # the mirrored tiles: ours go to the visiting block's owner, dst's come to us
            sends = []
            if strip is not None:
                sends.append((strip.to(self.comm.device).contiguous(), src, tag(s, 1, t)))
            recvs, incoming = [], None
            if t < len(send):
                k, nk = send[t]
                width = sum(n for _, n in rows_dst) * self.per
                incoming = torch.empty(
                    len(self.spans),
                    nk * self.per,
                    width,
                    dtype=self.kdtype,
                    device=self.comm.device,
                )
                recvs.append((incoming, dst, tag(s, 1, t)))
            self.comm.wait(
                self.comm.exchange(sends, recvs, f"exchanging mirrored tiles (step {s})")
            )
            if incoming is not None:
                self._write_mirror(k, nk, incoming, dst, rows_dst, half, mirror)

    def _visit(self, b: int, Jb: torch.Tensor, owner: int, rows_mine: list, half: bool):
        """Tiles between every own row block and the visiting block ``b``: written into the
        slab, their mirror images returned as ``[groups, n_b*per, n_own*per]``."""
        kw, per = self.kw, self.per
        n_b = int(Jb.shape[0])
        ib = [s for s, _ in (self.held2[owner] if self.cross else self.held[owner])].index(b)
        first = self.rows[self.rank].first
        strip = None
        if not self.cross:
            n_own = sum(n for _, n in rows_mine)
            strip = torch.zeros(
                len(self.spans), n_b * per, n_own * per, dtype=self.kdtype, device=self.job.device
            )
        symmetric = kw["kernel"] != "asym_signgd"
        region = []
        for ia, (a, Ja) in enumerate(self.store):
            if half and not parity_owner(self.rank, owner, ia, ib):
                continue
            n_a = int(Ja.shape[0])
            ra, cb = (a - first) * per, b * per
            region.append([a, a + n_a, b, b + n_b])
            for g, (name, spans) in enumerate(self.spans.items()):

                def tile(Ji, Jj, spans=spans):
                    return kernel_tile(
                        self.ops, Ji, Jj, spans, kw["kernel"], kw["outputs"], False, self.kdtype
                    )

                if self.cross:
                    own = tile(Ja, Jb)
                elif symmetric and b < a:  # the earlier block first, as one process does
                    back = tile(Jb, Ja)
                    own = back.t()
                elif symmetric:
                    own = tile(Ja, Jb)
                    back = own.t()
                else:  # asym_signgd: <sign J_a, J_b> and <sign J_b, J_a>, both computed
                    own, back = tile(Ja, Jb), tile(Jb, Ja)
                self.slab[name][ra : ra + n_a * per, cb : cb + n_b * per].copy_(own)
                if not self.cross:
                    strip[g, :, ra : ra + n_a * per].copy_(back)
            self.comm.stats.tiles += n_a * n_b
        if self.ckpt is not None:
            self.ckpt.finish("tiles", b, Jb, False, region)
        return strip

    def _write_mirror(
        self, k: int, nk: int, incoming, dst: int, rows_dst: list, half: bool, side: str
    ):
        """Rows of own block ``k`` at the columns of rank dst's blocks: the tiles dst
        computed (all of them, or its parity half)."""
        per = self.per
        first = self.rows[self.rank].first
        dfirst = self.rows[dst].first
        rk = (k - first) * per
        ik = [s for s, _ in self.held[self.rank]].index(k)
        region = []
        for ja, (a, na) in enumerate(rows_dst):
            if half and not parity_owner(dst, self.rank, ja, ik):
                continue
            ca = (a - dfirst) * per
            region.append([k, k + nk, a, a + na])
            for g, name in enumerate(self.spans):
                self.slab[name][rk : rk + nk * per, a * per : (a + na) * per].copy_(
                    incoming[g, :, ca : ca + na * per]
                )
        if self.ckpt is not None:
            self.ckpt.finish(side, k, torch.empty(nk, 0), False, region)

    # --- the result

    def _result(self):
        from ..sharded import KernelShard

        kw, comm = self.kw, self.comm
        C, per = self.C, self.per
        trace = kw["outputs"] == "trace" or C == 1
        shape = (self.n_rows, self.n_cols) if trace else (self.n_rows, C, self.n_cols, C)
        if self.out == "shard":
            counts = [sh.n * per for sh in self.rows]
            out = {}
            for name, S in self.slab.items():
                local = S if self.in_file or self.ckpt is None else S.to(self.out_dev, copy=True)
                out[name] = KernelShard(
                    local, self.rows[self.rank].first, self.n_rows, self.n_cols, per,
                    counts, comm, not self.cross and kw["kernel"] != "asym_signgd",
                )  # fmt: skip
            comm.barrier("finishing")
            return out
        if self.ckpt is not None:
            comm.barrier("finishing the kernel file")
            if self.rank != 0:
                return None
            K = (
                self.K
                if self.in_file
                else {n: k.to(self.out_dev, copy=True) for n, k in self.K.items()}
            )
            return {name: k.view(shape) for name, k in K.items()}
        self._gather()
        if self.rank != 0:
            return None
        return {name: k.view(shape) for name, k in self.K.items()}

    def _gather(self) -> None:
        """Every slab to rank 0."""
        starts = [sh.first * self.per for sh in self.rows] + [self.n_rows * self.per]
        for g, name in enumerate(self.spans):
            gather_rows(self.comm, self.slab[name], starts, self.K.get(name), g)


def gather_rows(comm: Comm, local: torch.Tensor, starts: list[int], dest, index: int) -> None:
    """Rank q's ``local`` rows into ``dest[starts[q]:starts[q+1]]`` on rank 0, in messages of at
    most ``_CHUNK`` bytes (rank 0's own rows are expected in ``dest`` already)."""
    # from the row width, not the row count: every rank must cut the same chunks
    rows = max(1, _CHUNK // max(1, local.shape[1] * local.element_size()))
    for q in range(1, comm.world):
        if comm.rank not in (0, q):
            continue
        total = starts[q + 1] - starts[q]
        for c, i in enumerate(range(0, total, rows)):
            j = min(total, i + rows)
            tag = comm.tag(0, 2, (index << 10) | c)
            if comm.rank == q:
                part = local[i:j].to(comm.device).contiguous()
                comm.wait(comm.exchange([(part, 0, tag)], [], "sending its rows to rank 0"))
                continue
            part = dest[starts[q] + i : starts[q] + j]
            direct = part.device == comm.device and part.is_contiguous()
            buf = part if direct else torch.empty(part.shape, dtype=part.dtype, device=comm.device)
            comm.wait(comm.exchange([], [(buf, q, tag)], f"receiving the rows of rank {q}"))
            if not direct:
                part.copy_(buf)


class _Shifted:
    """A ``JacobianStore`` seen with sample starts relative to the share's first sample
    (``assemble`` writes into the share's own columns)."""

    def __init__(self, store: JacobianStore, base: int):
        self._store, self._base = store, base

    @property
    def num_outputs(self):
        return self._store.num_outputs

    def add(self, start: int, J: torch.Tensor) -> None:
        self._store.add(start + self._base, J)

    def __iter__(self):
        for start, J in self._store:
            yield start - self._base, J
