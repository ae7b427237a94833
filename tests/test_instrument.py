"""Automatic instrumentation (llmtrace/instrument/): the spans it records at library
boundaries, and that it changes nothing else about the program."""

from __future__ import annotations

import json
import logging
import socket
import sys
import time

import pytest

import llmtrace
from llmtrace import names, recorder
from llmtrace.auto import patching
from llmtrace.auto.caller import SLOW_NS
from llmtrace.spool_format import ATTR_FLOAT, ATTR_ID_MASK, ATTR_STR, RECORD, SPAN, bits_float


@pytest.fixture
def spans():
    """Instrumented and recording; yields a function returning the spans since the last call."""
    strings: dict[int, str] = {}
    recorder.drain()
    recorder.requeue_strings()  # the first take names every string interned so far
    llmtrace.instrument()
    recorder.set_enabled(True)

    def take() -> list[dict]:
        data, _, new, _ = recorder.drain()
        strings.update(new)
        out = []
        for r in RECORD.iter_unpack(data):
            if r[17] != SPAN:  # kind
                continue
            attrs = {}
            for v, k in zip(r[6:10], r[10:14]):
                if k:
                    key = strings[k & ATTR_ID_MASK]
                    attrs[key] = strings[v] if k & ATTR_STR else bits_float(v) if k & ATTR_FLOAT else v
            out.append({"name": strings[r[14]], "stage": strings[r[15]], "dur": r[1] - r[0], "attrs": attrs})
        return out

    yield take
    recorder.set_enabled(False)
    llmtrace.uninstrument()
    recorder.drain()


def test_transport_runtime_and_serialization_spans(spans):
    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a.sendall(b"x" * 300)
    assert b.recv(1000) == b"x" * 300
    json.loads(json.dumps({"k": [1, 2, 3]}))
    json.dumps(list(range(200_000)))  # a slow call: it names its caller
    time.sleep(0.002)
    logging.getLogger("test_instrument").warning("a record")
    got = spans()
    by = {s["name"]: s for s in got}
    send, recv = by["tcp.send"], by["tcp.recv"]
    assert send["stage"] == names.TCP and send["attrs"][names.A_BYTES] == 300 and send["attrs"][names.A_NODELAY] == 1
    if send["dur"] < SLOW_NS:
        assert names.A_CALLER not in send["attrs"]  # a fast call does not pay for finding its caller
    assert recv["attrs"][names.A_BYTES] == 300
    encodes = sorted((s for s in got if s["name"] == "serialize.encode"), key=lambda s: s["dur"])
    assert encodes[-1]["attrs"][names.A_CALLER] == f"{__name__}.test_transport_runtime_and_serialization_spans"
    assert all(names.A_CALLER not in s["attrs"] for s in encodes if s["dur"] < SLOW_NS)
    assert encodes[0]["stage"] == names.SERIALIZE and "serialize.decode" in by
    assert by["sleep"]["stage"] == names.SLEEP and by["sleep"]["dur"] >= 2_000_000
    assert by["logging"]["stage"] == names.LOGGING
    for s in (a, b, srv):
        s.close()


def test_a_sockets_nodelay_is_read_once_and_again_after_the_program_sets_it(spans):
    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    a.sendall(b"x")
    a.sendall(b"y")
    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a.sendall(b"z")
    sends = [s["attrs"][names.A_NODELAY] for s in spans() if s["name"] == "tcp.send"]
    assert sends == [0, 0, 1]
    for s in (a, b, srv):
        s.close()


def test_behaviour_and_exceptions_are_the_programs(spans):
    with pytest.raises(TypeError, match="not JSON serializable"):
        json.dumps(object())
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(OSError):
        for _ in range(100):
            a.sendall(b"y" * 65536)
    a.close()
    assert json.dumps([1, "é"], ensure_ascii=False) == '[1, "é"]'
    assert {s["name"] for s in spans()} >= {"serialize.encode", "ipc.send"}  # Unix sockets are ipc
    recorder.set_enabled(False)  # off: the same calls record nothing
    json.dumps([1])
    time.sleep(0)
    assert spans() == []


def test_zmq_and_pipe_messages_and_polls(spans):
    import multiprocessing

    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    pull.bind("inproc://t")
    push.connect("inproc://t")
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    assert poller.poll(10) == []  # nothing yet: the poll waited its timeout
    push.send_multipart([b"h" * 10, b"b" * 2000])
    assert dict(poller.poll(1000)) == {pull: zmq.POLLIN}
    assert pull.recv_multipart() == [b"h" * 10, b"b" * 2000]
    a, b = multiprocessing.Pipe()
    assert not b.poll(0.003)
    got = spans()
    sends = [s["attrs"][names.A_BYTES] for s in got if s["name"] == "ipc.send"]
    recvs = [s["attrs"][names.A_BYTES] for s in got if s["name"] == "ipc.recv"]
    assert sends == [10, 2000] and recvs == [10, 2000]  # a multipart message: one span per part
    polls = [s for s in got if s["name"] == "ipc.poll"]
    assert len(polls) == 3 and polls[0]["dur"] >= 9_000_000 and polls[2]["dur"] >= 2_500_000
    assert {s["stage"] for s in got} == {names.IPC}
    push.close()
    pull.close()
    ctx.term()
    a.close()
    b.close()


def test_uninstrument_restores_every_attribute():
    before = (socket.socket.__dict__.get("send"), time.sleep, logging.Logger._log, json.dumps)
    llmtrace.instrument()
    assert time.sleep is not before[1] and "send" in socket.socket.__dict__
    assert llmtrace.instrument() == []  # once only
    llmtrace.uninstrument()
    assert (socket.socket.__dict__.get("send"), time.sleep, logging.Logger._log, json.dumps) == before


def test_a_module_imported_later_is_patched_after_its_import(tmp_path, monkeypatch):
    (tmp_path / "late_lib.py").write_text("def work(x):\n    return x * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    patching.on_import(
        "late_lib", lambda mod: patching.replace(mod, "work", lambda orig: recorder.traced(orig, "late.work", "late"))
    )
    try:
        import late_lib

        assert late_lib.work(21) == 42 and hasattr(late_lib.work, "__llmtrace_original__")
    finally:
        patching.restore()
        sys.modules.pop("late_lib", None)


def test_torch_forward_and_host_copies(spans):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Flatten(), torch.nn.Linear(32, 2048))
    with torch.no_grad():
        logits = model(torch.zeros(3, 4, dtype=torch.long))
        ids = logits.argmax(dim=-1).tolist()  # 3 ids: too small for a span on a CPU
        rows = logits.tolist()  # the whole [3, 2048] logits: a host copy worth a span
    big = torch.zeros(2000, 1000).tolist()  # slow enough to name its caller
    assert len(ids) == 3 and len(rows) == 3 and len(big) == 2000
    got = spans()
    forwards = [s for s in got if s["stage"] == names.FORWARD]
    assert len(forwards) == 1  # the outermost module only
    assert forwards[0]["attrs"][names.A_BATCH] == 3 and forwards[0]["attrs"][names.A_TOKENS] == 12
    copy, slow = [s for s in got if s["name"] == names.SYNC_WAIT]
    assert copy["attrs"][names.A_BYTES] == 3 * 2048 * 4 and copy["attrs"]["fn"] == "tolist"
    assert slow["attrs"][names.A_CALLER].endswith("test_torch_forward_and_host_copies")


def test_a_decode_records_how_many_ids_it_decoded(spans):
    spm = pytest.importorskip("sentencepiece")
    import os

    sp = spm.SentencePieceProcessor(
        model_file=os.path.join(os.path.dirname(__file__), "..", "engine", "assets", "tokenizer.model")
    )
    ids = sp.encode("hello world, this is a test")
    spans()
    assert sp.decode(ids) == "hello world, this is a test"
    assert sp.decode([ids, ids[:3]])[0] == "hello world, this is a test"
    assert sp.DecodeIds(input=ids) == "hello world, this is a test"  # by keyword, as sentencepiece calls itself
    counts = [s["attrs"][names.A_IDS] for s in spans() if s["stage"] == names.DETOKENIZE]
    assert counts[:2] == [len(ids), len(ids) + 3] and len(ids) in counts[2:]


def test_http_server_and_wsgi_requests_are_spans(spans):
    import threading
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler), make_server("127.0.0.1", 0, app, handler_class=Quiet)]
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    spans()
    for srv, path in zip(servers, ("/plain", "/wsgi")):
        assert urllib.request.urlopen(f"http://127.0.0.1:{srv.server_address[1]}{path}", timeout=10).read() == b"ok"
    for srv in servers:
        srv.shutdown()
        srv.server_close()
    got = sorted(s["attrs"]["path"] for s in spans() if s["name"] == names.HTTP_REQUEST)
    assert got == ["/plain", "/wsgi"]


def test_an_asyncio_sleep_is_a_span_and_a_yield_is_not(spans):
    import asyncio

    async def loop():
        await asyncio.sleep(0.002)
        await asyncio.sleep(0)  # a yield to the other tasks: no sleep to remove
        return "done"

    spans()
    assert asyncio.run(loop()) == "done"
    sleeps = [s for s in spans() if s["stage"] == names.SLEEP]
    assert len(sleeps) == 1 and sleeps[0]["dur"] >= 2_000_000


def test_a_queue_get_asked_not_to_wait_says_so(spans):
    import multiprocessing as mp
    import queue

    q = mp.Queue()
    q.put("work")
    time.sleep(0.1)  # the feeder thread has written it
    spans()
    assert q.get(timeout=5) == "work"
    with pytest.raises(queue.Empty):
        q.get_nowait()
    gets = [s for s in spans() if s["name"] == "ipc.get"]
    assert [g["attrs"].get(names.A_NONBLOCKING) for g in gets] == [None, 1]
