"""What deep attribution costs: examples/custom_pipeline.py recorded with `llmtrace record`
under each attribution mode; the median step time (from the step spans) against spans only.

    .venv/bin/python benchmarks/attribution_overhead.py [--steps 80] [--repeat 3]

The viztracer row also shows the steps inside its window (where it traces) apart from the
rest (where the program runs untraced).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "examples", "custom_pipeline.py")
WINDOW_STEPS = 10
MODES = [
    ("spans only", ["--sample-hz", "0"]),
    ("in-process sampler 200 Hz", ["--sample-hz", "200"]),
    ("in-process sampler 1000 Hz", ["--sample-hz", "1000"]),
    (
        f"viztracer preprocess, {WINDOW_STEPS} steps",
        ["--sample-hz", "0", "--viztracer", "--viztracer-stages", "preprocess", "--viztracer-steps", str(WINDOW_STEPS)],
    ),
    ("py-spy 200 Hz (nonblocking)", ["--py-spy", "--py-spy-rate", "200"]),
]


def step_times(options: list[str], steps: int) -> tuple[list[float], list[float]]:
    """(ms of steps inside a viztracer window, ms of the other steps) of one recorded run."""
    from llmtrace.load import load_trace

    with tempfile.TemporaryDirectory() as out:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTRACE_")}
        cmd = [
            sys.executable,
            "-m",
            "llmtrace.cli",
            "record",
            "--out",
            out,
            *options,
            "--",
            sys.executable,
            PIPELINE,
            "--steps",
            str(steps),
        ]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        trace = load_trace(out)
        windowed = {s for w in trace.meta.get("viztracer", {}).values() for s in w.get("steps", [])}
        roots = [s for s in trace.spans if s.name == "pipeline.step" and s.step >= 2]  # past warm-up
        inside = [s.dur_ns / 1e6 for s in roots if s.step in windowed]
        outside = [s.dur_ns / 1e6 for s in roots if s.step not in windowed]
        return inside, outside


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--repeat", type=int, default=3, help="runs per mode (medians of all their steps)")
    args = p.parse_args()
    times = {name: ([], []) for name, _ in MODES}
    for _ in range(args.repeat):  # modes interleaved, so a change in machine load hits them alike
        for name, options in MODES:
            a, b = step_times(options, args.steps)
            times[name][0].extend(a)
            times[name][1].extend(b)
    rows, base = [], None
    for name, (inside, outside) in times.items():
        med = statistics.median(outside)
        base = base or med
        win = f"{statistics.median(inside):8.2f}" if inside else "       -"
        rows.append(f"{name:36} {med:8.2f} {100 * (med / base - 1):+8.1f}% {win}")
    print(f"{'mode':36} {'step ms':>8} {'vs spans':>9} {'in window':>9}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
