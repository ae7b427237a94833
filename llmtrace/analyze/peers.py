"""Message hops between processes of a pipeline that carries no trace context: which send
in another process ended a blocking receive.

A receive or poll (stage tcp or ipc) returns once its message is there, so its sender
started sending before; among the sends of other processes over the same kind of
transport that started before the receive returned and ended inside it, at most MATCH_NS
before it returned (or at most MATCH_NS after: the sender may close its span late), one
with the same byte count wins, else the latest started (a client's HTTP request is no
answer to a queue read). While the receiver waited, the sending thread's work up to that send
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
MATCH_NS = 5_000_000  # a send may end this long before (or after) its receive returns (a loaded host)
MIN_WAIT_NS = 50_000  # a receive shorter than this found its message waiting


def is_send(s: Span) -> bool:
    return s.stage in WAIT_STAGES and s.name.endswith(names.SEND_VERBS)


def is_receive(s: Span) -> bool:
    return s.stage in WAIT_STAGES and s.name.endswith(names.RECEIVE_VERBS)


@dataclass
class Peer:
    pid: int
    tid: int
    send: Span
    top: list[Span]  # the sending thread's top-level spans, by start
    index: TraceIndex

    def spans(self, lo: int, hi: int) -> list[Span]:
        """The sending thread's spans in [lo, hi) (TraceIndex.in_window), the send excluded."""
        return [s for s in self.index.in_window(self.top, lo, hi) if s is not self.send]


class Peers:
    def __init__(self, index: TraceIndex):
        self.index = index
        self.sends = sorted((s for s in index.trace.spans if is_send(s)), key=lambda s: s.end_ns)
        self.ends = [s.end_ns for s in self.sends]
        self._found: dict[int, Peer | None] = {}  # receive span id -> its sender (the breakdown and rules ask)

    def sender_of(self, recv: Span) -> Peer | None:
        if recv.span_id not in self._found:
            self._found[recv.span_id] = self._match(recv)
        return self._found[recv.span_id]

    def _match(self, recv: Span) -> Peer | None:
        if not is_receive(recv) or recv.dur_ns < MIN_WAIT_NS:
            return None
        # The message leaves during the send span, and the sender may get the GIL back to
        # close that span only after the receiver has it: a send starts before the receive
        # returns, but may end after it.
        lo = max(recv.start_ns, recv.end_ns - MATCH_NS)
        i, j = bisect.bisect_left(self.ends, lo), bisect.bisect_right(self.ends, recv.end_ns + MATCH_NS)
        cands = [s for s in self.sends[i:j] if s.pid != recv.pid and s.stage == recv.stage  # same transport
                 and s.start_ns <= recv.end_ns]
        if not cands:
            return None
        n = recv.attrs.get(names.A_BYTES)
        same = [s for s in cands if n is not None and s.attrs.get(names.A_BYTES) == n]
        send = max(same or cands, key=lambda s: s.start_ns)
        return Peer(send.pid, send.tid, send, self.index.top_level(send.pid, send.tid), self.index)
