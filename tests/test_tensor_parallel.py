"""Tensor parallelism (engine/models/tensor_parallel.py) on the CPU: two gloo ranks of the
tiny model in float32 give the greedy tokens one rank gives, each keeps half the KV heads,
and each all-reduce is a span; the engine runs with `engine.tensor_parallel: 2`."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys

import pytest
from test_model import Driver

from engine.config import ModelConfig
from engine.model_runner import ModelRunner
from engine.models.tensor_parallel import TPGroup, check_divisible, local_kv_heads
from llmtrace import names

TINY = ModelConfig(preset="tiny", dtype="float32", device="cpu", seed=0)
PROMPTS = {0: [1, 5, 6, 7, 300, 41], 1: [1, 9, 77], 2: [1, 2000, 3000, 17, 4]}
STEPS = 12


def generate(tp: TPGroup | None) -> dict:
    runner = ModelRunner(TINY, block_size=16, num_blocks=32, tp=tp)
    d = Driver(runner)
    for s, toks in PROMPTS.items():
        d.add(s, toks)
    for _ in range(STEPS):
        d.step()
    return {
        "tokens": {s: t[len(PROMPTS[s]) :] for s, t in d.tokens.items()},
        "kv_heads": local_kv_heads(runner.model),
        "kv_shape": list(runner.kv_caches[0][0].shape),
    }


def _rank(rank: int, address: str, out) -> None:
    import torch.distributed as dist
    from synthetic import drain_recorded_trace

    import llmtrace

    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2)
    llmtrace.configure(enabled=True)  # records stay in memory
    result = generate(TPGroup(rank, 2))
    result["allreduce_spans"] = sum(1 for s in drain_recorded_trace().spans if s.name == names.ALLREDUCE)
    dist.destroy_process_group()
    out.put((rank, result))


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_two_ranks_give_the_tokens_of_one(monkeypatch):
    for key in [k for k in os.environ if k.startswith("LLMTRACE_")]:  # an earlier test's recording
        monkeypatch.delenv(key)  # would drain the ranks' records into its spool
    one = generate(None)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    address = _free_address()
    procs = [ctx.Process(target=_rank, args=(r, address, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert results[0]["tokens"] == results[1]["tokens"] == one["tokens"]
    assert one["kv_heads"] == 4 and results[0]["kv_heads"] == results[1]["kv_heads"] == 2
    assert results[0]["kv_shape"][2] == 2
    # two all-reduces per layer per step (attention and MLP), 4 layers
    assert results[0]["allreduce_spans"] == results[1]["allreduce_spans"] == 2 * 4 * STEPS


def test_a_world_that_does_not_divide_the_heads_is_refused():
    with pytest.raises(ValueError, match="tensor_parallel 3 does not divide the model's 8 attention heads"):
        check_divisible(8, 4, 688, 3)


def test_engine_serves_with_two_tensor_parallel_agents(tmp_path):
    from llmtrace.load import load_trace

    out = tmp_path / "run"
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
            "engine.tensor_parallel=2",
            "--set",
            "workload.num_requests=4",
            "--set",
            "workload.concurrency=2",
            "--set",
            "workload.output_len={dist: fixed, value: 8}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["output_tokens"] == 32
    trace = load_trace(str(out))
    by_proc = {
        p.name: sum(1 for s in trace.spans if s.pid == pid and s.name == names.ALLREDUCE)
        for pid, p in trace.processes.items()
    }
    assert by_proc["agent-0"] > 0 and by_proc["agent-0"] == by_proc["agent-1"]


def _two_ranks(slow_ms: dict[int, float], steps: int = 30):
    """An engine trace whose agent-0 and a second rank each run 8 all-reduces per step; a
    collective ends when the later rank arrives, so the faster rank's spans hold its wait."""
    from synthetic import AGENT_PID, MS, EngineTraceBuilder

    b = EngineTraceBuilder()
    b.process(AGENT_PID + 1, "agent-1")
    b.steps(steps, batch=8)
    trace = b.build()
    for fwd in [s for s in trace.spans if s.pid == AGENT_PID and s.name == "forward"]:
        t = fwd.start_ns
        for _ in range(8):
            arrive = {pid: t + int(slow_ms.get(pid, 0.0) * MS / 8) for pid in (AGENT_PID, AGENT_PID + 1)}
            done = max(arrive.values()) + 20_000
            for pid, a in arrive.items():
                b.span(pid, names.ALLREDUCE, a, done, step=fwd.step, attrs={names.A_BYTES: 4096})
            t = done
    trace.sort()
    return trace


def test_straggler_rank_names_the_rank_the_others_wait_for():
    from synthetic import AGENT_PID

    from llmtrace.analyze.analysis import Analysis
    from llmtrace.analyze.rules import run_rules

    ctx = Analysis(_two_ranks({AGENT_PID + 1: 2.0}))
    (s,) = [s for s in run_rules(ctx) if s.id == "straggler-rank"]
    assert s.evidence["rank_process"] == "agent-1" and s.evidence["steps_waited_for"] == 30
    assert s.evidence["wait_ms_per_step_p50"] == pytest.approx(2.0, rel=0.01)
    assert s.est_saving_ms_per_token == pytest.approx(ctx.ms_per_token(30 * 2_000_000), rel=0.01)
    assert not [s for s in run_rules(Analysis(_two_ranks({}))) if s.id == "straggler-rank"]
