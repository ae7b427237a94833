"""`detokenize-whole-sequence`: a streaming loop decodes each sequence's whole id list
again for every new token (text = tokenizer.decode(all_ids); delta = text[len(old):]),
so the detokenize cost per token grows with the output and the whole output costs
O(length^2).

Fingerprint: detokenize spans in steps (automatic instrumentation records how many ids
each decode call got, `ids`) that decode many ids per generated token (MIN_IDS_PER_TOKEN:
an incremental decoder reads the new token and a few before it).
Saving: what decoding only the new tokens leaves is each call's fixed cost and a few
ids' worth. Where the calls' ids spread (the longest at least SPREAD times the shortest),
a least-squares fit of call time over ids gives the cost per id (no finding when it does
not grow with the ids), and a call saves that times its ids beyond INCREMENTAL_IDS; each
call saves at most its time in proportion to those ids, which is the estimate where the
ids are too alike to fit (long calls: the fixed cost is small beside them).
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from ... import names
from ..analysis import MIN_STEPS_AFFECTED
from ..stats import slope

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion
    from ..functions import Call

ID = "detokenize-whole-sequence"
MIN_CALLS = 20
MIN_IDS_PER_TOKEN = 16
INCREMENTAL_IDS = 8  # ids an incremental decode reads per call: the new one and the context for word boundaries
SPREAD = 1.5  # the longest call's ids over the shortest's below which no slope is fitted

FIX = (
    "Detokenize incrementally: keep each sequence's text and offsets, decode only the new ids with a few "
    "before them for word boundaries and emit the text past the previous offset (vLLM's "
    "detokenize_incrementally, tokenizers' decoders.DecodeStream); never decode the whole sequence "
    "for every streamed token."
)


def _decode_calls(ctx: Analysis) -> list[Call]:
    """Detokenize calls on the critical path that say how many ids they decoded: the stage's
    own spans and detokenize spans nested in other stages, each once."""
    seen: set[int] = set()
    out: list[Call] = []
    for c in ctx.stage_calls(names.DETOKENIZE) + ctx.functions.calls:
        s = c.span
        if s is None or s.stage != names.DETOKENIZE or s.span_id in seen:
            continue
        if isinstance(s.attrs.get(names.A_IDS), (int, float)):
            seen.add(s.span_id)
            out.append(c)
    return out


def check(ctx: Analysis) -> list[Suggestion]:
    calls = _decode_calls(ctx)
    if len(calls) < MIN_CALLS or len({c.step for c in calls}) < MIN_STEPS_AFFECTED or not ctx.tokens:
        return []
    ids = [float(c.span.attrs[names.A_IDS]) for c in calls if c.span is not None]
    if sum(ids) / ctx.tokens < MIN_IDS_PER_TOKEN:
        return []
    durations = [float(c.end - c.start) for c in calls]
    per_id_ns = slope(ids, durations) if max(ids) >= SPREAD * max(1.0, min(ids)) else float("inf")
    if per_id_ns <= 0:
        return []
    saved_ns = sum(
        min(per_id_ns * (n - INCREMENTAL_IDS), d * (n - INCREMENTAL_IDS) / n)
        for n, d in zip(ids, durations)
        if n > INCREMENTAL_IDS
    )
    ctx.claim_calls(calls)
    ms = ctx.ms_per_token(saved_ns)
    evidence = {
        **ctx.function_evidence(calls),
        "decode_calls": len(calls),
        "median_ids_per_call": statistics.median(ids),
        "ids_per_output_token": round(sum(ids) / ctx.tokens, 1),
        "ms_per_token": round(ms, 4),
    }
    if per_id_ns != float("inf"):
        evidence["us_per_1000_ids"] = round(per_id_ns, 2)  # ns per id = us per 1000 ids
    title = (
        f"Each decode call detokenizes the whole sequence again ({evidence['median_ids_per_call']:.0f} ids "
        f"per call, {evidence['ids_per_output_token']:.0f} per output token): {ms:.2f} ms/token grows "
        f"with the output"
    )
    return [ctx.suggestion(ID, title, names.DETOKENIZE, evidence, ms, FIX)]
