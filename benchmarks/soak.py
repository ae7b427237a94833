"""Soak: thousands of randomized requests, then a burst far beyond the waiting queue, against
the real HTTP server (tiny model, one agent, loopback) running in this process.

1. leaks:    `--requests` requests (tests/test_leaks.py's chaos_load: random prompt and output
             lengths; clients that complete, stream, hang up mid-stream, give up while queued,
             or whose request the master aborts) on a KV cache small enough to preempt; then
             every block must be free and the scheduler's and BlockManager's invariants hold.
2. overload: the running batch and the waiting queue held full by long requests, then
             3 bursts of `--burst` requests: each must get 429 + Retry-After; RSS of this
             process (the server, and the clients) before and after each burst.

Run:  .venv/bin/python benchmarks/soak.py [--requests 2000] [--burst 3000]

On the 2-core dev VM: 2,000 requests in 67 s (2,540 steps, 194 preemptions; 419 streamed,
413 hung up mid-stream, 406 aborted by the master, 387 plain, 339 gave up while queued):
every block free, invariants hold. 3 x 3,000 requests beyond a full queue: all 9,000 got
429 + Retry-After (~1,100/s), waiting stayed at 4; RSS 79.9 -> 96.7 -> 96.9 -> 97.0 MiB
(the first burst's high-water mark of 200 concurrent connections, then flat); the 6 held
requests finished with 200.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]

import aiohttp  # noqa: E402
import psutil  # noqa: E402
import test_leaks  # noqa: E402
import test_overload  # noqa: E402
from test_server import EngineThread  # noqa: E402

from engine.config import load_config  # noqa: E402

ROUNDS = 3
HELD_TOKENS = 120  # the held requests must outlast the bursts (a 200 in the table: one ended first)


def soak_leaks(n: int, concurrency: int) -> None:
    engine = EngineThread(load_config({"engine": test_leaks.ENGINE}))
    try:
        t0 = time.perf_counter()
        tally = asyncio.run(test_leaks.chaos_load(engine, n, concurrency, seed=7))
        dt = time.perf_counter() - t0
        stats = test_leaks.check_no_leaks(engine)  # raises on a leak or a broken invariant
    finally:
        engine.close()
    print(
        f"leaks: {n} requests in {dt:.1f} s, concurrency {concurrency}, "
        f"{stats['kv_blocks_total']} KV blocks, {stats['steps']} steps, {stats['preemptions']} preemptions"
    )
    print(f"  {'what happened':<16}{'requests':>9}")
    for what, k in sorted(tally.items(), key=lambda kv: -kv[1]):
        print(f"  {what:<16}{k:>9}")
    print("  survived: every block free, scheduler + BlockManager invariants hold, no stream left\n")


def soak_overload(burst: int) -> None:
    engine = EngineThread(load_config({"engine": test_overload.ENGINE}))
    proc = psutil.Process()

    async def go():
        async with aiohttp.ClientSession() as session:
            held = await test_overload.hold_the_queue(engine, session, max_tokens=HELD_TOKENS)
            await test_overload.burst(engine.url, 500, 100)  # warm-up
            rss = [proc.memory_info().rss]
            t0 = time.perf_counter()
            tally = collections.Counter()
            for _ in range(ROUNDS):  # growth that stops after the first round is a high-water mark, not a leak
                tally += await test_overload.burst(engine.url, burst, 200)
                rss.append(proc.memory_info().rss)
            dt = time.perf_counter() - t0
            stats = await test_overload.stats(engine)
            done = await asyncio.gather(*held)
        return rss, dt, tally, stats, done

    try:
        rss, dt, tally, stats, done = asyncio.run(go())
        engine.wait_idle()
    finally:
        engine.close()
    print(
        f"overload: queue held full ({test_overload.MAX_NUM_SEQS} running + {test_overload.MAX_WAITING} waiting), "
        f"then {ROUNDS} bursts of {burst} requests, 200 at a time"
    )
    print(f"  {'status, Retry-After':<22}{'requests':>9}")
    for (status, retry), k in sorted(tally.items()):
        print(f"  {f'{status}, {retry}':<22}{k:>9}")
    print(
        f"  {ROUNDS * burst / dt:.0f} rejections/s; waiting {stats['waiting']} (max {test_overload.MAX_WAITING}) "
        f"after the bursts"
    )
    print("  RSS MiB before, then after each burst: " + " -> ".join(f"{r / 2**20:.1f}" for r in rss))
    ok = sum(status == 200 for status, _ in done)
    print(f"  held requests: {ok}/{len(done)} finished with 200")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--burst", type=int, default=3000)
    args = ap.parse_args()
    soak_leaks(args.requests, args.concurrency)
    soak_overload(args.burst)


if __name__ == "__main__":
    main()
