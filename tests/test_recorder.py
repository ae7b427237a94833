"""The recorder backends (C `_fastspan` and pure-Python `_pyrecorder`) behave the same.

Every test runs once per backend through the `backend` fixture, which points
`llmtrace.recorder` (and so the decorator, sink and context modules) at that backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import os
import threading
import time

import pytest

import llmtrace
from llmtrace import recorder
from llmtrace.spool_format import ATTR_FLOAT, ATTR_ID_MASK, ATTR_STR, COUNTER, INSTANT, RECORD, SPAN, bits_float

FUNCTIONS = (
    "span",
    "instant",
    "counter",
    "traced",
    "emit",
    "intern",
    "drain",
    "current",
    "set_current",
    "reset_current",
    "new_span_id",
    "set_enabled",
    "is_enabled",
    "set_device_hook",
    "reset_after_fork",
    "requeue_strings",
    "close_open",
)
MODULES = {"c": "llmtrace._fastspan", "python": "llmtrace._pyrecorder"}
FLAG_EXCEPTION, FLAG_ATTRS_CUT = 1, 2
_strings: dict[str, dict[int, str]] = {"c": {}, "python": {}}  # every string each backend has sent


@pytest.fixture(params=list(MODULES))
def backend(request, monkeypatch):
    """Route llmtrace.recorder to one backend, enabled and empty; yields a `Recorded` reader."""
    try:
        mod = importlib.import_module(MODULES[request.param])
    except ImportError:
        pytest.skip("the C backend is not built")
    for name in FUNCTIONS:
        monkeypatch.setattr(recorder, name, getattr(mod, name))
    for name in ("span", "instant", "counter"):
        monkeypatch.setattr(llmtrace, name, getattr(mod, name))
    monkeypatch.setattr(recorder, "backend", mod)
    monkeypatch.setattr(recorder, "BACKEND", request.param)
    rec = Recorded(request.param, mod)
    mod.requeue_strings()  # strings interned (and drained) by earlier tests' sinks come back
    rec.take()
    mod.set_enabled(True)
    yield rec
    mod.set_enabled(False)
    mod.set_device_hook(None)
    rec.take()


class Recorded:
    """Drains a backend and decodes its records into dicts with names resolved."""

    def __init__(self, name, mod):
        self.name, self.mod = name, mod
        self.strings = _strings[name]
        self.dropped: dict[int, int] = {}

    def take(self) -> list[dict]:
        data, n, strings, dropped = self.mod.drain()
        self.strings.update(strings)
        self.dropped = dropped
        assert len(data) == n * RECORD.size
        return [self._decode(r) for r in RECORD.iter_unpack(data)]

    def spans(self) -> dict[str, dict]:
        return {r["name"]: r for r in self.take() if r["kind"] == SPAN}

    def _decode(self, r) -> dict:
        (start, end, span_id, parent, link, step, *rest) = r
        vals, keys = rest[:4], rest[4:8]
        name_id, stage_id, tid, kind, flags, _ = rest[8:]
        attrs = {}
        for v, k in zip(vals, keys):
            if k:
                key = self.strings[k & ATTR_ID_MASK]
                attrs[key] = self.strings[v] if k & ATTR_STR else bits_float(v) if k & ATTR_FLOAT else v
        return dict(
            start=start,
            end=end,
            span_id=span_id,
            parent=parent,
            link=link,
            step=step,
            attrs=attrs,
            name=self.strings.get(name_id),
            stage=self.strings.get(stage_id),
            tid=tid,
            kind=kind,
            flags=flags,
        )


def test_nesting_steps_stages_and_current(backend):
    span = recorder.span
    assert recorder.current() == (0, -1)
    with span("master.step", step=7) as outer:
        with span("schedule") as inner:
            cur = recorder.current()
            with span("tcp.send", stage="transport", step=9):
                pass
        assert recorder.current()[1] == 7
    assert recorder.current() == (0, -1)
    s = backend.spans()
    assert s["master.step"]["parent"] == 0 and s["master.step"]["stage"] == "master"
    assert cur == (s["schedule"]["span_id"], 7)
    assert s["schedule"]["parent"] == s["master.step"]["span_id"]
    assert s["schedule"]["step"] == 7 and s["schedule"]["stage"] == "schedule"
    assert s["tcp.send"]["parent"] == s["schedule"]["span_id"]
    assert (s["tcp.send"]["stage"], s["tcp.send"]["step"]) == ("transport", 9)
    assert s["master.step"]["start"] <= s["schedule"]["start"] <= s["schedule"]["end"] <= s["master.step"]["end"]
    assert (outer.span_id, inner.span_id) == (s["master.step"]["span_id"], s["schedule"]["span_id"])
    for r in s.values():
        assert r["span_id"] >> 40 == os.getpid() and r["tid"] == threading.get_native_id()


def test_spans_work_through_exit_stack_and_explicit_calls(backend):
    with contextlib.ExitStack() as stack:
        outer = stack.enter_context(recorder.span("outer"))  # calls type(cm).__enter__(cm)
        stack.enter_context(recorder.span("inner"))
    sp = recorder.span("manual")
    assert sp.__enter__() is sp
    assert sp.__exit__(None, None, None) is False
    s = backend.spans()
    assert outer.span_id == s["outer"]["span_id"] == s["inner"]["parent"] and s["manual"]["parent"] == 0


def test_disabled_c_span_is_one_shared_object(backend):
    if backend.name != "c":
        pytest.skip("the pure-Python backend builds a Span either way")
    recorder.set_enabled(False)
    assert recorder.span("a", x=1) is recorder.span("b", step=2)


def test_attrs_round_trip_and_cut(backend):
    with recorder.span("forward", batch=8, ratio=0.25, kind="prefill", warm=True) as sp:
        sp.set(batch=9, extra=[1])
    with recorder.span("many", a=1, b=2, c=3, d=4, e=5):
        pass
    with recorder.span("big", n=1 << 70):
        pass
    s = backend.spans()
    assert s["forward"]["attrs"] == {"batch": 9, "ratio": 0.25, "kind": "prefill", "warm": 1}
    assert s["forward"]["flags"] & FLAG_ATTRS_CUT  # `extra` was a fifth attribute
    assert s["many"]["attrs"] == {"a": 1, "b": 2, "c": 3, "d": 4} and s["many"]["flags"] == FLAG_ATTRS_CUT
    assert s["big"]["attrs"] == {"n": str(1 << 70)} and s["big"]["flags"] == 0


def test_set_adds_attributes_inside_the_span(backend):
    with recorder.span("forward", batch=1) as sp:
        sp.set(tokens=128, mode="decode")
    assert backend.spans()["forward"]["attrs"] == {"batch": 1, "tokens": 128, "mode": "decode"}


def test_exception_sets_flag_and_propagates(backend):
    with pytest.raises(KeyError):
        with recorder.span("outer"):
            with recorder.span("boom"):
                raise KeyError("x")
    s = backend.spans()
    assert s["boom"]["flags"] == FLAG_EXCEPTION and s["outer"]["flags"] == FLAG_EXCEPTION
    assert recorder.current() == (0, -1)


def test_open_spans_are_recorded_at_a_stop_and_once_only(backend):
    """close_open() (a process's last flush) records every span still open, in any thread or
    asyncio task, as ending now and flagged; their own exit later records nothing; a span
    that ended before is not touched."""
    import asyncio
    import threading

    FLAG_OPEN_AT_STOP = 4
    entered, release = threading.Event(), threading.Event()

    def handler():
        with recorder.span("http.request", req="r9"):
            entered.set()
            release.wait(10)

    async def task(name, started, go):
        with recorder.span(name):
            started.set()
            await go.wait()

    async def two_tasks():  # interleaved on one thread: a, b opened, then a closed first
        sa, sb, ga, gb = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
        ta, tb = asyncio.create_task(task("task.a", sa, ga)), asyncio.create_task(task("task.b", sb, gb))
        await sa.wait()
        await sb.wait()
        ga.set()
        await ta
        return tb, gb

    t = threading.Thread(target=handler)
    t.start()
    entered.wait(10)
    loop = asyncio.new_event_loop()
    tb, gb = loop.run_until_complete(two_tasks())
    with recorder.span("done.before"):
        pass
    with recorder.span("decode.step", step=3):
        assert recorder.close_open() == 3  # http.request, task.b, decode.step
        assert recorder.close_open() == 0
    release.set()
    t.join()
    gb.set()
    loop.run_until_complete(tb)
    loop.close()
    recs = [r for r in backend.take() if r["kind"] == SPAN]
    by = {r["name"]: r for r in recs}
    assert len(recs) == len(by) == 5  # no span twice
    cut = {r["name"] for r in recs if r["flags"] & FLAG_OPEN_AT_STOP}
    assert cut == {"http.request", "task.b", "decode.step"}
    assert by["http.request"]["tid"] == t.native_id and by["http.request"]["attrs"] == {"req": "r9"}
    assert by["decode.step"]["step"] == 3 and by["decode.step"]["tid"] == threading.get_native_id()
    assert not by["task.a"]["flags"] and not by["done.before"]["flags"]


def test_disabled_records_nothing(backend):
    recorder.set_enabled(False)
    assert not recorder.is_enabled()
    fn = recorder.traced(lambda x: x + 1, "f", "user")
    with recorder.span("off", a=1) as sp:
        sp.set(b=2)
        assert recorder.current() == (0, -1)
    with contextlib.ExitStack() as stack:
        stack.enter_context(recorder.span("off2")).set(c=3)
    recorder.instant("i")
    recorder.counter("c", 1)
    assert fn(1) == 2
    assert backend.take() == []


def test_instant_and_counter(backend):
    with recorder.span("step", step=4):
        recorder.instant("req.finish", req="r1")
    recorder.counter("kv_blocks_used", 12, pool="gpu")
    recs = backend.take()
    inst = next(r for r in recs if r["kind"] == INSTANT)
    step = next(r for r in recs if r["kind"] == SPAN)
    cnt = next(r for r in recs if r["kind"] == COUNTER)
    assert (inst["parent"], inst["step"], inst["stage"], inst["attrs"]) == (step["span_id"], 4, "req", {"req": "r1"})
    assert inst["start"] == inst["end"]
    assert cnt["attrs"] == {"value": 12.0, "pool": "gpu"} and cnt["parent"] == 0 and cnt["step"] == -1


def test_follows_links_and_takes_step(backend):
    with recorder.span("agent.step", follows=(1, 12345, 42)):
        pass
    with recorder.span("tcp.recv", follows=(1, 777, 42), step=43):
        pass
    with recorder.span("plain", follows=None):
        pass
    s = backend.spans()
    assert (s["agent.step"]["link"], s["agent.step"]["step"]) == (12345, 42)
    assert (s["tcp.recv"]["link"], s["tcp.recv"]["step"]) == (777, 43)
    assert s["plain"]["link"] == 0


def test_set_and_reset_current(backend):
    tok = recorder.set_current(99, 3)
    with recorder.span("child"):
        pass
    assert recorder.current() == (99, 3)
    recorder.reset_current(tok)
    assert recorder.current() == (0, -1)
    child = backend.spans()["child"]
    assert (child["parent"], child["step"]) == (99, 3)


def test_emit_raw_record(backend):
    nid, sid = recorder.intern("forward"), recorder.intern("forward")
    assert nid == sid and recorder.intern("other") != nid
    recorder.emit(3, nid, sid, 10, 20, span_id=5, step=2, attrs={"dev": 1})
    (r,) = backend.take()
    assert (r["kind"], r["start"], r["end"], r["span_id"], r["step"], r["attrs"]) == (3, 10, 20, 5, 2, {"dev": 1})


def test_emit_for_another_thread(backend):
    nid = recorder.intern("sample")
    recorder.emit(4, nid, 0, 5, 5, tid=4242)
    recorder.emit(4, nid, 0, 6, 6)
    assert [r["tid"] for r in backend.take()] == [4242, threading.get_native_id()]


def test_span_ids_are_pid_based_and_unique(backend):
    ids = {recorder.new_span_id() for _ in range(1000)}
    assert len(ids) == 1000 and {i >> 40 for i in ids} == {os.getpid()}


def test_threads_record_their_own_tid_and_parents(backend):
    barrier = threading.Barrier(4)
    seen = {}

    def work(i):
        barrier.wait()
        with recorder.span(f"outer{i}"):
            with recorder.span(f"inner{i}"):
                seen[i] = threading.get_native_id()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    with recorder.span("main"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    s = backend.spans()
    for i, tid in seen.items():
        assert s[f"outer{i}"]["tid"] == s[f"inner{i}"]["tid"] == tid
        assert s[f"outer{i}"]["parent"] == 0  # a new thread starts without a current span
        assert s[f"inner{i}"]["parent"] == s[f"outer{i}"]["span_id"]
    assert len(set(seen.values())) == 4


def test_records_of_exited_threads_are_drained(backend):
    for _ in range(3):
        t = threading.Thread(target=lambda: recorder.span("gone").__enter__().__exit__(None, None, None))
        t.start()
        t.join()
    assert [r["name"] for r in backend.take()] == ["gone"] * 3
    assert backend.take() == []


async def _task(name, rounds):
    with recorder.span(name):
        for i in range(rounds):
            with recorder.span(f"{name}.{i}"):
                await asyncio.sleep(0)  # let the other task run inside this span


def test_interleaved_asyncio_tasks_keep_their_own_parents(backend):
    async def main():
        with recorder.span("root"):
            await asyncio.gather(_task("a", 3), _task("b", 3))

    asyncio.run(main())
    s = backend.spans()
    for name in "ab":
        assert s[name]["parent"] == s["root"]["span_id"]  # tasks inherit the creator's span
        for i in range(3):
            assert s[f"{name}.{i}"]["parent"] == s[name]["span_id"]
    assert s["a.0"]["start"] < s["b.0"]["start"] < s["a.0"]["end"]  # they did interleave


def test_copied_context_keeps_the_span_current_at_copy_time(backend):
    with recorder.span("a"):
        ctx = contextvars.copy_context()
        with recorder.span("b"):
            pass
    seen = ctx.run(recorder.current)
    assert recorder.current() == (0, -1)
    s = backend.spans()
    assert seen == (s["a"]["span_id"], -1)


def test_to_thread_inherits_the_callers_span(backend):
    def work():
        with recorder.span("in_thread"):
            return threading.get_native_id()

    async def main():
        with recorder.span("caller"):
            return await asyncio.to_thread(work)

    tid = asyncio.run(main())
    s = backend.spans()
    assert s["in_thread"]["parent"] == s["caller"]["span_id"] and s["in_thread"]["tid"] == tid


def test_overflow_is_counted_per_thread_not_silent(backend):
    cap = backend.mod.BUFFER_CAP
    span = recorder.span
    for _ in range(cap + 25):
        with span("x"):
            pass
    recs = backend.take()
    assert len(recs) == cap
    assert backend.dropped == {threading.get_native_id(): 25}
    with span("x"):
        pass
    assert len(backend.take()) == 1 and backend.dropped == {}  # dropped counts are since the last drain


class _Hook:
    def __init__(self):
        self.calls = []

    def begin(self):
        self.calls.append("begin")
        return "tok"

    def end(self, tok, span_id, name_id, stage_id, step):
        self.calls.append((tok, span_id, name_id, stage_id, step))


def test_device_hook_brackets_device_spans(backend):
    hook = _Hook()
    recorder.set_device_hook(hook)
    with recorder.span("forward", step=5, device=True):
        pass
    with recorder.span("host_only", step=5):
        pass
    fwd = backend.spans()["forward"]
    assert hook.calls == ["begin", ("tok", fwd["span_id"], recorder.intern("forward"), recorder.intern("forward"), 5)]


def test_late_follow_links_and_gives_the_step_to_later_children(backend):
    """A span whose sender is known only once its frame is decoded (the agent's step)."""
    with recorder.span("outer"):  # no step: the frame's carrier brings it
        with recorder.span("agent.step") as s:
            s.follow((1, 4242, 17))
            with recorder.span("preprocess"):
                pass
    with recorder.span("master.step", step=3):
        with recorder.span("tcp.recv") as r:  # inherited step 3 stays
            r.follow((1, 99, 2))
    got = backend.spans()
    assert got["agent.step"]["link"] == 4242 and got["agent.step"]["step"] == 17
    assert got["preprocess"]["parent"] == got["agent.step"]["span_id"] and got["preprocess"]["step"] == 17
    assert got["tcp.recv"]["link"] == 99 and got["tcp.recv"]["step"] == 3


def test_explicit_start_and_record_span(backend):
    t0 = time.perf_counter_ns() - 5_000_000
    with recorder.span("agent.step", start_ns=t0, follows=(1, 7, 4)) as s:
        assert s.start_ns == t0 and s.step == 4
        sid = llmtrace.record_span("tcp.recv", t0, t0 + 1_000, bytes=64)
    queue_id = llmtrace.record_span("queue", t0, t0 + 10, parent=0, step=9, req="r1")
    got = backend.spans()
    assert got["agent.step"]["start"] == t0 and got["agent.step"]["link"] == 7
    recv = got["tcp.recv"]
    assert (recv["span_id"], recv["parent"], recv["step"], recv["attrs"]) == (
        sid,
        got["agent.step"]["span_id"],
        4,
        {"bytes": 64},
    )
    assert (recv["start"], recv["end"]) == (t0, t0 + 1_000)
    q = got["queue"]
    assert (q["span_id"], q["parent"], q["step"], q["attrs"]) == (queue_id, 0, 9, {"req": "r1"})


def test_record_span_and_follow_are_free_when_off(backend):
    backend.mod.set_enabled(False)
    assert llmtrace.record_span("x", 1, 2) == 0
    with recorder.span("x", start_ns=5) as s:
        s.follow((1, 2, 3))
    backend.mod.set_enabled(True)
    assert backend.spans() == {}
