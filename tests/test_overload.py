"""Overload: the waiting queue is bounded; a request beyond it gets 429 with Retry-After at
once (it never queues), the requests already admitted stay where they were, and a burst
of rejected requests leaves the server's memory where it was.

The heavier burst (thousands of requests, RSS before/after): benchmarks/soak.py.
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp
import psutil
import pytest
from test_server import EngineThread

from engine.config import load_config

pytestmark = pytest.mark.timeout(120)

C = "/v1/completions"
MAX_NUM_SEQS, MAX_WAITING = 2, 4
ENGINE = {
    "max_model_len": 256,
    "max_batched_tokens": 256,
    "max_num_seqs": MAX_NUM_SEQS,
    "max_waiting": MAX_WAITING,
    "num_blocks": 32,
}
HELD_TOKENS = 240  # outlasts the burst: at <= 10 ms a step, the first held request ends after 2.4 s


@pytest.fixture(scope="module")
def engine():
    e = EngineThread(load_config({"engine": ENGINE}))
    yield e
    e.close()


async def burst(url: str, n: int, concurrency: int) -> collections.Counter:
    """`n` small requests, `concurrency` at a time; a tally of (status, Retry-After)."""
    tally: collections.Counter = collections.Counter()
    body = {"prompt": "a request that finds the queue full", "max_tokens": 4}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def one() -> None:
            async with s.post(url + C, json=body) as r:
                await r.read()
                tally[r.status, r.headers.get("Retry-After")] += 1

        await asyncio.gather(*(one() for _ in range(n)))
    return tally


async def stats(engine: EngineThread) -> dict:
    """The master's stats, without blocking this event loop (its clients must keep talking)."""

    async def read():
        return engine.handle.master.stats()

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(read(), engine.loop))


async def hold_the_queue(
    engine: EngineThread, session: aiohttp.ClientSession, max_tokens: int = HELD_TOKENS
) -> list[asyncio.Task]:
    """Fill the running batch and the waiting queue with long requests, one at a time, each
    once the previous one is where it belongs (sent together, or before the scheduler has
    moved the first ones to running, they would find the queue full); their tasks."""
    body = {"prompt": "hold on", "max_tokens": max_tokens, "ignore_eos": True}

    async def one(rid: str):
        async with session.post(engine.url + C, json=body, headers={"X-Request-Id": rid}) as r:
            return r.status, await r.json()

    held = []
    for k in range(1, MAX_NUM_SEQS + MAX_WAITING + 1):
        held.append(asyncio.ensure_future(one(f"held-{k}")))
        for _ in range(500):
            s = await stats(engine)
            if (s["running"], s["waiting"]) == (min(k, MAX_NUM_SEQS), max(k - MAX_NUM_SEQS, 0)):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"held request {k} was not admitted: {s}")
    return held


async def test_a_burst_beyond_the_queue_is_rejected_with_429_and_memory_stays_flat(engine):
    proc = psutil.Process()
    async with aiohttp.ClientSession() as session:
        held = await hold_the_queue(engine, session)
        warm = await burst(engine.url, 300, 50)  # first allocations of the handlers' steady state
        rss0 = proc.memory_info().rss
        tally = await burst(engine.url, 1500, 100)
        rss1 = proc.memory_info().rss
        s = await stats(engine)
        for k in range(1, len(held) + 1):  # done: end the held requests early
            engine.loop.call_soon_threadsafe(engine.handle.master.abort, f"held-{k}")
        held_results = await asyncio.gather(*held)
    assert set(warm) == set(tally) == {(429, "1")}, tally  # every one rejected, each with Retry-After
    assert (s["running"], s["waiting"]) == (MAX_NUM_SEQS, MAX_WAITING)  # the admitted ones were not displaced
    # Loose: 1,500 rejected requests may not grow this process (server and clients) by 32 MiB.
    assert rss1 - rss0 < 32 << 20, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB"
    assert [status for status, _ in held_results] == [200] * len(held)
    assert all(body["choices"][0]["finish_reason"] == "abort" for _, body in held_results)
    engine.wait_idle()
