"""`llmtrace export RUN --otlp URL`: the run's spans reach an OTLP/HTTP receiver (here a
local HTTP server) as protobuf that the official opentelemetry-proto definitions decode:
parents, cross-process links, resource attributes per process, error status, Unix times,
and the GenAI attributes on request spans."""

from __future__ import annotations

import http.server
import threading

import pytest
from synthetic import AGENT_PID, MASTER_PID, EngineTraceBuilder

from llmtrace.cli import main as cli_main
from llmtrace.export import otlp
from llmtrace.export.chrome import write_chrome_trace
from llmtrace.timeline import FLAG_EXCEPTION

pb = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

EPOCH = 1_765_000_000 * 10**9


def _trace():
    b = EngineTraceBuilder(gpu=False)
    for pid in (MASTER_PID, AGENT_PID):
        b.trace.processes[pid].header.update(trace_id="00000000000abc12", epoch_offset_ns=EPOCH, argv=["serve"])
    b.trace.processes[MASTER_PID].header["resource"]["max_num_seqs"] = 8
    for _ in range(3):
        b.step(batch=2)
    req = b.span(
        MASTER_PID,
        "http.request",
        b.t,
        b.t + 50_000_000,
        attrs={"req": "r1", "prompt_tokens": 17, "output_tokens": 12, "ttft_us": 25_000},
    )
    boom = b.span(AGENT_PID, "forward", b.t, b.t + 1_000_000, attrs={})
    boom.flags = FLAG_EXCEPTION
    boom.link_id = req.span_id  # a cross-process `follows` link
    b.trace.meta["config"] = {"model": {"preset": "tiny"}}
    return b.build(), req


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: list[tuple[str, bytes]] = []

    def do_POST(self):
        self.bodies.append((self.headers["Content-Type"], self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def _decode(body: bytes):
    msg = pb.ExportTraceServiceRequest()
    msg.ParseFromString(body)
    return msg


def test_spans_arrive_decodable_with_links_resources_and_genai(tmp_path, capsys):
    trace, req = _trace()
    path = tmp_path / "t.json"
    write_chrome_trace(trace, str(path))
    _Receiver.bodies = []
    server = http.server.HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1/traces"
    try:
        assert cli_main(["export", str(path), "--otlp", url]) == 0
    finally:
        server.shutdown()
    assert f"sent {len(trace.spans)} spans of 2 processes" in capsys.readouterr().out
    assert {ct for ct, _ in _Receiver.bodies} == {"application/x-protobuf"}
    spans, resources = {}, {}
    for _, body in _Receiver.bodies:
        for rs in _decode(body).resource_spans:
            attrs = {kv.key: kv.value for kv in rs.resource.attributes}
            resources[attrs["process.pid"].int_value] = attrs
            for ss in rs.scope_spans:
                assert ss.scope.name == "llmtrace"
                for s in ss.spans:
                    spans[int.from_bytes(s.span_id, "big")] = s
    assert len(spans) == len(trace.spans)
    assert resources[MASTER_PID]["service.name"].string_value == "master"
    assert resources[MASTER_PID]["max_num_seqs"].int_value == 8
    by_id = {s.span_id: s for s in trace.spans}
    for sid, s in spans.items():
        orig = by_id[sid]
        assert s.trace_id == bytes(8) + bytes.fromhex("00000000000abc12")
        assert int.from_bytes(s.parent_span_id or bytes(8), "big") == orig.parent_id
        assert s.start_time_unix_nano == orig.start_ns + EPOCH and s.end_time_unix_nano == orig.end_ns + EPOCH
    linked = [s for s in trace.spans if s.link_id]
    assert linked and all(int.from_bytes(spans[s.span_id].links[0].span_id, "big") == s.link_id for s in linked)
    http_span = spans[req.span_id]
    attrs = {kv.key: kv.value for kv in http_span.attributes}
    assert attrs["gen_ai.request.model"].string_value == "tiny"
    assert attrs["gen_ai.usage.input_tokens"].int_value == 17 and attrs["gen_ai.usage.output_tokens"].int_value == 12
    assert attrs["gen_ai.server.time_to_first_token"].double_value == pytest.approx(0.025)
    assert http_span.kind == 2  # SERVER
    assert [s.status.code for s in spans.values() if s.name == "forward" and s.status.code] == [2]


def test_batches_and_a_receiver_that_refuses(tmp_path, capsys):
    trace, _ = _trace()
    bodies = otlp.requests(trace, batch=5)
    assert len(bodies) >= len(trace.spans) // 5
    assert sum(len(ss.spans) for b in bodies for rs in _decode(b).resource_spans for ss in rs.scope_spans) == len(
        trace.spans
    )
    path = tmp_path / "t.json"
    write_chrome_trace(trace, str(path))
    assert cli_main(["export", str(path), "--otlp", "http://127.0.0.1:9/v1/traces"]) == 2
    assert "cannot send OTLP" in capsys.readouterr().err
    assert cli_main(["export", str(path), "--otlp", "http://x", "-o", str(tmp_path / "y.json")]) == 2
