"""A recorded run as OpenTelemetry traces over OTLP/HTTP (protobuf), for the tracing
backends people already run (Jaeger, Tempo, an OpenTelemetry Collector).

`llmtrace export RUN --otlp http://collector:4318/v1/traces` posts the run's spans in
batches of BATCH_SPANS: one ResourceSpans per process (resource attributes: service.name
= the process name, process.pid, process.command_args, the process's
`llmtrace.configure(resource=...)` entries), parent/child ids as recorded, cross-process
`follows` links as span links, a failed span with status ERROR, times in Unix ns (each
process's CLOCK_MONOTONIC plus its recorded epoch offset). Request spans that carry token
counts get the GenAI semantic-convention attributes (`gen_ai.request.model`,
`gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
`gen_ai.server.time_to_first_token` in seconds).

The protobuf wire format is written here directly (no dependency): varints, fixed64 and
length-delimited fields, with the field numbers of opentelemetry-proto's
collector/trace/v1 ExportTraceServiceRequest, which the tests decode with the official
definitions.
"""

from __future__ import annotations

import struct
import urllib.error
import urllib.request

from .. import names
from ..errors import UserError
from ..timeline import Process, Span, Trace

BATCH_SPANS = 5000
TIMEOUT_S = 30.0
SCOPE = ("llmtrace", "0.1.0")
STATUS_ERROR = 2
KIND_INTERNAL = 1
KIND_SERVER = 2
_GENAI = (
    (names.A_TTFT_US, "gen_ai.server.time_to_first_token", 1e-6),
    ("prompt_tokens", "gen_ai.usage.input_tokens", 1),
    (names.A_OUTPUT_TOKENS, "gen_ai.usage.output_tokens", 1),
)


# ---- protobuf wire format --------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _field(num: int, wire: int) -> bytes:
    return _varint(num << 3 | wire)


def _len(num: int, payload: bytes) -> bytes:
    return _field(num, 2) + _varint(len(payload)) + payload


def _str(num: int, s: str) -> bytes:
    return _len(num, s.encode("utf-8", "surrogatepass"))


def _fixed64(num: int, v: int) -> bytes:
    return _field(num, 1) + struct.pack("<Q", v & ((1 << 64) - 1))


def _any_value(v) -> bytes:
    if isinstance(v, bool):
        return _field(2, 0) + _varint(int(v))
    if isinstance(v, int):
        return _field(3, 0) + _varint(v)
    if isinstance(v, float):
        return _field(4, 1) + struct.pack("<d", v)
    return _str(1, str(v))


def _kv(key: str, value) -> bytes:
    return _str(1, key) + _len(2, _any_value(value))


def _attributes(num: int, attrs: dict) -> bytes:
    return b"".join(_len(num, _kv(k, v)) for k, v in attrs.items())


# ---- llmtrace -> OTLP -------------------------------------------------------------------


def _trace_id(proc: Process) -> bytes:
    """llmtrace's 64-bit trace id in OTLP's 16 bytes (high half zero)."""
    tid = proc.header.get("trace_id") or "0"
    return bytes(8) + int(tid, 16).to_bytes(8, "big")


def _span_id(i: int) -> bytes:
    return i.to_bytes(8, "big")


def _span_attrs(s: Span, model: str | None) -> dict:
    attrs = {"llmtrace.stage": s.stage, "thread.id": s.tid, **s.attrs}
    if s.step >= 0:
        attrs["llmtrace.step"] = s.step
    if s.open_at_stop:
        attrs["llmtrace.open_at_stop"] = True
    if s.name == names.HTTP_REQUEST and any(k in s.attrs for k, _, _ in _GENAI):
        if model:
            attrs["gen_ai.request.model"] = model
        for key, otel, scale in _GENAI:
            v = s.attrs.get(key)
            if isinstance(v, (int, float)) and v >= 0:
                attrs[otel] = v * scale if scale != 1 else int(v)
    return attrs


def _span(s: Span, proc: Process, model: str | None) -> bytes:
    epoch, trace_id = proc.epoch_offset_ns, _trace_id(proc)
    out = (
        _len(1, trace_id)
        + _len(2, _span_id(s.span_id))
        + (_len(4, _span_id(s.parent_id)) if s.parent_id else b"")
        + _str(5, s.name)
        + _field(6, 0)
        + _varint(KIND_SERVER if s.name == names.HTTP_REQUEST else KIND_INTERNAL)
        + _fixed64(7, s.start_ns + epoch)
        + _fixed64(8, s.end_ns + epoch)
        + _attributes(9, _span_attrs(s, model))
    )
    if s.link_id:
        out += _len(13, _len(1, trace_id) + _len(2, _span_id(s.link_id)))
    if s.failed:
        out += _len(15, _field(3, 0) + _varint(STATUS_ERROR))
    return out


def _resource(proc: Process) -> bytes:
    attrs = {"service.name": proc.name, "process.pid": proc.pid, "telemetry.sdk.name": "llmtrace"}
    argv = proc.header.get("argv")
    if isinstance(argv, list):
        attrs["process.command_args"] = " ".join(map(str, argv))
    attrs.update({k: v for k, v in proc.resource.items() if isinstance(v, (str, int, float, bool))})
    return _attributes(1, attrs)


def _model_name(trace: Trace) -> str | None:
    model = (trace.meta.get("config") or {}).get("model") if isinstance(trace.meta.get("config"), dict) else None
    if isinstance(model, dict):
        return model.get("preset") or model.get("path")
    return model if isinstance(model, str) else None


def requests(trace: Trace, batch: int = BATCH_SPANS) -> list[bytes]:
    """ExportTraceServiceRequest messages holding every span of `trace`, `batch` at most each."""
    model = _model_name(trace)
    scope = _len(1, _str(1, SCOPE[0]) + _str(2, SCOPE[1]))
    by_pid: dict[int, list[Span]] = {}
    for s in trace.spans:
        by_pid.setdefault(s.pid, []).append(s)
    out, body, n = [], b"", 0
    for pid, spans in sorted(by_pid.items()):
        proc = trace.processes.get(pid) or Process(pid, str(pid))
        for i in range(0, len(spans), batch):
            chunk = spans[i : i + batch]
            encoded = b"".join(_len(2, _span(s, proc, model)) for s in chunk)
            body += _len(1, _len(1, _resource(proc)) + _len(2, scope + encoded))
            n += len(chunk)
            if n >= batch:
                out.append(body)
                body, n = b"", 0
    if body:
        out.append(body)
    return out


def send(trace: Trace, url: str, batch: int = BATCH_SPANS) -> tuple[int, int]:
    """POST every batch to `url`; (requests sent, spans sent). A receiver that refuses or
    cannot be reached is a UserError naming the URL and what it said."""
    sent = 0
    for body in requests(trace, batch):
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/x-protobuf"})
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            raise UserError(
                f"{url}: the OTLP receiver answered {e.code} {e.reason}: {e.read()[:300].decode('utf-8', 'replace')}"
            ) from None
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"{url}: cannot send OTLP: {getattr(e, 'reason', e)}") from None
        sent += 1
    return sent, len(trace.spans)
