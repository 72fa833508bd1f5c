"""A killed run, simulated: stop the kernel run after some Jacobian blocks."""

from __future__ import annotations


class Interrupt(Exception):
    pass


def stop_after_blocks(monkeypatch, blocks: int | None) -> list[int]:
    """Record the start of each Jacobian block computed; raise ``Interrupt`` after ``blocks``
    of them (None: never). The output function stays the same, so the checkpoint's key does
    too."""
    from linft.kernel.engine import JacobianEngine

    real = getattr(JacobianEngine.block, "__wrapped__", JacobianEngine.block)
    calls = []

    def block(self, batch, start):
        calls.append(start)
        if blocks is not None and len(calls) > blocks:
            raise Interrupt
        return real(self, batch, start)

    block.__wrapped__ = real
    monkeypatch.setattr(JacobianEngine, "block", block)
    return calls
