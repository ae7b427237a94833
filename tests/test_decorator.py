"""@llmtrace.trace on sync, async, generator and async-generator functions and methods, per backend."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from test_recorder import FLAG_EXCEPTION

from llmtrace import recorder, trace


def test_name_and_stage_forms(backend):
    @trace
    def plain():
        return 1

    @trace("tokenize")
    def tok():
        return 2

    @trace(stage="sampling")
    def sample():
        return 3

    @trace("http.request")
    def req():
        return 4

    assert (plain(), tok(), sample(), req()) == (1, 2, 3, 4)
    s = backend.spans()
    qual = "test_name_and_stage_forms.<locals>."
    assert s[qual + "plain"]["stage"] == "user"
    assert s["tokenize"]["stage"] == "tokenize"
    assert s[qual + "sample"]["stage"] == "sampling"
    assert s["http.request"]["stage"] == "http"


def test_sync_wrapper_keeps_metadata_args_and_nesting(backend):
    def detokenize(ids, *, skip=False):
        """Turn ids into text."""
        with recorder.span("inner"):
            return "".join(map(str, ids)) + ("!" if skip else "")

    wrapped = trace(detokenize)
    assert wrapped.__wrapped__ is detokenize
    assert (wrapped.__name__, wrapped.__qualname__, wrapped.__doc__) == (
        "detokenize",
        detokenize.__qualname__,
        "Turn ids into text.",
    )
    assert inspect.signature(wrapped) == inspect.signature(detokenize)
    with recorder.span("outer", step=3):
        assert wrapped([1, 2], skip=True) == "12!"
    s = backend.spans()
    fn = s[detokenize.__qualname__]
    assert fn["parent"] == s["outer"]["span_id"] and fn["step"] == 3
    assert s["inner"]["parent"] == fn["span_id"]


def test_methods_bind_self(backend):
    class Scheduler:
        def __init__(self):
            self.n = 0

        @trace("schedule")
        def schedule(self, k):
            self.n += k
            return self

        @trace("postprocess")
        def postprocess(self):
            return self.schedule(1)

        @classmethod
        @trace("make")
        def make(cls):
            return cls()

        @staticmethod
        @trace("helper")
        def helper(x):
            return x * 2

    sch = Scheduler.make()
    assert sch.schedule(2) is sch and sch.n == 2
    assert Scheduler.schedule(sch, 1).n == 3
    assert sch.postprocess().n == 4 and Scheduler.helper(4) == 8 and sch.helper(1) == 2
    assert Scheduler.schedule.__name__ == "schedule"
    recs = backend.take()
    names = [r["name"] for r in recs]
    assert names.count("schedule") == 3 and "make" in names and names.count("helper") == 2
    post = next(r for r in recs if r["name"] == "postprocess")
    nested = [r for r in recs if r["name"] == "schedule" and r["parent"] == post["span_id"]]
    assert len(nested) == 1


def test_exception_in_decorated_function(backend):
    @trace("fails")
    def fails():
        raise ValueError("no")

    with pytest.raises(ValueError):
        fails()
    assert backend.spans()["fails"]["flags"] == FLAG_EXCEPTION


def test_disabled_calls_straight_through(backend):
    @trace("quiet")
    def quiet(a, b=1):
        return a + b

    recorder.set_enabled(False)
    assert quiet(1, b=2) == 3
    assert backend.take() == []


def test_async_function(backend):
    @trace("tokenize")
    async def tokenize(text):
        with recorder.span("inner"):
            await asyncio.sleep(0)
        return len(text)

    async def main():
        with recorder.span("http.request"):
            return await asyncio.gather(tokenize("ab"), tokenize("abc"))

    assert asyncio.run(main()) == [2, 3]
    assert inspect.iscoroutinefunction(tokenize)
    recs = backend.take()
    req = next(r for r in recs if r["name"] == "http.request")
    toks = [r for r in recs if r["name"] == "tokenize"]
    inner = [r for r in recs if r["name"] == "inner"]
    assert len(toks) == 2 and all(t["parent"] == req["span_id"] for t in toks)
    assert sorted(i["parent"] for i in inner) == sorted(t["span_id"] for t in toks)


def test_generator_span_covers_iteration_and_is_current_only_while_running(backend):
    @trace("stream")
    def stream(n):
        for i in range(n):
            with recorder.span("chunk"):
                yield i

    with recorder.span("consumer", step=2):
        out = []
        for v in stream(3):
            out.append(v)
            with recorder.span("between"):
                pass
    assert out == [0, 1, 2]
    recs = backend.take()
    consumer = next(r for r in recs if r["name"] == "consumer")
    gen = next(r for r in recs if r["name"] == "stream")
    assert gen["parent"] == consumer["span_id"] and gen["step"] == 2
    assert all(r["parent"] == gen["span_id"] for r in recs if r["name"] == "chunk")
    assert all(r["parent"] == consumer["span_id"] for r in recs if r["name"] == "between")


def test_generator_send_throw_and_close(backend):
    @trace("echo")
    def echo():
        got = yield "ready"
        while True:
            try:
                got = yield got * 2
            except KeyError:
                got = -1

    g = echo()
    assert next(g) == "ready" and g.send(4) == 8 and g.throw(KeyError) == -2
    g.close()
    assert backend.spans()["echo"]["flags"] == 0

    @trace("broken")
    def broken():
        yield 1
        raise RuntimeError("x")

    with pytest.raises(RuntimeError):
        list(broken())
    assert backend.spans()["broken"]["flags"] == FLAG_EXCEPTION


def test_async_generator(backend):
    @trace("detokenize")
    async def deltas(n):
        for i in range(n):
            with recorder.span("piece"):
                await asyncio.sleep(0)
            yield i

    async def main():
        with recorder.span("stream.write"):
            return [d async for d in deltas(3)]

    assert asyncio.run(main()) == [0, 1, 2]
    recs = backend.take()
    top = next(r for r in recs if r["name"] == "stream.write")
    gen = next(r for r in recs if r["name"] == "detokenize")
    assert gen["parent"] == top["span_id"]
    assert [r["parent"] for r in recs if r["name"] == "piece"] == [gen["span_id"]] * 3


def test_update_wrapper_copies_function_dict(backend):
    def f():
        pass

    f.marker = "kept"
    w = trace(f)
    assert w.marker == "kept"


def test_a_decorated_model_call_records_its_batch(backend):
    """`@trace("forward")`: the span carries the first array argument's leading dimension,
    which makes the tokens of the step the model cadence infers around it."""

    class Batch:
        shape = (4, 512)

    class Model:
        @trace("forward")
        def forward(self, h, scale=1):
            return len(h) * scale if isinstance(h, list) else h.shape[0] * scale

    assert Model().forward(Batch()) == 4
    assert backend.spans()["forward"]["attrs"] == {"batch": 4}
    assert Model().forward([1, 2, 3], scale=2) == 6  # a list of ids has no shape: no batch
    assert backend.spans()["forward"]["attrs"] == {}
