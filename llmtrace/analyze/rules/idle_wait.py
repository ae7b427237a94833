"""`wait-in-step`: the step loop blocks on a receive that no other process ended: a
`queue.get(timeout=...)`, `poll(timeout)` or socket read that waits for new work (or for
its timeout) while requests are running.

Fingerprint: receive spans (stage tcp / ipc, named *.recv / *.get) on a step's critical
path, each at least MIN_WAIT_MS long, that no send of another process ended
(peers.py finds none), not asked to return at once (a get_nowait slowed by a busy CPU is
no wait for work); the program's function that waits comes from the stack samples taken
during the wait.
Saving: their time per token: take new work without blocking while a batch is running
(get_nowait / poll(0)) and block only when idle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import names
from ...names import is_receive
from ..analysis import MIN_STEPS_AFFECTED
from ..functions import Call, covered

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion

ID = "wait-in-step"
# receives that a transport finding explains (a stall, a logits copy, a decode loop) are not idle waits
AFTER = ("tcp-nodelay", "full-logits-transfer", "serialization-in-hot-path", "detokenize-whole-sequence")
MIN_WAIT_MS = 0.5


def check(ctx: Analysis) -> list[Suggestion]:
    peers = ctx.breakdown.peers
    calls = [
        Call(stage, sc.step, s.pid, s.start_ns, s.end_ns, s.name, "span", True, s)
        for sc in ctx.steps
        for stage, s in sc.stage_spans
        if is_receive(s)
        and s.name not in ctx.claimed
        and s.dur_ns >= MIN_WAIT_MS * 1e6
        and not s.attrs.get(names.A_NONBLOCKING)
        and peers.sender_of(s) is None
    ]
    if len({c.step for c in calls}) < MIN_STEPS_AFFECTED:
        return []
    ns, per_step = covered(calls)
    ms = ctx.ms_per_token(ns)
    ev = ctx.function_evidence(calls)
    ctx.claim_calls(calls)
    ev["ms_per_wait"] = round(ns / len(calls) / 1e6, 4)
    where = f" in {ev['responsible'][0]['function']}" if ev["responsible"] else ""
    return [
        ctx.suggestion(
            ID,
            f"Steps block{where} on {calls[0].name} that no peer answered: {len(calls)} waits, {ms:.2f} ms/token",
            calls[0].stage,
            ev,
            ms,
            "While a batch is running, take new work without blocking (queue.get_nowait(), conn.poll(0), a "
            "non-blocking socket) and block only when nothing is running; a timeout meant for the idle loop "
            "otherwise costs every step its full length.",
        )
    ]
