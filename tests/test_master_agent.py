"""Master + agent processes end to end (no HTTP): streaming, equality with ModelRunner alone,
aborts, bad input, an agent killed mid-generation, and the spans both processes record."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import pytest_asyncio

from engine import protocol
from engine.config import load_config
from engine.ipc import shm
from engine.ipc.tcp import FrameSocket
from engine.master import EngineDead, Master
from engine.sampling_params import SamplingParams, SamplingParamsError
from engine.scheduler import QueueFull, RequestRejected
from engine.tokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.timeout(120)
on_shared_loop = pytest.mark.asyncio(loop_scope="module")  # the tests that use the module's master

CFG = {
    "model": {"preset": "tiny", "seed": 0},
    "engine": {
        "block_size": 16,
        "num_blocks": 16,
        "max_num_seqs": 4,
        "max_batched_tokens": 256,
        "max_model_len": 256,
        "max_waiting": 8,
    },
}


def prompt(n: int, offset: int = 0) -> list[int]:
    return [(37 * i + offset) % 7000 + 100 for i in range(n)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


async def collect(stream) -> tuple[list[int], str, list[str | None]]:
    tokens, text, reasons = [], "", []
    async for delta in stream:
        tokens += delta.token_ids
        text += delta.text
        reasons.append(delta.finish_reason)
    return tokens, text, reasons


async def until_idle(master: Master) -> None:
    for _ in range(200):
        if not master.scheduler.has_unfinished():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine did not go idle")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def master():
    m = Master(load_config(CFG))
    await m.start()
    yield m
    await m.stop()
    assert not shm.owned_names()


@on_shared_loop
async def test_requests_of_different_lengths_stream_and_finish(master):
    lengths = [(5, 3), (40, 12), (17, 1), (90, 7), (64, 20), (3, 9)]  # (prompt, max_tokens); 6 > max_num_seqs
    streams = [master.add_request(f"len-{i}", prompt(p, i), greedy(m)) for i, (p, m) in enumerate(lengths)]
    results = await asyncio.gather(*(collect(s) for s in streams))
    for (p, m), (tokens, text, reasons) in zip(lengths, results):
        assert len(tokens) == m
        assert reasons == [None] * (m - 1) + ["length"]  # one delta per step, the last one says why
        assert all(0 <= t < master.vocab_size for t in tokens)
        detok = IncrementalDetokenizer(master.tokenizer, prompt(p, lengths.index((p, m))))
        assert text == "".join(detok.add([t]) for t in tokens) + detok.flush()
    stats = master.stats()
    assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0
    assert stats["kv_blocks_total"] == 16
    assert stats["steps"] > 0 and stats["agent_ms_per_step"] > 0 and stats["transport_ms_per_step"] > 0
    master.scheduler.check_invariants()


@on_shared_loop
async def test_a_stop_string_in_the_output_finishes_the_sequence_and_frees_its_blocks(master):
    _, full, _ = await collect(master.add_request("whole", prompt(20, 4), greedy(16)))
    stop = full[6:9]
    deltas = [d async for d in master.add_request("cut", prompt(20, 4), greedy(16, stop=(stop,)))]
    assert "".join(d.text for d in deltas) == full[: full.find(stop)]
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", stop)
    assert sum(len(d.token_ids) for d in deltas) < 16  # stopped there, not run to max_tokens
    stats = master.stats()
    assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0
    master.scheduler.check_invariants()


@on_shared_loop
async def test_outputs_equal_the_model_runner_alone(master):
    """Greedy and seeded sampling through master + agent give what ModelRunner alone gives,
    while other requests share the batch (sampling parameters travel in the diffs)."""
    seeded = SamplingParams(temperature=0.8, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    noise = [master.add_request(f"noise-{i}", prompt(30 + i, 9), greedy(6)) for i in range(2)]
    a = master.add_request("greedy", prompt(21, 1), greedy(10, logprobs=True))
    b = master.add_request("seeded", prompt(33, 2), seeded)
    (ta, _, _), (tb, _, _), *_ = await asyncio.gather(collect(a), collect(b), *(collect(s) for s in noise))
    ref = await asyncio.to_thread(reference_generate, [(prompt(21, 1), greedy(10)), (prompt(33, 2), seeded)])
    assert ta == ref[0][0]
    assert tb == ref[1][0]
    assert a.logprobs == pytest.approx(ref[0][1], abs=1e-4) and not b.logprobs  # only when asked for


def reference_generate(requests: list[tuple[list[int], SamplingParams]]) -> list[tuple[list[int], list[float]]]:
    """Each request alone through ModelRunner.execute: one prefill, then decode steps.
    Returns (token ids, their logprobs) per request."""
    from engine.model_runner import ModelRunner
    from engine.step_io import StepInput

    cfg = load_config(CFG)
    runner = ModelRunner(cfg.model, block_size=16, num_blocks=64)
    outs = []
    for ids, sp in requests:
        tokens, out, logprobs, step = list(ids), [], [], 0
        blocks = list(range(-(-(len(ids) + sp.max_tokens) // 16)))
        while len(out) < sp.max_tokens:
            start = 0 if not out else len(tokens) - 1
            new = tokens[start:]
            step_in = StepInput(
                step=step,
                is_prefill=not out,
                seq_ids=np.array([0]),
                input_ids=np.array(new, np.int32),
                positions=np.arange(start, len(tokens), dtype=np.int32),
                query_start_loc=np.array([0, len(new)], np.int32),
                context_lens=np.array([len(tokens)], np.int32),
                block_tables=np.array([blocks], np.int32),
                slot_mapping=np.arange(start, len(tokens), dtype=np.int64),
                temperature=np.array([sp.temperature], np.float32),
                top_p=np.array([sp.top_p], np.float32),
                top_k=np.array([sp.top_k], np.int32),
                seed=np.array([-1 if sp.seed is None else sp.seed], np.int64),
            )
            result = runner.execute(step_in)
            out.append(int(result.token_ids[0]))
            logprobs.append(float(result.logprobs[0]))
            tokens.append(out[-1])
            step += 1
        outs.append((out, logprobs))
    return outs


@on_shared_loop
async def test_preemption_under_kv_pressure_recomputes_and_finishes(master):
    """4 x (40 + 30) tokens need 20 blocks at the end; 16 exist, so some sequences are
    preempted, re-prefilled with what they generated (their sampling parameters are not
    sent again) and still finish with every token."""
    before = master.stats()["preemptions"]
    streams = [master.add_request(f"p{i}", prompt(40, i), greedy(30)) for i in range(4)]
    results = await asyncio.gather(*(collect(s) for s in streams))
    assert [len(t) for t, _, _ in results] == [30] * 4
    assert master.stats()["preemptions"] > before
    await until_idle(master)
    master.scheduler.check_invariants()
    assert master.stats()["kv_blocks_used"] == 0


@on_shared_loop
async def test_abort_frees_blocks_and_ends_the_stream(master):
    stream = master.add_request("long", prompt(50), greedy(200))
    other = master.add_request("short", prompt(10), greedy(5))
    first = await stream.__anext__()
    assert first.token_ids and first.finish_reason is None
    master.abort("long")
    rest = [d async for d in stream]
    assert rest[-1].finish_reason == "abort"
    assert len(rest) <= 2  # at most the delta of the step in flight, then the abort
    assert len((await collect(other))[0]) == 5
    await until_idle(master)
    master.scheduler.check_invariants()
    assert master.stats()["kv_blocks_used"] == 0
    master.abort("long")  # a finished request: nothing to do
    assert master.healthy


@on_shared_loop
async def test_bad_requests_are_rejected_with_a_reason(master):
    with pytest.raises(RequestRejected, match="outside the model's vocabulary"):
        master.add_request("oov", [5, 8000], greedy(2))
    with pytest.raises(RequestRejected, match="prompt is empty"):
        master.add_request("empty", [], greedy(2))
    with pytest.raises(SamplingParamsError, match="max_tokens"):
        master.add_request("too-long", prompt(250), greedy(10))
    streams = [master.add_request(f"q{i}", prompt(8, i), greedy(1)) for i in range(8)]  # nobody scheduled yet
    with pytest.raises(QueueFull):
        master.add_request("q-over", prompt(8), greedy(1))
    with pytest.raises(RequestRejected, match="already in use"):
        master.add_request("q0", prompt(8), greedy(1))
    for s in streams:
        await collect(s)
    assert master.healthy


@on_shared_loop
async def test_killed_agent_fails_streams_promptly_and_unlinks_arenas(master):
    """Runs last on the shared master: it kills the agent."""
    m = master
    names = m.executor.arena_names
    assert not any(os.path.exists(os.path.join(shm.SHM_DIR, n)) for n in names)  # unlinked once attached
    streams = [m.add_request(f"k{i}", prompt(20, i), greedy(200)) for i in range(3)]
    await streams[0].__anext__()
    os.kill(m.agent_pids[0], signal.SIGKILL)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for s in streams:
        with pytest.raises(EngineDead, match=r"agent-0 \(pid \d+\) was killed by SIGKILL"):
            await asyncio.wait_for(collect(s), 10)
    assert loop.time() - t0 < 5
    assert not m.healthy
    with pytest.raises(EngineDead, match="SIGKILL"):
        m.add_request("after", prompt(5), greedy(1))
    assert not shm.owned_names()


def test_agent_refuses_a_master_of_another_protocol_version():
    with socket.create_server(("127.0.0.1", 0)) as srv:
        address = "127.0.0.1:%d" % srv.getsockname()[1]
        agent = subprocess.Popen(
            [sys.executable, "-m", "engine.agent", "--connect", address, "--rank", "0"],
            stderr=subprocess.PIPE,
            text=True,
        )
        srv.settimeout(60)
        conn, _ = srv.accept()
        master = FrameSocket(conn)
        assert protocol.check(master.recv(), "hello")["rank"] == 0
        master.send({"v": 99, "type": "hello"})
        _, err = agent.communicate(timeout=60)
        got_error = master.recv()
        conn.close()
    assert agent.returncode == 1
    assert "protocol version mismatch: peer speaks v99" in err
    assert got_error["type"] == "error" and "agent-0" in got_error["message"]


def test_killed_master_leaves_no_agent_and_no_shared_memory():
    script = textwrap.dedent(f"""
        import asyncio
        from engine.config import load_config
        from engine.master import Master
        from engine.sampling_params import SamplingParams
        from engine.tokenizer import Tokenizer

        async def main():
            m = Master(load_config({CFG!r}), Tokenizer())
            await m.start()
            stream = m.add_request("r", [100] * 8, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
            await stream.__anext__()
            print(m.agent_pids[0], *m.executor.arena_names, flush=True)
            async for _ in stream:
                pass

        asyncio.run(main())
    """)
    master = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    agent_pid, *names = master.stdout.readline().split()
    master.kill()  # SIGKILL: no handler, no atexit
    master.wait(timeout=30)
    for _ in range(500):  # the orphaned agent sees the closed connection and exits
        if not os.path.exists(f"/proc/{agent_pid}") or " Z " in open(f"/proc/{agent_pid}/stat").read():
            break
        time.sleep(0.02)
    else:
        os.kill(int(agent_pid), signal.SIGKILL)
        raise AssertionError("the agent outlived its master by 10 s")
    assert len(names) == 2 and not any(os.path.exists(os.path.join(shm.SHM_DIR, n)) for n in names)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_spans_of_all_processes_link_up_with_two_ranks(tmp_path, async_scheduling):
    """Two agents (the N-rank protocol: both get every step and reply, rank 0's rows are read).
    With async scheduling, master.step n sends step n+1 before it waits for step n."""
    cfg = {**CFG, "engine": {**CFG["engine"], "agents": 2, "async_scheduling": async_scheduling}}
    script = textwrap.dedent(f"""
        import asyncio, llmtrace
        from engine.config import load_config
        from engine.master import Master
        from engine.sampling_params import SamplingParams
        from engine.tokenizer import Tokenizer

        async def main():
            m = Master(load_config({cfg!r}), Tokenizer())  # the shipped tokenizer: no torch import here
            await m.start()
            streams = [m.add_request(f"r{{i}}", [100 + i] * (8 + i), SamplingParams(temperature=0, max_tokens=4))
                       for i in range(2)]
            for s in streams:
                async for _ in s:
                    pass
            await m.stop()

        llmtrace.configure(out={str(tmp_path)!r}, process_name="master")
        asyncio.run(main())
        llmtrace.shutdown()
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    from llmtrace.timeline import load_spool_dir

    trace = load_spool_dir(str(tmp_path))
    pids = {proc.name: pid for pid, proc in trace.processes.items()}
    assert set(pids) == {"master", "agent-0", "agent-1"}
    by_id = {s.span_id: s for s in trace.spans}
    children = {}
    for s in trace.spans:
        children.setdefault(s.parent_id, []).append(s.name)
    steps = [s for s in trace.spans if s.name == "master.step" and s.attrs.get("batch", 0) > 0]
    agent_steps = {(s.pid, s.step): s for s in trace.spans if s.name == "agent.step"}
    assert len(steps) == 4 and len(agent_steps) == 2 * len(steps)  # a prefill and 3 decodes: max_tokens 4
    assert steps[0].attrs["prefill"] == 1 and steps[0].attrs["tokens"] == 8 + 9
    send = ["schedule", "shm.write", "tcp.send"]
    for i, ms in enumerate(steps):
        assert ms.pid == pids["master"] and ms.step == i and ms.attrs["output_tokens"] == 2
        last = i == len(steps) - 1  # nothing follows: it streams its own outputs at once
        if not async_scheduling:
            sends, sender = send, ms
        else:  # the first iteration sends steps 0 and 1; the last has nothing left to send ahead
            sends, sender = (send * 2 if i == 0 else ["schedule"] if last else send), steps[max(i - 1, 0)]
        assert children[ms.span_id] == [
            *sends,
            "agent.wait",
            "tcp.recv",
            "shm.read",
            "postprocess",
            *(["detokenize", "stream.write"] if last else []),
        ]
        wait = next(s for s in trace.spans if s.parent_id == ms.span_id and s.name == "agent.wait")
        output = [s for s in trace.spans if s.parent_id == wait.span_id]  # the previous step's, while agents run
        assert [(s.name, s.step) for s in output] == (
            [] if i == 0 else [("detokenize", ms.step - 1), ("stream.write", ms.step - 1)]
        )
        for rank in (0, 1):
            ag = agent_steps[pids[f"agent-{rank}"], ms.step]
            assert ag.link_id == sender.span_id  # master.step that sent it -> agent.step
            kids = [k for k in children[ag.span_id] if k not in ("preprocess.batch", "gc")]
            assert kids == [
                "tcp.recv",
                "shm.read",
                "preprocess",
                "forward",
                "sampling",
                "sync.wait",
                *(["shm.write"] if rank == 0 else []),
                "tcp.send",
            ]
            assert all(by_id[i].step == ag.step for i in by_id if by_id[i].parent_id == ag.span_id)
        recv = next(by_id[i] for i in by_id if by_id[i].parent_id == ms.span_id and by_id[i].name == "tcp.recv")
        lead = agent_steps[pids["agent-0"], ms.step]
        assert recv.link_id == lead.span_id and recv.step == ms.step  # agent.step -> master tcp.recv
    queue = [s for s in trace.spans if s.name == "queue"]
    assert sorted(s.attrs["req"] for s in queue) == ["r0", "r1"]
    tokens = [i for i in trace.instants if i.name == "token"]
    assert sorted((i.attrs["req"], i.attrs["n"]) for i in tokens) == [(r, n) for r in ("r0", "r1") for n in range(1, 5)]
    finish = [i for i in trace.instants if i.name == "req.finish"]
    assert sorted((i.attrs["req"], i.attrs["reason"]) for i in finish) == [("r0", "length"), ("r1", "length")]
    counters = {c.name for c in trace.counters if c.pid == pids["master"]}
    assert {"running", "waiting", "batch_size", "kv_blocks_used", "kv_blocks_total"} <= counters


class _DeviceStub:
    """A runner whose device finishes a step only once the next one was launched (or after
    0.5 s), like a GPU still busy when the master's next step arrives; logs the order."""

    def __init__(self):
        self.events: list[tuple[str, int]] = []

    def launch(self, step):
        self.events.append(("launch", step.step))
        return _PendingStub(self, step, time.monotonic() + 0.5)


class _PendingStub:
    def __init__(self, device, step, deadline):
        self.device, self.step, self.deadline = device, step, deadline

    def done(self) -> bool:
        return ("launch", self.step.step + 1) in self.device.events or time.monotonic() > self.deadline

    def result(self):
        from engine.step_io import StepOutput

        self.device.events.append(("result", self.step.step))
        b = self.step.num_seqs
        return StepOutput(
            np.full(b, 100 + self.step.step, np.int32),
            np.zeros(b, np.float32),
            np.zeros((b, 0), np.int32),
            np.zeros((b, 0), np.float32),
        )


def test_agent_launches_the_next_step_while_the_device_runs_and_replies_in_order():
    from engine.agent import Agent

    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    request = shm.ShmArena.create(protocol.request_layout(4, 16, 2))
    reply = shm.ShmArena.create(protocol.reply_layout(4))
    try:
        agent = Agent(FrameSocket(a), rank=0)
        agent.request, agent.reply, agent.runner = request, reply, _DeviceStub()
        master = FrameSocket(b)
        for n in range(3):
            slot = protocol.slot_views(request, n)
            slot["seq_ids"][:2] = [7, 8]
            slot["input_ids"][:2] = [5, 6] if n == 0 else [-1, -1]
            slot["query_start_loc"][:3] = [0, 1, 2]
            master.send(
                protocol.message(
                    "step",
                    step=n,
                    carrier=None,
                    prefill=False,
                    num_seqs=2,
                    num_tokens=2,
                    block_width=1,
                    drop=[],
                    new=[[s, [0.0, 1.0, -1, -1, 0]] for s in (7, 8)] if n == 0 else [],
                )
            )
        serving = threading.Thread(target=agent.serve)
        serving.start()
        replies = []
        for n in range(3):
            replies.append(master.recv())
            replies[-1]["ids"] = protocol.slot_views(reply, n)["token_ids"][:2].tolist()
        master.send(protocol.message("shutdown"))
        serving.join(timeout=10)
        assert not serving.is_alive()
    finally:
        for arena in (request, reply):
            arena.unlink()
        a.close()
        b.close()
    assert [(r["step"], r["ids"]) for r in replies] == [(n, [100 + n] * 2) for n in range(3)]
    # step n+1 went to the device before the host waited for step n
    assert agent.runner.events == [
        ("launch", 0),
        ("launch", 1),
        ("result", 0),
        ("launch", 2),
        ("result", 1),
        ("result", 2),
    ]
