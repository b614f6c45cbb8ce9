"""One result for many askers: what /health and /metrics serve when scraped hard (status.py)."""

import asyncio
import time
from collections.abc import Awaitable, Callable

# How long one result serves every asker.
SHARED_FOR_S = 1.0


class Shared:
    """`make()`'s result, made at most once per `ttl_s`: askers meanwhile share it, or the one making.

    A failed make is not kept. An asker that leaves does not cancel the making the others wait on."""

    def __init__(self, make: Callable[[], Awaitable], ttl_s: float = SHARED_FOR_S):
        self.make, self.ttl_s = make, ttl_s
        self._future: asyncio.Future | None = None
        self._made_at = float("-inf")

    async def get(self):
        future = self._future
        stale = future is None or (future.done() and (future.cancelled() or future.exception() is not None
                                                      or time.monotonic() - self._made_at >= self.ttl_s))
        if stale:
            self._made_at = time.monotonic()
            future = self._future = asyncio.ensure_future(self.make())
        return await asyncio.shield(future)
