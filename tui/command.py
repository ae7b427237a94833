"""`llmtrace tui PATH`: browse a run in the terminal. A run directory whose processes are
still writing their spool files opens live; anything else (a finished run, a spool
directory or file, a trace.json) opens with the full report of the run."""

from __future__ import annotations

import os
import sys

from llmtrace.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("tui", help="browse a finished run (or a live one) in the terminal")
    p.add_argument("path", help="run directory or trace.json")


def main(args) -> int:
    try:
        import tui  # noqa: F401  (textual is only needed by this command)
    except ImportError as e:
        raise UserError(f"the TUI needs textual: {e}") from None
    from tui.header import RunInfo

    path = os.path.abspath(args.path)
    run_dir = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path) and _writers_alive(path):
        _live(path, RunInfo.from_config(_config(run_dir)))
    else:
        _finished(path, run_dir)
    return 0


def _live(run_dir: str, info) -> None:
    from tui.app import LlmtraceApp
    from tui.feed import SpoolFeed
    from tui.model import RunModel

    LlmtraceApp(RunModel(), info, run_dir, feed=SpoolFeed(run_dir)).run()


def _finished(path: str, run_dir: str) -> None:
    from llmtrace.analyze import build_report
    from llmtrace.load import load_trace, truncation_warnings
    from tui.app import LlmtraceApp
    from tui.header import RunInfo
    from tui.model import RunModel

    print(f"loading {path}…", flush=True)
    trace = load_trace(path)
    for warning in truncation_warnings(trace):
        print(f"llmtrace tui: {warning}", file=sys.stderr)
    report = build_report(trace)
    model = RunModel(window=None, series=None)
    model.ingest(trace)
    model.settle(everything=True)
    info = RunInfo.from_config(_config(run_dir) or trace.meta.get("config"))
    LlmtraceApp(model, info, run_dir, report=report, trace=trace, source=path).run()


def _config(run_dir: str) -> dict | None:
    """`llmtrace run`'s config.yaml, when the run directory has one."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)
    return data if isinstance(data, dict) else None


def _writers_alive(run_dir: str) -> bool:
    """Whether a process that writes this run's spool files is still running."""
    from tui.feed import SpoolFeed

    feed = SpoolFeed(run_dir)
    return any(_alive(pid) for pid in feed.writer_pids())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
