"""Message hops between processes of a pipeline that carries no trace context: which send
in another process ended a blocking receive.

A receive (stage tcp or ipc) returns once its message is there, so its sender finished
sending shortly before; among the sends of other processes that ended inside the
receive and at most MATCH_NS before it returned, one with the same byte count wins,
else the latest. While the receiver waited, the sending thread's work up to that send
was the pipeline's critical path (the motivating stack's master formatting arrays while
the worker waited on its socket), so the breakdown charges it by the sender's stages.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from .. import names
from ..timeline import Span
from .index import TraceIndex

WAIT_STAGES = (names.TCP, names.IPC)
MATCH_NS = 5_000_000  # a send may end this long before its receive returns (a loaded host)
MIN_WAIT_NS = 50_000  # a receive shorter than this found its message waiting


def is_send(s: Span) -> bool:
    return s.stage in WAIT_STAGES and s.name.endswith((".send", ".put"))


def is_receive(s: Span) -> bool:
    return s.stage in WAIT_STAGES and s.name.endswith((".recv", ".get"))


@dataclass
class Peer:
    pid: int
    tid: int
    send: Span
    top: list[Span]  # the sending thread's top-level spans, by start
    starts: list[int]

    def spans(self, lo: int, hi: int) -> list[Span]:
        """The sending thread's top-level spans overlapping [lo, hi), the send excluded."""
        i = max(0, bisect.bisect_left(self.starts, lo) - 1)
        out = []
        while i < len(self.top) and self.top[i].start_ns < hi:
            s = self.top[i]
            if s.end_ns > lo and s is not self.send:
                out.append(s)
            i += 1
        return out


class Peers:
    def __init__(self, index: TraceIndex):
        self.index = index
        self.sends = sorted((s for s in index.trace.spans if is_send(s)), key=lambda s: s.end_ns)
        self.ends = [s.end_ns for s in self.sends]
        self._top: dict[tuple[int, int], tuple[list[Span], list[int]]] = {}

    def sender_of(self, recv: Span) -> Peer | None:
        if not is_receive(recv) or recv.dur_ns < MIN_WAIT_NS:
            return None
        lo = max(recv.start_ns, recv.end_ns - MATCH_NS)
        i, j = bisect.bisect_left(self.ends, lo), bisect.bisect_right(self.ends, recv.end_ns)
        cands = [s for s in self.sends[i:j] if s.pid != recv.pid]
        if not cands:
            return None
        n = recv.attrs.get(names.A_BYTES)
        same = [s for s in cands if n is not None and s.attrs.get(names.A_BYTES) == n]
        send = (same or cands)[-1]
        top, starts = self._thread(send.pid, send.tid)
        return Peer(send.pid, send.tid, send, top, starts)

    def _thread(self, pid: int, tid: int) -> tuple[list[Span], list[int]]:
        key = (pid, tid)
        if key not in self._top:
            top = self.index.top_level(pid, tid)
            self._top[key] = (top, [s.start_ns for s in top])
        return self._top[key]
