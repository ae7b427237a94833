"""`serialization-in-hot-path`: encoding or decoding messages (json, pickle, msgpack,
orjson) on the step's critical path, typically whole arrays (logits, hidden states,
token lists) converted to Python objects and text for a transport.

Fingerprint: spans of stage `serialize` (automatic instrumentation wraps json/pickle/
msgpack/orjson dumps and loads) inside steps, on the critical path.
Reported when it is at least MIN_SHARE of the per-token time or its median call takes
MIN_CALL_MS: encoding a small control message per step is normal (tens of us a call; the
mean, which one preempted call on a loaded machine can double, made a clean program's
control messages a finding).
Saving: their time per token: send only what the receiver needs (the sampled ids, not
the logits), as raw buffers (numpy `tobytes`, shared memory) instead of text.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from ... import names

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion
    from ..report_schema import Evidence

ID = "serialization-in-hot-path"
MIN_SHARE = 0.03
MIN_CALL_MS = 0.1


FIX = (
    "Move less and encode it cheaply: send token ids instead of logits or hidden states, pass arrays "
    "as raw bytes (ndarray.tobytes / np.frombuffer, torch shared memory, multiprocessing.shared_memory) "
    "with a small header, and keep json/pickle for control messages off the per-step path."
)


def _title(ms: float, steps: list[int], ev: Evidence) -> str:
    return f"Serializing messages costs {ms:.2f} ms/token ({ev['spans']} encode/decode calls in {len(steps)} steps)"


def check(ctx: Analysis) -> list[Suggestion]:
    ms = ctx.breakdown.ms_per_token(names.SERIALIZE)
    calls = ctx.stage_calls(names.SERIALIZE)
    # the median call: a few calls preempted on a loaded machine make no small message large
    per_call = statistics.median(c.end - c.start for c in calls) / 1e6 if calls else 0.0
    if ms < MIN_SHARE * ctx.per_token_ms and per_call < MIN_CALL_MS:
        return []
    return ctx.stage_suggestion(ID, names.SERIALIZE, _title, FIX)
