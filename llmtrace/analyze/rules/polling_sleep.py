"""`polling-sleep`: the step loop sleeps (time.sleep / asyncio.sleep) on its critical path,
typically polling for work or waiting "for more requests to batch".

Fingerprint: spans of stage `sleep` (automatic instrumentation wraps time.sleep and
asyncio.sleep) inside steps, on the critical path; the functions that sleep come from
the stack samples taken during them.
Saving: their time per token: a loop that blocks on its queue or event instead wakes
the moment work arrives, and a step never waits on a clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import names

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion
    from ..report_schema import Evidence

ID = "polling-sleep"


FIX = (
    "Do not sleep on the step path: block on the work queue with a timeout (queue.get(timeout=...), "
    "threading.Condition.wait, asyncio.Event / asyncio.Queue.get) so the loop wakes as soon as a request "
    "arrives; to batch arrivals, take what is queued now and let continuous batching add the rest at "
    "the next step instead of waiting a fixed time."
)


def _title(ms: float, steps: list[int], ev: Evidence) -> str:
    where = f" in {ev['responsible'][0]['function']}" if ev.get("responsible") else ""
    return f"The step loop sleeps{where}: {ms:.2f} ms/token in {len(steps)} steps"


def check(ctx: Analysis) -> list[Suggestion]:
    return ctx.stage_suggestion(ID, names.SLEEP, _title, FIX)
