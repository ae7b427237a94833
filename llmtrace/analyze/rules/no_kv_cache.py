"""`no-kv-cache`: a decode loop that runs the model over the whole sequence every step
(`use_cache=False`, or past_key_values dropped) instead of feeding only the new token.

Fingerprint: on one thread, runs of at least MIN_RUN consecutive outermost `forward`
spans whose input grows by exactly one token per sequence each step (automatic
instrumentation records `batch` and `tokens` of the input ids): step n recomputes the
keys and values of every earlier position.
Saving: from a least-squares fit of those forwards' time against their tokens per
sequence, t = a + b * L: a step with a KV cache costs about a + b (one new token), so
each step saves t - (a + b).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import names

if TYPE_CHECKING:
    from ...timeline import Span
    from ..analysis import Analysis, Suggestion

ID = "no-kv-cache"
MIN_RUN = 4


def _runs(ctx: Analysis) -> list[list[tuple[float, Span]]]:
    """Runs of forwards (one thread) whose tokens per sequence grow by one each step."""
    by_thread: dict[tuple[int, int], dict[int, Span]] = {}
    for sc in ctx.steps:
        for _, s in sc.stage_spans:
            if (
                s.stage == names.FORWARD
                and isinstance(s.attrs.get(names.A_TOKENS), int)
                and isinstance(s.attrs.get(names.A_BATCH), int)
                and s.attrs[names.A_BATCH] > 0
            ):
                by_thread.setdefault((s.pid, s.tid), {})[s.span_id] = s
    runs: list[list[tuple[float, Span]]] = []
    for spans in by_thread.values():
        run: list[tuple[float, Span]] = []
        for s in sorted(spans.values(), key=lambda s: s.start_ns):
            per_seq = s.attrs[names.A_TOKENS] / s.attrs[names.A_BATCH]
            if run and per_seq == run[-1][0] + 1 and s.attrs[names.A_BATCH] == run[-1][1].attrs[names.A_BATCH]:
                run.append((per_seq, s))
                continue
            if len(run) >= MIN_RUN:
                runs.append(run)
            run = [(per_seq, s)]
        if len(run) >= MIN_RUN:
            runs.append(run)
    return runs


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
    return my - b * mx, max(0.0, b)


def _dur(s: Span) -> float:
    return float(s.device_dur_ns if s.device_dur_ns is not None else s.dur_ns)


def check(ctx: Analysis) -> list[Suggestion]:
    runs = _runs(ctx)
    if not runs:
        return []
    points = [(L, _dur(s)) for run in runs for L, s in run]
    a, b = _fit(points)
    cached = a + b
    saving_ns = sum(max(0.0, t - cached) for _, t in points)
    longest = max(L for L, _ in points)
    ms = ctx.ms_per_token(saving_ns)
    return [
        ctx.suggestion(
            ID,
            f"The decode loop recomputes the whole sequence each step ({len(points)} forwards, up to "
            f"{longest:.0f} tokens per sequence)",
            names.FORWARD,
            {
                "forwards": len(points),
                "runs": len(runs),
                "longest_tokens_per_seq": longest,
                "fit_ms": {"per_step": round(a / 1e6, 4), "per_token_of_context": round(b / 1e6, 5)},
                "cached_step_ms_est": round(cached / 1e6, 4),
                "example_steps": [run[0][1].step for run in runs[:5]],
            },
            ms,
            "Keep the KV cache: call the model with use_cache=True and pass its past_key_values (or a Cache) "
            "back with only the new token each step; a serving engine with a paged KV cache does this for a "
            "whole batch.",
        )
    ]
