"""`tcp-nodelay`: small control messages held back by Nagle's algorithm meeting delayed
ACKs: the sender waits for the ACK of its previous segment, the receiver delays that ACK
up to 40 ms (Linux's minimum delayed-ACK timeout), so a stall lasts up to ~40 ms.

Fingerprints: `tcp.send`/`tcp.recv` spans, or the transport residual of the master's
`agent.wait` (the wait not covered by the agent's step, i.e. the agent was idle), with
values in STALL_NS. Every step may stall (then the median is a stall too). A receive that
a send of another process ended (peers.py: the message left just before it arrived) was
waiting for that process's work, not for a held-back segment, and does not count.
Saving: each stall's excess over the no-stall cost of the same measure: the median of its
values below the band when there are enough of them, else LOOPBACK_NS.
Where every TCP send that recorded its socket's option had TCP_NODELAY on, Nagle cannot
hold a segment: stalls in the band are something else (a loaded machine's scheduling
delays reach tens of ms) and are no finding here.
Without stalls, TCP sends on the step path from a socket with TCP_NODELAY off (attr
`nodelay` 0, in MIN_STEPS steps and MIN_STEP_SHARE of them or more: the step's own
messages, not a front end's occasional reply that crossed a step) are the latent form: whether Nagle meets a
delayed ACK depends on the timing of each run (the engine's planted mistake stalled in 3
of 5 runs, never in the other 2), so it is reported with no saving and that risk as its
impact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import names
from ..stats import median

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion

ID = "tcp-nodelay"
STALL_NS = (20_000_000, 50_000_000)
LOOPBACK_NS = 100_000  # a small frame over loopback, decoded, when nothing stalls
MIN_STALLS = 2
MIN_BASELINE = 3
MIN_STEPS = 3
MIN_STEP_SHARE = 0.2
FIX = (
    "Set TCP_NODELAY on both ends (sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)) and "
    "send each frame with one sendall() (header and body together) instead of write-write-read."
)


def _stalls(values: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], float]:
    """values: (step, ns) -> (stalls, no-stall baseline ns)."""
    stalls = [(st, v) for st, v in values if STALL_NS[0] <= v <= STALL_NS[1]]
    fast = [v for _, v in values if v < STALL_NS[0]]
    return stalls, (median(fast) if len(fast) >= MIN_BASELINE else LOOPBACK_NS)


def check(ctx: Analysis) -> list[Suggestion]:
    series = {"agent.wait residual": [(sc.step, sc.transport_ns) for sc in ctx.steps if sc.wait is not None]}
    peers = ctx.breakdown.peers
    for sc in ctx.steps:
        for _, s in sc.stage_spans:
            if s.name in ("tcp.send", "tcp.recv") and (s.name == "tcp.send" or peers.sender_of(s) is None):
                proc = ctx.trace.processes.get(s.pid)
                series.setdefault(f"{s.name} ({proc.name if proc else s.pid})", []).append((sc.step, s.dur_ns))
    found: dict[str, dict[str, float]] = {}
    excess, worst = 0.0, []
    for name, values in series.items():
        stalls, baseline = _stalls(values)
        if len(stalls) >= MIN_STALLS:
            found[name] = {
                "stalls": len(stalls),
                "of": len(values),
                "stall_ms_p50": round(median(v for _, v in stalls) / 1e6, 3),
                "baseline_ms": round(baseline / 1e6, 4),
            }
            excess += sum(v - baseline for _, v in stalls)
            worst += [st for st, _ in stalls]
    if not found:
        return _latent(ctx)
    if _nagle_off_everywhere(ctx):
        return []
    ctx.claim(c.name for c in ctx.functions.select(stage="tcp"))  # the stall is waiting, whatever the frame
    ctx.claim(("tcp.send", "tcp.recv"))  # its receives are stalls, not waits for work (wait-in-step)
    saving = ctx.ms_per_token(excess)
    return [
        ctx.suggestion(
            ID,
            f"Control messages stall up to 40 ms ({sum(f['stalls'] for f in found.values())} times): "
            "Nagle + delayed ACK",
            "tcp",
            {"measures": found, "example_steps": sorted(set(worst))[:5]},
            saving,
            FIX,
        )
    ]


def _nagle_off_everywhere(ctx: Analysis) -> bool:
    """Every TCP send that recorded TCP_NODELAY (small sends do) had it on."""
    seen = [
        s.attrs[names.A_NODELAY]
        for s in ctx.index.by_stage.get(names.TCP, ())
        if names.is_send(s) and names.A_NODELAY in s.attrs
    ]
    return bool(seen) and all(v == 1 for v in seen)


def _latent(ctx: Analysis) -> list[Suggestion]:
    """Sends on the step path from sockets with TCP_NODELAY off, when nothing stalled."""
    sends = [
        (sc.step, s)
        for sc in ctx.steps
        for _, s in sc.stage_spans
        if s.stage == names.TCP and names.is_send(s) and s.attrs.get(names.A_NODELAY) == 0
    ]
    steps = sorted({st for st, _ in sends})
    if len(steps) < max(MIN_STEPS, MIN_STEP_SHARE * len(ctx.steps)):
        return []
    procs = sorted({ctx.trace.processes[s.pid].name if s.pid in ctx.trace.processes else str(s.pid) for _, s in sends})
    return [
        ctx.suggestion(
            ID,
            f"TCP_NODELAY is off on the step's sends ({', '.join(procs)}): no stall in this run, but Nagle + "
            "delayed ACK can hold a small message up to 40 ms",
            "tcp",
            {
                "sends_without_nodelay": len(sends),
                "steps_affected": len(steps),
                "example_steps": steps[:5],
                "processes": procs,
            },
            0.0,
            FIX,
            "latent: the stall depends on each run's timing; none in this one",
        )
    ]
