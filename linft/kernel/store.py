"""Where Jacobian blocks wait for their later tiles: the compute device while they fit a
byte budget, pinned host memory after that."""

from __future__ import annotations

from collections.abc import Callable

import torch


def store_budget(device: torch.device, cap) -> Callable[[], float]:
    """Device bytes for stored J blocks, worked out once the first block is done (K is
    allocated by then): three quarters of what is free, cached blocks of the allocator
    included, the rest left for the next blocks' work; at most ``cap``. Blocks past it
    wait in host memory and are copied back for each later tile, so a budget that holds
    all of J is much faster; ``cap=0`` bounds device memory by one block plus K."""
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int | float) or cap < 0):
        raise ValueError(
            f"jacobian_memory must be a number of bytes >= 0 (0: every Jacobian block waits "
            f"in host memory), or None to use what the GPU has free; got {cap!r}"
        )
    if device.type != "cuda":
        return lambda: float("inf")  # J is in host memory already

    def budget() -> float:
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        room = 0.75 * (free + cached)
        return room if cap is None else min(room, float(cap))

    return budget


class JacobianStore:
    """J blocks kept for later tiles: on the compute device while they fit in
    ``budget`` bytes, in host memory (pinned, for fast copies back) after that, so
    that device memory stays bounded by the budget plus one block plus K.
    ``budget``: bytes, or a function that gives them when the first block arrives."""

    def __init__(self, device: torch.device, budget):
        self.device, self.budget, self.used = device, budget, 0
        self.blocks: list[tuple[int, torch.Tensor]] = []
        self.parked = 0  # blocks waiting in host memory

    @property
    def num_outputs(self) -> int | None:
        return self.blocks[0][1].shape[1] if self.blocks else None

    def add(self, start: int, J: torch.Tensor) -> None:
        if callable(self.budget):
            self.budget = float(self.budget())
        size = J.numel() * J.element_size()
        if self.used + size > self.budget:
            J = J.to("cpu")
            if self.device.type == "cuda":
                J = J.pin_memory()
            self.parked += 1
        else:
            self.used += size
        self.blocks.append((start, J))

    def __iter__(self):
        for start, J in self.blocks:
            yield start, J.to(self.device, non_blocking=True)
