"""`hot-function-in-stage`: one nested span or function takes a large share of an
overhead stage, and no more specific rule explained it.

Fingerprint: in a stage worth >= MIN_STAGE_SHARE of the per-token time, a host-side
function (nested llmtrace span, `@llmtrace.trace` function, viztracer/py-spy frame)
whose time is >= MIN_FUNCTION_SHARE of that stage's overhead. Runs after the specific
rules and skips the functions they claimed.
Saving: the function's time per token, i.e. what removing it from the per-step path
saves; making it cheaper saves part of it.
"""
from __future__ import annotations

ID = "hot-function-in-stage"
MIN_STAGE_SHARE = 0.05
MIN_FUNCTION_SHARE = 0.3


def check(ctx):
    out = []
    view = ctx.breakdown.view()
    if not view:
        return out
    for row in view["stages"]:
        if row["share"] < MIN_STAGE_SHARE:
            continue
        calls = [c for c in ctx.functions.select(stage=row["name"], host_side=True) if c.name not in ctx.claimed]
        for f in ctx.functions.stats(calls)[:3]:
            ms = ctx.ms_per_token(f.total_ns)
            share = ms / row["ms_per_token"] if row["ms_per_token"] else 0.0
            if share < MIN_FUNCTION_SHARE:
                break
            out.append(ctx.suggestion(
                ID, f"{f.name} takes {share:.0%} of {row['name']} ({ms:.2f} ms/token)", row["name"],
                {"function": f.name, "sources": f.sources, "ms_per_token": round(ms, 4),
                 "ms_per_call": round(f.total_ns / f.count / 1e6, 4), "calls": f.count,
                 "share_of_stage": round(share, 3), "example_steps": f.example_steps()},
                ms,
                f"Look at {f.name}: hoist it out of the per-step path, cache its result across steps, or "
                f"vectorize it; it is the largest cost inside {row['name']}."))
    return out
