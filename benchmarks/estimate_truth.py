"""The engine's estimates against the truth: for every switch of examples/antipatterns.yaml,
the measured saving of turning that one mistake off next to what the report estimates.

  truth     `llmtrace run` with every mistake on, and with that one off
            (`--set antipatterns.<switch>=false`), interleaved, --repeats times each;
            ms/token = the breakdown's step time per output token (what the estimates are
            relative to); the saving is the difference of medians, the spread that of the
            all-on runs
  estimate  the matching rule's est_saving_ms_per_token in the all-on runs, median
  found     in how many all-on runs the rule reported it
  tuned     in how many runs of examples/tuned.yaml (every switch off) it was reported
Goal (issue 19): every estimate within 25% of the truth (or 0.3 ms/token), every mistake
found in every run, none on tuned.yaml.

    python benchmarks/estimate_truth.py [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from diagnosis_accuracy import emit, estimate_cell, within_goal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# switch -> the rule that reports it
SWITCHES = {
    "log_arrays": "log-in-hot-path",
    "concat_padding": "concat-padding",
    "host_sampling": "full-logits-transfer",
    "no_tcp_nodelay": "tcp-nodelay",
    "prefill_batch_1": "small-prefill-batch",
    "gc_churn": "gc-pauses",
}


def run(config: str, *overrides: str) -> dict | None:
    """The report of one `llmtrace run`; None when it failed (its output and directory are
    kept and printed: a failed run is not silently left out)."""
    out = tempfile.mkdtemp(prefix="estimate_truth_")
    cmd = [
        sys.executable,
        "-m",
        "llmtrace.cli",
        "run",
        "--config",
        os.path.join(ROOT, "examples", config),
        "--out",
        out,
        *[a for o in overrides for a in ("--set", o)],
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if p.returncode:
        print(
            f"FAILED (exit {p.returncode}, kept in {out}): {' '.join(cmd[3:])}\n{p.stdout[-1500:]}{p.stderr[-3000:]}",
            file=sys.stderr,
        )
        return None
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    shutil.rmtree(out)
    return report


def saving(report: dict, rule: str) -> float | None:
    found = [s["est_saving_ms_per_token"] for s in report["suggestions"] if s["id"] == rule]
    return found[0] if found else None


def evaluate(repeats: int) -> list[dict]:
    ms: dict[str, list[float]] = {v: [] for v in ["all", *SWITCHES]}
    all_on, tuned = [], []
    for _ in range(repeats):
        for variant in ms:
            off = () if variant == "all" else (f"antipatterns.{variant}=false",)
            rep = run("antipatterns.yaml", *off)
            if rep is None:
                continue
            ms[variant].append(rep["breakdown"]["per_token_ms"])
            if variant == "all":
                all_on.append(rep)
        rep = run("tuned.yaml")
        if rep is not None:
            tuned.append(rep)
    on = statistics.median(ms["all"])
    rows = []
    for switch, rule in SWITCHES.items():
        truth = on - statistics.median(ms[switch])
        est = [e for e in (saving(r, rule) for r in all_on) if e is not None]
        median_est = statistics.median(est) if est else None
        rows.append(
            {
                "switch": switch,
                "rule": rule,
                "truth_ms": truth,
                "spread_ms": max(ms["all"]) - min(ms["all"]),
                "estimate_ms": median_est,
                "found": len(est),
                "runs": len(all_on),
                "within_goal": within_goal(median_est, truth),
                "on_tuned": sum(saving(r, rule) is not None for r in tuned),
                "tuned_runs": len(tuned),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant (default 3)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    rows = evaluate(args.repeats)
    emit(
        ["switch", "rule", "truth ms/token (spread)", "estimate", "found", "within goal", "on tuned"],
        [
            [
                r["switch"],
                r["rule"],
                f"{r['truth_ms']:.3f} ({r['spread_ms']:.3f})",
                estimate_cell(r["estimate_ms"]),
                f"{r['found']}/{r['runs']}",
                "yes" if r["within_goal"] else "no",
                f"{r['on_tuned']}/{r['tuned_runs']}",
            ]
            for r in rows
        ],
        rows,
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
