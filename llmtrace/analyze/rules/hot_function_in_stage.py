"""`hot-function-in-stage`: one nested span or function takes a large share of an
overhead stage, and no more specific rule explained it.

Fingerprint: in a stage worth >= MIN_STAGE_SHARE of the per-token time, a host-side
function (nested llmtrace span, `@llmtrace.trace` function, viztracer event, sampled
frame) whose time, less the time of calls other rules explained inside it, is >=
MIN_FUNCTION_SHARE of that stage, seen in at least MIN_SAMPLES stack samples when samples
are all the evidence (each stands for a sampling interval, which a slowed sampler makes
longer than a short stage: two samples are not a finding). Runs after the specific rules.
Not reported: waiting (select/poll/wait frames, samples of a thread blocked in one: the
stage is blocked, not busy), llmtrace's own frames (the tracing section reports them),
a caller whose time is its callee's (the callee is named instead), and the call that is
a transfer stage (tcp, ipc, shm, sync: its send, receive or copy).
Saving: that unexplained time per token, i.e. what removing the function from the
per-step path saves; making it cheaper saves part of it.
A host stage worth >= MIN_STAGE_SHARE with no function-level data at all gets a
finding with no saving: record functions inside it (stack samples, viztracer, py-spy).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ... import names
from ...frame_labels import IDLE

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion
    from ..functions import Call
    from ..report_schema import StageRow

ID = "hot-function-in-stage"
AFTER = "*"  # rules.ALL: what every specific finding explained is claimed by then
MIN_STAGE_SHARE = 0.05
MIN_FUNCTION_SHARE = 0.3
MIN_SAMPLES = 5
NOT_BLIND = ("gap", names.TCP, names.SYNC)  # no code of their own runs there: pauses, transport, device waits
# a transfer's stage is its send, receive or copy call: that call taking the stage is no finding
# (what makes transfers slow has rules of its own: tcp-nodelay, serialization, full-logits-transfer)
TRANSFERS = (names.TCP, names.IPC, names.SHM, names.SYNC)
SAME_TIME = 0.1  # a caller within 10% of its callee's time is the same finding
OWN = re.compile(r"^llmtrace\.")


def _stage_findings(ctx: Analysis, stage: str, stage_ms: float) -> list[tuple[float, str, list[Call]]]:
    host = ctx.functions.select(stage=stage, host_side=True)
    by_name: dict[str, list[Call]] = {}
    for c in host:
        if c.name not in ctx.claimed and not c.idle and not IDLE.search(c.name) and not OWN.search(c.name):
            by_name.setdefault(c.name, []).append(c)
    found: list[tuple[float, str, list[Call]]] = []
    for name, calls in by_name.items():
        if all(c.sample is not None for c in calls) and len({id(c.sample) for c in calls}) < MIN_SAMPLES:
            continue
        # samples stand for sampling intervals, which can add up to more than the stage's
        # measured time: a function takes at most all of it
        ms = min(stage_ms, ctx.ms_per_token(sum(ctx.unexplained(calls)[1].values())))
        if stage_ms and ms / stage_ms >= MIN_FUNCTION_SHARE:
            found.append((ms, name, calls))
    found.sort(key=lambda f: -f[0])
    kept: list[tuple[float, str, list[Call]]] = []
    for f in found:  # callers come first (more time): a callee with the same time replaces its caller
        same = [k for k in kept if k[0] - f[0] <= SAME_TIME * k[0]]
        kept = [k for k in kept if k not in same] + [f]
    return kept


def check(ctx: Analysis) -> list[Suggestion]:
    out: list[Suggestion] = []
    view = ctx.breakdown.view()
    if not view:
        return out
    for row in view["stages"]:
        if row["share"] < MIN_STAGE_SHARE:
            continue
        if row["name"] not in NOT_BLIND and not ctx.functions.select(stage=row["name"]):
            out.append(_blind(ctx, row))
        if row["name"] in TRANSFERS:
            continue
        for ms, name, calls in _stage_findings(ctx, row["name"], row["ms_per_token"]):
            share = ms / row["ms_per_token"]
            stat = ctx.functions.stats(calls)[0]
            out.append(
                ctx.suggestion(
                    ID,
                    f"{name} takes {share:.0%} of {row['name']} ({ms:.2f} ms/token)",
                    row["name"],
                    {
                        "function": name,
                        "sources": stat.sources,
                        "ms_per_token": round(ms, 4),
                        "ms_per_call": round(stat.total_ns / stat.count / 1e6, 4),
                        "calls": stat.count,
                        "share_of_stage": round(share, 3),
                        "example_steps": stat.example_steps(),
                    },
                    ms,
                    f"Look at {name}: hoist it out of the per-step path, cache its result across steps, or "
                    f"vectorize it; it is the largest unexplained cost inside {row['name']}.",
                )
            )
    return out


def _blind(ctx: Analysis, row: StageRow) -> Suggestion:
    return ctx.suggestion(
        ID,
        f"{row['name']} takes {row['share']:.0%} of each token and nothing inside it is recorded",
        row["name"],
        {"ms_per_token": round(row["ms_per_token"], 4), "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"]},
        0.0,
        f"Record what runs inside {row['name']}: `trace.detail: full` (stack samples and gc spans) in the run "
        f"config, `llmtrace record --py-spy` or `--viztracer --viztracer-stages {row['name']}`, or "
        f"@llmtrace.trace on its helpers; then this report names the functions and their cost.",
        f"visibility: {row['share']:.0%} of each token is unexplained",
    )
