"""Processes on other hosts' clocks (llmtrace/clock_align.py): a test clock makes one process
look like another host (its monotonic clock 5 s ahead, its Unix clock 3 ms off); loading
the trace puts it back on the reference clock from the messages' round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llmtrace import names
from llmtrace.clock_align import META_KEY, align, round_trip_offset
from llmtrace.clock_domain import ENV_TEST_CLOCK, injected_skew
from llmtrace.load import load_trace
from llmtrace.timeline import Process, Span, Trace

MONO, WALL = 5_000_000_000, 3_000_000
US = 1_000


def _two_hosts(theta: int, coarse_error: int, steps: int = 40) -> Trace:
    """A master (P) and an agent (Q) whose clock reads theta ahead; per step a frame P -> Q
    and a reply Q -> P, each 30-80 us on the wire; Q's Unix clock is coarse_error off."""
    t = Trace()
    t.processes[1] = Process(1, "master", {"clock_domain": "a", "epoch_offset_ns": 10**18})
    t.processes[2] = Process(2, "agent", {"clock_domain": "b", "epoch_offset_ns": 10**18 - theta + coarse_error})
    now, ids = 1_000_000 * US, iter(range(1, 10**6))
    for k in range(steps):
        wire = (30 + (k * 7) % 50) * US
        msg = {names.A_MSG: k}
        send = Span(names.TCP + ".send", names.TCP, 1, 1, now, now + 20 * US, next(ids), step=k, attrs=msg)
        recv = Span(
            names.TCP + ".recv",
            names.TCP,
            2,
            2,
            now + wire + theta,
            now + wire + 10 * US + theta,
            next(ids),
            step=k + 1,
            attrs=msg,
        )  # step ids need not agree: the message id does
        back = now + 2_000 * US
        reply = Span(
            names.TCP + ".send", names.TCP, 2, 2, back + theta, back + 20 * US + theta, next(ids), step=k, attrs=msg
        )
        got = Span(
            names.TCP + ".recv", names.TCP, 1, 1, back - 500 * US, back + wire + 5 * US, next(ids), step=k, attrs=msg
        )
        t.spans += [send, recv, reply, got]
        now += 5_000 * US
    t.sort()
    return t


def test_round_trips_bound_the_offset_from_both_sides():
    t = _two_hosts(theta=MONO, coarse_error=0)
    theta, uncertainty, trips = round_trip_offset(t, {1}, {2})
    assert trips == 40 and abs(theta - MONO) <= uncertainty <= 40 * US


def test_align_moves_the_other_domain_with_coarse_then_round_trip_offsets():
    t = _two_hosts(theta=MONO, coarse_error=WALL)
    (done,) = align(t)
    assert done["method"] == "round trips" and done["processes"] == ["agent"]
    assert abs(done["offset_ns"]["agent"] + MONO) <= done["uncertainty_ns"] <= 40 * US
    for k in range(40):  # causality holds again: each frame arrives after it left
        (send,) = (s for s in t.spans if s.attrs[names.A_MSG] == k and s.name == "tcp.send" and s.pid == 1)
        (recv,) = (s for s in t.spans if s.attrs[names.A_MSG] == k and s.name == "tcp.recv" and s.pid == 2)
        assert recv.end_ns > send.start_ns
    assert t.meta[META_KEY]["reference"] == "a"


def test_one_domain_or_old_spools_are_left_alone():
    t = _two_hosts(theta=0, coarse_error=0)
    t.processes[2].header["clock_domain"] = "a"
    before = [(s.start_ns, s.end_ns) for s in t.spans]
    assert align(t) is None and [(s.start_ns, s.end_ns) for s in t.spans] == before


def test_without_replies_only_the_unix_clocks_align():
    t = _two_hosts(theta=MONO, coarse_error=WALL)
    t.spans = [s for s in t.spans if s.pid == 1 or s.name.endswith("recv")]  # the agent never answers
    (done,) = align(t)
    assert done["method"] == "Unix clocks only" and done["offset_ns"]["agent"] == -MONO + WALL


@pytest.mark.parametrize(
    "spec, expect", [("agent-0=5,7", (5, 7)), ("agent-0=5", (5, 0)), ("master=5", (0, 0)), ("", (0, 0))]
)
def test_the_test_clock_applies_to_the_named_process_only(monkeypatch, spec, expect):
    monkeypatch.setenv(ENV_TEST_CLOCK, spec)
    assert injected_skew("agent-0") == expect


def test_an_engine_agent_on_another_clock_is_aligned_within_its_uncertainty(tmp_path):
    """How close depends on the machine's load; what must hold anywhere: the true offset lies
    inside the reported bounds, and they are tighter than the Unix clocks' alignment (WALL off)."""
    out = tmp_path / "run"
    env = {**os.environ, ENV_TEST_CLOCK: f"agent-0={MONO},{WALL}"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmtrace.cli",
            "run",
            "--config",
            "examples/quickstart.yaml",
            "--out",
            str(out),
            "--set",
            "workload.num_requests=6",
            "--set",
            "workload.concurrency=3",
            "--set",
            "workload.output_len={dist: fixed, value: 16}",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    trace = load_trace(str(out))
    (done,) = trace.meta[META_KEY]["domains"]
    assert done["processes"] == ["agent-0"] and done["method"] == "round trips" and done["round_trips"] >= 20
    error = abs(done["offset_ns"]["agent-0"] + MONO)
    # bounds that hold the truth and beat the Unix clocks (3 ms apart here); how tight depends
    # on the load: 2-152 us alone, 1.4 ms once in a full suite run on 2 cores
    assert error <= done["uncertainty_ns"] < WALL, (error, done["uncertainty_ns"])
    report = json.loads((out / "report.json").read_text())  # the analysis ran on the aligned trace
    assert report["breakdown"]["model_ms"] > 0 and report["summary"]["output_tokens"] == 96
    assert "Clock: agent-0 on another host's clock, aligned by" in (out / "report.md").read_text()


def test_merge_aligns_recordings_of_two_hosts_and_an_aligned_export_stays_put(tmp_path):
    from llmtrace.export.chrome import write_chrome_trace
    from llmtrace.merge import merge_files

    both = _two_hosts(theta=MONO, coarse_error=WALL)
    paths = []
    for pid in (1, 2):  # each host exported its own recording
        t = Trace(processes={pid: both.processes[pid]}, spans=[s for s in both.spans if s.pid == pid])
        paths.append(str(tmp_path / f"host{pid}.json"))
        write_chrome_trace(t, paths[-1])
    merged = merge_files(paths)
    (done,) = merged.trace.meta[META_KEY]["domains"]
    assert abs(done["offset_ns"]["agent"] + MONO) <= done["uncertainty_ns"] <= 40 * US
    assert any("another host's clock" in n for n in merged.notes)
    out = str(tmp_path / "merged.json")
    write_chrome_trace(merged.trace, out)
    again = merge_files([out])  # one clock domain now: nothing moves
    assert META_KEY not in again.trace.meta or again.trace.meta[META_KEY] == merged.trace.meta[META_KEY]
    starts = sorted(s.start_ns for s in again.trace.spans)
    assert starts == sorted(s.start_ns for s in merged.trace.spans)
