"""Decoding large requests off the event loop, on a few threads, with a bound on how many wait."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from .errors import Overloaded

__all__ = ["OffloadDecoder"]

T = TypeVar("T")


class OffloadDecoder:
    """Runs the decoding of large requests on `threads` threads instead of the event loop, with at most
    `max_waiting` decodes queued or running; beyond it `Overloaded` at once. Small requests (under `min_bytes`)
    are decoded in place: a thread hop costs more than their decoding."""

    def __init__(self, *, min_bytes: int, threads: int, max_waiting: int) -> None:
        self.min_bytes = min_bytes
        self.max_waiting = max_waiting
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="embserve-decode")
        self.waiting = 0

    async def run(self, nbytes: int, decode: Callable[[], T]) -> T:
        if nbytes < self.min_bytes:
            return decode()
        if self.waiting >= self.max_waiting:
            raise Overloaded(
                f"{self.waiting} large requests are being decoded, the server's max_decode_queue; retry later"
            )
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, decode)
        finally:
            self.waiting -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
