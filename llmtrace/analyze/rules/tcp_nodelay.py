"""`tcp-nodelay`: small control messages held back ~40 ms by Nagle's algorithm meeting
delayed ACKs (Linux's minimum delayed-ACK timeout is 40 ms).

Fingerprints: `tcp.send`/`tcp.recv` spans, or the transport residual of the master's
`agent.wait` (the wait not covered by the agent's step, i.e. the agent was idle), that
cluster in STALL_NS while the typical value is far below it.
Saving: each stall's excess over the typical (median) value of the same measure.
"""
from __future__ import annotations

from ..stats import median

ID = "tcp-nodelay"
STALL_NS = (30_000_000, 50_000_000)
MIN_STALLS = 2


def _stalls(values: list[tuple[int, int]]):
    """values: (step, ns). Returns (stalls, typical ns) when some sit in the 40 ms band."""
    if not values:
        return [], 0
    typical = median(v for _, v in values)
    if typical >= STALL_NS[0]:
        return [], typical
    return [(st, v) for st, v in values if STALL_NS[0] <= v <= STALL_NS[1]], typical


def check(ctx):
    series = {"agent.wait residual": [(sc.step, sc.transport_ns) for sc in ctx.steps if sc.wait is not None]}
    for sc in ctx.steps:
        for _, s in sc.stage_spans:
            if s.name in ("tcp.send", "tcp.recv"):
                proc = ctx.trace.processes.get(s.pid)
                series.setdefault(f"{s.name} ({proc.name if proc else s.pid})", []).append((sc.step, s.dur_ns))
    found, excess, worst = {}, 0, []
    for name, values in series.items():
        stalls, typical = _stalls(values)
        if len(stalls) >= MIN_STALLS:
            found[name] = {"stalls": len(stalls), "stall_ms_p50": round(median(v for _, v in stalls) / 1e6, 3),
                           "typical_ms": round(typical / 1e6, 4)}
            excess += sum(v - typical for _, v in stalls)
            worst += [st for st, _ in stalls]
    if not found:
        return []
    saving = ctx.ms_per_token(excess)
    return [ctx.suggestion(
        ID, f"Control messages stall ~40 ms ({sum(f['stalls'] for f in found.values())} times): Nagle + delayed ACK",
        "tcp", {"measures": found, "example_steps": sorted(set(worst))[:5]}, saving,
        "Set TCP_NODELAY on both ends (sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)) and "
        "send each frame with one sendall() (header and body together) instead of write-write-read.")]
