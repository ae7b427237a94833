"""`unbatched-requests`: the model runs one sequence per forward while other requests are
in flight: each request decodes alone (a handler that runs its own generate loop under a
model lock, a worker that takes one request at a time), so concurrent requests queue
instead of sharing steps.

Fingerprint: steps of one token (no `batch` > 1 on the forward or the step) that start
while at least two HTTP requests (`http.request` spans, any process) are open, in at
least MIN_SHARE of the steps. Pipelines whose scheduler declares its limit
(`max_num_seqs`) batch by design: `underfilled-batch` judges those.
Saving: each such step runs the requests then in flight as one batch. Its time at that
batch comes from the trace's own forwards when their token counts vary (a fit of
forward time over tokens: the model's cost per token on this device). Otherwise, with
the model on a GPU (device timing recorded), the step is taken to cost what it costs
now (decode is memory-bound); on a CPU the forward's whole time is taken to grow with
the batch, so only the rest of the step is shared: a lower bound (a CPU batch costs
less than that), with the flat estimate as the upper one in the title and evidence.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING

from ... import names
from ..breakdown import MODEL
from ..stats import median, slope
from .limits import max_num_seqs

if TYPE_CHECKING:
    from ...timeline import Span
    from ..analysis import Analysis, Suggestion
    from ..breakdown import StepCost

ID = "unbatched-requests"
MIN_SHARE = 0.5
MIN_STEPS = 10
FIT_SPREAD = 2.0  # the forwards' token counts must span this ratio to fit a cost per token

FIX = (
    "Batch concurrent requests: run one decode loop that takes every waiting request into the next "
    "step (continuous batching: a queue the handlers put into and the loop drains each step, padding or "
    "packing the sequences into one forward), instead of a generate loop per request behind a lock; or "
    "serve the model with an engine that batches (vLLM, TGI, SGLang)."
)


class _InFlight:
    """How many requests were open at a time, from the HTTP request spans."""

    def __init__(self, spans: list[Span]):
        self.starts = sorted(s.start_ns for s in spans)
        self.ends = sorted(s.end_ns for s in spans)

    def at(self, t: int) -> int:
        return bisect_right(self.starts, t) - bisect_right(self.ends, t)


def _fitted_cost_per_token(ctx: Analysis) -> float | None:
    """ns of forward per token processed, fitted over the steps' forwards; None when their
    token counts are too alike to tell."""
    pts = [
        (float(s.attrs[names.A_TOKENS]), float(s.end_ns - s.start_ns))
        for sc in ctx.steps
        for st, s in sc.stage_spans
        if st in ctx.breakdown.profile.model_stages
        and isinstance(s.attrs.get(names.A_TOKENS), (int, float))
        and s.attrs[names.A_TOKENS] > 0
    ]
    if len(pts) < MIN_STEPS or max(x for x, _ in pts) < FIT_SPREAD * min(x for x, _ in pts):
        return None
    return max(0.0, slope([x for x, _ in pts], [y for _, y in pts]))


def _batched_step_ns(ctx: Analysis, steps: list[StepCost], targets: list[int]) -> tuple[list[float], str]:
    """Each step's time with its in-flight requests as one batch, and what that rests on."""
    per_token = _fitted_cost_per_token(ctx)
    if per_token is not None:
        return (
            [sc.wall_ns + per_token * _forward_tokens(ctx, sc) * (n - 1) for sc, n in zip(steps, targets)],
            f"fitted from this trace's forwards: {per_token / 1e3:.2f} us per token",
        )
    if ctx.has_device_timing():
        return [float(sc.wall_ns) for sc in steps], "flat: a decode step on the GPU costs about the same at the batch"
    return (
        [sc.wall_ns + sc.parts.get(MODEL, 0) * (n - 1) for sc, n in zip(steps, targets)],
        "proportional: on the CPU the forward's time grows with the batch; a lower bound",
    )


def _forward_tokens(ctx: Analysis, sc: StepCost) -> float:
    return sum(
        float(s.attrs.get(names.A_TOKENS) or 0) for st, s in sc.stage_spans if st in ctx.breakdown.profile.model_stages
    )


def check(ctx: Analysis) -> list[Suggestion]:
    requests = [s for s in ctx.trace.spans if s.name == names.HTTP_REQUEST]
    if len(requests) < 2 or max_num_seqs(ctx) or len(ctx.steps) < MIN_STEPS:
        return []
    in_flight = _InFlight(requests)
    steps: list[StepCost] = []
    targets: list[int] = []
    for sc in ctx.steps:
        n = in_flight.at(sc.root.start_ns)
        if sc.tokens <= 1 and n >= 2:
            steps.append(sc)
            targets.append(n)
    if len(steps) < MIN_SHARE * len(ctx.steps):
        return []
    batched, basis = _batched_step_ns(ctx, steps, targets)
    ms = _saved_ms(ctx, steps, targets, batched)
    upper = _saved_ms(ctx, steps, targets, [float(sc.wall_ns) for sc in steps])
    evidence = {
        "ms_per_token": round(ms, 4),
        "ms_per_token_if_flat": round(upper, 4),
        "steps_unbatched": len(steps),
        "in_flight_p50": median(targets),
        "model_ms_per_step_p50": round(median(sc.parts.get(MODEL, 0) for sc in steps) / 1e6, 4),
        "batch_cost": basis,
        "example_steps": [sc.step for sc in steps[:5]],
    }
    title = (
        f"The model runs one sequence per forward while {median(targets):.0f} requests are in flight "
        f"({len(steps)} of {len(ctx.steps)} steps)"
    )
    if upper > 1.5 * ms:
        title += f"; batching saves {ms:.2f} ms/token or more, {upper:.2f} if a batch costs what one sequence does"
    return [ctx.suggestion(ID, title, "schedule", evidence, ms, FIX)]


def _saved_ms(ctx: Analysis, steps: list[StepCost], targets: list[int], batched: list[float]) -> float:
    """ms/token saved when step i takes batched[i] for targets[i] tokens instead of its own."""
    now = sum(sc.wall_ns for sc in steps)
    return ctx.ms_per_token(max(0.0, now - sum(t / n for t, n in zip(batched, targets))))
