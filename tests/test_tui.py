"""The TUI: the incremental spool feed, the model, and the app driven headless by Pilot."""

from __future__ import annotations

import os

import pytest
from synthetic import MS, EngineTraceBuilder, pipelined_trace

from llmtrace.spool_format import (
    ATTR_FLOAT,
    ATTR_STR,
    COUNTER,
    DEVICE,
    INSTANT,
    RECORD,
    SPAN,
    encode_batch,
    encode_header,
    float_bits,
)
from llmtrace.timeline import Trace
from tui.feed import SpoolFeed
from tui.model import RunModel

pytest.importorskip("textual")


class SpoolWriter:
    """Writes a synthetic process's records as the spooler does: a header, then CRC-checked batches."""

    def __init__(self, run_dir, pid: int, name: str, resource: dict | None = None):
        os.makedirs(os.path.join(run_dir, "spool"), exist_ok=True)
        self.path = os.path.join(run_dir, "spool", f"{pid}.lts")
        self.pid, self.strings = pid, {}
        with open(self.path, "wb") as f:
            f.write(
                encode_header({"pid": pid, "process_name": name, "span_cost_ns": 300.0, "resource": resource or {}})
            )

    def _id(self, s: str, new: list) -> int:
        if s not in self.strings:
            self.strings[s] = len(self.strings) + 1
            new.append((self.strings[s], s))
        return self.strings[s]

    def _attrs(self, attrs: dict, new: list) -> list[int]:
        vals, keys = [0] * 4, [0] * 4
        for i, (k, v) in enumerate(attrs.items()):
            key = self._id(k, new)
            if isinstance(v, float):
                vals[i], keys[i] = float_bits(v), key | ATTR_FLOAT
            elif isinstance(v, str):
                vals[i], keys[i] = self._id(v, new), key | ATTR_STR
            else:
                vals[i], keys[i] = int(v), key
        return vals + keys

    def batch(self, spans=(), instants=(), counters=()) -> bytes:
        new, recs = [], []
        for s in spans:
            a = self._attrs(s.attrs, new)
            recs.append(
                RECORD.pack(
                    s.start_ns,
                    s.end_ns,
                    s.span_id,
                    s.parent_id,
                    s.link_id,
                    s.step,
                    *a,
                    self._id(s.name, new),
                    self._id(s.stage, new),
                    s.tid,
                    SPAN,
                    s.flags,
                    0,
                )
            )
            if s.device_start_ns is not None:
                recs.append(
                    RECORD.pack(
                        s.device_start_ns,
                        s.device_end_ns,
                        s.span_id,
                        0,
                        0,
                        s.step,
                        *[0] * 8,
                        self._id(s.name, new),
                        self._id(s.stage, new),
                        s.tid,
                        DEVICE,
                        0,
                        0,
                    )
                )
        for i in instants:
            a = self._attrs(i.attrs, new)
            recs.append(
                RECORD.pack(
                    i.ts_ns,
                    i.ts_ns,
                    0,
                    i.parent_id,
                    0,
                    i.step,
                    *a,
                    self._id(i.name, new),
                    self._id(i.stage, new),
                    i.tid,
                    INSTANT,
                    0,
                    0,
                )
            )
        for c in counters:
            a = self._attrs({"value": float(c.value)}, new)
            recs.append(
                RECORD.pack(
                    c.ts_ns,
                    c.ts_ns,
                    0,
                    0,
                    0,
                    -1,
                    *a,
                    self._id(c.name, new),
                    self._id(c.name, new),
                    c.pid,
                    COUNTER,
                    0,
                    0,
                )
            )
        return encode_batch(new, {}, b"".join(recs), len(recs))

    def append(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)


def write_run(trace: Trace, run_dir) -> dict[int, SpoolWriter]:
    """Every process of `trace` as a spool file of `run_dir`, one batch each."""
    writers = {}
    for pid, proc in trace.processes.items():
        w = writers[pid] = SpoolWriter(run_dir, pid, proc.name, proc.resource)
        w.append(
            w.batch(
                [s for s in trace.spans if s.pid == pid],
                [i for i in trace.instants if i.pid == pid],
                [c for c in trace.counters if c.pid == pid],
            )
        )
    return writers


def engine_trace(steps: int = 40, log_ms: float = 0.0) -> Trace:
    """An engine-shaped run: decode steps of batch 4, four requests streaming one token per step,
    and optionally a `logging.debug` of `log_ms` inside every preprocess."""
    b = EngineTraceBuilder()
    t0 = b.t
    nested = {"preprocess": [("logging.debug", log_ms, {})]} if log_ms else None
    ends = []
    for _ in range(steps):
        b.step(batch=4, nested=nested)
        ends.append(b.t - int(0.1 * MS))
    for r in range(4):
        b.request(f"r{r}", t0 - (r + 1) * MS, ends, queue_ns=(r + 1) * MS)
    return b.build()


def _split(trace: Trace, pid: int, parts: int) -> list[tuple]:
    """One process's records cut into `parts` time-ordered chunks (as successive flushes would be)."""
    spans = sorted((s for s in trace.spans if s.pid == pid), key=lambda s: s.end_ns)
    k = -(-len(spans) // parts)
    return [(spans[i : i + k],) for i in range(0, len(spans), k)]


# -- the feed ----------------------------------------------------------------------------


def test_feed_decodes_only_appended_batches_and_waits_for_a_truncated_one(tmp_path):
    trace = engine_trace(steps=6)
    w = SpoolWriter(tmp_path, 1000, "master", trace.processes[1000].resource)
    parts = _split(trace, 1000, 3)
    chunks, n_per = [w.batch(*p) for p in parts], [len(p[0]) for p in parts]
    w.append(chunks[0])
    feed = SpoolFeed(str(tmp_path))
    assert len(feed.poll().spans) == n_per[0]
    assert feed.poll().spans == []  # nothing new: nothing decoded again
    tail = next(iter(feed.tails.values()))
    assert tail.offset == os.path.getsize(w.path)

    w.append(chunks[1])
    assert len(feed.poll().spans) == n_per[1]
    cut = len(chunks[2]) // 2
    done = os.path.getsize(w.path)
    w.append(chunks[2][:cut])  # the writer is mid-batch
    assert feed.poll().spans == []
    assert tail.offset == done and not tail.problem  # the partial batch is read again next time
    w.append(chunks[2][cut:])
    new = feed.poll()
    assert len(new.spans) == n_per[2]
    assert tail.batches == 3
    assert feed.processes[1000].name == "master"


def test_feed_stops_at_a_corrupt_batch_and_keeps_reading_other_files(tmp_path):
    trace = engine_trace(steps=2)
    good, bad = write_run(trace, tmp_path).values()
    data = bytearray(bad.batch([trace.spans[0]]))
    data[-1] ^= 0xFF  # checksum mismatch
    bad.append(bytes(data))
    feed = SpoolFeed(str(tmp_path))
    new = feed.poll()
    assert {s.pid for s in new.spans} == {1000, 2000}
    assert len(feed.problems) == 1 and "checksum" in feed.problems[0]
    bad.append(bad.batch([trace.spans[0]]))
    assert feed.poll().spans == []  # a corrupt file is not read past the corruption


def test_feed_joins_a_device_record_that_arrives_a_batch_after_its_span(tmp_path):
    trace = engine_trace(steps=1)
    fwd = next(s for s in trace.spans if s.name == "forward")
    dev = (fwd.device_start_ns, fwd.device_end_ns)
    fwd.device_start_ns = fwd.device_end_ns = None
    w = SpoolWriter(tmp_path, 2000, "agent-0")
    w.append(w.batch([fwd]))
    feed = SpoolFeed(str(tmp_path))
    (span,) = feed.poll().spans
    fwd.device_start_ns, fwd.device_end_ns = dev
    w.append(_device_only(w, fwd))
    feed.poll()
    assert (span.device_start_ns, span.device_end_ns) == dev


def _device_only(w: SpoolWriter, s) -> bytes:
    new = []
    rec = RECORD.pack(
        s.device_start_ns,
        s.device_end_ns,
        s.span_id,
        0,
        0,
        s.step,
        *[0] * 8,
        w._id(s.name, new),
        w._id(s.stage, new),
        s.tid,
        DEVICE,
        0,
        0,
    )
    return encode_batch(new, {}, rec, 1)


# -- the model ---------------------------------------------------------------------------


def test_model_costs_each_step_as_the_analyzer_does():
    from llmtrace.analyze import build_report

    trace = engine_trace(steps=30, log_ms=2.0)
    model = RunModel(window=None)
    model.ingest(trace)
    assert model.settle(everything=True) == 30
    view, report = model.breakdown_view(), build_report(trace)["breakdown"]
    assert view["per_token_ms"] == pytest.approx(report["per_token_ms"])
    assert view["stages"][0]["name"] == report["stages"][0]["name"] == "preprocess"
    assert [r["name"] for r in view["stages"]] == [r["name"] for r in report["stages"]]
    assert model.tokens_total == 30 * 4 and len(model.step_ms) == 30
    rows = model.requests
    assert set(rows) == {"r0", "r1", "r2", "r3"} and all(r.done and r.tokens == 30 for r in rows.values())
    assert rows["r1"].queue_ns == 2 * MS


def test_model_costs_async_scheduled_steps_whose_parents_sit_in_the_step_before():
    """agent.step n holds step n+1's launch: step n+1's group names a parent of step n's, and
    each window counts the next step's device time, as the analyzer does on the whole trace."""
    from llmtrace.analyze.breakdown import Breakdown
    from llmtrace.analyze.index import TraceIndex

    trace = pipelined_trace()
    now = [0.0]
    model = RunModel(settle_s=0.5, clock=lambda: now[0])
    model.ingest(trace)
    now[0] = 0.6
    assert model.settle() == 3  # no wait for STALE_S
    whole = Breakdown.of(TraceIndex(trace)).steps
    assert [v.cost.parts for v in model.steps] == [c.parts for c in whole]


def test_model_settles_a_step_only_once_no_record_of_it_arrived_for_settle_s():
    trace = engine_trace(steps=1)
    now = [0.0]
    model = RunModel(settle_s=0.5, clock=lambda: now[0])
    agent = Trace(trace.processes, [s for s in trace.spans if s.pid == 2000])
    master = Trace(trace.processes, [s for s in trace.spans if s.pid == 1000])
    model.ingest(agent)
    now[0] = 0.4
    model.ingest(master)
    now[0] = 0.8
    assert model.settle() == 0 and model.pending_steps == 1
    now[0] = 0.9
    assert model.settle() == 1
    (view,) = model.steps
    assert view.cost.agent_root is not None  # the agent's step was grafted in, not counted as transport
    assert len(view.spans) == len(trace.spans) - sum(1 for s in trace.spans if s.step < 0)


def test_window_trace_keeps_only_the_recent_steps():
    model = RunModel(window=10)
    model.ingest(engine_trace(steps=25))
    model.settle(everything=True)
    assert [v.cost.step for v in model.steps] == list(range(15, 25))
    w = model.window_trace()
    assert {s.step for s in w.spans if s.step >= 0} == set(range(15, 25))
    assert all(c.ts_ns >= model.steps[0].cost.root.start_ns for c in w.counters)


# -- the app -----------------------------------------------------------------------------


def finished_app(tmp_path, steps: int = 30, log_ms: float = 3.0):
    from llmtrace.analyze import build_report
    from llmtrace.load import load_trace
    from tui.app import LlmtraceApp
    from tui.header import RunInfo

    write_run(engine_trace(steps=steps, log_ms=log_ms), tmp_path)
    trace = load_trace(str(tmp_path))
    model = RunModel(window=None, series=None)
    model.ingest(trace)
    model.settle(everything=True)
    return LlmtraceApp(
        model, RunInfo("tiny", "cpu", 4), str(tmp_path), report=build_report(trace), trace=trace, source=str(tmp_path)
    )


async def _exported(app) -> None:
    for w in [w for w in app.workers if w.group == "export"]:
        await w.wait()


def _column(table, i: int = 0) -> list[str]:
    return [str(table.get_row_at(r)[i]) for r in range(table.row_count)]


async def test_finished_run_shows_its_stages_and_suggestions(tmp_path):
    app = finished_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        stages = _column(app.stages.table)
        assert stages[:2] == ["model", "preprocess"]  # sorted by cost: the injected log is the top overhead
        assert {"schedule", "tcp", "postprocess"} <= set(stages)
        header = str(app.header.content)
        assert "model tiny  device cpu" in header and "requests 4/4" in header and "overhead" in header
        assert "log-in-hot-path" in [s["id"] for s in app.suggestions.suggestions]
        assert _column(app.request_table) == ["r3", "r2", "r1", "r0"]


async def test_keys_switch_tabs_open_a_suggestion_export_and_quit(tmp_path):
    from tui.suggestions import SuggestionScreen

    app = finished_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        for key, tab in (("2", "chain"), ("4", "requests"), ("1", "overview"), ("3", "suggestions")):
            await pilot.press(key)
            assert app.tabs.active == tab
        app.suggestions.focus()
        await pilot.press("enter")
        assert isinstance(app.screen, SuggestionScreen)
        assert app.screen.suggestion["id"] == "log-in-hot-path"
        await pilot.press("escape")
        assert not isinstance(app.screen, SuggestionScreen)

        await pilot.press("e")
        await _exported(app)
        out = tmp_path / "trace.json"
        assert out.exists() and b"master.step" in out.read_bytes()

        await pilot.press("s")
        assert app.tabs.active == "chain" and "slowest" in str(app.chain.heading.content)
        await pilot.press("p")  # decode steps only: all of this run's steps
        assert app.tabs.active == "overview"
        assert "the 30 decode steps of all 30 steps" in str(app.stages.heading.content)
        await pilot.press("p")  # prefill: none
        assert "no steps" in str(app.stages.heading.content) and app.stages.table.row_count == 0
        await pilot.press("q")
    assert not app.is_running


async def test_call_chain_nests_the_agent_step_under_the_masters_wait(tmp_path):
    app = finished_app(tmp_path, steps=5)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("left_square_bracket")
        assert "step 3" in str(app.chain.heading.content)
        root = app.chain.spans_tree.root.children[0]
        assert str(root.label).startswith("master.step")
        wait = next(n for n in root.children if str(n.label).startswith("agent.wait"))
        (agent,) = wait.children
        assert "[agent-0]" in str(agent.label)
        names = [str(n.label).split()[0] for n in agent.children]
        assert names[names.index("preprocess") : names.index("sampling") + 1] == ["preprocess", "forward", "sampling"]
        assert "device" in str(agent.children[names.index("forward")].label)


async def test_live_feed_updates_the_table_as_batches_arrive(tmp_path, monkeypatch):
    import tui.app as app_mod
    from tui.app import LlmtraceApp
    from tui.header import RunInfo

    monkeypatch.setattr(app_mod, "REDRAW_S", 0.05)
    monkeypatch.setattr(app_mod, "SUGGEST_S", 0.1)
    trace = engine_trace(steps=20, log_ms=1.0)
    writers = {pid: SpoolWriter(tmp_path, pid, p.name, p.resource) for pid, p in trace.processes.items()}
    steps = sorted({s.step for s in trace.spans if s.step >= 0})

    def flush(lo: int, hi: int) -> None:
        for pid, w in writers.items():
            w.append(w.batch([s for s in trace.spans if s.pid == pid and lo <= s.step < hi]))

    app = LlmtraceApp(RunModel(settle_s=0.0), RunInfo(), str(tmp_path), feed=SpoolFeed(str(tmp_path)))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.3)
        assert app.stages.table.row_count == 0
        flush(0, 5)
        await pilot.pause(0.4)
        assert app.model.steps_total == 5
        assert _column(app.stages.table)[:2] == ["model", "preprocess"]
        flush(5, len(steps))
        await pilot.pause(0.4)
        assert app.model.steps_total == 20
        assert "tok/s now" in str(app.header.content)
        assert "steps 20" in str(app.header.content) and "the last 20 steps" in str(app.stages.heading.content)
        await pilot.press("e")  # live: exports what the spool files hold so far
        await _exported(app)
        assert b"agent.step" in (tmp_path / "trace.json").read_bytes()
        app.workload_ended = "workload done"  # as the workload's thread does
        for _ in range(50):  # the rules run on the window in a worker thread
            await pilot.pause(0.1)
            if app.suggestions.suggestions:
                break
        assert [s["id"] for s in app.suggestions.suggestions] == ["log-in-hot-path"]
        assert "workload done" in str(app.header.content)


@pytest.mark.parametrize("size", [(80, 24), (160, 50)])
async def test_every_tab_renders_at_small_and_large_sizes(tmp_path, size):
    app = finished_app(tmp_path, steps=10)
    async with app.run_test(size=size) as pilot:
        for key in ("1", "2", "3", "4"):
            await pilot.press(key)
            await pilot.pause()
            assert app.screen.size == size
        svg = app.export_screenshot().replace("&#160;", " ")
        assert "overhead" in svg and "TPOT ms" in svg  # the header and the requests tab


def test_a_run_opens_live_only_while_a_process_still_writes_its_spool(tmp_path):
    import subprocess
    import sys

    from tui.command import _writers_alive

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    SpoolWriter(tmp_path, int(done.stdout), "master")
    assert not _writers_alive(str(tmp_path))
    SpoolWriter(tmp_path, os.getpid(), "client")
    assert _writers_alive(str(tmp_path))


def test_tui_command_rejects_a_missing_path(tmp_path, capsys):
    from llmtrace.cli import main

    assert main(["tui", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_span_arriving_after_its_step_was_costed_does_not_open_it_again():
    trace = engine_trace(steps=2)
    late = next(s for s in trace.spans if s.name == "sync.wait" and s.step == 1)  # a leaf
    model = RunModel(settle_s=0.0)
    model.ingest(Trace(trace.processes, [s for s in trace.spans if s is not late]))
    assert model.settle() == 2
    model.ingest(Trace(spans=[late]))
    assert model.settle() == 0 and model.pending_steps == 0
    assert model.late_spans == 1 and model.steps_total == 2


def test_a_slow_step_waits_for_its_roots():
    trace = engine_trace(steps=1)
    now = [0.0]
    model = RunModel(settle_s=0.5, clock=lambda: now[0])
    roots = ("master.step", "agent.step")
    # the agent's first stages and the master's stages before its wait: the forward is running
    model.ingest(Trace(trace.processes, [s for s in trace.spans if s.name not in roots and s.name != "agent.wait"]))
    now[0] = 5.0
    assert model.settle() == 0
    model.ingest(Trace(spans=[s for s in trace.spans if s.name in roots or s.name == "agent.wait"]))
    now[0] = 5.4
    assert model.settle() == 0
    now[0] = 5.5
    assert model.settle() == 1 and model.steps[0].cost.root.name == "master.step"


# -- llmtrace run --tui: the workload in a thread, the app in the foreground -------------------


@pytest.fixture
def headless_live(monkeypatch):
    """run_live with a headless app that quits as soon as the workload ends (or at once)."""
    from textual.app import App

    from tui.app import LlmtraceApp

    def run(self):
        return App.run(self, headless=True, size=(80, 24))

    def finished(self, message):
        self.finished_message = message
        self.exit()

    monkeypatch.setattr(LlmtraceApp, "run", run)
    monkeypatch.setattr(LlmtraceApp, "workload_finished", finished)
    return monkeypatch


def test_run_live_returns_the_workload_result(tmp_path, headless_live):
    from tui.header import RunInfo
    from tui.live import run_live

    async def workload(progress):
        return "summary"

    assert run_live(str(tmp_path), RunInfo(), workload) == "summary"


def test_run_live_raises_the_workload_error_after_the_app_closes(tmp_path, headless_live):
    from tui.header import RunInfo
    from tui.live import run_live

    async def workload(progress):
        raise RuntimeError("the engine died")

    with pytest.raises(RuntimeError, match="the engine died"):
        run_live(str(tmp_path), RunInfo(), workload)


def test_quitting_early_cancels_the_workload(tmp_path, headless_live):
    import asyncio

    from tui.app import LlmtraceApp
    from tui.header import RunInfo
    from tui.live import run_live

    headless_live.setattr(LlmtraceApp, "on_mount", lambda self: self.set_timer(0.2, self.exit))
    cancelled = []

    async def workload(progress):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    with pytest.raises(KeyboardInterrupt):
        run_live(str(tmp_path), RunInfo(), workload)
    assert cancelled == [True]
