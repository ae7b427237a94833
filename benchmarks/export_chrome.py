"""Speed and memory of the Chrome trace export and of loading it back.

What it measures: for synthetic engine-like traces (per step: master.step, agent.step
following it, forward with device time, sampling), the wall time of
`write_chrome_trace`, the growth of the process's peak RSS during it (the export streams,
so this stays far below the file size), the file size, and the time of
`load_chrome_trace`. Each size runs in a fresh subprocess so peak RSS is its own.

Run:  .venv/bin/python benchmarks/export_chrome.py [--spans 50000 200000 1000000]

Goal: >= 100k spans/s exported on the 2-core dev VM; peak RSS growth < 1/2 of the file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def engine_like_trace(n: int):
    """n spans: per step a master.step, the agent.step following it, forward (with device
    time) and sampling. Also used by tests/test_export.py."""
    from llmtrace.timeline import Process, Span, Trace

    t = Trace(processes={1: Process(1, "master"), 2: Process(2, "agent-0")})
    for i in range(n // 4):
        base, top, agent = i * 10_000, (1 << 40) + i, (2 << 40) + 3 * i
        t.spans.append(Span("master.step", "master", 1, 1, base, base + 9_000, top, 0, 0, i, {"batch": 8}))
        t.spans.append(Span("agent.step", "agent", 2, 2, base + 100, base + 8_000, agent, 0, top, i))
        t.spans.append(
            Span(
                "forward",
                "forward",
                2,
                2,
                base + 200,
                base + 4_000,
                agent + 1,
                agent,
                0,
                i,
                device_start_ns=base + 300,
                device_end_ns=base + 5_000,
            )
        )
        t.spans.append(Span("sampling", "sampling", 2, 2, base + 4_000, base + 7_000, agent + 2, agent, 0, i))
    t.sort()
    return t


WORKER = """
import json, resource, sys, time
from export_chrome import engine_like_trace
from llmtrace.export import load_chrome_trace, write_chrome_trace

n, path = int(sys.argv[1]), sys.argv[2]
t = engine_like_trace(n)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
stats = write_chrome_trace(t, path)
t1 = time.perf_counter()
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
del t
load_chrome_trace(path)
t2 = time.perf_counter()
print(json.dumps({"events": stats.events, "bytes": stats.bytes, "export_s": t1 - t0,
                  "rss_growth": (rss1 - rss0) * 1024, "load_s": t2 - t1}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spans", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    args = ap.parse_args()
    print(f"{'spans':>9} {'events':>9} {'file MiB':>9} {'export s':>9} {'spans/s':>9} {'RSS+ MiB':>9} {'load s':>7}")
    with tempfile.TemporaryDirectory() as d:
        for n in args.spans:
            path = os.path.join(d, "trace.json")
            out = subprocess.run(
                [sys.executable, "-c", WORKER, str(n), path],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": HERE},
            ).stdout
            r = json.loads(out)
            print(
                f"{n:>9} {r['events']:>9} {r['bytes'] / 2**20:>9.1f} {r['export_s']:>9.2f} "
                f"{n / r['export_s']:>9.0f} {r['rss_growth'] / 2**20:>9.1f} {r['load_s']:>7.2f}"
            )


if __name__ == "__main__":
    main()
