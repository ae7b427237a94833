"""How well `llmtrace record` diagnoses serving programs it did not write
(examples/pipelines/, none of which imports llmtrace).

For each pipeline and each planted mistake:
  truth     the mistake's cost per token: in each round the program runs untraced with
            every mistake on, then with each one off in turn (PLANT_<NAME>=0); ms/token =
            wall time / output tokens; the saving is the median over the rounds of (all on
            - that one off), runs of one round seeing the same load on a shared machine; its
            uncertainty half the range of those differences. --repeats rounds, more (up to
            --max-repeats) while a saving is not larger than its uncertainty ("resolved")
  found     in how many of --recordings recordings (`llmtrace record`, no change to the
            program, every mistake on) a suggestion of the expected rule names the
            program's function responsible (evidence "responsible" or "function")
  estimate  that suggestion's est_saving_ms_per_token, median over the recordings
  false +   expected-rule suggestions in recordings of the clean variant (PIPELINE_CLEAN=1)
Goal (issue 14): every mistake found with its function, its estimate within 25% of the
truth or 0.3 ms/token, none on the clean variants, the same findings in every recording.

    python benchmarks/diagnosis_accuracy.py [--repeats 3] [--recordings 3] [--json FILE]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = os.path.join(ROOT, "examples", "pipelines")
# pipeline -> (its arguments, {planted mistake: (rule ids that diagnose it, function responsible)})
CORPUS = {
    "thread_queue_server": (
        ["--requests", "32"],
        {
            "log_arrays": (("log-in-hot-path",), "Engine.step"),
            "host_argmax": (("full-logits-transfer",), "Engine.argmax_on_host"),
            "poll_sleep": (("polling-sleep",), "Engine.admit"),
            "stop_text": (("detokenize-whole-sequence",), "Engine.stopped"),
        },
    ),
    "tcp_master_agent": (
        ["--requests", "16"],
        {
            "nagle": (("tcp-nodelay",), None),
            "json_topk": (("serialization-in-hot-path",), "send_frame"),
            "concat_padding": (("concat-padding",), "Master.pad"),
            "log_arrays": (("log-in-hot-path",), "Master.step"),
        },
    ),
    "asyncio_pipe_worker": (
        ["--requests", "32"],
        {
            "poll_sleep": (("polling-sleep",), "Scheduler.reply"),
            "pickle_logits": (("full-logits-transfer", "serialization-in-hot-path"), "worker"),
            "log_arrays": (("log-in-hot-path",), "Scheduler.run"),
        },
    ),
    "mp_queue_workers": (
        ["--requests", "32", "--workers", "1", "--concurrency", "6"],
        {
            "wait_for_work": (("wait-in-step",), "take_new"),
            "log_arrays": (("log-in-hot-path",), "worker"),
        },
    ),
    "zmq_engine_core": (
        ["--requests", "32"],
        {
            "poll_wait": (("wait-in-step",), "EngineCore.admit"),
            "full_logprobs": (("full-logits-transfer", "serialization-in-hot-path"), "EngineCore.step"),
            "log_arrays": (("log-in-hot-path",), "EngineCore.step"),
        },
    ),
    "fastapi_batcher": (
        ["--requests", "32"],
        {
            "poll_sleep": (("polling-sleep",), "Batcher.run"),
            "host_argmax": (("full-logits-transfer",), "Batcher.argmax_on_host"),
            "log_json": (("log-in-hot-path", "serialization-in-hot-path"), "Batcher.step"),
        },
    ),
    "transformers_http": (
        ["--requests", "8", "--max-tokens", "40"],
        {
            "no_kv_cache": (("no-kv-cache",), None),
            "host_softmax": (("full-logits-transfer",), "Generator.sample"),
            "log_arrays": (("log-in-hot-path",), "Generator.sample"),
        },
    ),
}


def run_untraced(pipeline: str, args: list[str], env: dict) -> float:
    """ms per output token of one untraced run."""
    out = subprocess.run(
        [sys.executable, os.path.join(PIPELINES, pipeline + ".py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
        timeout=600,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return 1000 * r["seconds"] / r["tokens"]


def truth(pipeline: str, args: list[str], mistakes: list[str], repeats: int, max_repeats: int) -> dict:
    """{mistake: (saving ms/token, its uncertainty, rounds)}: paired rounds (module docstring)."""
    diffs: dict[str, list[float]] = {m: [] for m in mistakes}
    while True:
        on = run_untraced(pipeline, args, {})
        for m in mistakes:
            diffs[m].append(on - run_untraced(pipeline, args, {f"PLANT_{m.upper()}": "0"}))
        rounds = len(diffs[mistakes[0]])
        saving = {m: (statistics.median(d), (max(d) - min(d)) / 2, rounds) for m, d in diffs.items()}
        if rounds >= max_repeats or (rounds >= repeats and all(abs(v) > u for v, u, _ in saving.values())):
            return saving


def record(pipeline: str, args: list[str], env: dict) -> dict:
    """The report of one `llmtrace record` run; a run whose program failed keeps its directory
    (printed) and counts as a recording that found nothing unless its report says otherwise."""
    out = tempfile.mkdtemp(prefix=f"diag_{pipeline}_")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmtrace.cli",
            "record",
            "--out",
            out,
            "--",
            sys.executable,
            os.path.join(PIPELINES, pipeline + ".py"),
            *args,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    report = {"suggestions": []}
    if os.path.exists(os.path.join(out, "report.json")):
        with open(os.path.join(out, "report.json")) as f:
            report = json.load(f)
    if p.returncode:
        print(
            f"{pipeline}: recording failed (exit {p.returncode}), kept in {out}:\n{p.stderr[-2000:]}", file=sys.stderr
        )
    else:
        shutil.rmtree(out)
    return {**report, "_exit": p.returncode}


def named(s: dict, function: str | None) -> bool:
    if function is None:
        return True
    ev = s["evidence"]
    names = [r["function"] for r in ev.get("responsible", [])] + [ev.get("function") or ""]
    names += [f["name"] for f in ev.get("functions", [])]
    return any(function in n for n in names)


def diagnose(report: dict, rules: tuple, function: str | None) -> float | None:
    """The best matching suggestion's saving, or None when the mistake was not found."""
    hits = [s for s in report["suggestions"] if s["id"] in rules and named(s, function)]
    return max(s["est_saving_ms_per_token"] for s in hits) if hits else None


def emit(header: list[str], cells: list[list[str]], rows: list[dict], json_path: str | None) -> None:
    """Print the table (header, one list of cells per row); write `rows` to json_path too."""
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for c in cells:
        print("| " + " | ".join(c) + " |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)


def found_cell(r: dict) -> str:
    failed = r.get("failed_recordings")
    return f"{r['found']}/{r['recordings']}" + (f" ({failed} failed)" if failed else "")


def truth_cell(r: dict) -> str:
    unresolved = "" if r["truth_resolved"] else ", not resolved"
    return f"{r['truth_ms']:.3f} (± {r['truth_uncertainty_ms']:.3f}, {r['truth_rounds']}{unresolved})"


def estimate_cell(ms: float | None) -> str:
    return f"{ms:.3f}" if ms is not None else "-"


def within_goal(estimate: float | None, truth: float) -> bool:
    """The issue's goal: within 25% of the truth or 0.3 ms/token, whichever is larger."""
    return estimate is not None and abs(estimate - truth) <= max(0.25 * abs(truth), 0.3)


def evaluate(pipeline: str, repeats: int, max_repeats: int, recordings: int) -> list[dict]:
    args, mistakes = CORPUS[pipeline]
    true = truth(pipeline, args, list(mistakes), repeats, max_repeats)
    reports = [record(pipeline, args, {}) for _ in range(recordings)]
    clean = record(pipeline, args, {"PIPELINE_CLEAN": "1"})
    rows = []
    for m, (rules, function) in mistakes.items():
        est = [e for e in (diagnose(r, rules, function) for r in reports) if e is not None]
        saving, uncertainty, rounds = true[m]
        median_est = statistics.median(est) if est else None
        rows.append(
            {
                "pipeline": pipeline,
                "mistake": m,
                "rules": list(rules),
                "function": function,
                "truth_ms": saving,
                "truth_uncertainty_ms": uncertainty,
                "truth_rounds": rounds,
                "truth_resolved": abs(saving) > uncertainty,
                "found": len(est),
                "recordings": recordings,
                "failed_recordings": sum(1 for r in reports if r["_exit"]),
                "estimate_ms": median_est,
                "within_goal": within_goal(median_est, saving),
                "false_positive": any(s["id"] in rules for s in clean["suggestions"]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="rounds of untraced runs (default 3)")
    ap.add_argument(
        "--max-repeats", type=int, default=6, help="rounds at most, while a truth is not resolved (default 6)"
    )
    ap.add_argument("--recordings", type=int, default=3, help="recordings of each pipeline (default 3)")
    ap.add_argument("--pipelines", nargs="+", default=list(CORPUS), choices=list(CORPUS))
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    rows = [
        r
        for p in args.pipelines
        for r in evaluate(p, args.repeats, max(args.repeats, args.max_repeats), args.recordings)
    ]
    emit(
        [
            "pipeline",
            "mistake",
            "rule",
            "truth ms/token (± uncertainty, rounds)",
            "estimate",
            "found",
            "within goal",
            "false + on clean",
        ],
        [
            [
                r["pipeline"],
                r["mistake"],
                "/".join(r["rules"]),
                truth_cell(r),
                estimate_cell(r["estimate_ms"]),
                found_cell(r),
                "yes" if r["within_goal"] else "no",
                "YES" if r["false_positive"] else "no",
            ]
            for r in rows
        ],
        rows,
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
