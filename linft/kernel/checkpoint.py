"""Resumable kernels: K in a memory-mapped file, finished J blocks on disk.

A checkpoint directory holds ``meta.json`` (what is being computed and which
blocks are finished), one ``K_<group>.bin`` per kernel (float32/64, row-major,
mapped with ``torch.from_file``) and ``J_<side>_<start>.safetensors`` for the
finished blocks whose Jacobians later tiles still need. A block is marked
finished only after all of its tiles are in K and its J is saved, so a run
killed at any point resumes by recomputing at most the block it was on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

META = "meta.json"


def fingerprint(parts: dict, tensors: list[torch.Tensor]) -> str:
    """Hash of the computation's settings and of every input and parameter value it reads."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Checkpoint:
    def __init__(self, directory: str | os.PathLike, key: str, block_size: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / META
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta["key"] != key:
                raise ValueError(
                    f"checkpoint {self.dir} holds a different computation (other model weights, "
                    "inputs or settings); pass a new directory, or delete this one to start over"
                )
            self.meta = meta
        else:
            self.meta = {"key": key, "block_size": block_size, "done": {"rows": {}, "cols": {}}}
            self._save_meta()

    @property
    def block_size(self) -> int:
        return int(self.meta["block_size"])

    def finished(self, side: str) -> dict[int, int]:
        """start -> number of samples of the finished blocks of one side."""
        return {int(s): int(n) for s, n in self.meta["done"][side].items()}

    def kernel(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
        path = self.dir / f"K_{safe}.bin"
        size = rows * cols
        if (
            not path.exists()
            or path.stat().st_size != size * torch.empty((), dtype=dtype).element_size()
        ):
            with open(path, "wb") as fh:
                fh.truncate(size * torch.empty((), dtype=dtype).element_size())
        return torch.from_file(str(path), shared=True, size=size, dtype=dtype).view(rows, cols)

    def load(self, side: str, start: int) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.dir / f"J_{side}_{start}.safetensors"))["J"]

    def finish(self, side: str, start: int, J: torch.Tensor, keep: bool) -> None:
        if keep:
            from safetensors.torch import save_file

            save_file(
                {"J": J.detach().cpu().contiguous()},
                str(self.dir / f"J_{side}_{start}.safetensors"),
            )
        self.meta["done"][side][str(start)] = int(J.shape[0])
        self._save_meta()

    def _save_meta(self) -> None:
        tmp = self.dir / (META + ".tmp")
        tmp.write_text(json.dumps(self.meta))
        os.replace(tmp, self.dir / META)  # atomic: a crash leaves the old or the new state
