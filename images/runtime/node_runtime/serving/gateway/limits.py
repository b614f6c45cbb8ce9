"""Requests and tokens per minute, per named key: token buckets every gateway worker shares.

A key's bucket holds up to a minute's allowance and refills continuously (limit / 60 per second),
so a quiet key may burst up to its limit at once and a busy one gets its limit spread over the
minute. Requests are taken from their bucket when they arrive. Tokens are known only once answered:
a request is let in while the key's token bucket is not in debt, and its prompt + completion tokens
are taken when it ends, so one request may overshoot and the key then waits until the debt is paid.

With several gateway workers the buckets live in one file every worker maps (in the workers' shared
directory, metrics.py), each key's slot locked while it is read and written: a key's limit holds for
the gateway as a whole however its connections spread over the workers. CLOCK_MONOTONIC, which
time.monotonic reads, is one clock for every process of the machine.
"""

import fcntl
import math
import mmap
import os
import time
from contextlib import contextmanager
from pathlib import Path

from node_runtime.serving.gateway.errors import GatewayError

# Per limited key: requests level, requests refilled at, tokens level, tokens refilled at.
FIELDS = 4
SLOT_BYTES = FIELDS * 8
FILE_NAME = "rate-limits.bin"


class Buckets:
    """The levels, in this process's memory (one worker) or in the shared file (several)."""

    def __init__(self, slots: int, shared_dir: str | None):
        size = max(1, slots) * SLOT_BYTES
        self._fd = None
        if shared_dir is None:
            self._memory = bytearray(size)
        else:
            self._fd = os.open(Path(shared_dir) / FILE_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(self._fd, size)  # every worker sets the same size; a new file is zeros
            self._memory = mmap.mmap(self._fd, size)
        self.values = memoryview(self._memory).cast("d")  # zeros: "refilled at 0", i.e. full

    @contextmanager
    def locked(self, slot: int):
        """The slot to itself while read and written; other slots stay free."""
        if self._fd is None:
            yield
            return
        fcntl.lockf(self._fd, fcntl.LOCK_EX, SLOT_BYTES, slot * SLOT_BYTES)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, SLOT_BYTES, slot * SLOT_BYTES)


def refilled(level: float, at: float, now: float, per_minute: int) -> float:
    """A bucket's level at `now`: `at` 0 is a bucket never used, full."""
    if at == 0:
        return float(per_minute)
    return min(float(per_minute), level + (now - at) * per_minute / 60)


def rate_limited(name: str, what: str, per_minute: int, wait_s: float) -> GatewayError:
    seconds = max(1, math.ceil(wait_s))
    return GatewayError(429, f"rate limit reached for key '{name}' on {what} per minute (limit {per_minute}): "
                             f"try again in {seconds} s", code="rate_limit_exceeded",
                        error_type=what, headers={"Retry-After": str(seconds)})


class Limiter:
    """admit() before a limited key's request, charge() with its tokens after."""

    def __init__(self, slots: int, shared_dir: str | None, clock=time.monotonic):
        self.buckets = Buckets(slots, shared_dir)
        self.clock = clock

    def admit(self, slot: int, name: str, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """Take one request, or raise 429 with the seconds until the key may send again."""
        values, base, now = self.buckets.values, slot * FIELDS, self.clock()
        with self.buckets.locked(slot):
            if tokens_per_minute is not None:
                tokens = refilled(values[base + 2], values[base + 3], now, tokens_per_minute)
                if tokens < 0:
                    raise rate_limited(name, "tokens", tokens_per_minute, -tokens * 60 / tokens_per_minute)
            if requests_per_minute is not None:
                requests = refilled(values[base], values[base + 1], now, requests_per_minute)
                if requests < 1:
                    raise rate_limited(name, "requests", requests_per_minute, (1 - requests) * 60 / requests_per_minute)
                values[base], values[base + 1] = requests - 1, now

    def charge(self, slot: int, tokens_per_minute: int, tokens: int) -> None:
        values, base, now = self.buckets.values, slot * FIELDS, self.clock()
        with self.buckets.locked(slot):
            level = refilled(values[base + 2], values[base + 3], now, tokens_per_minute)
            values[base + 2], values[base + 3] = level - tokens, now
