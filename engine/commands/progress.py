"""The progress bar of `llmtrace run`: requests done and live output tokens/s."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class WorkloadProgress:
    def __init__(self, workload_cfg):
        total = getattr(workload_cfg, "num_requests", None)
        self._progress = Progress(
            TextColumn("[bold]workload"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self._task = self._progress.add_task("requests", total=total, rate="")
        self._t0 = time.monotonic()
        self._window: list[tuple[float, int]] = []
        self._last, self._done = 0.0, -1

    def __enter__(self) -> WorkloadProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(self, p) -> None:
        """Called by the workload client (engine.workload.Progress) on every streamed chunk."""
        done, output_tokens, errors = p.done, p.output_tokens, p.errors
        now = time.monotonic()
        if now - self._last < 0.1 and done == self._done:
            return  # called per streamed chunk: redraw at most 10 times a second
        self._last, self._done = now, done
        self._window.append((now, output_tokens))
        while len(self._window) > 2 and now - self._window[0][0] > 2.0:
            self._window.pop(0)
        (t0, n0) = self._window[0]
        rate = (output_tokens - n0) / (now - t0) if now > t0 else 0.0
        text = f"{rate:7.0f} tok/s  {output_tokens} tokens" + (f"  [red]{errors} errors" if errors else "")
        self._progress.update(self._task, completed=done, rate=text)
