"""py-spy over a recorded run: its chrometrace turned into samples on our clock (beacon
alignment), the slow function named under its stage when ptrace works here, and the
fallback to the in-process sampler, with what to grant, when it does not."""

from __future__ import annotations

import bisect
import os
import random
import subprocess
import sys
import time

import pytest
from test_record import PIPELINE, names_array_formatting_in_preprocess, record, report

from llmtrace.integrations import pyspy


def ptrace_denied() -> str | None:
    """None when py-spy can read a sibling process here, else why not."""
    exe = pyspy.find_executable()
    if exe is None:
        return "py-spy is not installed"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10)"])
    try:
        time.sleep(0.3)
        r = subprocess.run([exe, "dump", "--pid", str(child.pid)], capture_output=True, text=True, timeout=30)
    finally:
        child.kill()
        child.wait()
    return (
        None
        if r.returncode == 0
        else f"py-spy dump failed: {(r.stderr or r.stdout).strip()[:200]}; {pyspy.ptrace_advice()}"
    )


def test_record_with_pyspy_names_the_slow_function(tmp_path):
    reason = ptrace_denied()
    if reason:
        pytest.skip(reason)
    r = record(tmp_path, "--py-spy", "--py-spy-rate", "250", program=[sys.executable, PIPELINE, "--steps", "300"])
    assert r.returncode == 0, r.stderr
    assert "sampling in-process" not in r.stderr
    # not asserted in the stage's top five: a py-spy sample lands a millisecond or so off its
    # span (its clock is pinned by one beacon; 55-75% of the samples of preprocess's code
    # fell inside its spans), so a neighbouring stage's frames can crowd that short list
    names_array_formatting_in_preprocess(report(tmp_path), "samples:py-spy", in_top_functions=False)
    assert os.path.isfile(tmp_path / "pyspy" / "beacon.json")


def test_fallback_when_pyspy_may_not_attach(tmp_path):
    fake = tmp_path / "py-spy"
    fake.write_text("#!/bin/sh\necho 'Permission Denied: Try running again with elevated permissions' >&2\nexit 1\n")
    fake.chmod(0o755)
    out = tmp_path / "run"
    env = {pyspy.ENV_EXECUTABLE: str(fake)}
    r = record(
        out, "--py-spy", "--py-spy-rate", "1000", program=[sys.executable, PIPELINE, "--steps", "150"], env_extra=env
    )
    assert r.returncode == 0, r.stderr
    assert "py-spy was not allowed to read the program" in r.stderr
    assert "ptrace is not permitted here" in r.stderr and "sudo" in r.stderr
    assert "sampling in-process at 1000 Hz instead" in r.stderr
    names_array_formatting_in_preprocess(report(out), "samples:llmtrace")


def chrometrace(pid: int, pthread: int, native: int, stacks: list[tuple[int, list[str]]]) -> list[dict]:
    """py-spy's B/E events for one thread whose stack is `stacks[i][1]` from `stacks[i][0]` µs."""
    events, prev = [], []

    def frames(names):
        return [(f'process {pid}:"python x.py"', ""), (f"thread ({native}): MainThread", "")] + [
            (n, "/app/pipeline.py") for n in names
        ]

    for ts, names in stacks + [(stacks[-1][0] + 5000, None)]:
        cur = frames(names) if names is not None else []
        keep = 0
        while keep < min(len(prev), len(cur)) and prev[keep] == cur[keep]:
            keep += 1
        for name, fn in reversed(prev[keep:]):
            events.append(
                {
                    "ph": "E",
                    "name": name,
                    "pid": pid,
                    "tid": pthread,
                    "ts": ts,
                    "cat": "py-spy",
                    "args": {"filename": fn, "line": 7},
                }
            )
        for name, fn in cur[keep:]:
            events.append(
                {
                    "ph": "B",
                    "name": name,
                    "pid": pid,
                    "tid": pthread,
                    "ts": ts,
                    "cat": "py-spy",
                    "args": {"filename": fn, "line": 7},
                }
            )
        prev = cur
    return events


def test_chrometrace_to_samples_on_native_threads():
    events = chrometrace(
        42,
        140000000000001,
        4242,
        [(0, ["main", "step", "tokenize"]), (20_000, ["main", "step", "preprocess", "format"])],
    )
    threads = pyspy.stack_changes(events)
    assert list(threads) == [(42, 4242)]
    samples = pyspy.to_samples(threads, offset_ns=1_000_000, rate=200)
    assert [s.ts_ns for s in samples] == [1_000_000 + i * 5_000_000 for i in range(5)]
    assert samples[0].stack == ("pipeline:main", "pipeline:step", "pipeline:tokenize:7")
    assert samples[-1].stack[-1] == "pipeline:format:7" and {s.tid for s in samples} == {4242}
    assert {s.source for s in samples} == {"py-spy"}


def test_beacon_fit_recovers_the_offset():
    """Irregular tick/tock intervals stamped on our clock, observed by a 200 Hz sampler
    whose clock is `true` ns behind, with up to 0.3 ms of jitter: the fit lands within 0.5 ms."""
    rng = random.Random(3)
    marks = [10_000_000_000]
    for _ in range(400):
        marks.append(marks[-1] + rng.randint(400_000, 2_400_000))
    true = 9_990_000_000
    obs = []
    t = marks[0] + 1_000_000
    while t < marks[-1]:
        j = next(i for i in range(len(marks) - 1) if marks[i] <= t < marks[i + 1])
        obs.append((t - true + rng.randint(0, 300_000), j % 2 == 0))
        t += 5_000_000
    fitted = pyspy.fit_beacon(obs, marks, lo=true - 20_000_000, hi=true + 30_000_000)
    assert abs(fitted - true) < 500_000, fitted - true


def observed_beacon(seed: int, rate: int, jitter_ns: int) -> tuple[list[int], list[tuple[int, bool]], int]:
    """A beacon of the lengths `record` uses at `rate`, as long as it beacons, and py-spy's
    view of it: a sample every period (+-10%), an observation where the function changed,
    its time `true` ns behind ours plus up to `jitter_ns`. (marks, observations, true)"""
    rng = random.Random(seed)
    shortest, spread = pyspy.beacon_lengths(rate)
    period = int(1e9 / rate)
    marks = [10_000_000_000]
    while marks[-1] - marks[0] < max(pyspy.BEACON_MIN_S, pyspy.BEACON_SAMPLES / rate) * 1e9:
        marks.append(marks[-1] + shortest + rng.randrange(spread))
    true, obs, prev = 9_990_000_000, [], None
    t = marks[0] + rng.randrange(period)
    while t < marks[-1]:
        tick = (bisect.bisect_right(marks, t) - 1) % 2 == 0
        if tick != prev:
            obs.append((t - true + rng.randrange(jitter_ns), tick))
        prev, t = tick, t + period + rng.randint(-period // 10, period // 10)
    return marks, obs, true


@pytest.mark.parametrize("rate", [100, 200, 1000])
def test_beacon_fit_holds_under_millisecond_jitter(rate):
    """py-spy's times jitter by a millisecond or more on a loaded machine: the fit stays
    within the jitter in every one of 30 beacons (a fit from too few observations of too
    short intervals had landed tens of milliseconds off, samples in the wrong stage)."""
    for seed in range(30):
        marks, obs, true = observed_beacon(seed, rate, 1_500_000)
        fitted = pyspy.fit_beacon(obs, marks, lo=true - 60_000_000, hi=true + 120_000_000)
        assert abs(fitted - true) < 2_000_000, (seed, fitted - true)


def test_ptrace_advice_says_what_to_grant():
    advice = pyspy.ptrace_advice()
    assert advice.startswith("ptrace is not permitted here (")
    assert "sudo" in advice
