"""`unsynced-gpu-timing`: host-timed spans around asynchronous device work, so the time is
charged to whichever span syncs next, not to the one that queued the work.

Two patterns, both only when `forward`/`sampling` carry no device time:
- "short launch, long sync": `forward` host time is a small fraction of the spans that
  wait for the device (stage `sync`, a name such as `sync.wait`, `synchronize`, `.item`,
  `Tensor.cpu`, or host-timed `sampling`, whose copy of the ids waits) in most steps:
  the device time shows up there;
- "four short, one long": a host stage spikes every k steps while the steps in between
  look cheap, and the spike is a sync: the stage is `sync`, or a span or function matching
  SYNC runs inside it in the spike steps (e.g. a periodic `.item()` or tensor print).
It saves no time by itself (est_saving 0); evidence gives the ms/token the current
timing charges to the wrong stage.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

from ..breakdown import MODEL, MODEL_STAGES, moves_logits
from ..stats import median

if TYPE_CHECKING:
    from ...timeline import Span
    from ..analysis import Analysis, Suggestion

ID = "unsynced-gpu-timing"
SYNC = re.compile(r"(^|\.)(sync|synchronize|item|wait)(\.|$)|(^|\.)Tensor\.(cpu|item|tolist)$")
LAUNCH_RATIO = 3.0  # sync time / forward host time above which forward looks like a launch only
MIN_SPIKES = 3
FIX = (
    "Time device work with CUDA events: `llmtrace.span('forward', device=True)` after "
    "`llmtrace.gpu.install()` (or torch.cuda.Event pairs); then a host span measures only the host "
    "and the breakdown puts the device time into the model."
)


def _host_timed_model(ctx: Analysis) -> bool:
    spans = [s for st in MODEL_STAGES for s in ctx.index.by_stage.get(st, ())]
    return bool(spans) and all(s.device_start_ns is None for s in spans)


def _absorbs(st: str, s: Span) -> bool:
    """A span that waits for the device: a sync, or host-timed sampling (its copy of the ids)."""
    return st == "sync" or bool(SYNC.search(s.name)) or (st == "sampling" and not moves_logits(s, 1))


def _sync_absorbs(ctx: Analysis) -> Suggestion | None:
    fwd: list[int] = []
    sync: list[int] = []
    steps: list[int] = []
    where: Counter[str] = Counter()
    for sc in ctx.steps:
        f = sum(s.dur_ns for st, s in sc.stage_spans if st == "forward")
        absorbing = [(st, s) for st, s in sc.stage_spans if st != "forward" and _absorbs(st, s)]
        y = sum(s.dur_ns for _, s in absorbing)
        if f and y > LAUNCH_RATIO * f:
            fwd.append(f)
            sync.append(y)
            steps.append(sc.step)
            where.update({st: s.dur_ns for st, s in absorbing})
    if len(steps) * 2 < len(ctx.steps) or not steps:
        return None
    stage = where.most_common(1)[0][0]
    wrong = round(ctx.ms_per_token(sum(sync)), 4)
    return ctx.suggestion(
        ID,
        f"Device time is charged to {stage}: forward is host-timed on an asynchronous device",
        stage,
        {
            "steps_affected": len(steps),
            "example_steps": steps[:5],
            "forward_host_ms_p50": round(median(fwd) / 1e6, 4),
            "sync_ms_p50": round(median(sync) / 1e6, 4),
            "misattributed_ms_per_token": wrong,
        },
        0.0,
        FIX,
        _impact(wrong, stage),
    )


def _impact(ms_per_token: float, stage: str) -> str:
    return f"a true breakdown: {ms_per_token:.3f} ms/token of device work now shows as {stage}"


def _periodic(step_ids: list[int]) -> int | None:
    diffs = Counter(b - a for a, b in zip(step_ids, step_ids[1:]))
    if not diffs:
        return None
    k, n = diffs.most_common(1)[0]
    return k if k >= 2 and n >= 0.75 * sum(diffs.values()) else None


def _syncs_in(ctx: Analysis, stage: str, steps: set[int]) -> bool:
    if stage == "sync":
        return True
    spans = [s for sc in ctx.steps if sc.step in steps for st, s in sc.stage_spans if st == stage]
    calls = [c for c in ctx.functions.select(SYNC, stage=stage) if c.step in steps]
    ctx.claim(c.name for c in calls)  # its time is device work, not a hot function to remove
    return any(SYNC.search(s.name) for s in spans) or bool(calls)


def _spikes(ctx: Analysis) -> list[Suggestion]:
    out: list[Suggestion] = []
    labels = {lab for sc in ctx.steps for lab in sc.parts} - {MODEL, "gap", "tcp"}
    for lab in sorted(labels):
        vals = [sc.parts.get(lab, 0) for sc in ctx.steps]
        m = median(vals)
        spikes = [(sc.step, v - m) for sc, v in zip(ctx.steps, vals) if v > max(3 * m, m + 1_000_000)]
        k = _periodic([s for s, _ in spikes]) if len(spikes) >= MIN_SPIKES else None
        if k is None or not _syncs_in(ctx, lab, {s for s, _ in spikes}):
            continue
        wrong = round(ctx.ms_per_token(sum(e for _, e in spikes)), 4)
        out.append(
            ctx.suggestion(
                ID,
                f"'{lab}' spikes every {k} steps: a periodic sync absorbs queued device work",
                lab,
                {
                    "period_steps": k,
                    "spikes": len(spikes),
                    "example_steps": [s for s, _ in spikes][:5],
                    "stage_ms_p50": round(m / 1e6, 4),
                    "spike_ms_p50": round(median(e for _, e in spikes) / 1e6 + m / 1e6, 4),
                    "misattributed_ms_per_token": wrong,
                },
                0.0,
                FIX,
                _impact(wrong, lab),
            )
        )
    return out


def check(ctx: Analysis) -> list[Suggestion]:
    if not ctx.steps or not _host_timed_model(ctx):
        return []
    found = _spikes(ctx)
    absorbed = _sync_absorbs(ctx)
    return ([absorbed] if absorbed else []) + found
