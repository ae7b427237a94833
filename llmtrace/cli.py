"""The `llmtrace` command. Each subcommand lives in `llmtrace/commands/<name>.py` and is
imported only when used, so `llmtrace export` never pays for torch or textual.

Other packages add subcommands through the `llmtrace.commands` entry-point group: each
entry names a module with `add_parser(subparsers)` and `main(args) -> exit code` (the
engine's `run` and `serve`, the TUI's `tui`). The library imports none of them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import entry_points

from .errors import UserError


def _add_record(sub):
    p = sub.add_parser("record", help="run any Python program with tracing on: llmtrace record -- python x.py")
    p.add_argument("--out", help="output directory (default runs/<timestamp>/)")
    p.add_argument(
        "--sample-hz",
        type=float,
        default=250.0,
        help="in-process stack samples per second (0 = off): the functions each stage and "
        "the unannotated code between stages spend their time in",
    )
    p.add_argument(
        "--no-auto",
        action="store_true",
        help="no automatic spans at sockets, pipes, logging, sleep, serialization, torch, "
        "tokenizers, HTTP handlers (llmtrace.instrument) and garbage collections",
    )
    p.add_argument(
        "--gc",
        action="store_true",
        help="record garbage-collector pauses as `gc` spans also with --no-auto (on with auto)",
    )
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="sample every process with py-spy instead (falls back to in-process sampling)",
    )
    p.add_argument("--py-spy-rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--viztracer", action="store_true", help="function-level detail inside stages")
    p.add_argument(
        "--viztracer-stages",
        default="preprocess,sampling,postprocess",
        help="comma-separated stages that viztracer records inside",
    )
    p.add_argument("--viztracer-steps", type=int, default=20, help="steps viztracer records")
    p.add_argument(
        "--device-activity",
        type=int,
        default=0,
        metavar="N",
        help="on a GPU, read the kernel records (CUPTI via torch.profiler) of the first N model "
        "spans: device busy vs idle between kernels, and the launch-bound finding (0 = off)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- program and its arguments")


def _add_analyze(sub):
    p = sub.add_parser("analyze", help="per-token overhead breakdown and suggestions for a trace or run dir")
    p.add_argument("path", help="run directory, spool directory or trace.json")
    p.add_argument("--json", action="store_true", help="print report.json instead of text")
    p.add_argument("--markdown", action="store_true", help="print the markdown report")


def _add_export(sub):
    p = sub.add_parser("export", help="write Chrome trace JSON (opens in ui.perfetto.dev)")
    p.add_argument("path", help="run directory, spool directory or spool file (.lts)")
    p.add_argument(
        "-o",
        "--output",
        help="where to write (default: trace.json in the run directory, or <file>.trace.json next to a spool file)",
    )
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument(
        "--otlp",
        metavar="URL",
        help="send the spans to an OpenTelemetry receiver instead "
        "(OTLP/HTTP protobuf, e.g. http://localhost:4318/v1/traces)",
    )


def _add_merge(sub):
    p = sub.add_parser("merge", help="merge llmtrace, viztracer, py-spy and torch.profiler traces")
    p.add_argument(
        "inputs",
        nargs="+",
        help="Chrome trace files (.json or .json.gz); the first llmtrace one "
        "is the base, the others' clocks are aligned to it",
    )
    p.add_argument("-o", "--output", required=True, help="the merged trace to write")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")


def _add_diff(sub):
    p = sub.add_parser("diff", help="compare two runs per stage, with confidence intervals: did the fix work?")
    p.add_argument("before", help="run directory, spool directory or trace.json of the run before the change")
    p.add_argument("after", help="the same for the run after it")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--markdown", action="store_true", help="print it as markdown")


COMMANDS = {
    "record": _add_record,
    "analyze": _add_analyze,
    "diff": _add_diff,
    "export": _add_export,
    "merge": _add_merge,
}
PLUGIN_GROUP = "llmtrace.commands"
ENV_COMMAND = "LLMTRACE_COMMAND"  # set by a command that runs another as its child: errors name the one the user ran
DESCRIPTION = (
    "Tracing and per-token overhead analysis for LLM serving pipelines: record a program, "
    "see where each token's time goes outside the model, and what to fix."
)


def plugin_modules() -> dict[str, str]:
    """Subcommand name -> module, of every installed `llmtrace.commands` entry point."""
    return {ep.name: ep.value for ep in entry_points(group=PLUGIN_GROUP) if ep.name not in COMMANDS}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser and the module of each subcommand."""
    parser = argparse.ArgumentParser(prog="llmtrace", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")
    modules = {name: f"llmtrace.commands.{name}" for name in COMMANDS}
    for add in COMMANDS.values():
        add(sub)
    for name, module in sorted(plugin_modules().items()):
        try:
            importlib.import_module(module).add_parser(sub)
        except ImportError as e:  # a plugin whose own dependencies are missing
            sub.add_parser(name, help=f"(unavailable: {e})")
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(modules[args.command_name])
    try:
        return int(module.main(args) or 0)
    except UserError as e:
        print(f"llmtrace {os.environ.get(ENV_COMMAND) or args.command_name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
