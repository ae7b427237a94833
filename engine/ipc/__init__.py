"""Transport between the master and its agents: TCP frames (`tcp`), shared-memory arenas
(`shm`), and `ReceiveSpan`, the span of work started by a frame from another process."""
from __future__ import annotations

from time import perf_counter_ns

from llmtrace import recorder
from llmtrace.context import Carrier
from llmtrace.spool_format import SPAN


class ReceiveSpan:
    """A span that follows the sender's carrier, which is known only once the frame it
    times has been decoded (an ordinary span takes `follows=` when it opens).

        with ReceiveSpan("agent.step") as s:
            msg = conn.recv()
            s.follow(Carrier.from_wire(msg["carrier"]), child="tcp.recv")
            ...  # children opened here carry the sender's step

    `follow` links the span to the sender's span, adopts the sender's step when the span
    has none, and (with `child`) records the decoding so far as a child span. Backend
    agnostic: it uses only the recorder's raw functions.
    """

    __slots__ = ("name", "step", "link", "sid", "parent", "token", "t0")

    def __init__(self, name: str, step: int = -1):
        self.name, self.step, self.link = name, step, 0
        self.sid = 0

    def __enter__(self) -> "ReceiveSpan":
        self.t0 = perf_counter_ns()
        if recorder.is_enabled():
            self.sid = recorder.new_span_id()
            self.parent, cur_step = recorder.current()
            if self.step == -1:
                self.step = cur_step
            self.token = recorder.set_current(self.sid, self.step)
        return self

    def follow(self, carrier: Carrier | None, child: str | None = None) -> None:
        if not self.sid or carrier is None:
            return
        self.link = carrier.span_id
        if self.step == -1:
            self.step = carrier.step
        recorder.reset_current(self.token)
        self.token = recorder.set_current(self.sid, self.step)
        if child is not None:
            _emit(child, self.t0, perf_counter_ns(), recorder.new_span_id(), self.sid, 0, self.step)

    def discard(self) -> None:
        """Record nothing: the frame turned out to start no work (e.g. a shutdown)."""
        if self.sid:
            recorder.reset_current(self.token)
            self.sid = 0

    def __exit__(self, et, ev, tb) -> bool:
        if self.sid:
            recorder.reset_current(self.token)
            _emit(self.name, self.t0, perf_counter_ns(), self.sid, self.parent, self.link, self.step,
                  1 if et is not None else 0)
        return False


def record_receive(name: str, t0: int, carrier: Carrier | None) -> None:
    """A child span of the open one, [t0, now), for decoding a frame that is not what the
    open span follows (a later step arriving while it runs): it carries the sender's step."""
    if recorder.is_enabled():
        parent, step = recorder.current()
        _emit(name, t0, perf_counter_ns(), recorder.new_span_id(), parent, 0,
              step if carrier is None else carrier.step)


def _emit(name: str, start: int, end: int, sid: int, parent: int, link: int, step: int, flags: int = 0) -> None:
    recorder.emit(SPAN, recorder.intern(name), recorder.intern(name.split(".", 1)[0]), start, end,
                  sid, parent, link, step, None, flags)
