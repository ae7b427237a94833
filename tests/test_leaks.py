"""No leaked KV blocks: requests of random lengths through the real HTTP server (tiny model,
one agent, loopback), with clients that hang up mid-stream, give up while queued, and
requests the master aborts; afterwards every block is free, nothing waits or runs, and
the scheduler's and BlockManager's invariants hold.

`chaos_load` is also what benchmarks/soak.py runs, with 2,000 requests.
"""

from __future__ import annotations

import asyncio
import collections
import random

import aiohttp
import pytest
from test_server import EngineThread

from engine.config import load_config

pytestmark = pytest.mark.timeout(120)

C = "/v1/completions"
# Small KV cache for the batch: sequences are preempted and recomputed while others hang up.
ENGINE = {
    "max_model_len": 128,
    "max_batched_tokens": 256,
    "max_num_seqs": 8,
    "max_waiting": 16,
    "num_blocks": 12,
    "block_size": 16,
}
WORDS = "the quick brown fox jumps over lazy dogs while seven tiny models decode random tokens".split()
KINDS = ("complete", "stream", "disconnect", "give_up", "abort")


async def _one(session, url: str, rng: random.Random, i: int, abort) -> str:
    """One request that behaves as `kind` says; returns what happened to it."""
    kind = rng.choice(KINDS)
    rid = f"chaos-{i}"
    max_tokens = rng.randint(1, 12)
    body = {
        "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": kind != "complete" and kind != "give_up",
    }
    timeout = aiohttp.ClientTimeout(total=rng.uniform(0.005, 0.3) if kind == "give_up" else 60)
    cut = rng.randint(0, max_tokens)  # SSE events before hanging up / aborting
    try:
        async with session.post(url + C, json=body, headers={"X-Request-Id": rid}, timeout=timeout) as r:
            if r.status != 200:
                return f"http {r.status}"
            if not body["stream"]:
                await r.read()
                return kind
            events = 0
            async for line in r.content:
                if not line.startswith(b"data:"):
                    continue
                if events == cut and kind == "disconnect":
                    return kind  # leaving the block closes the connection mid-stream
                if events == cut and kind == "abort":
                    abort(rid)
                events += 1
            return kind
    except asyncio.TimeoutError:
        return "gave up"


async def chaos_load(engine: EngineThread, n: int, concurrency: int, seed: int) -> collections.Counter:
    """`n` randomized requests, `concurrency` at a time; a tally of what happened to them."""
    rng = random.Random(seed)
    master = engine.handle.master

    def abort(rid: str) -> None:
        engine.loop.call_soon_threadsafe(master.abort, rid)

    tally: collections.Counter = collections.Counter()
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def run(i: int, r: random.Random) -> None:
            async with sem:
                tally[await _one(session, engine.url, r, i, abort)] += 1

        await asyncio.gather(*(run(i, random.Random(rng.random())) for i in range(n)))
    return tally


def check_no_leaks(engine: EngineThread) -> dict:
    """Stats once idle, after checking the invariants in the engine's own loop."""
    stats = engine.wait_idle(timeout=30)
    master = engine.handle.master

    async def check():
        master.scheduler.check_invariants()
        bm = master.scheduler.block_manager
        return bm.num_free_blocks, bm.num_blocks, len(master.outputs.streams)

    free, total, streams = engine.call(check())
    assert free == total and streams == 0, (free, total, streams)
    return stats


@pytest.fixture(scope="module")
def engine():
    e = EngineThread(load_config({"engine": ENGINE}))
    yield e
    e.close()


async def test_random_lengths_disconnects_and_aborts_leak_no_blocks(engine):
    tally = await chaos_load(engine, n=200, concurrency=16, seed=1)
    assert sum(tally.values()) == 200
    # The mix really happened: clients hung up, gave up while waiting, and requests were aborted.
    assert tally["disconnect"] and tally["abort"] and tally["gave up"] and tally["complete"], tally
    stats = check_no_leaks(engine)
    assert stats["preemptions"] > 0, "the KV cache was never short: preemption paths went untested"
    async with aiohttp.ClientSession() as s:  # still serving, at full capacity
        async with s.post(engine.url + C, json={"prompt": "hello", "max_tokens": 5, "ignore_eos": True}) as r:
            assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 5
    check_no_leaks(engine)
