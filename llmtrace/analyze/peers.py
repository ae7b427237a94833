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
from collections.abc import Callable
from dataclasses import dataclass

from .. import names
from ..names import is_receive, is_send
from ..timeline import Span
from .index import TraceIndex

MATCH_NS = 5_000_000  # a send may end this long before (or after) its receive returns (a loaded host)
MIN_WAIT_NS = 50_000  # a receive shorter than this found its message waiting
# threads that only send what another thread of their process handed them: a
# multiprocessing.Queue's feeder sends each item some put() of another thread queued
RELAY_THREADS = ("QueueFeederThread",)


@dataclass
class Peer:
    """The other end of a hop: the thread whose `hop` (a send that ended a receive, or a
    receive that let a blocked send return) decided when the waiting span ended."""

    pid: int
    tid: int
    hop: Span
    top: list[Span]  # that thread's top-level spans, by start
    index: TraceIndex

    def spans(self, lo: int, hi: int) -> list[Span]:
        """The peer thread's spans in [lo, hi) (TraceIndex.in_window), the hop excluded, and
        so is a span still open when the hop began that does not enclose it: another
        asyncio task's (an idle `await asyncio.sleep(...)` spans the hop while the thread
        runs it), which did not hold the thread up."""
        hop, up = self.hop, self._ancestors()
        return [
            s
            for s in self.index.in_window(self.top, lo, hi)
            if s is not hop and (s.end_ns <= hop.start_ns or s.span_id in up)
        ]

    def _ancestors(self) -> set[int]:
        out, s = set(), self.index.by_id.get(self.hop.parent_id)
        while s is not None and s.span_id not in out:
            out.add(s.span_id)
            s = self.index.by_id.get(s.parent_id)
        return out


class Peers:
    def __init__(self, index: TraceIndex):
        self.index = index
        self.sends = sorted((s for s in index.trace.spans if is_send(s)), key=lambda s: s.end_ns)
        self.ends = [s.end_ns for s in self.sends]
        self.receives = sorted((s for s in index.trace.spans if is_receive(s)), key=lambda s: s.end_ns)
        self.receive_ends = [s.end_ns for s in self.receives]
        self._found: dict[int, Peer | None] = {}  # span id -> its peer (the breakdown and rules ask)
        self._puts: dict[int, tuple[list[int], list[Span]]] | None = None  # pid -> its puts, by start

    def peer_of(self, s: Span) -> Peer | None:
        """The sender of a blocking receive, or the receiver of a blocking send."""
        return self.sender_of(s) if is_receive(s) else self.receiver_of(s)

    def receiver_of(self, send: Span) -> Peer | None:
        """A send that blocked (a message larger than the pipe's or socket's buffer) returned
        once another process read it: the receive over the same transport that ended
        within MATCH_NS of the send's end and started before it ended, the same byte count
        first, else the nearest end. Until it started reading, that process kept the sender
        waiting (a front end asleep in a polling loop while the worker's reply fills the pipe)."""
        return self._memo(send, self._match_receive)

    def sender_of(self, recv: Span) -> Peer | None:
        return self._memo(recv, self._match_send)

    def _memo(self, s: Span, match: Callable[[Span], Peer | None]) -> Peer | None:
        if s.span_id not in self._found:
            self._found[s.span_id] = match(s)
        return self._found[s.span_id]

    def _peer(self, cands: list[Span], nbytes: object, rank: Callable[[Span], int]) -> Peer | None:
        """The best candidate hop: the same byte count first, then the highest rank."""
        if not cands:
            return None
        same = [s for s in cands if nbytes is not None and s.attrs.get(names.A_BYTES) == nbytes]
        hop = self._origin(max(same or cands, key=rank))
        return Peer(hop.pid, hop.tid, hop, self.index.top_level(hop.pid, hop.tid), self.index)

    def _relay(self, s: Span) -> bool:
        proc = self.index.trace.processes.get(s.pid)
        return proc is not None and proc.threads.get(s.tid) in RELAY_THREADS

    def _origin(self, hop: Span) -> Span:
        """A relay thread's send stands for the put that queued its item: the latest put of
        another thread of that process begun before the send (FIFO: while the pipeline
        carries one message per step, that put's)."""
        if not self._relay(hop):
            return hop
        if self._puts is None:
            by_pid: dict[int, list[Span]] = {}
            for s in self.sends:
                if s.name.endswith(names.PUT_VERB) and not self._relay(s):
                    by_pid.setdefault(s.pid, []).append(s)
            self._puts = {}
            for pid, puts in by_pid.items():
                puts.sort(key=lambda s: s.start_ns)
                self._puts[pid] = ([s.start_ns for s in puts], puts)
        starts, puts = self._puts.get(hop.pid, ([], []))
        i = bisect.bisect_right(starts, hop.start_ns) - 1
        return puts[i] if i >= 0 else hop

    def _match_receive(self, send: Span) -> Peer | None:
        if not is_send(send) or send.dur_ns < MIN_WAIT_NS:
            return None
        i = bisect.bisect_left(self.receive_ends, send.end_ns - MATCH_NS)
        j = bisect.bisect_right(self.receive_ends, send.end_ns + MATCH_NS)
        cands = [
            r for r in self.receives[i:j] if r.pid != send.pid and r.stage == send.stage and r.start_ns < send.end_ns
        ]
        return self._peer(cands, send.attrs.get(names.A_BYTES), lambda r: -abs(r.end_ns - send.end_ns))

    def _match_send(self, recv: Span) -> Peer | None:
        if not is_receive(recv) or recv.dur_ns < MIN_WAIT_NS:
            return None
        # The message leaves during the send span, and the sender may get the GIL back to
        # close that span only after the receiver has it: a send starts before the receive
        # returns, but may end after it.
        lo = max(recv.start_ns, recv.end_ns - MATCH_NS)
        i, j = bisect.bisect_left(self.ends, lo), bisect.bisect_right(self.ends, recv.end_ns + MATCH_NS)
        cands = [
            s
            for s in self.sends[i:j]
            if s.pid != recv.pid
            and s.stage == recv.stage  # same transport
            and s.start_ns <= recv.end_ns
        ]
        return self._peer(cands, recv.attrs.get(names.A_BYTES), lambda s: s.start_ns)
