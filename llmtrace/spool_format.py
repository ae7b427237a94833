"""The spool file format: one file per process, a JSON header then CRC-checked batches.

File:   b"LLMTRACE" | u16 version | u16 0 | u32 header_len | header JSON
Batch:  b"LTB1" | u32 payload_len | u32 crc32(payload) | payload
Payload: u32 n_strings, n x (u32 id, u32 len, utf-8 bytes)
         u32 meta_len, meta JSON ({"threads": {tid: name}, "dropped": {tid: n}, ...; the last
         batch of a process that stopped recording cleanly: "closed": {"reason", "ns"}})
         u32 n_records, n x RECORD (fixed 112 bytes, layout below)

Batches are append-only and become visible whole: the writer (llmtrace/sink.py) either
appends a batch with one write() call or copies it into a mapping of the file magic last,
after a zero-filled (preallocated) tail. A crash leaves at most one unfinished batch at
the end, and a mapped file a zero tail; readers stop there and report the offset.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field

MAGIC = b"LLMTRACE"
BATCH_MAGIC = b"LTB1"
_NO_MAGIC = bytes(4)
VERSION = 1

# Record kinds.
SPAN = 0  # a host span: [start_ns, end_ns]
INSTANT = 1  # a point event at start_ns
COUNTER = 2  # a counter sample at start_ns; value in attr slot 0 (float bits)
DEVICE = 3  # device (CUDA event) time of span `span_id`, on the host clock
SAMPLE = 4  # a stack sample of thread `tid` at start_ns; name = folded stack "outer;...;inner"

CLOSED = "closed"  # batch meta key: the recording ended here ({"reason": "exit" | signal name, "ns"})

# Record flags.
FLAG_EXCEPTION = 1  # the span's body raised
FLAG_ATTRS_CUT = 2  # more than N_ATTRS attributes were given; the rest are not kept
FLAG_OPEN_AT_STOP = 4  # still open when the process stopped recording (exit, SIGTERM): ends there

# Attribute key flags (high bits of attr_key); the low 30 bits are a string id.
ATTR_STR = 1 << 31  # value is a string id
ATTR_FLOAT = 1 << 30  # value is the bits of an IEEE double
ATTR_ID_MASK = (1 << 30) - 1
N_ATTRS = 4

# start, end, span_id, parent_id, link_id, step, attr_val[4], attr_key[4],
# name_id, stage_id, tid, kind, flags, pad
RECORD = struct.Struct("<qqQQQq4q4I3IBBH")
assert RECORD.size == 112

_HDR = struct.Struct("<8sHHI")
_BATCH = struct.Struct("<4sII")
_U32 = struct.Struct("<I")
_STR = struct.Struct("<II")
# an encoder of its own: json.dumps is looked up at each call, and automatic instrumentation
# patches it (the flush thread's headers and metadata were recorded as the program's serialize spans)
_JSON = json.JSONEncoder(separators=(",", ":"))
_F64 = struct.Struct("<d")
_I64 = struct.Struct("<q")


def float_bits(x: float) -> int:
    return _I64.unpack(_F64.pack(x))[0]


def bits_float(b: int) -> float:
    return _F64.unpack(_I64.pack(b))[0]


def encode_header(header: dict) -> bytes:
    body = _JSON.encode(header).encode()
    return _HDR.pack(MAGIC, VERSION, 0, len(body)) + body


def encode_batch(strings: list[tuple[int, str]], meta: dict, records: bytes, n_records: int) -> bytes:
    parts = [_U32.pack(len(strings))]
    for sid, s in strings:
        b = s.encode("utf-8", "surrogatepass")
        parts.append(_STR.pack(sid, len(b)))
        parts.append(b)
    mb = _JSON.encode(meta).encode() if meta else b""
    parts += [_U32.pack(len(mb)), mb, _U32.pack(n_records), records]
    payload = b"".join(parts)
    return _BATCH.pack(BATCH_MAGIC, len(payload), zlib.crc32(payload)) + payload


class SpoolError(ValueError):
    """A spool file that cannot be read; names the file and the byte offset."""

    def __init__(self, path: str, offset: int, what: str):
        super().__init__(f"{path}: at byte {offset}: {what}")
        self.path, self.offset, self.what = path, offset, what


@dataclass
class Batch:
    strings: list[tuple[int, str]]
    meta: dict
    records: memoryview  # n_records * RECORD.size bytes
    n_records: int


@dataclass
class SpoolFile:
    path: str
    header: dict
    batches: list[Batch] = field(default_factory=list)
    truncated_at: int | None = None  # offset of an incomplete/corrupt tail, if any
    truncation_reason: str = ""


def decode_batch(payload: memoryview, path: str = "<stream>", base: int = 0) -> Batch:
    try:
        pos = 0
        (n_str,) = _U32.unpack_from(payload, pos)
        pos += 4
        strings = []
        for _ in range(n_str):
            sid, ln = _STR.unpack_from(payload, pos)
            pos += 8
            strings.append((sid, bytes(payload[pos : pos + ln]).decode("utf-8", "surrogatepass")))
            pos += ln
        (mlen,) = _U32.unpack_from(payload, pos)
        pos += 4
        meta = json.loads(bytes(payload[pos : pos + mlen])) if mlen else {}
        if not _meta_ok(meta):
            raise SpoolError(
                path, base + pos, "batch meta is not an object of {tid: name} threads, {tid: count} dropped"
            )
        pos += mlen
        (n_rec,) = _U32.unpack_from(payload, pos)
        pos += 4
        recs = payload[pos : pos + n_rec * RECORD.size]
        if len(recs) != n_rec * RECORD.size:
            raise SpoolError(path, base + pos, f"batch holds {len(recs)} record bytes, header says {n_rec} records")
        return Batch(strings, meta, recs, n_rec)
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, SpoolError):
            raise
        raise SpoolError(path, base, f"malformed batch: {e}") from None


def _meta_ok(meta) -> bool:
    if not isinstance(meta, dict):
        return False
    threads, dropped = meta.get("threads", {}), meta.get("dropped", {})
    return (
        isinstance(threads, dict)
        and isinstance(dropped, dict)
        and all(k.isdigit() for k in (*threads, *dropped))
        and all(isinstance(v, str) for v in threads.values())
        and all(isinstance(v, int) for v in dropped.values())
    )


def parse_header(data: memoryview, path: str) -> tuple[dict, int] | None:
    """The file header and the offset of the first batch; None while `data` is shorter than it."""
    if len(data) < _HDR.size:
        return None
    magic, version, _, hlen = _HDR.unpack_from(data, 0)
    if magic != MAGIC:
        raise SpoolError(path, 0, "not an llmtrace spool file (bad magic)")
    if version != VERSION:
        raise SpoolError(path, 8, f"spool version {version}, this llmtrace reads version {VERSION}")
    if len(data) < _HDR.size + hlen:
        return None
    try:
        header = json.loads(bytes(data[_HDR.size : _HDR.size + hlen]))
    except ValueError as e:
        raise SpoolError(path, _HDR.size, f"malformed header JSON: {e}") from None
    if (
        not isinstance(header, dict)
        or not isinstance(header.get("pid", 0), int)
        or not isinstance(header.get("process_name", ""), str)
    ):
        raise SpoolError(path, _HDR.size, "the header is not an object with an integer pid and a process_name")
    return header, _HDR.size + hlen


@dataclass
class Scan:
    batches: list[Batch]
    end: int  # offset just past the last complete batch
    problem: str = ""  # why the scan stopped before the end of the data ("" = it did not)
    incomplete: bool = False  # the problem is a batch not fully written yet: more bytes may complete it


def scan_batches(data: memoryview, pos: int, path: str) -> Scan:
    """Decode the complete, checksummed batches of `data` from offset `pos` on."""
    scan = Scan([], pos)
    while pos < len(data):
        if len(data) - pos < _BATCH.size:
            scan.problem, scan.incomplete = "incomplete batch header", True
            break
        bmagic, plen, crc = _BATCH.unpack_from(data, pos)
        if bmagic != BATCH_MAGIC:
            if bmagic == _NO_MAGIC:  # a mapped writer's batch without its magic yet, or the zero tail
                if plen or bytes(data[pos:]).strip(b"\0"):
                    scan.problem, scan.incomplete = "batch not finished (no magic yet)", True
            elif bytes(data[pos:]).strip(b"\0"):
                scan.problem = "bad batch magic"
            break
        start = pos + _BATCH.size
        if start + plen > len(data):
            scan.problem, scan.incomplete = f"batch of {plen} bytes cut at {len(data) - start}", True
            break
        payload = data[start : start + plen]
        if zlib.crc32(payload) != crc:
            scan.problem = "batch checksum mismatch"
            break
        scan.batches.append(decode_batch(payload, path, start))
        pos = scan.end = start + plen
    return scan


def read_spool(path: str) -> SpoolFile:
    """Read a whole spool file. A truncated or corrupt tail is tolerated and reported."""
    with open(path, "rb") as f:
        data = memoryview(f.read())
    head = parse_header(data, path)
    if head is None:
        raise SpoolError(path, 0, f"file is {len(data)} bytes, too short for a spool header")
    header, pos = head
    scan = scan_batches(data, pos, path)
    sf = SpoolFile(path, header, scan.batches)
    if scan.problem:  # the batches before it are kept
        sf.truncated_at, sf.truncation_reason = scan.end, f"batch {len(scan.batches) + 1}: {scan.problem}"
    return sf
