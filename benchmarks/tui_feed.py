"""Throughput of the live TUI's data path: the spool feed (incremental decode) and the
model (grouping spans into steps, costing each with the analyzer's Breakdown, requests).

Times are this thread's CPU time (the machine is shared: time spent descheduled is not
the reader's cost). What it measures, on a real spool file recorded by llmtrace (engine-shaped steps: the
master's stages around agent.wait, the agent's step, counters and token instants):
  1. decode:     SpoolFeed.poll() over the whole file, spans/s
  2. aggregate:  RunModel.ingest() + settle() of those records, spans/s
  3. live:       a writer process appends the file's batches at a fixed span rate while
                 the reader polls every POLL_S as the app does; reports the reader's CPU
                 per wall second (it keeps up while well under 100%), its poll times, and
                 how long after the writer's last batch the reader had decoded everything
                 (the settle delay of the last steps is not included).
Goal: keep up with >= 10,000 spans/s. The engine pays nothing for the TUI: the feed reads
the spool files the spooler writes anyway (no socket, no extra write).

Run:  .venv/bin/python benchmarks/tui_feed.py [--steps 3000] [--rates 10000,30000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llmtrace  # noqa: E402
from llmtrace import recorder  # noqa: E402
from llmtrace.spool_format import parse_header, scan_batches  # noqa: E402
from llmtrace.timeline import Process, RecordDecoder, Trace  # noqa: E402
from tui.app import POLL_S, REDRAW_S, SUGGEST_S  # noqa: E402
from tui.feed import SpoolFeed  # noqa: E402
from tui.model import RunModel  # noqa: E402

GOAL_SPANS_S = 10_000
BATCH_STEPS = 25  # steps per flushed batch: ~500 spans, what 50 ms hold at 10k spans/s
MASTER_BEFORE = ("schedule", "shm.write", "tcp.send")
MASTER_AFTER = ("tcp.recv", "shm.read", "postprocess", "detokenize", "stream.write")
AGENT = ("tcp.recv", "shm.read", "preprocess", "forward", "sampling", "sync.wait", "shm.write", "tcp.send")
BATCH = 8
BATCH_HEADER = 12  # b"LTB1" | u32 payload length | u32 crc32 (spool_format.py)


def record(out: str, steps: int) -> str:
    """Record `steps` engine-shaped steps into out/spool; returns the spool file."""
    span = llmtrace.span
    llmtrace.configure(out=out, process_name="bench", propagate=False)
    try:
        for i in range(steps):
            with span("master.step", step=i, batch=BATCH, tokens=BATCH, prefill=0):
                for name in MASTER_BEFORE:
                    with span(name):
                        pass
                with span("agent.wait"):
                    token = recorder.set_current(0, i)  # the agent's step is a root, as in its own process
                    with span("agent.step", step=i):
                        for name in AGENT:
                            with span(name):
                                pass
                    recorder.reset_current(token)
                for name in MASTER_AFTER:
                    with span(name):
                        pass
                for r in range(BATCH):
                    llmtrace.instant("token", req=f"r{(i // 64) * BATCH + r}", n=i % 64 + 1)
                llmtrace.counter("batch_size", BATCH)
                llmtrace.counter("kv_blocks_used", i % 100)
            if i % BATCH_STEPS == BATCH_STEPS - 1:
                llmtrace.flush()
    finally:
        llmtrace.shutdown()
    (path,) = [os.path.join(out, "spool", f) for f in os.listdir(os.path.join(out, "spool"))]
    return path


def split(path: str) -> tuple[bytes, list[tuple[bytes, int]]]:
    """The file's header bytes and its batches as (bytes, spans in it)."""
    data = open(path, "rb").read()
    _, pos = parse_header(memoryview(data), path)
    decoder = RecordDecoder(Process(0, "bench"))
    head, batches = data[:pos], []
    while pos < len(data):
        size = BATCH_HEADER + int.from_bytes(data[pos + 4 : pos + 8], "little")
        chunk, into = data[pos : pos + size], Trace()
        for b in scan_batches(memoryview(chunk), 0, path).batches:
            decoder.add(b, into)
        batches.append((chunk, len(into.spans)))
        pos += size
    return head, batches


def offline(path: str) -> tuple[int, int, float, float, RunModel]:
    """(spans, records, decode s, aggregate s, model) for the whole file in one poll."""
    t0 = time.thread_time()
    new = SpoolFeed(os.path.dirname(os.path.dirname(path))).poll()
    t1 = time.thread_time()
    model = RunModel()
    model.ingest(new)
    model.settle(everything=True)
    t2 = time.thread_time()
    return len(new.spans), model.records_total, t1 - t0, t2 - t1, model


def periodic(model: RunModel) -> list[tuple[str, float, float]]:
    """(what, CPU ms per call, calls per second) of the app's timed work on a full window."""
    from llmtrace.analyze import build_report

    def cpu_ms(fn, n: int) -> float:
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        return (time.thread_time() - t0) / n * 1e3

    return [
        ("stage table (breakdown_view)", cpu_ms(model.breakdown_view, 20), 1 / REDRAW_S),
        ("header (live_summary)", cpu_ms(model.live_summary, 20), 1 / REDRAW_S),
        ("suggestions (rules on window)", cpu_ms(lambda: build_report(model.window_trace()), 3), 1 / SUGGEST_S),
    ]


def _write_paced(path: str, batches: list[tuple[bytes, int]], rate: float) -> None:
    """The engine's side, in its own process: append the batches at `rate` spans/s."""
    t0, sent = time.perf_counter(), 0
    with open(path, "ab", buffering=0) as f:
        for chunk, spans in batches:
            delay = t0 + sent / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            f.write(chunk)
            sent += spans


def live(head: bytes, batches: list[tuple[bytes, int]], rate: float) -> dict:
    """Append `batches` at `rate` spans/s from another process while polling like the app."""
    run = tempfile.mkdtemp(prefix="tui-feed-live-")
    os.makedirs(os.path.join(run, "spool"))
    path = os.path.join(run, "spool", "1.lts")
    with open(path, "wb") as f:
        f.write(head)
    total = sum(n for _, n in batches)
    feed, model = SpoolFeed(run), RunModel()
    polls, read = [], 0
    writer = multiprocessing.get_context("fork").Process(target=_write_paced, args=(path, batches, rate))
    t_start = time.perf_counter()
    writer.start()
    while read < total:
        t0, c0 = time.perf_counter(), time.thread_time()
        new = feed.poll()
        model.ingest(new)
        model.settle()
        read += len(new.spans)
        polls.append(time.thread_time() - c0)
        time.sleep(max(0.0, POLL_S - (time.perf_counter() - t0)))
    wall = time.perf_counter() - t_start
    writer.join()
    polls.sort()
    return {
        "spans": read,
        "busy": sum(polls) / wall,
        "p50_ms": polls[len(polls) // 2] * 1e3,
        "max_ms": polls[-1] * 1e3,
        "late_s": wall - total / rate,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000, help="engine steps to record")
    ap.add_argument("--rates", default="10000,30000", help="live span rates to replay, comma-separated")
    args = ap.parse_args()
    path = record(tempfile.mkdtemp(prefix="tui-feed-"), args.steps)
    spans, records, dec, agg, model = offline(path)
    print(
        f"recorded {args.steps} engine-shaped steps: {spans} spans, {records} records, "
        f"{os.path.getsize(path) / 1e6:.1f} MB (backend {recorder.BACKEND})\n"
    )
    print(f"{'stage':<28}{'spans/s':>12}{'records/s':>12}{'goal':>10}")
    rows = (("decode (SpoolFeed.poll)", dec), ("aggregate (ingest+settle)", agg), ("decode + aggregate", dec + agg))
    for name, secs in rows:
        ok = "ok" if spans / secs >= GOAL_SPANS_S else "MISSED"
        print(f"{name:<28}{spans / secs:>12,.0f}{records / secs:>12,.0f}{ok:>10}")
    print(f"\nperiodic work on a full window ({len(model.steps)} steps):")
    print(f"{'what':<32}{'ms/call':>10}{'calls/s':>10}{'CPU share':>11}")
    for what, ms, per_s in periodic(model):
        print(f"{what:<32}{ms:>10.1f}{per_s:>10.2f}{ms * per_s / 1e3:>11.1%}")
    head, batches = split(path)
    print(f"\nlive replay, polled every {POLL_S * 1e3:.0f} ms as the app does:")
    print(
        f"{'spans/s':>10}{'spans read':>12}{'reader CPU':>12}{'poll p50 ms':>13}{'poll max ms':>13}"
        f"{'behind at end s':>17}{'keeps up':>10}"
    )
    for rate in (float(r) for r in args.rates.split(",")):
        r = live(head, batches, rate)
        keeps = "yes" if r["busy"] < 0.8 and r["late_s"] < 1.0 else "NO"
        print(
            f"{rate:>10,.0f}{r['spans']:>12,}{r['busy']:>12.0%}{r['p50_ms']:>13.1f}{r['max_ms']:>13.1f}"
            f"{r['late_s']:>17.2f}{keeps:>10}"
        )


if __name__ == "__main__":
    main()
