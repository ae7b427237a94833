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
"""
from __future__ import annotations

from ..stats import median

ID = "tcp-nodelay"
STALL_NS = (20_000_000, 50_000_000)
LOOPBACK_NS = 100_000  # a small frame over loopback, decoded, when nothing stalls
MIN_STALLS = 2
MIN_BASELINE = 3


def _stalls(values: list[tuple[int, int]]):
    """values: (step, ns) -> (stalls, no-stall baseline ns)."""
    stalls = [(st, v) for st, v in values if STALL_NS[0] <= v <= STALL_NS[1]]
    fast = [v for _, v in values if v < STALL_NS[0]]
    return stalls, (median(fast) if len(fast) >= MIN_BASELINE else LOOPBACK_NS)


def check(ctx):
    series = {"agent.wait residual": [(sc.step, sc.transport_ns) for sc in ctx.steps if sc.wait is not None]}
    peers = ctx.breakdown.peers
    for sc in ctx.steps:
        for _, s in sc.stage_spans:
            if s.name in ("tcp.send", "tcp.recv") and (s.name == "tcp.send" or peers.sender_of(s) is None):
                proc = ctx.trace.processes.get(s.pid)
                series.setdefault(f"{s.name} ({proc.name if proc else s.pid})", []).append((sc.step, s.dur_ns))
    found, excess, worst = {}, 0, []
    for name, values in series.items():
        stalls, baseline = _stalls(values)
        if len(stalls) >= MIN_STALLS:
            found[name] = {"stalls": len(stalls), "of": len(values),
                           "stall_ms_p50": round(median(v for _, v in stalls) / 1e6, 3),
                           "baseline_ms": round(baseline / 1e6, 4)}
            excess += sum(v - baseline for _, v in stalls)
            worst += [st for st, _ in stalls]
    if not found:
        return []
    ctx.claim(c.name for c in ctx.functions.select(stage="tcp"))  # the stall is waiting, whatever the frame
    ctx.claim(("tcp.send", "tcp.recv"))  # its receives are stalls, not waits for work (wait-in-step)
    saving = ctx.ms_per_token(excess)
    return [ctx.suggestion(
        ID, f"Control messages stall up to 40 ms ({sum(f['stalls'] for f in found.values())} times): "
            "Nagle + delayed ACK",
        "tcp", {"measures": found, "example_steps": sorted(set(worst))[:5]}, saving,
        "Set TCP_NODELAY on both ends (sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)) and "
        "send each frame with one sendall() (header and body together) instead of write-write-read.")]
