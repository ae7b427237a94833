"""Requests linked to the steps that served them without the program's help
(analyze/request_steps.py, auto/handoff.py): a TTFT and a queue time for programs that
never name their requests."""

from __future__ import annotations

import itertools
import json
import queue
import subprocess
import sys
import textwrap
import threading

import pytest
from synthetic import drain_recorded_trace

import llmtrace
from llmtrace import names, recorder
from llmtrace.analyze.analysis import Analysis
from llmtrace.analyze.request_steps import HANDOFF, SAME_THREAD, request_links
from llmtrace.timeline import Instant, Process, Span, Trace

MS = 1_000_000
_ids = itertools.count(1)


def _span(t: Trace, name: str, start: float, end: float, tid: int, parent: Span | None = None) -> Span:
    s = Span(
        name,
        name.split(".", 1)[0],
        1,
        tid,
        int(start * MS),
        int(end * MS),
        next(_ids),
        parent.span_id if parent else 0,
        0,
        -1,
        {},
    )
    t.spans.append(s)
    return s


def _engine_steps(t: Trace, tid: int, n: int = 10) -> None:
    """Steps of 10 ms on thread `tid`: 2 ms admitting and scheduling, then an 8 ms forward."""
    for k in range(n):
        _span(t, "forward", 10 * k + 2, 10 * k + 10, tid)


def _handoff(t: Trace, request: Span, key: int, put_ms: float, get_ms: float, get_tid: int) -> None:
    t.instants.append(
        Instant(
            names.I_HANDOFF_PUT,
            "handoff",
            1,
            request.tid,
            int(put_ms * MS),
            -1,
            request.span_id,
            {names.A_HANDOFF: key},
        )
    )
    t.instants.append(
        Instant(names.I_HANDOFF_GET, "handoff", 1, get_tid, int(get_ms * MS), -1, 0, {names.A_HANDOFF: key})
    )


def _analysis(t: Trace) -> Analysis:
    t.processes = {1: Process(1, "server", {"pid": 1})}
    t.sort()
    return Analysis(t)


def test_a_request_handed_to_the_step_loop_is_served_from_the_next_forward():
    t = Trace()
    _engine_steps(t, tid=2)
    request = _span(t, names.HTTP_REQUEST, 13, 70, tid=5)
    _handoff(t, request, key=7, put_ms=13.5, get_ms=23, get_tid=2)  # taken after step 2's forward began at 22
    a = _analysis(t)
    (link,) = request_links(a.index, a.breakdown.steps).values()
    assert link.by == HANDOFF and link.first_step == 3 and link.steps == 4  # forwards at 32, 42, 52, 62
    # step 3 (inferred from the forwards' cadence) runs until the next forward, at 42
    assert link.queue_ns == int(9.5 * MS) and link.ttft_ns == 42 * MS - 13 * MS
    summary = a.metrics
    assert summary["ttft_ms"]["p50"] == pytest.approx(29.0) and summary["queue_ms"]["p50"] == pytest.approx(9.5)
    assert summary["request_links"] == {"linked": 1, "requests": 1, "by": {HANDOFF: 1}}


def test_a_handler_running_the_loop_itself_serves_its_own_request():
    t = Trace()
    for start in (0, 50):  # one request at a time on one thread, each with 3 forwards inside
        request = _span(t, names.HTTP_REQUEST, start, start + 40, tid=3)
        for j in range(3):
            _span(t, "forward", start + 5 + 10 * j, start + 12 + 10 * j, tid=3, parent=request)
    a = _analysis(t)
    links = sorted(request_links(a.index, a.breakdown.steps).values(), key=lambda x: x.first_step)
    # the first step of each runs from its forward (5 ms in) to the next forward (15 ms in)
    assert [(x.by, x.steps, x.ttft_ns) for x in links] == [(SAME_THREAD, 3, 15 * MS)] * 2


def test_a_get_on_a_thread_without_steps_is_served_by_its_process_steps_ties_included():
    t = Trace()
    _engine_steps(t, tid=2)
    _engine_steps(t, tid=3)  # a second loop whose forwards start at the same instants
    request = _span(t, names.HTTP_REQUEST, 13, 45, tid=5)
    _handoff(t, request, key=1, put_ms=13.5, get_ms=23, get_tid=4)  # a thread that runs no step
    a = _analysis(t)
    (link,) = request_links(a.index, a.breakdown.steps).values()
    assert link.by == HANDOFF and link.steps == 4  # forwards at 32 and 42 on both threads


def test_concurrent_requests_on_one_thread_prove_nothing_by_time():
    t = Trace()
    _engine_steps(t, tid=1)  # an event loop: the step task and the handlers share the thread
    _span(t, names.HTTP_REQUEST, 5, 60, tid=1)
    _span(t, names.HTTP_REQUEST, 15, 70, tid=1)
    a = _analysis(t)
    assert request_links(a.index, a.breakdown.steps) == {} and a.metrics["request_links"] is None


def test_queue_hand_offs_are_recorded_inside_a_span_and_matched_by_identity():
    q: queue.Queue = queue.Queue()
    item, other = {"prompt": [1, 2]}, {"prompt": [3]}
    recorder.drain()
    llmtrace.instrument(["handoff"])
    recorder.set_enabled(True)
    try:
        q.put(other)  # outside any span: nothing to link
        with llmtrace.span(names.HTTP_REQUEST):
            q.put(item)
        got = []
        worker = threading.Thread(target=lambda: got.extend([q.get(), q.get()]))
        worker.start()
        worker.join(5)
    finally:
        recorder.set_enabled(False)
        llmtrace.uninstrument()
    instants = [i for i in drain_recorded_trace().instants if i.name.startswith("handoff.")]
    assert got == [other, item]
    (put,) = [i for i in instants if i.name == names.I_HANDOFF_PUT]
    (get,) = [i for i in instants if i.name == names.I_HANDOFF_GET]
    assert put.attrs[names.A_HANDOFF] == get.attrs[names.A_HANDOFF] and put.parent_id and get.tid != put.tid


SERVER = textwrap.dedent("""\
    import json, queue, threading, time, urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import torch

    inbox = queue.Queue()
    model = torch.nn.Linear(64, 64)

    def engine():
        running = []
        while True:
            while True:
                try:
                    running.append(inbox.get_nowait())
                except queue.Empty:
                    break
            if not running:
                running.append(inbox.get())
            x = torch.randn(len(running), 64)
            with torch.no_grad():
                model(x)
            time.sleep(0.004)
            for r in running:
                r["left"] -= 1
            for r in [r for r in running if r["left"] == 0]:
                running.remove(r)
                r["done"].set()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            r = {"left": 5, "done": threading.Event()}
            inbox.put(r)
            r["done"].wait()
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    threading.Thread(target=engine, daemon=True).start()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    def call():
        urllib.request.urlopen(urllib.request.Request(url, data=b"{}"), timeout=30).read()
    clients = [threading.Thread(target=call) for _ in range(6)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    server.shutdown()
    """)


@pytest.mark.slow
def test_an_unannotated_queue_server_gets_ttft_and_queue_time(tmp_path):
    program = tmp_path / "server.py"
    program.write_text(SERVER)
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "llmtrace.cli", "record", "--out", str(out), "--", sys.executable, str(program)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["requests"] == 6 and summary["request_links"]["by"] == {HANDOFF: 6}
    # a request waits at least one 4 ms step after it is taken; it ends after its 5th
    assert 4 <= summary["ttft_ms"]["p50"] < summary["e2e_ms"]["p50"] and summary["queue_ms"]["p50"] >= 0
