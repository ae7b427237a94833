"""`llmtrace run --tui`: the workload runs in a background thread (its own asyncio loop)
while the TUI runs in the foreground, reading the run's spool files as they grow."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from .app import LlmtraceApp
from .feed import SpoolFeed
from .header import RunInfo
from .model import RunModel

Workload = Callable[[Callable], Coroutine[Any, Any, Any]]  # workload(progress_callback) -> result


def run_live(run_dir: str, info: RunInfo, workload: Workload):
    """Run `workload` under the live TUI; returns its result once the user quits.

    Quitting before the workload ends cancels it and raises KeyboardInterrupt; an error
    of the workload (the engine died) is raised here after the TUI closes."""
    app = LlmtraceApp(RunModel(), info, run_dir, feed=SpoolFeed(run_dir))

    def progress(p) -> None:
        """The load generator's callback (engine.workload.Progress): requests done so far."""
        app.requests_done = p.done

    # Made here, run by the thread: quitting can cancel the task whenever it happens.
    loop = asyncio.new_event_loop()
    task = loop.create_task(workload(progress))
    box: dict = {}

    def target() -> None:
        asyncio.set_event_loop(loop)
        try:
            box["result"] = loop.run_until_complete(task)
            app.workload_ended = "workload done: q writes the report"
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e
            app.workload_ended = f"workload stopped: {e}"
        finally:
            _close(loop)

    thread = threading.Thread(target=target, name="llmtrace-workload", daemon=True)
    thread.start()
    app.run()
    if thread.is_alive():
        loop.call_soon_threadsafe(task.cancel)
        thread.join()
        raise KeyboardInterrupt
    if "error" in box:
        raise box["error"]
    return box["result"]


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what the workload left running (its requests) and close the loop, as asyncio.run does."""
    pending = asyncio.all_tasks(loop)
    for t in pending:
        t.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    asyncio.set_event_loop(None)
    loop.close()
