"""Chrome trace export: structure that Perfetto / chrome://tracing rely on, round trip back
into a Trace, streaming memory, and bad input given to `load_trace`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import orjson
import pytest

import llmtrace
from llmtrace import context
from llmtrace.cli import main as cli_main
from llmtrace.errors import UserError
from llmtrace.export import load_chrome_trace, write_chrome_trace
from llmtrace.export.tracks import anchor_time, nest
from llmtrace.load import load_trace
from llmtrace.timeline import CounterSample, Instant, Process, Sample, Span, Trace, load_spool_dir

MASTER, AGENT0, AGENT1 = 100, 200, 300
BASE = 5_000_000_000  # CLOCK_MONOTONIC ns of the hand-made trace's first event


def sid(pid: int, n: int) -> int:
    return (pid << 40) | n


def hand_made() -> Trace:
    """A master and two agents for one step, flows both ways, device time, and request spans
    that overlap partially on the master's event-loop thread (as asyncio tasks do)."""
    m_step, a0_step, a1_step = sid(MASTER, 1), sid(AGENT0, 1), sid(AGENT1, 1)

    def span(name, pid, start, end, n, parent=0, link=0, step=7, **kw):
        return Span(name, name.split(".")[0], pid, pid, BASE + start, BASE + end, sid(pid, n), parent, link, step, **kw)

    t = Trace(
        processes={
            MASTER: Process(
                MASTER,
                "master",
                {"pid": MASTER, "epoch_offset_ns": 1_700_000_000_000_000_000},
                threads={MASTER: "MainThread"},
            ),
            AGENT1: Process(AGENT1, "agent-1", {"pid": AGENT1, "epoch_offset_ns": 1_700_000_000_000_000_123}),
            AGENT0: Process(
                AGENT0, "agent-0", {"pid": AGENT0, "epoch_offset_ns": 1_700_000_000_000_000_077}, dropped={AGENT0: 3}
            ),
        },
        meta={"config": {"model": "tiny"}},
    )
    t.spans = [
        span("http.request", MASTER, 500, 30_000, 10, step=-1, attrs={"req": "r1", "prompt_tokens": 12}),
        span("master.step", MASTER, 1_000, 50_000, 1, attrs={"batch": 2, "prefill": 1}),
        span("schedule", MASTER, 2_000, 5_000, 2, m_step),
        span("tcp.send", MASTER, 5_000, 6_000, 3, m_step),
        span("agent.wait", MASTER, 6_000, 40_000, 4, m_step),
        span("http.request", MASTER, 20_000, 60_000, 11, step=-1, attrs={"req": "r2"}),
        span("tokenize", MASTER, 600, 900, 12, sid(MASTER, 10), step=-1),  # in r1's tree, no `req`
        span("tcp.recv", MASTER, 40_000, 42_000, 5, m_step, link=a0_step),
        span("postprocess", MASTER, 42_000, 42_000, 6, m_step, flags=3),  # zero length, raised, attrs cut
        # The agent's step starts with the receive of its header (no room before the child),
        # and the child comes first, as the recorder writes them (children end first).
        span("tcp.recv", AGENT0, 8_000, 9_000, 4, a0_step),
        span("agent.step", AGENT0, 8_000, 38_000, 1, link=m_step),
        span(
            "forward",
            AGENT0,
            10_000,
            30_000,
            2,
            a0_step,
            device_start_ns=BASE + 12_000,
            device_end_ns=BASE + 35_000,
            attrs={"tokens": 2},
        ),
        span(
            "sampling", AGENT0, 30_000, 33_000, 3, a0_step, device_start_ns=BASE + 35_000, device_end_ns=BASE + 36_500
        ),
        span("agent.step", AGENT1, 8_500, 37_000, 1, link=m_step),
        span("tcp.recv", AGENT1, 9_000, 9_500, 2, a1_step, link=sid(999, 1)),  # link outside the trace
    ]
    t.instants = [
        Instant("token", "token", MASTER, MASTER, BASE + 43_000, 7, m_step, {"req": "r1", "n": 1}),
        Instant("batch.ready", "batch", MASTER, MASTER, BASE + 1_200, 7, m_step, {}),
        Instant("preempt", "preempt", MASTER, MASTER, BASE + 44_000, 7, 0, {}),
    ]
    t.counters = [
        CounterSample("running", MASTER, BASE + 1_500, 2.0),
        CounterSample("kv_blocks_used", MASTER, BASE + 1_500, 17.0, {"total": 64}),
        CounterSample("kv_blocks_used", MASTER, BASE + 45_000, 19.0, {"total": 64}),
    ]
    loop = ("engine.agent:main", "engine.agent:Agent.run_step")
    t.samples = [
        Sample(AGENT0, AGENT0, BASE + 11_000, (*loop, "engine.agent:Agent.preprocess:88")),
        Sample(AGENT0, AGENT0, BASE + 12_000, (*loop, "engine.agent:Agent.preprocess:88")),
        Sample(MASTER, MASTER, BASE + 3_000, ("engine.master:main",), "py-spy"),
    ]
    # A viztracer-style event, already on our clock (µs of CLOCK_MONOTONIC), and its metadata.
    t.foreign_events = [
        {"name": "process_name", "ph": "M", "pid": AGENT0, "tid": AGENT0, "args": {"name": "agent-0"}},
        {
            "name": "build_inputs",
            "ph": "X",
            "ts": (BASE + 10_500) / 1000,
            "dur": 2.0,
            "pid": AGENT0,
            "tid": AGENT0,
            "cat": "FEE",
        },
    ]
    t.sort()
    return t


def export(trace: Trace, path) -> dict:
    write_chrome_trace(trace, str(path))
    return orjson.loads(path.read_bytes())


def ns(us: float) -> int:
    return round(us * 1000)


def check_chrome(doc: dict) -> None:
    """What viewers need: complete X events, named processes, tracks that nest, paired flows
    that bind to the linked spans, numeric counters."""
    assert doc["displayTimeUnit"] == "ns"
    events = doc["traceEvents"]
    named = {e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    slices: dict[tuple[int, int], list[tuple[int, int, dict]]] = {}
    for e in events:
        assert isinstance(e["pid"], int) and e["pid"] in named, e
        if e["ph"] != "M":
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0, e
        if e["ph"] == "X":
            assert {"name", "ph", "ts", "dur", "pid", "tid"} <= e.keys() and e["dur"] >= 0, e
            slices.setdefault((e["pid"], e["tid"]), []).append((ns(e["ts"]), ns(e["ts"] + e["dur"]), e))
        if e["ph"] == "C":
            assert e["args"] and all(isinstance(v, (int, float)) for v in e["args"].values()), e
    for track in slices.values():  # every track is a proper stack of slices, in file order
        track.sort(key=lambda x: x[0])  # stable: a parent must precede a child starting with it
        stack = []
        for start, end, e in track:
            while stack and stack[-1][1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1][1], f"{e} overlaps {stack[-1][2]} partially"
            stack.append((start, end, e))

    def innermost(e):  # chrome://tracing binds a flow to the innermost enclosing slice
        t = ns(e["ts"])
        inside = [x for x in slices.get((e["pid"], e["tid"]), []) if x[0] <= t <= x[1]]
        assert inside, f"flow event {e} is not inside any slice of its track"
        return min(inside, key=lambda x: x[1] - x[0])[2]

    spans = {
        e["args"]["span_id"]: e
        for e in events
        if e["ph"] == "X" and "span_id" in e.get("args", {}) and not e["args"].get("device")
    }

    def binds_to(bound: str, expected: str) -> bool:
        """The span itself, or (when a child starts with it, leaving no room) that child."""
        while bound != expected:
            if bound not in spans or spans[bound]["ts"] != spans[expected]["ts"]:
                return False
            bound = spans[bound]["args"]["parent_id"]
        return True

    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert len(starts) == sum(e["ph"] == "s" for e in events)
    assert starts.keys() == ends.keys()
    perfetto = perfetto_flow_binding(events)
    for fid, s in starts.items():
        f = ends[fid]
        assert (f["bp"], f["cat"], f["name"]) == ("e", s["cat"], s["name"])
        src = spans[fid]["args"]["link_id"]
        assert binds_to(innermost(f)["args"]["span_id"], fid)
        assert binds_to(innermost(s)["args"]["span_id"], src)
        assert binds_to(perfetto[fid][0], src) and binds_to(perfetto[fid][1], fid)


def perfetto_flow_binding(events: list[dict]) -> dict[str, tuple]:
    """Bind flows as Perfetto's JSON importer does: per track in time order (file order
    among equal times), a slice (an instant is one of length 0) pops the ended slices when
    it begins, and a flow event binds to the slice on top of the stack. Returns flow id ->
    (span id bound at the start, span id bound at the end)."""
    order = [(ns(e["ts"]), n, e) for n, e in enumerate(events) if e["ph"] in "Xisf"]
    stacks: dict[tuple, list] = {}
    bound: dict[str, list] = {}
    for t, _, e in sorted(order, key=lambda x: x[:2]):
        stack = stacks.setdefault((e["pid"], e["tid"]), [])
        if e["ph"] in "Xi":
            while stack and stack[-1][0] <= t:
                stack.pop()
            stack.append((t + ns(e.get("dur", 0)), e))
        else:
            top = stack[-1][1].get("args", {}).get("span_id") if stack else None
            bound.setdefault(e["id"], [None, None])[e["ph"] == "f"] = top
    return {fid: tuple(v) for fid, v in bound.items()}


def span_key(s: Span) -> tuple:
    return (
        s.name,
        s.stage,
        s.pid,
        s.tid,
        s.start_ns,
        s.end_ns,
        s.span_id,
        s.parent_id,
        s.link_id,
        s.step,
        s.attrs,
        s.flags,
        s.device_start_ns,
        s.device_end_ns,
    )


def assert_same(a: Trace, b: Trace) -> None:
    def keys(spans):  # the order among spans that start together is not kept
        return [span_key(s) for s in sorted(spans, key=lambda s: (s.start_ns, s.span_id))]

    assert keys(a.spans) == keys(b.spans)
    assert a.instants == b.instants
    assert a.counters == b.counters
    assert a.samples == b.samples
    assert {p: (x.name, x.header, x.threads, x.dropped) for p, x in a.processes.items()} == {
        p: (x.name, x.header, x.threads, x.dropped) for p, x in b.processes.items()
    }
    assert a.meta == b.meta


def test_hand_made_trace_structure(tmp_path):
    doc = export(hand_made(), tmp_path / "t.json")
    check_chrome(doc)
    ev = doc["traceEvents"]
    info = doc["otherData"]["llmtrace"]
    assert info["origin_ns"] == BASE + 500
    assert info["processes"][str(AGENT1)]["epoch_offset_ns"] == 1_700_000_000_000_000_123

    order = sorted((e["args"]["sort_index"], e["pid"]) for e in ev if e["name"] == "process_sort_index")
    assert [pid for _, pid in order] == [MASTER, AGENT0, AGENT1]
    flows = {(e["ph"], e["pid"], e["id"]) for e in ev if e["ph"] in "sf"}
    assert flows == {
        ("s", MASTER, hex(sid(AGENT0, 1))),
        ("f", AGENT0, hex(sid(AGENT0, 1))),
        ("s", MASTER, hex(sid(AGENT1, 1))),
        ("f", AGENT1, hex(sid(AGENT1, 1))),
        ("s", AGENT0, hex(sid(MASTER, 5))),
        ("f", MASTER, hex(sid(MASTER, 5))),
    }

    forward = [e for e in ev if e["name"] == "forward"]
    (host,) = [e for e in forward if "device" not in e["args"]]
    (dev,) = [e for e in forward if e["args"].get("device")]
    assert host["args"]["device_ms"] == pytest.approx(0.023)
    assert (dev["pid"], dev["ts"], dev["dur"]) == (AGENT0, 11.5, 23.0)
    gpu_names = {e["tid"]: e["args"]["name"] for e in ev if e["name"] == "thread_name" and e["pid"] == AGENT0}
    assert gpu_names[dev["tid"]] == "GPU (CUDA events)"

    # Request spans overlap master.step and each other partially (asyncio tasks on one
    # thread): they and their children get lanes of their own; the step loop keeps the thread.
    x = [e for e in ev if e["ph"] == "X" and e["pid"] == MASTER]
    tid = {(e["name"], e["args"].get("attrs", {}).get("req")): e["tid"] for e in x}
    lanes = {e["tid"]: e["args"]["name"] for e in ev if e["name"] == "thread_name" and e["pid"] == MASTER}
    assert {n: tid[n, None] for n in ("master.step", "schedule", "agent.wait", "tcp.recv")} == dict.fromkeys(
        ("master.step", "schedule", "agent.wait", "tcp.recv"), MASTER
    )
    assert lanes[tid["http.request", "r1"]] == "MainThread (requests 1)" == lanes[tid["tokenize", None]]
    assert lanes[tid["http.request", "r2"]] == "MainThread (requests 2)"

    counters = [e for e in ev if e["ph"] == "C"]
    assert {(e["name"], tuple(sorted(e["args"]))) for e in counters} == {
        ("running", ("value",)),
        ("kv_blocks_used", ("total", "value")),
    }
    (failed,) = [e for e in ev if e["name"] == "postprocess"]
    assert failed["args"]["failed"] is True and failed["dur"] == 0

    samples = [e for e in ev if e.get("cat") == "sample"]
    assert [(e["name"], e["args"]["stack"]) for e in samples] == [
        ("engine.master:main", 0),
        ("engine.agent:Agent.preprocess:88", 1),
        ("engine.agent:Agent.preprocess:88", 1),
    ]
    assert info["stacks"][1][-1] == "engine.agent:Agent.preprocess:88"

    # Foreign events come last, shifted onto the export's origin.
    assert ev[info["events"] :] == [hand_made().foreign_events[0], {**hand_made().foreign_events[1], "ts": 10.0}]


def test_round_trip_hand_made(tmp_path):
    t = hand_made()
    export(t, tmp_path / "t.json")
    back = load_chrome_trace(str(tmp_path / "t.json"))
    assert_same(t, back)
    assert back.foreign_events == t.foreign_events
    assert back.processes[AGENT0].epoch_offset_ns == t.processes[AGENT0].epoch_offset_ns
    assert back.spans_dropped == 3


def _record(out: str) -> None:
    """Spans from the real recorder: nesting, a cross-thread link, attrs, an exception."""
    llmtrace.configure(out=out, process_name="master", propagate=False)
    try:
        with llmtrace.span("master.step", step=3, batch=4):
            carrier = context.current()
            with llmtrace.span("schedule"):
                time.sleep(0.0005)

            def agent():
                with llmtrace.span("agent.step", follows=carrier):
                    with llmtrace.span("forward", tokens=3):
                        time.sleep(0.0005)

            th = threading.Thread(target=agent, name="agent-loop")
            th.start()
            th.join()
            llmtrace.instant("token", req="r1", n=1)
            llmtrace.counter("running", 3)
        with pytest.raises(ValueError):
            with llmtrace.span("postprocess", step=3):
                raise ValueError("boom")
    finally:
        llmtrace.shutdown()


def test_recorded_trace_round_trip(tmp_path):
    _record(str(tmp_path / "run"))
    t = load_spool_dir(str(tmp_path / "run"))
    assert [s.name for s in t.spans] == ["master.step", "schedule", "agent.step", "forward", "postprocess"]
    doc = export(t, tmp_path / "t.json")
    check_chrome(doc)
    assert sum(e["ph"] == "s" for e in doc["traceEvents"]) == 1
    back = load_trace(str(tmp_path / "t.json"))
    assert_same(t, back)
    by_name = {s.name: s for s in back.spans}
    assert by_name["agent.step"].link_id == by_name["master.step"].span_id
    assert by_name["agent.step"].step == 3 and by_name["postprocess"].failed
    assert abs(by_name["forward"].dur_ns - next(s for s in t.spans if s.name == "forward").dur_ns) < 1000


def test_run_dir_reads_spool_and_meta_of_its_trace_json(tmp_path):
    run = str(tmp_path / "run")
    _record(run)
    write_chrome_trace(load_trace(run), os.path.join(run, "trace.json"), meta={"config": {"model": "tiny"}})
    t = load_trace(run)  # the records from the spool, the run's meta from trace.json's tail
    assert t.meta == {"config": {"model": "tiny"}}
    assert t.processes[next(iter(t.processes))].source.endswith(".lts")
    assert len(t.spans) == 5


def test_cli_export(tmp_path, capsys):
    _record(str(tmp_path / "run"))
    out = tmp_path / "trace.json"
    assert cli_main(["export", str(tmp_path / "run"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "5 spans" in printed and "1 processes (master)" in printed
    check_chrome(orjson.loads(out.read_bytes()))
    # A run directory holding only trace.json loads through it.
    os.makedirs(tmp_path / "shared")
    os.replace(out, tmp_path / "shared" / "trace.json")
    assert len(load_trace(str(tmp_path / "shared")).spans) == 5
    assert cli_main(["export", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "nodir" / "t.json")]) == 2
    assert "nodir does not exist" in capsys.readouterr().err


def test_cli_export_writes_next_to_its_input_and_never_overwrites_silently(tmp_path, capsys, monkeypatch):
    _record(str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path / "run" / "spool")  # not where the file goes
    assert cli_main(["export", str(tmp_path / "run" / "spool")]) == 0  # a spool directory: its run's trace.json
    written = tmp_path / "run" / "trace.json"
    assert written.exists() and not (tmp_path / "run" / "spool" / "trace.json").exists()
    before = written.read_bytes()
    assert cli_main(["export", str(tmp_path / "run")]) == 2
    assert "trace.json exists; pass --force" in capsys.readouterr().err and written.read_bytes() == before
    assert cli_main(["export", str(tmp_path / "run"), "--force"]) == 0
    (spool,) = (tmp_path / "run" / "spool").glob("*.lts")
    assert cli_main(["export", str(spool)]) == 0 and spool.with_suffix(".trace.json").exists()


def test_cli_export_of_a_crashed_run_notes_the_cut(tmp_path, capsys):
    _record(str(tmp_path / "run"))
    (spool,) = (tmp_path / "run" / "spool").iterdir()
    size = spool.stat().st_size
    with open(spool, "ab") as f:  # a batch the process did not finish writing
        f.write(b"LTB1" + (1 << 16).to_bytes(4, "little") + bytes(4) + b"partial")
    out = tmp_path / "t.json"
    assert cli_main(["export", str(tmp_path / "run"), "-o", str(out)]) == 0
    assert f"ends early at byte {size}" in capsys.readouterr().out
    assert len(load_trace(str(out)).spans) == 5


def test_load_trace_rejects_malformed_input(tmp_path):
    good = tmp_path / "t.json"
    export(hand_made(), good)
    data = good.read_bytes()
    cut = tmp_path / "cut.json"
    cut.write_bytes(data[:1000])
    with pytest.raises(UserError, match=rf"{cut}: at byte 1000: malformed JSON"):
        load_trace(str(cut))
    bad = tmp_path / "bad.json"
    bad.write_bytes('{"é": [1, x]}'.encode())
    with pytest.raises(UserError, match=rf"{bad}: at byte 11: malformed JSON"):
        load_trace(str(bad))
    foreign = tmp_path / "viztracer.json"
    foreign.write_text(json.dumps({"traceEvents": []}))
    with pytest.raises(UserError, match="not a trace written by `llmtrace export`"):
        load_trace(str(foreign))
    broken = tmp_path / "broken.json"
    doc = orjson.loads(data)
    next(e for e in doc["traceEvents"] if e["ph"] == "X")["args"].pop("span_id")
    broken.write_bytes(orjson.dumps(doc))
    with pytest.raises(UserError, match=rf"{broken}: traceEvents\[\d+\]: malformed event"):
        load_trace(str(broken))
    spool = tmp_path / "run" / "spool"
    spool.mkdir(parents=True)
    (spool / "1.lts").write_bytes(b"NOTASPOOL" * 4)
    with pytest.raises(UserError, match=r"1\.lts: at byte 0: not an llmtrace spool file"):
        load_trace(str(tmp_path / "run"))
    with pytest.raises(UserError, match="no trace here"):
        load_trace(str(tmp_path))


def test_nest_lanes_and_first_children():
    def s(start, end, n, parent=0, **attrs):
        return Span("x", "x", 1, 1, start, end, n, parent, attrs=attrs)

    spans = [s(0, 100, 1), s(10, 20, 2, 1), s(50, 150, 3), s(60, 70, 4, 3), s(100, 120, 5, 3), s(130, 130, 6)]
    first_child = {}
    lanes = nest(spans, anchored=lambda x: x.span_id in (1, 3, 6), first_child=first_child)
    assert lanes == [0, 0, 1, 1, 1, 0]  # 3 overlaps 1 partially: lane 1, and its children follow it
    assert first_child == {1: 10, 3: 60}
    shuffled = [spans[i] for i in (4, 2, 0, 5, 1, 3)]
    assert nest(shuffled) == [1, 1, 0, 0, 0, 1]
    # Request trees go apart, first-fit among themselves; the rest keeps lane 0.
    spans = [s(0, 100, 1, req="a"), s(5, 200, 2), s(10, 20, 3, 1), s(50, 150, 4, req="b"), s(60, 70, 5, 2)]
    assert nest(spans, apart=lambda x: "req" in x.attrs) == [-1, 0, -1, -2, 0]


def test_anchor_time():
    assert anchor_time(0, 100, 10) == 5  # halfway to the first child
    assert anchor_time(0, 100_000, 50_000) == 1_000  # at most a margin in
    assert anchor_time(0, 100, None) == 50
    assert anchor_time(7, 8, None) == 7  # no room: the start


BIG = """
import resource, sys, time
from llmtrace.export import write_chrome_trace
from export_chrome import engine_like_trace  # benchmarks/: the same synthetic engine trace
n = int(sys.argv[1])
t = engine_like_trace(n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
stats = write_chrome_trace(t, sys.argv[2])
print(stats.events, stats.flows, stats.bytes, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024,
      time.perf_counter() - t0)
"""


def test_large_trace_streams_with_bounded_memory(tmp_path):
    """200k spans, 50k flows: the export's peak memory stays well below the size of what it
    writes (holding the events would take several times the file size); what it keeps is
    per flow (an anchor time per linked span), not per event."""
    out = tmp_path / "big.json"
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    r = subprocess.run(
        [sys.executable, "-c", BIG, "200000", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": bench},
    )
    assert r.returncode == 0, r.stderr
    events, flows, size, growth, _secs = r.stdout.split()
    steps = 200_000 // 4
    assert int(flows) == steps
    assert int(events) == 200_000 + steps + 2 * steps + 5 and int(size) == out.stat().st_size > 30_000_000
    assert int(growth) < int(size) // 2, f"export grew the process by {int(growth) >> 20} MiB"
    with open(out, "rb") as f:
        head = f.read(200)
    assert head.startswith(b'{"displayTimeUnit":"ns","traceEvents":[')
