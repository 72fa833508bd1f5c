"""Resumable kernels: K in a memory-mapped file, finished J blocks on disk.

A checkpoint directory holds ``meta.json`` (what is being computed, which blocks
are finished and their checksums), one ``K_<group>.bin`` per kernel (float32/64,
row-major, preallocated, mapped with ``torch.from_file``) and
``J_<side>_<start>.safetensors`` for the finished blocks whose Jacobians later
tiles still need. A block is marked finished only after all of its tiles are in K
and its J is saved, so a run killed at any point resumes by recomputing at most
the block it was on.

A checkpoint is opened only by the computation that made it: its key hashes
everything that changes K (``identity.computation_parts``, the fingerprint the
ranks of a distributed run compare too). A resume with any part changed is
refused, naming what differs.

Each finished block records a CRC-32 of its J file and of the region of every K
its tiles wrote; a resume checks K's size and these sums before using them, so a
file cut short, deleted or damaged is an error that names it, never zeros or
stray bits in K. (CRC-32 finds damage, not deliberate edits.)
"""

from __future__ import annotations

import errno
import json
import os
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

from .identity import PARTS, _sha

META = "meta.json"
FORMAT = 2  # layout of meta.json
_CHUNK = 1 << 24  # bytes per step when summing K or filling it with zeros
_FIX = "delete the directory {dir} to start over"


class CheckpointError(ValueError):
    """A checkpoint directory that holds another computation or damaged files."""


# --- files ---------------------------------------------------------------------------


def _preallocate(path: Path, nbytes: int) -> None:
    """Reserve the file's blocks on disk now: writes to a memory map past a full disk end
    the process with SIGBUS, a failed reservation is an ``OSError`` before any tile.
    Data already in the file stays (a resume, or another process sharing it)."""
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size > nbytes:
            os.ftruncate(fd, nbytes)
        fallocate = getattr(os, "posix_fallocate", None)  # absent on macOS
        try:
            if fallocate is None:
                raise OSError(errno.ENOSYS, "posix_fallocate is not available")
            fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            _fill_zeros(fd, min(size, nbytes), nbytes)  # no fallocate on this system or disk
    except OSError as e:
        os.close(fd)
        fd = -1
        if created:
            path.unlink(missing_ok=True)
        raise OSError(
            e.errno,
            f"cannot reserve {nbytes} bytes for the kernel file {path.name} in {path.parent} "
            f"({e.strerror}); free space on that disk, or pass checkpoint= a directory on a "
            "disk with room",
        ) from e
    finally:
        if fd >= 0:
            os.close(fd)


def _fill_zeros(fd: int, start: int, stop: int) -> None:
    zeros = bytes(min(_CHUNK, max(stop - start, 0)))
    pos = start
    while pos < stop:
        pos += os.pwrite(fd, zeros[: stop - pos], pos)


def _write_atomic(path: Path, data: bytes, sync: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic: a crash leaves the old or the new file
    except OSError as e:
        tmp.unlink(missing_ok=True)
        # A full disk, a quota or a file size limit: the finished blocks stay resumable.
        raise OSError(
            e.errno,
            f"cannot write {path.name} ({len(data)} bytes) in the checkpoint {path.parent} "
            f"({e.strerror or e}); free space on that disk (or raise the file size limit) and "
            "run again to resume, or pass checkpoint= a directory on a disk with room",
        ) from e


def _make_directory(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise CheckpointError(
            f"checkpoint={str(path)!r} is a file, not a directory; pass checkpoint= a directory "
            "(it is created if missing)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        # A file on the way (NotADirectoryError), no permission, a read-only disk.
        raise CheckpointError(
            f"cannot create the checkpoint directory {path} ({e.strerror or e}); pass "
            "checkpoint= a directory this process can create and write"
        ) from e


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


class Checkpoint:
    """One computation's checkpoint directory (see the module docstring).

    ``key``: the computation's key, or a mapping part -> hash (``computation_parts``)
    so that a refused resume names the parts that differ. ``meta_name``: the meta
    file; processes that share the directory and write disjoint regions of K keep one
    each. ``cross``: the cross kernel K(X, X2), whose row blocks write whole rows.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        key: str | Mapping[str, str],
        block_size: int,
        meta_name: str = META,
        *,
        cross: bool = False,
    ):
        self.dir = Path(directory)
        self.meta_name = meta_name
        self.cross = cross
        self._maps: dict[str, torch.Tensor] = {}
        parts = dict(key) if isinstance(key, Mapping) else None
        key = _sha(parts) if parts is not None else key
        _make_directory(self.dir)
        meta_path = self.dir / meta_name
        if meta_path.exists():
            meta = self._read_meta(meta_path)
            if meta.get("format") != FORMAT:
                raise CheckpointError(
                    f"checkpoint {self.dir} was written by another version of linft; {self._fix()}"
                )
            if meta.get("key") != key:
                raise CheckpointError(self._different(meta.get("parts"), parts))
            self.meta = meta
            self._check_layout(meta_path.name)
            self._verify()
        else:
            self.meta = {
                "format": FORMAT,
                "key": key,
                "parts": parts,
                "block_size": block_size,
                "done": {"rows": {}, "cols": {}},
                "sums": {"rows": {}, "cols": {}},
                "kernels": {},
            }
            self._save_meta()

    @property
    def block_size(self) -> int:
        return int(self.meta["block_size"])

    def finished(self, side: str) -> dict[int, int]:
        """start -> number of samples of the finished blocks of one side."""
        return {int(s): int(n) for s, n in self.meta["done"].get(side, {}).items()}

    def kernel(
        self, name: str, rows: int, cols: int, dtype: torch.dtype, per: int = 1
    ) -> torch.Tensor:
        """The memory-mapped ``[rows, cols]`` kernel of group ``name``, ``per`` rows per
        sample (C for ``outputs="full"``); preallocated on first use."""
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
        record = {
            "file": f"K_{safe}.bin",
            "rows": rows,
            "cols": cols,
            "dtype": str(dtype),
            "per": per,
        }
        known = self.meta["kernels"].get(name)
        if self._any_done():
            if known != record:
                raise CheckpointError(
                    f"checkpoint {self.dir} holds the kernel {name!r} as {known}, but this run "
                    f"makes {record}; {self._fix()}"
                )
            return self._map(name)
        _preallocate(self.dir / record["file"], rows * cols * dtype.itemsize)
        if known != record:
            self.meta["kernels"][name] = record
            self._save_meta()
        self._maps.pop(name, None)
        return self._map(name)

    def load(self, side: str, start: int, check: bool = True) -> torch.Tensor:
        """The saved J of a finished block, checked against its checksum (``check=False``:
        a file this process has checked already)."""
        from safetensors.torch import load as from_bytes

        path = self._j_path(side, start)
        sums = self.meta["sums"][side].get(str(start), {})
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(self._damaged(path, side, start, "is missing")) from None
        if len(data) != sums.get("J_bytes", len(data)):
            raise CheckpointError(self._damaged(path, side, start, "was cut short"))
        if check and "J" in sums and zlib.crc32(data) != sums["J"]:
            raise CheckpointError(self._damaged(path, side, start, "is damaged (checksum)"))
        return from_bytes(data)["J"]

    def finish(
        self, side: str, start: int, J: torch.Tensor, keep: bool, region: list | None = None
    ) -> None:
        """Mark a block finished once its tiles are in K: save its J if ``keep`` and the
        checksums of its J file and of each kernel's ``region`` (sample ranges
        ``[r0, r1, c0, c1]``; default: what the single-process run writes for it)."""
        n = int(J.shape[0])
        sums: dict = {}
        if keep:
            from safetensors.torch import save

            data = save({"J": J.detach().cpu().contiguous()})
            _write_atomic(self._j_path(side, start), data)
            sums.update(J=zlib.crc32(data), J_bytes=len(data))
        regions = self._regions(side, start, n) if region is None else [list(r) for r in region]
        sums["regions"] = regions
        sums["K"] = {name: self._region_sum(name, regions) for name in self.meta["kernels"]}
        self.meta["sums"].setdefault(side, {})[str(start)] = sums  # any side: distributed.py
        self.meta["done"].setdefault(side, {})[str(start)] = n
        self._save_meta()

    # --- internals

    def _fix(self) -> str:
        return _FIX.format(dir=self.dir)

    def _any_done(self) -> bool:
        return any(self.meta["done"].values())

    def _j_path(self, side: str, start: int) -> Path:
        return self.dir / f"J_{side}_{start}.safetensors"

    def _map(self, name: str) -> torch.Tensor:
        if name not in self._maps:
            rec = self.meta["kernels"][name]
            rows, cols = rec["rows"], rec["cols"]
            path = str(self.dir / rec["file"])
            K = torch.from_file(path, shared=True, size=rows * cols, dtype=_dtype(rec["dtype"]))
            self._maps[name] = K.view(rows, cols)
        return self._maps[name]

    def _regions(self, side: str, start: int, n: int) -> list:
        end = start + n
        if side == "cols" or not self.meta["kernels"]:
            return []  # X2 blocks write no tile when they finish
        if self.cross:
            rec = next(iter(self.meta["kernels"].values()))
            return [[start, end, 0, rec["cols"] // rec["per"]]]
        # block j of K(X, X) writes tiles (i, j), i <= j, and their mirrors (j, i)
        return [[0, end, start, end]] + ([[start, end, 0, start]] if start else [])

    def _region_sum(self, name: str, regions: list) -> int:
        K, per = self._map(name), self.meta["kernels"][name]["per"]
        crc = 0
        for r0, r1, c0, c1 in regions:
            part = K[r0 * per : r1 * per, c0 * per : c1 * per]
            step = max(1, _CHUNK // max(1, part.shape[1] * part.element_size()))
            for i in range(0, part.shape[0], step):
                chunk = part[i : i + step].contiguous().view(torch.uint8).numpy()
                crc = zlib.crc32(chunk, crc)
        return crc

    def _check_layout(self, name: str) -> None:
        """The metadata has every field a resume reads, of the type it reads (an edited or
        half-damaged file is named, never a ``KeyError`` deep inside a resume)."""
        meta, problem = self.meta, None
        try:
            int(meta["block_size"])
            for side in ("rows", "cols"):
                for start, n in meta["done"][side].items():
                    int(start), int(n)
                    sums = meta["sums"][side][start]
                    if not isinstance(sums["K"], dict) or not isinstance(sums["regions"], list):
                        raise TypeError("checksums")
                    if "J" in sums:
                        int(sums["J_bytes"])
            for rec in meta["kernels"].values():
                str(rec["file"]), int(rec["rows"]), int(rec["cols"]), _dtype(rec["dtype"])
        except KeyError as e:
            problem = f"it has no {e.args[0]!r} entry where a finished block needs one"
        except (TypeError, ValueError, AttributeError) as e:
            problem = f"a field has the wrong type ({e})"
        if problem is not None:
            raise CheckpointError(
                f"checkpoint {self.dir}: {name} is damaged or was edited: {problem}; {self._fix()}"
            )

    def _verify(self) -> None:
        """Before any use: every kernel file of finished blocks present at its size, their
        regions and J files as they were written."""
        done = [
            (side, int(s), n)
            for side in self.meta["done"]
            for s, n in self.meta["done"][side].items()
        ]
        if not done:
            return
        for rec in self.meta["kernels"].values():
            path = self.dir / rec["file"]
            want = rec["rows"] * rec["cols"] * _dtype(rec["dtype"]).itemsize
            if not path.exists():
                raise CheckpointError(
                    f"checkpoint {self.dir}: the kernel file {path.name} is missing, but "
                    f"{len(done)} finished blocks were written to it; {self._fix()}"
                )
            if path.stat().st_size != want:
                raise CheckpointError(
                    f"checkpoint {self.dir}: the kernel file {path.name} has "
                    f"{path.stat().st_size} bytes, not {want} (cut short or replaced); "
                    f"{self._fix()}"
                )
        for side, start, n in done:
            sums = self.meta["sums"][side][str(start)]
            path = self._j_path(side, start)
            if "J" in sums and not path.exists():
                raise CheckpointError(self._damaged(path, side, start, "is missing"))
            if "J" in sums and path.stat().st_size != sums["J_bytes"]:
                raise CheckpointError(self._damaged(path, side, start, "was cut short"))
            for name, crc in sums["K"].items():
                if self._region_sum(name, sums["regions"]) != crc:
                    file = self.meta["kernels"][name]["file"]
                    raise CheckpointError(
                        f"checkpoint {self.dir}: the kernel file {file} is damaged in the "
                        f"tiles of {side} block {start}..{start + n - 1} (checksum); "
                        f"{self._fix()}"
                    )

    def _damaged(self, path: Path, side: str, start: int, what: str) -> str:
        n = self.meta["done"][side].get(str(start), 0)
        return (
            f"checkpoint {self.dir}: the Jacobian file {path.name} of the finished {side} "
            f"block {start}..{start + n - 1} {what}; {self._fix()}"
        )

    def _different(self, theirs, ours) -> str:
        what = "other model weights, inputs or settings"
        if isinstance(theirs, dict) and isinstance(ours, dict):
            changed = [PARTS.get(p, p) for p in ours if theirs.get(p) != ours.get(p)]
            what = "; ".join(changed) or what
        return (
            f"checkpoint {self.dir} holds a different computation ({what} changed); pass a "
            f"new directory, or {self._fix()}"
        )

    def _read_meta(self, path: Path) -> dict:
        try:
            meta = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(
                f"checkpoint {self.dir}: {path.name} is damaged (not JSON); {self._fix()}"
            ) from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {self.dir}: {path.name} is damaged; {self._fix()}")
        return meta

    def _save_meta(self) -> None:
        _write_atomic(self.dir / self.meta_name, json.dumps(self.meta).encode(), sync=True)
