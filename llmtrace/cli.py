"""The `llmtrace` command. Each subcommand lives in `llmtrace/commands/<name>.py` and is
imported only when used, so `llmtrace export` never pays for torch or textual."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError


def _add_run(sub):
    p = sub.add_parser("run", help="run the engine on a workload, trace it, write trace + report")
    p.add_argument("--config", required=True, help="YAML config (see examples/quickstart.yaml)")
    p.add_argument("--out", help="output directory (default runs/<timestamp>/)")
    p.add_argument("--tui", action="store_true", help="show the live TUI while the workload runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set workload.num_requests=8")


def _add_serve(sub):
    p = sub.add_parser("serve", help="start the engine's HTTP server (Ctrl-C stops every process)")
    p.add_argument("--config", required=True)
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default from config, 0 = any free)")
    p.add_argument("--out", help="also record a trace into this directory")


def _add_record(sub):
    p = sub.add_parser("record", help="run any Python program with tracing on: llmtrace record -- python x.py")
    p.add_argument("--out", help="output directory (default runs/<timestamp>/)")
    p.add_argument("--sample-hz", type=float, default=500.0,
                   help="in-process stack samples per second (0 = off): top functions per stage")
    p.add_argument("--gc", action="store_true", help="record garbage-collector pauses as `gc` spans")
    p.add_argument("--py-spy", action="store_true",
                   help="sample every process with py-spy instead (falls back to in-process sampling)")
    p.add_argument("--py-spy-rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--viztracer", action="store_true", help="function-level detail inside stages")
    p.add_argument("--viztracer-stages", default="preprocess,sampling,postprocess",
                   help="comma-separated stages that viztracer records inside")
    p.add_argument("--viztracer-steps", type=int, default=20, help="steps viztracer records")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- program and its arguments")


def _add_analyze(sub):
    p = sub.add_parser("analyze", help="per-token overhead breakdown and suggestions for a trace or run dir")
    p.add_argument("path", help="run directory, spool directory or trace.json")
    p.add_argument("--json", action="store_true", help="print report.json instead of text")
    p.add_argument("--markdown", action="store_true", help="print the markdown report")


def _add_tui(sub):
    p = sub.add_parser("tui", help="browse a finished run (or a live one) in the terminal")
    p.add_argument("path", help="run directory or trace.json")


def _add_export(sub):
    p = sub.add_parser("export", help="write Chrome trace JSON (opens in ui.perfetto.dev)")
    p.add_argument("path", help="run directory or spool directory")
    p.add_argument("-o", "--output", default="trace.json")


def _add_merge(sub):
    p = sub.add_parser("merge", help="merge llmtrace, viztracer, py-spy and torch.profiler traces")
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--output", default="merged.json")


COMMANDS = {
    "run": _add_run,
    "serve": _add_serve,
    "record": _add_record,
    "analyze": _add_analyze,
    "tui": _add_tui,
    "export": _add_export,
    "merge": _add_merge,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmtrace", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"llmtrace.commands.{args.command_name}")
    try:
        return int(module.main(args) or 0)
    except UserError as e:
        print(f"llmtrace {args.command_name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
