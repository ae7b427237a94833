"""`llmtrace serve --config FILE [--host] [--port] [--out]`: the engine behind its HTTP API
(http://127.0.0.1:8000 unless configured or given).

Serves until Ctrl-C or SIGTERM, then stops the server, the agents and the shared memory
on every path (a failed start included). With --out the master and agents record a trace,
and when the server stops it writes trace.json, report.json and report.md there, as `run`
does.
"""

from __future__ import annotations

import asyncio
import signal

import llmtrace
from llmtrace.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="start the engine's HTTP server (Ctrl-C stops every process)")
    p.add_argument("--config", required=True, help="YAML config (see examples/quickstart.yaml)")
    p.add_argument("--host", help="bind address (default: engine.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: engine.port, 8000; 0 = any free port)")
    p.add_argument(
        "--out",
        help="record a trace into this directory; trace.json, report.json and report.md "
        "are written there when the server stops",
    )
    p.add_argument(
        "--no-report",
        action="store_true",
        help="with --out, keep only the recording (spool/): `llmtrace run` writes the report itself",
    )


def main(args) -> int:
    from engine.config import load_config
    from engine.trace_resource import resource

    cfg = load_config(args.config)
    out = args.out or cfg.trace.out
    if out:
        llmtrace.configure(out=out, process_name="master", resource=resource(cfg))
    try:
        asyncio.run(_serve(cfg, args.host, args.port))
    finally:
        if out:
            llmtrace.shutdown()
    return _write_outputs(out) if out and not args.no_report else 0


def _write_outputs(out: str) -> int:
    from llmtrace.load import load_trace
    from llmtrace.outputs import write_outputs

    return write_outputs(out, load_trace(out), command="serve")


async def _serve(cfg, host: str | None, port: int | None) -> None:
    from engine.master import EngineDead
    from engine.server import start_engine

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        handle = await start_engine(cfg, host, port)
    except EngineDead as e:
        if stop.is_set():  # Ctrl-C while the agents loaded: their arenas went with the signal
            print("stopped while starting", flush=True)
            return
        raise UserError(f"the engine did not start: {e}") from None
    try:
        print(
            f"serving {cfg.model.preset or cfg.model.path} at {handle.url}  "
            f"(POST /v1/completions, POST /generate, GET /health, GET /metrics; Ctrl-C stops)",
            flush=True,
        )
        await stop.wait()
        print("stopping", flush=True)
    finally:
        await handle.close()
