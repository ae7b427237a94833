"""The load generator: request building (seeded, exact prompt lengths) and runs against a
real `llmtrace serve` process (tiny model, one agent) whose counts must agree with the
client's. The last test stops that process and checks its shutdown and its trace."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from synthetic import drain_recorded_trace

from engine.config import load_config
from engine.tokenizer import Tokenizer
from engine.workload import PromptBuilder, iter_requests, percentile, run_workload, sample_length
from llmtrace import recorder, sink
from llmtrace.timeline import load_spool_dir

MAX_MODEL_LEN = 128
CONFIG = f"engine: {{max_model_len: {MAX_MODEL_LEN}, max_batched_tokens: 256, max_num_seqs: 8, num_blocks: 96}}\n"


def workload(**kw):
    return load_config({"workload": kw}).workload


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


class ServeProcess:
    """`llmtrace serve --out DIR` in a child process."""

    def __init__(self, tmp):
        (tmp / "serve.yaml").write_text(CONFIG)
        self.out_dir = tmp / "run"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmtrace.cli",
                "serve",
                "--config",
                str(tmp / "serve.yaml"),
                "--port",
                "0",
                "--out",
                str(self.out_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        line = self.proc.stdout.readline().decode()
        m = re.search(r"http://[\d.]+:\d+", line)
        if m is None:
            self.proc.kill()
            raise AssertionError(f"llmtrace serve did not start: {line}{self.proc.communicate()[0].decode()}")
        self.url = m.group()
        self.agent_pids = [
            int(p)
            for p in subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        ]

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.loads(r.read())

    def shared_memory(self) -> set[str]:
        """/dev/shm names the server and its agents have mapped (unlinked ones included)."""
        names = set()
        for pid in (self.proc.pid, *self.agent_pids):
            with open(f"/proc/{pid}/maps") as f:
                names |= set(re.findall(r"/dev/shm/(llmtrace-[0-9a-f]+)", f.read()))
        return names

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as a service manager stops it; (exit code, output)."""
        self.proc.send_signal(signal.SIGTERM)
        out = self.proc.communicate(timeout=60)[0].decode()
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    serve = ServeProcess(tmp_path_factory.mktemp("serve"))
    yield serve
    if serve.proc.poll() is None:
        serve.proc.kill()
        serve.proc.wait()


# ---- building requests -------------------------------------------------------------------------


def test_prompts_have_the_asked_token_length(tokenizer):
    builder, rng = PromptBuilder(tokenizer), random.Random(0)
    for n in [2, 3, 17, 64, 300, 9000]:  # 9000 is longer than the corpus: slices wrap around
        text, got = builder.build(n, rng)
        assert got == n == len(tokenizer.encode(text))


def test_requests_are_seeded_and_within_the_distributions(tokenizer):
    wl = workload(
        num_requests=20,
        input_len={"dist": "uniform", "min": 4, "max": 40},
        output_len={"dist": "normal", "mean": 10, "std": 30},
        seed=3,
    )
    a, b = list(iter_requests(wl, tokenizer, MAX_MODEL_LEN)), list(iter_requests(wl, tokenizer, MAX_MODEL_LEN))
    assert a == b and len(a) == 20 and len({r.req_id for r in a}) == 20
    assert a != list(iter_requests(dataclasses.replace(wl, seed=4), tokenizer, MAX_MODEL_LEN))
    assert all(4 <= r.prompt_len <= 40 for r in a)
    assert all(1 <= r.max_tokens and r.prompt_len + r.max_tokens <= MAX_MODEL_LEN for r in a)
    assert len({r.max_tokens for r in a}) > 3


def test_lengths_are_capped_by_the_context(tokenizer):
    wl = workload(num_requests=3, input_len=500, output_len=500)
    for r in iter_requests(wl, tokenizer, MAX_MODEL_LEN):
        assert r.prompt_len == MAX_MODEL_LEN - 1 and r.max_tokens == 1


def test_sample_length_fixed_and_uniform_bounds():
    rng = random.Random(1)
    assert sample_length(workload(input_len=7).input_len, rng) == 7
    dist = workload(input_len={"dist": "uniform", "min": 3, "max": 5}).input_len
    assert {sample_length(dist, rng) for _ in range(200)} == {3, 4, 5}


def test_percentile_matches_numpy():
    rng = random.Random(2)
    for n in (1, 2, 7, 100):
        xs = [rng.random() for _ in range(n)]
        for q in (50, 90, 99):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


# ---- against the engine ------------------------------------------------------------------------


async def test_closed_loop_counts_agree_with_the_server(engine, tokenizer):
    wl = workload(
        num_requests=8,
        arrival="closed",
        concurrency=4,
        seed=5,
        input_len={"dist": "uniform", "min": 8, "max": 48},
        output_len={"dist": "uniform", "min": 3, "max": 8},
    )
    specs = {r.req_id: r for r in iter_requests(wl, tokenizer, MAX_MODEL_LEN)}
    seen = []
    results, summary = await run_workload(engine.url, wl, tokenizer, max_model_len=MAX_MODEL_LEN, progress=seen.append)
    assert sorted(r.req_id for r in results) == sorted(specs)
    for r in results:
        spec = specs[r.req_id]
        assert r.ok, r.error
        assert r.prompt_tokens == spec.prompt_len  # the server counted the prompt the client built
        assert r.output_tokens == spec.max_tokens  # ignore_eos: every request runs to its budget
        assert r.chunks <= r.output_tokens and len(r.itl_s) == r.chunks - 1
        assert 0 < r.ttft_s <= r.e2e_s and r.tpot_s > 0
    assert summary.completed == summary.requests == 8 and summary.errors == 0
    assert summary.output_tokens == sum(s.max_tokens for s in specs.values())
    assert summary.prompt_tokens == sum(s.prompt_len for s in specs.values())
    assert summary.throughput_tok_s == pytest.approx(summary.output_tokens / summary.duration_s)
    assert summary.ttft_ms["p50"] <= summary.ttft_ms["p99"] <= summary.e2e_ms["p99"]
    final = seen[-1]
    assert final.done == final.total == 8 and final.output_tokens == summary.output_tokens
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert engine.health()["kv_blocks_used"] == 0


async def test_poisson_arrivals_for_a_duration(engine, tokenizer):
    wl = workload(duration_s=1.0, arrival="poisson", rate=8.0, seed=1, input_len=16, output_len=4, stream=True)
    results, summary = await run_workload(engine.url, wl, tokenizer, max_model_len=MAX_MODEL_LEN)
    assert 2 <= len(results) <= 30  # ~8 expected; bounds a broken arrival loop, not the RNG
    assert all(r.ok and r.output_tokens == 4 for r in results)
    assert all(r.start_s < 1.0 for r in results)
    starts = sorted(r.start_s for r in results)
    assert len(set(starts)) == len(starts)  # spread out, not a burst
    assert summary.completed == len(results)


async def test_non_streaming_requests_count_tokens_from_usage(engine, tokenizer):
    wl = workload(num_requests=3, concurrency=3, input_len=10, output_len=5, stream=False)
    results, summary = await run_workload(engine.url, wl, tokenizer, max_model_len=MAX_MODEL_LEN)
    assert summary.completed == 3 and summary.output_tokens == 15
    assert all(r.ttft_s is None and r.itl_s == [] for r in results)
    assert summary.ttft_ms["p50"] is None and summary.e2e_ms["p50"] > 0


async def test_unreachable_server_counts_errors(tokenizer):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wl = workload(num_requests=4, concurrency=2, input_len=8, output_len=2)
    results, summary = await run_workload(f"http://127.0.0.1:{port}", wl, tokenizer)
    assert summary.errors == 4 and summary.completed == 0 and summary.output_tokens == 0
    assert all(not r.ok and "Connect" in r.error for r in results)


# ---- must stay last: stops the server ----------------------------------------------------------


@pytest.mark.skipif(sink.current() is not None, reason="a spooler in this process would take the records")
async def test_client_spans_match_the_servers_and_sigterm_stops_everything(engine, tokenizer):
    wl = workload(num_requests=3, concurrency=3, seed=9, input_len=12, output_len=5)
    recorder.drain()
    recorder.set_enabled(True)
    try:
        results, _ = await run_workload(engine.url, wl, tokenizer, max_model_len=MAX_MODEL_LEN)
    finally:
        recorder.set_enabled(False)
    assert all(r.ok for r in results)
    arenas = engine.shared_memory()
    assert arenas  # the master's request and reply arenas
    rc, out = engine.stop()
    assert rc == 0 and "Traceback" not in out, out
    for pid in engine.agent_pids:  # reaped by the server before it exited
        assert not os.path.exists(f"/proc/{pid}"), pid
    assert not arenas & set(os.listdir("/dev/shm"))

    client = {s.attrs["req"]: s for s in drain_recorded_trace().spans if s.name == "client.request"}
    server = {s.attrs["req"]: s for s in load_spool_dir(str(engine.out_dir)).spans if s.name == "http.request"}
    assert set(client) == {r.req_id for r in results} and set(client) <= set(server)
    for rid, c in client.items():
        s = server[rid]
        # one host clock: the server starts after the client sent (it may end a moment after [DONE] arrived)
        assert c.start_ns <= s.start_ns < c.end_ns
        assert c.attrs["output_tokens"] == s.attrs["output_tokens"] == 5
