"""A closed-loop load generator for /v1/completions: C clients, each sending its next request as soon as
its last one is answered, over one fixed sequence of requests.

The sequence (`request_mix`) is drawn once from a seed: `max_tokens` uniform in a range, a share of
the requests streamed. Every measurement starts at its first request, so every router is asked
the same things in the same order. A measurement runs a warm-up (the engines' slots and queues
fill), then the measured window, then stops sending and waits for what is still in flight, so
that the next measurement starts on idle engines. Throughput counts each answer for the share of
its life inside the window; latency (to the last byte) is that of the answers completed in it. Every answer is checked: status 200 and as many tokens as
asked for; anything else is counted as an error by kind.
"""

import asyncio
import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class Request:
    max_tokens: int
    stream: bool
    body: bytes


def request_mix(model: str, seed: int, count: int, min_tokens: int, max_tokens: int, stream_share: float) -> list[Request]:
    rng = random.Random(seed)
    mix = []
    for i in range(count):
        tokens, stream = rng.randint(min_tokens, max_tokens), rng.random() < stream_share
        body = {"model": model, "prompt": f"Request {i}: tell me a story", "max_tokens": tokens, "temperature": 0}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        mix.append(Request(tokens, stream, json.dumps(body).encode()))
    return mix


@dataclass
class Outcome:
    start: float  # the window, in the event loop's clock
    end: float
    answers: list[tuple[float, float, int]] = field(default_factory=list)  # (sent, done, tokens) of every good answer
    errors: Counter = field(default_factory=Counter)
    sent: int = 0  # every request sent, warm-up and drain included

    @property
    def latencies(self) -> list[float]:
        """Seconds to the last byte, of the answers completed in the window."""
        return [done - sent for sent, done, _ in self.answers if self.start <= done < self.end]

    def _per_second(self, weight) -> float:
        """Each answer counted for the share of its life (sent to done) inside the window: unlike
        counting answers as they complete, this does not jump with the few long requests that happen
        to end just inside or just outside it."""
        total = sum(weight(tokens) * max(0.0, min(done, self.end) - max(sent, self.start)) / (done - sent)
                    for sent, done, tokens in self.answers)
        return total / (self.end - self.start)

    @property
    def rps(self) -> float:
        return self._per_second(lambda tokens: 1)

    @property
    def tps(self) -> float:
        return self._per_second(lambda tokens: tokens)


async def completion_tokens(response: aiohttp.ClientResponse, stream: bool) -> int:
    if not stream:
        return (await response.json())["usage"]["completion_tokens"]
    usage = None
    async for line in response.content:
        if line.startswith(b"data: {") and b'"usage"' in line:  # the final chunk (stream_options.include_usage)
            usage = json.loads(line[6:])["usage"] or usage
    if usage is None:
        raise ValueError("stream ended without its usage chunk")
    return usage["completion_tokens"]


async def closed_loop(targets: list[str], mix: list[Request], clients: int, warmup_s: float, window_s: float) -> Outcome:
    """Client i sends to targets[i % len(targets)] (one router, or each engine directly)."""
    loop = asyncio.get_running_loop()
    outcome = Outcome(loop.time() + warmup_s, loop.time() + warmup_s + window_s)
    next_request = itertools.count()

    async def client(url: str, session: aiohttp.ClientSession) -> None:
        while loop.time() < outcome.end:
            request = mix[next(next_request) % len(mix)]
            outcome.sent += 1
            sent = loop.time()
            try:
                async with session.post(url, data=request.body, headers=JSON) as response:
                    if response.status != 200:
                        outcome.errors[f"HTTP {response.status}"] += 1
                        await response.read()
                        await asyncio.sleep(0.05)  # an erring router must not turn the loop into a busy one
                        continue
                    tokens = await completion_tokens(response, request.stream)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as failure:
                outcome.errors[type(failure).__name__] += 1
                await asyncio.sleep(0.05)
                continue
            if tokens != request.max_tokens:
                outcome.errors[f"{tokens} tokens for max_tokens {request.max_tokens}"] += 1
            else:
                outcome.answers.append((sent, loop.time(), tokens))

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(client(targets[i % len(targets)] + "/v1/completions", session) for i in range(clients)))
    return outcome

