"""Putting the processes of several hosts on one clock, when a trace is loaded (and so when
it is merged, analyzed or exported).

Each spool header names its clock domain (clock_domain.py). The domain with the most
processes is the reference; every other domain's processes are moved onto it in two steps:
1. coarse: by the Unix time of each clock's zero (`epoch_offset_ns`): as good as the
   hosts' NTP sync (milliseconds);
2. fine: by the round trips of the messages the processes already exchange, NTP-style. A
   message that left a reference process P and reached a process Q of the domain bounds
   Q's remaining offset from above (it arrived after it left: theta <= recv_Q.end -
   send_P.start), a reply bounds it from below (theta >= send_Q.start - recv_P.end); the
   tightest bounds on each side give the offset (their midpoint) and its uncertainty
   (half the gap). A message is known on both sides by its `msg` attribute (the engine's
   frames carry their step): its earliest send start and latest receive end (start, for a
   receive marked `ready`: it began once the message was there), which keeps the bound
   valid when one send reaches several receivers.
A domain with no round trip in both directions keeps the coarse alignment; the trace's
meta says which (`clock_alignment`), with the offsets and their uncertainty. An aligned
process's header names the reference domain from then on (its own is kept as
`recorded_clock_domain`), so a trace exported after alignment is not aligned again, and
`llmtrace merge` of traces recorded on different hosts aligns them as one.
"""

from __future__ import annotations

from collections import defaultdict

from . import names
from .timeline import Trace

META_KEY = names.M_CLOCK_ALIGNMENT


def align(trace: Trace) -> list[dict] | None:
    """Move every process outside the reference clock domain onto it; what was done, or None
    when the trace has one domain."""
    domains: dict[str, list[int]] = defaultdict(list)
    for pid, p in trace.processes.items():
        if p.header.get("clock_domain"):
            domains[p.header["clock_domain"]].append(pid)
    if len(domains) < 2:
        return None
    ref = max(domains, key=lambda d: (len(domains[d]), -min(domains[d])))
    ref_epoch = sorted(trace.processes[pid].epoch_offset_ns for pid in domains[ref])[len(domains[ref]) // 2]
    done = []
    for d, pids in domains.items():
        if d == ref:
            continue
        shift_processes(trace, {pid: ref_epoch - trace.processes[pid].epoch_offset_ns for pid in pids})
        theta, uncertainty, trips = round_trip_offset(trace, set(domains[ref]), set(pids))
        if theta is not None:
            shift_processes(trace, dict.fromkeys(pids, theta))
        for pid in pids:  # on the reference clock now: aligned once
            header = trace.processes[pid].header
            header["recorded_clock_domain"], header["clock_domain"] = d, ref
        done.append(
            {
                "domain": d,
                "processes": sorted(trace.processes[p].name for p in pids),
                "offset_ns": {
                    trace.processes[p].name: trace.processes[p].header.get("clock_shift_ns", 0) for p in pids
                },
                "uncertainty_ns": uncertainty,
                "round_trips": trips,
                "method": "round trips" if theta is not None else "Unix clocks only",
            }
        )
    trace.meta[META_KEY] = {"reference": ref, "domains": done}
    trace.sort()
    return done


def round_trip_offset(trace: Trace, ref: set[int], other: set[int]) -> tuple[int | None, int | None, int]:
    """(offset of `other`'s clock from `ref`'s, its uncertainty, messages bounding it on the
    scarcer side); (None, None, 0) without bounds on both sides."""
    sent: dict[tuple[bool, object], int] = {}  # (sent by ref, msg) -> earliest send start
    received: dict[tuple[bool, object], int] = {}  # (received by ref, msg) -> latest receive end
    for s in trace.spans:
        msg = s.attrs.get(names.A_MSG)
        if msg is None or (s.pid not in ref and s.pid not in other):
            continue
        key = (s.pid in ref, msg)
        if names.is_send(s):
            sent[key] = min(sent.get(key, s.start_ns), s.start_ns)
        elif names.is_receive(s):
            t = s.start_ns if s.attrs.get(names.A_READY) else s.end_ns  # a time the message was there
            received[key] = max(received.get(key, t), t)
    upper = [received[(False, m)] - t for (by_ref, m), t in sent.items() if by_ref and (False, m) in received]
    lower = [t - received[(True, m)] for (by_ref, m), t in sent.items() if not by_ref and (True, m) in received]
    if not upper or not lower:
        return None, None, 0
    hi, lo = min(upper), max(lower)
    return (lo + hi) // 2, abs(hi - lo) // 2, min(len(upper), len(lower))


def shift_processes(trace: Trace, deltas: dict[int, int]) -> None:
    """Every timestamp of each process in `deltas` moved back by its delta (its clock read
    that many ns ahead), in one pass over the records; each header keeps Unix time right
    and adds up what it was moved (`clock_shift_ns`)."""
    deltas = {pid: d for pid, d in deltas.items() if d}
    if not deltas:
        return
    for s in trace.spans:
        delta = deltas.get(s.pid)
        if delta:
            s.start_ns -= delta
            s.end_ns -= delta
            if s.device_start_ns is not None and s.device_end_ns is not None:
                s.device_start_ns -= delta
                s.device_end_ns -= delta
    for group in (trace.instants, trace.counters, trace.samples):
        for r in group:
            delta = deltas.get(r.pid)
            if delta:
                r.ts_ns -= delta
    for pid, delta in deltas.items():
        p = trace.processes[pid]
        for reading in p.cpu:
            reading["ns"] -= delta
        if p.closed and "ns" in p.closed:
            p.closed["ns"] -= delta
        p.header["epoch_offset_ns"] = p.epoch_offset_ns + delta
        p.header["clock_shift_ns"] = p.header.get("clock_shift_ns", 0) - delta
