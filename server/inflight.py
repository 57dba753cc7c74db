"""Calls in progress, across every front end: what a drain waits for before the port closes."""

from __future__ import annotations

import asyncio

__all__ = ["InFlight"]


class InFlight:
    """Counts lookups in progress (calls and stream messages, of every API) and says when there are none."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    def enter(self) -> None:
        self._count += 1
        self._idle.clear()

    def exit(self) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until nothing is in progress (or `timeout` passes); True when idle."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
