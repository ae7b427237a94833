"""Serving metrics (the report's `summary`): requests, tokens, throughput, latencies, batch
and KV usage over time.

Sources, each optional: `http.request` spans (req, output_tokens, ttft_us), `queue` spans,
`token` instants (req, n = tokens so far), `req.finish` instants, and the master's
counters. A generic pipeline with none of them still gets duration, tokens and
throughput from its steps, and a request's TTFT and queue time from the steps that served
it where they can be linked (request_steps.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from .. import names
from .breakdown import Breakdown
from .index import TraceIndex
from .report_schema import BatchSize, KvUsage, Latencies, RequestLinks, Summary
from .request_steps import RequestLink, request_links
from .stats import summary

TIMELINE_POINTS = 200


@dataclass
class _Request:
    start: int | None = None
    end: int | None = None
    ttft_ns: int | None = None
    output_tokens: int | None = None
    tokens: list[tuple[int, int]] = field(default_factory=list)  # (ts, n so far)
    link: RequestLink | None = None  # the steps that served it, found without its help

    def finish(self) -> int | None:
        return self.end if self.end is not None else (self.tokens[-1][0] if self.tokens else None)


def _num(v: object) -> float | None:
    """A numeric attribute, or None (attrs of foreign traces can be anything)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _requests(index: TraceIndex, links: dict[int, RequestLink]) -> dict[object, _Request]:
    reqs: dict[object, _Request] = defaultdict(_Request)
    for s in index.by_name.get(names.HTTP_REQUEST, ()):
        r = reqs[s.attrs.get(names.A_REQ, s.span_id)]
        r.start, r.end, r.link = s.start_ns, s.end_ns, links.get(s.span_id)
        out, ttft = _num(s.attrs.get(names.A_OUTPUT_TOKENS)), _num(s.attrs.get(names.A_TTFT_US))
        if out is not None:
            r.output_tokens = int(out)
        if ttft is not None and ttft >= 0:  # -1: the request produced no token
            r.ttft_ns = int(ttft * 1000)
    for s in index.by_name.get(names.QUEUE_SPAN, ()):
        if names.A_REQ in s.attrs:
            r = reqs[s.attrs[names.A_REQ]]
            r.start = s.start_ns if r.start is None else min(r.start, s.start_ns)
    for i in index.instants.get(names.I_TOKEN, ()):
        n = _num(i.attrs.get(names.A_TOKENS_SO_FAR))
        if names.A_REQ in i.attrs and n is not None:
            reqs[i.attrs[names.A_REQ]].tokens.append((i.ts_ns, int(n)))
    for i in index.instants.get(names.I_REQ_FINISH, ()):
        if names.A_REQ in i.attrs:
            r = reqs[i.attrs[names.A_REQ]]
            r.end = i.ts_ns if r.end is None else r.end
    for r in reqs.values():
        r.tokens.sort()
        if r.output_tokens is None and r.tokens:
            r.output_tokens = max(n for _, n in r.tokens)
        if r.ttft_ns is None and r.tokens and r.start is not None:
            r.ttft_ns = r.tokens[0][0] - r.start
        if r.ttft_ns is None and r.link is not None:
            r.ttft_ns = r.link.ttft_ns
        else:
            r.link = None  # the request said it itself
    return reqs


def _linked(reqs: dict[object, _Request]) -> RequestLinks | None:
    """How many requests got their TTFT from the steps that served them, and by which link."""
    links = [r.link for r in reqs.values() if r.link is not None]
    if not links:
        return None
    by: dict[str, int] = defaultdict(int)
    for link in links:
        by[link.by] += 1
    return {"linked": len(links), "requests": len(reqs), "by": dict(by)}


def _latencies(reqs: dict[object, _Request]) -> Latencies:
    ttft, tpot, itl, e2e = [], [], [], []
    for r in reqs.values():
        if r.ttft_ns is not None:
            ttft.append(r.ttft_ns)
        end = r.finish()
        if r.start is not None and end is not None:
            e2e.append(end - r.start)
            if r.ttft_ns is not None and r.output_tokens and r.output_tokens > 1:
                tpot.append((end - r.start - r.ttft_ns) / (r.output_tokens - 1))
        for (t0, n0), (t1, n1) in zip(r.tokens, r.tokens[1:]):
            if n1 > n0:
                itl.append((t1 - t0) / (n1 - n0))
    return {
        "ttft_ms": summary(ttft, 1e-6),
        "tpot_ms": summary(tpot, 1e-6),
        "itl_ms": summary(itl, 1e-6),
        "e2e_ms": summary(e2e, 1e-6),
    }


def _timeline(ts: list[int], vals: list[float], t0: int) -> list[list[float]]:
    """At most TIMELINE_POINTS [seconds since t0, value] pairs (each the max of its bucket)."""
    if not ts:
        return []
    k = max(1, -(-len(ts) // TIMELINE_POINTS))
    return [[(ts[i] - t0) / 1e9, max(vals[i : i + k])] for i in range(0, len(ts), k)]


def _batch_size(index: TraceIndex, bd: Breakdown, t0: int) -> BatchSize | None:
    for name in (names.C_BATCH_SIZE, names.C_RUNNING):
        ts, vals = index.counter_series(name)
        if vals:
            break
    else:
        batches = [(s.root.start_ns, float(s.batch)) for s in bd.steps if s.batch is not None]
        ts, vals = [t for t, _ in batches], [v for _, v in batches]
    stats = summary(vals)
    if stats is None:
        return None
    return {**stats, "max": max(vals), "timeline": _timeline(ts, vals, t0)}


def _kv_usage(index: TraceIndex, t0: int) -> KvUsage | None:
    ts, used = index.counter_series(names.C_KV_BLOCKS_USED)
    if not used:
        return None
    frac = []
    for t, u in zip(ts, used):
        total = index.counter_at(names.C_KV_BLOCKS_TOTAL, t) or index.counter_max(names.C_KV_BLOCKS_TOTAL)
        frac.append(u / total if total else 0.0)
    return {
        "peak_fraction": max(frac),
        "mean_fraction": sum(frac) / len(frac),
        "peak_blocks": max(used),
        "total_blocks": index.counter_max(names.C_KV_BLOCKS_TOTAL),
        "timeline": _timeline(ts, frac, t0),
    }


def _extent(index: TraceIndex, reqs: dict[object, _Request], bd: Breakdown) -> tuple[int, int] | None:
    starts = [r.start for r in reqs.values() if r.start is not None]
    ends = [end for r in reqs.values() if (end := r.finish()) is not None]
    if starts and ends:
        return min(starts), max(ends)
    if bd.steps:
        return bd.steps[0].root.start_ns, max(s.root.end_ns for s in bd.steps)
    spans = index.trace.spans
    if spans:
        return spans[0].start_ns, max(s.end_ns for s in spans)
    return None


def serving_metrics(index: TraceIndex, bd: Breakdown) -> Summary:
    reqs = _requests(index, request_links(index, bd.steps))
    extent = _extent(index, reqs, bd)
    t0, t1 = extent if extent else (0, 0)
    counted = [r.output_tokens for r in reqs.values() if r.output_tokens is not None]
    output_tokens = sum(counted) if counted else bd.tokens
    duration_s = (t1 - t0) / 1e9
    queue = [s.dur_ns for s in index.by_name.get(names.QUEUE_SPAN, ())] or [
        r.link.queue_ns for r in reqs.values() if r.link is not None and r.link.queue_ns is not None
    ]
    return {
        "requests": len(reqs) if reqs else None,
        "output_tokens": output_tokens,
        "steps": len(bd.steps),
        "duration_s": duration_s,
        "throughput_tok_s": output_tokens / duration_s if duration_s > 0 else 0.0,
        **_latencies(reqs),
        "queue_ms": summary(queue, 1e-6),
        "request_links": _linked(reqs),
        "preemptions": len(index.instants.get(names.I_PREEMPT, ())),
        "batch_size": _batch_size(index, bd, t0),
        "kv_usage": _kv_usage(index, t0),
    }
