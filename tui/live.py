"""`llmtrace run --tui`: the workload runs in a background thread (its own asyncio loop)
while the TUI runs in the foreground, reading the run's spool files as they grow."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

from .app import LlmtraceApp
from .feed import SpoolFeed
from .header import RunInfo
from .model import RunModel

Workload = Callable[[Callable], Awaitable]  # workload(progress_callback) -> result


def run_live(run_dir: str, info: RunInfo, workload: Workload):
    """Run `workload` under the live TUI; returns its result once the user quits.

    Quitting before the workload ends cancels it and raises KeyboardInterrupt; an error
    of the workload (the engine died) is raised here after the TUI closes."""
    app = LlmtraceApp(RunModel(), info, run_dir, feed=SpoolFeed(run_dir))
    box: dict = {}

    def progress(p) -> None:
        """The load generator's callback (engine.workload.Progress): requests done so far."""
        app.requests_done = p.done  # read by the next redraw; an int store needs no lock

    async def main():
        box["loop"], box["task"] = asyncio.get_running_loop(), asyncio.current_task()
        return await workload(progress)

    def target() -> None:
        message = "workload done: q writes the report"
        try:
            box["result"] = asyncio.run(main())
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e
            message = f"workload stopped: {e}"
        if app.is_running:
            try:
                app.call_from_thread(app.workload_finished, message)
            except RuntimeError:
                pass  # the app closed meanwhile

    thread = threading.Thread(target=target, name="llmtrace-workload", daemon=True)
    thread.start()
    app.run()
    if thread.is_alive():
        loop, task = box.get("loop"), box.get("task")
        if loop is not None:
            loop.call_soon_threadsafe(task.cancel)
        thread.join()
        raise KeyboardInterrupt
    if "error" in box:
        raise box["error"]
    return box.get("result")
