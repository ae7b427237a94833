"""What `llmtrace record` costs a program it did not write: output tokens/s of the
examples/pipelines/ servers run bare and under record with each setting, in rounds that
alternate the order, median and spread per setting. Goal (issue 14): the default
(automatic instrumentation + 250 Hz in-process stack sampling) within a few percent of
the bare program.

    python benchmarks/record_overhead.py [--rounds 3] [--pipelines thread_queue_server ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = {
    "thread_queue_server": ["--requests", "48"],
    "asyncio_pipe_worker": ["--requests", "48"],
    "mp_queue_workers": ["--requests", "48", "--workers", "1"],
}
MODES = {
    "bare": None,
    "record, spans only (--no-auto --sample-hz 0)": ["--no-auto", "--sample-hz", "0"],
    "record, automatic spans (--sample-hz 0)": ["--sample-hz", "0"],
    "record, default (auto + 250 Hz samples)": [],
    "record, auto + 1000 Hz samples": ["--sample-hz", "1000"],
}


def tok_s(pipeline: str, options: list[str] | None) -> float:
    prog = [sys.executable, os.path.join(ROOT, "examples", "pipelines", pipeline + ".py"), *PIPELINES[pipeline]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTRACE_")} | {"PIPELINE_CLEAN": "1"}
    with tempfile.TemporaryDirectory() as out:
        cmd = (
            prog
            if options is None
            else [sys.executable, "-m", "llmtrace.cli", "record", "--out", out, *options, "--", *prog]
        )
        stdout = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, timeout=600).stdout
    line = next(ln for ln in stdout.splitlines() if ln.startswith('{"pipeline"'))
    return json.loads(line)["tok_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    args = ap.parse_args(argv)
    print("| pipeline (clean variant) | setting | tok/s median | spread | vs bare |")
    print("| --- | --- | --- | --- | --- |")
    for p in args.pipelines:
        runs: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            for m in list(MODES) if r % 2 == 0 else list(reversed(MODES)):
                runs[m].append(tok_s(p, MODES[m]))
        bare = statistics.median(runs["bare"])
        for m, v in runs.items():
            med = statistics.median(v)
            print(f"| {p} | {m} | {med:,.1f} | {max(v) - min(v):,.1f} | {100 * (med / bare - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
