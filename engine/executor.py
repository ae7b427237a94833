"""The agents as one executor (vLLM v1's Executor): the agent processes, the shared-memory
arenas and the frames between them and the master.

`start` creates the arenas, spawns the agents (`engine.agent`), hands each the config and
the arenas at the handshake and learns the KV-cache size they can all hold; `watch` tells
the master when one exits. Per step, `send` writes a scheduled step into its request slot
and sends its frame (counts, the sampling parameters of sequences new to the agents, ids
they can forget); `wait` blocks until every rank has replied; `receive` reads the replies
and the sampled ids from the reply slot. The master's step loop sees only steps going out
and token ids coming back.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter_ns

import llmtrace
from llmtrace import names
from llmtrace.context import Carrier

from . import protocol
from .agent import TOKEN_ENV
from .block_manager import slot_mapping
from .config import RunConfig
from .ipc.shm import ShmArena
from .ipc.tcp import AsyncFrameStream, ConnectionClosed, FrameError, NagleFrameStream
from .protocol import PeerError, ProtocolError
from .scheduler import SchedulerOutput
from .sequence import Sequence
from .step_io import SampledRows

log = logging.getLogger("engine.executor")

START_TIMEOUT_S = 600.0  # model loading included
HELLO_TIMEOUT_S = 10.0  # an agent says hello as soon as it connects; a silent peer is not one
STOP_TIMEOUT_S = 10.0
EXIT_GRACE_S = 2.0  # how long a closed connection may wait for the agent's exit status


class EngineDead(RuntimeError):
    """The engine cannot generate any more: an agent died or failed, or the master stopped.
    The HTTP server answers 503."""


@dataclass
class AgentHandle:
    rank: int
    proc: asyncio.subprocess.Process
    conn: AsyncFrameStream | None = None
    watcher: asyncio.Task | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"agent-{self.rank} (pid {self.proc.pid})"

    def exit_text(self) -> str:
        rc = self.proc.returncode
        if rc is None:
            return f"{self.name} closed its connection"
        if rc < 0:
            return f"{self.name} was killed by {signal.Signals(-rc).name}"
        return f"{self.name} exited with code {rc}"


class AgentLost(Exception):
    def __init__(self, agent: AgentHandle):
        super().__init__(agent.name)
        self.agent = agent


class Executor:
    def __init__(self, cfg: RunConfig, eos_id: int):
        self.cfg, self.eos_id = cfg, eos_id
        self.agents: list[AgentHandle] = []
        self.vocab_size = 0
        # Sums over steps, from the agents' timings: time in the agent vs the rest of the round trip.
        self.agent_ns = 0
        self.transport_ns = 0
        self._request: ShmArena | None = None
        self._reply: ShmArena | None = None
        self._known: set[int] = set()  # seq ids whose sampling parameters the agents hold
        self._drop: list[int] = []  # known seq ids finished since the last step
        self._token = secrets.token_hex(16)

    @property
    def pids(self) -> list[int]:
        return [a.proc.pid for a in self.agents]

    @property
    def arena_names(self) -> list[str]:
        return [a.name for a in (self._request, self._reply) if a is not None]

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> int:
        """Create the arenas, spawn the agents and handshake; the KV blocks every agent can hold."""
        eng = self.cfg.engine
        max_blocks = -(-eng.max_model_len // eng.block_size)
        self._request = ShmArena.create(protocol.request_layout(eng.max_num_seqs, eng.max_batched_tokens, max_blocks))
        self._reply = ShmArena.create(protocol.reply_layout(eng.max_num_seqs))
        incoming: asyncio.Queue = asyncio.Queue()
        # the agents' listener takes any free port: engine.port is the HTTP server's
        listener = await asyncio.start_server(lambda r, w: incoming.put_nowait((r, w)), eng.host, 0)
        try:
            port = listener.sockets[0].getsockname()[1]
            self.agents = [AgentHandle(r, await self._spawn(r, eng.host, port)) for r in range(eng.num_agents)]
            num_blocks = await self._unless_an_agent_exits(self._handshake(incoming))
        except BaseException:
            await self.shutdown()
            raise
        finally:
            listener.close()
        # Every agent has mapped the arenas; their names are no longer needed by anyone.
        self._request.unlink()
        self._reply.unlink()
        return num_blocks

    def watch(self, on_exit: Callable[[EngineDead], None]) -> list[asyncio.Task]:
        """A task per agent that calls on_exit when its process ends."""

        async def watch(agent: AgentHandle) -> None:
            await agent.proc.wait()
            on_exit(EngineDead(agent.exit_text()))

        for a in self.agents:
            a.watcher = asyncio.create_task(watch(a), name=f"watch-agent-{a.rank}")
        return [a.watcher for a in self.agents if a.watcher is not None]

    async def shutdown(self) -> None:
        """Tell the agents to stop, wait for them (killing the late ones), free the arenas."""
        for a in self.agents:
            if a.conn is None:  # never finished its handshake: nothing to be graceful about
                if a.proc.returncode is None:
                    a.proc.kill()
            else:
                try:
                    await asyncio.wait_for(a.conn.send(protocol.message("shutdown")), STOP_TIMEOUT_S)
                except (FrameError, asyncio.TimeoutError):
                    pass  # already gone; reaped below
        for a in self.agents:
            try:
                await asyncio.wait_for(a.proc.wait(), STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("%s did not exit within %.0f s; killing it", a.name, STOP_TIMEOUT_S)
                a.proc.kill()
                await a.proc.wait()
            if a.conn is not None:
                await a.conn.close()
        self.release_arenas()

    def kill(self) -> None:
        """An agent is gone: take the others down now."""
        for a in self.agents:
            if a.proc.returncode is None:
                a.proc.kill()
        self.release_arenas()

    def release_arenas(self) -> None:
        for arena in (self._request, self._reply):
            if arena is not None:
                arena.unlink()
                arena.close()

    async def _spawn(self, rank: int, host: str, port: int) -> asyncio.subprocess.Process:
        env = {**os.environ, llmtrace.ENV_PROCESS_NAME: f"agent-{rank}", TOKEN_ENV: self._token}
        connect = "127.0.0.1" if host in ("", "0.0.0.0") else host
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine.agent",
            "--connect",
            f"{connect}:{port}",
            "--rank",
            str(rank),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
        )

    async def _handshake(self, incoming: asyncio.Queue) -> int:
        """Accept one connection per rank, send each the config and arenas, collect `ready`.
        Returns the KV-cache size every agent can hold (in blocks)."""
        stream = NagleFrameStream if self.cfg.antipatterns.no_tcp_nodelay else AsyncFrameStream
        pending = {a.rank: a for a in self.agents}
        group = process_group_address(self.cfg.engine)
        while pending:
            conn = stream(*await incoming.get())
            try:
                hello = protocol.check(await asyncio.wait_for(conn.recv(), HELLO_TIMEOUT_S), "hello")
                if not hmac.compare_digest(str(hello.get("token", "")), self._token):
                    raise ProtocolError("connection without this master's agent token")
                agent = pending.pop(hello.get("rank"), None)
                if agent is None:
                    raise ProtocolError(f"unexpected rank {hello.get('rank')!r}")
            except (ProtocolError, FrameError, asyncio.TimeoutError) as e:
                log.warning("rejected an agent connection: %s", e or "no hello")
                await _send_error(conn, str(e))
                continue
            agent.conn = conn
            await conn.send(
                protocol.message(
                    "hello",
                    config=self.cfg.to_dict(),
                    world_size=len(self.agents),
                    process_group=group,
                    arenas={"request": self._request.to_wire(), "reply": self._reply.to_wire()},
                )
            )
        ready = [protocol.check(await a.conn.recv(), "ready") for a in self.agents]
        self.vocab_size = min(int(r["vocab_size"]) for r in ready)
        return min(int(r["num_blocks"]) for r in ready)

    async def _unless_an_agent_exits(self, coro):
        """Run the handshake; fail with EngineDead if an agent exits or it times out."""
        task = asyncio.ensure_future(coro)
        exits = {asyncio.ensure_future(a.proc.wait()): a for a in self.agents}
        try:
            done, _ = await asyncio.wait([task, *exits], timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            if task not in done and done:
                # The agent may have said why before exiting: give its message a moment to arrive.
                await asyncio.wait([task], timeout=EXIT_GRACE_S)
            if task.done():
                try:
                    return task.result()
                except (PeerError, ProtocolError, FrameError) as e:
                    raise EngineDead(f"agent failed while starting: {e}") from None
            for ev, agent in exits.items():
                if ev in done:
                    raise EngineDead(f"{agent.exit_text()} while starting (see its output above)")
            raise EngineDead(f"the agents did not start within {START_TIMEOUT_S:.0f} s")
        finally:
            for t in (task, *exits):
                t.cancel()

    # ---- steps -----------------------------------------------------------------------------

    async def send(self, out: SchedulerOutput, step: int) -> None:
        """Write scheduled step `step` into its request slot and send its frame to every agent."""
        B = len(out.scheduled)
        with llmtrace.span("shm.write", seqs=B):
            T, W = self._write_inputs(out, step)
        # The carrier names the step sent, which is not the enclosing master.step's when ahead.
        carrier = list(llmtrace.context.current()._replace(step=step))
        msg = protocol.message(
            "step",
            step=step,
            carrier=carrier,
            prefill=out.is_prefill,
            num_seqs=B,
            num_tokens=T,
            block_width=W,
            new=self._new_seqs(out),
            drop=self._take_drop(),
        )
        # msg: the step sent (this root's, or the next one's ahead), as the agents' tcp.recv says
        nodelay = int(all(a.conn.nodelay for a in self.agents))
        with llmtrace.span("tcp.send", **{names.A_MSG: step, names.A_NODELAY: nodelay}):
            for a in self.agents:
                await _guard(a, a.conn.send(msg))

    async def wait(self) -> None:
        """Until every rank's reply to the oldest step in flight has arrived."""
        for a in self.agents:
            await _guard(a, a.conn.wait())

    async def receive(self, step: int, num_seqs: int, sent_ns: int, waiting_ns: int) -> SampledRows:
        """Step `step`'s replies (every rank's, once done with its request slot) and its
        sampled ids, logprobs and asked-for alternatives (rank 0's rows, in the reply slot).
        `sent_ns`: when the step was sent; `waiting_ns`: when the master began to wait for it."""
        ready_ns = perf_counter_ns()
        with llmtrace.span("tcp.recv", **{names.A_MSG: step, names.A_READY: 1}) as recv_span:
            replies = [protocol.check(await _guard(a, a.conn.recv()), "reply") for a in self.agents]
            recv_span.follow(Carrier.from_wire(replies[0].get("carrier")))
        self._account(replies, step, num_seqs, sent_ns, waiting_ns, ready_ns)
        with llmtrace.span("shm.read", seqs=num_seqs):
            reply, k = protocol.slot_views(self._reply, step), int(replies[0].get("top", 0))
            top = (
                [
                    list(zip(ids, lps))
                    for ids, lps in zip(
                        reply["top_ids"][:num_seqs, :k].tolist(), reply["top_logprobs"][:num_seqs, :k].tolist()
                    )
                ]
                if k  # asked for: most steps ask for none
                else None
            )
            return SampledRows(reply["token_ids"][:num_seqs].tolist(), reply["logprobs"][:num_seqs].tolist(), top)

    def forget(self, seq: Sequence) -> None:
        """A finished sequence: the next frame tells the agents to drop its parameters."""
        if seq.seq_id in self._known:
            self._known.discard(seq.seq_id)
            self._drop.append(seq.seq_id)

    def _account(
        self, replies: list[dict], step: int, num_seqs: int, sent_ns: int, waiting_ns: int, ready_ns: int
    ) -> None:
        """Check the replies answer this step; add its agent time and its transport time: the
        step message's way to the slowest rank, and the reply's way back as far as the master
        was waiting for it (a reply that arrived while the master was busy elsewhere waited
        for the master, not for the wire; with async scheduling most do). Agents and master
        share the host's CLOCK_MONOTONIC."""
        for r in replies:
            if r.get("step") != step or r.get("n") != num_seqs:
                raise ProtocolError(
                    f"reply for step {r.get('step')} with {r.get('n')} rows, expected step {step} with {num_seqs}"
                )
        arrival = max(r["timings"]["arrival_ns"] for r in replies)
        sent_back = max(r["timings"]["send_ns"] for r in replies)
        self.agent_ns += max(r["timings"]["send_ns"] - r["timings"]["arrival_ns"] for r in replies)
        self.transport_ns += max(0, arrival - sent_ns) + max(0, ready_ns - max(sent_back, waiting_ns))

    def _write_inputs(self, out: SchedulerOutput, step: int) -> tuple[int, int]:
        """Fill the step's request slot with its flattened inputs; returns (tokens, block-table width)."""
        bs, B = self.cfg.engine.block_size, len(out.scheduled)
        W = max(len(s.seq.block_table) for s in out.scheduled)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        query_start_loc = [0]
        for seq, num_new, start in out.scheduled:
            ids += token_ids(seq, start, num_new)
            positions += range(start, start + num_new)
            slots += slot_mapping(seq.block_table, start, num_new, bs)
            context_lens.append(start + num_new)
            query_start_loc.append(query_start_loc[-1] + num_new)
        T = len(ids)
        a = protocol.step_arrays(self._request, step, B, T, W)
        a["block_tables"][:] = -1
        for row, s in enumerate(out.scheduled):
            a["block_tables"][row, : len(s.seq.block_table)] = s.seq.block_table
        a["input_ids"][:] = ids
        a["positions"][:] = positions
        a["slot_mapping"][:] = slots
        a["context_lens"][:] = context_lens
        a["query_start_loc"][:] = query_start_loc
        a["seq_ids"][:] = [s.seq.seq_id for s in out.scheduled]
        return T, W

    def _new_seqs(self, out: SchedulerOutput) -> list:
        new = []
        for s in out.scheduled:
            if s.seq.seq_id not in self._known:
                self._known.add(s.seq.seq_id)
                new.append(
                    [
                        s.seq.seq_id,
                        protocol.sampling_to_wire(s.seq.sampling_params, s.seq.num_prompt_tokens, self.eos_id),
                    ]
                )
        return new

    def _take_drop(self) -> list[int]:
        drop, self._drop = self._drop, []
        return drop


async def _guard(agent: AgentHandle, aw):
    """Await channel I/O with `agent`; a closed connection means the agent is gone."""
    try:
        return await aw
    except ConnectionClosed:
        raise AgentLost(agent) from None


def process_group_address(eng) -> str | None:
    """Where tensor-parallel agents rendezvous (torch.distributed's TCP store): a free port
    on the agents' host, or None without tensor parallelism."""
    if eng.tensor_parallel < 2:
        return None
    with socket.socket() as s:
        s.bind((eng.host, 0))
        return f"tcp://{eng.host}:{s.getsockname()[1]}"


async def _send_error(conn: AsyncFrameStream, message: str) -> None:
    try:
        await conn.send(protocol.message("error", message=message))
    except FrameError:
        pass
    await conn.close()


def token_ids(seq: Sequence, start: int, n: int) -> list[int]:
    """The sequence's tokens at positions [start, start + n) without copying the whole sequence."""
    prompt = seq.prompt_token_ids
    if start >= len(prompt):
        o = start - len(prompt)
        return seq.output_token_ids[o : o + n]
    if start + n <= len(prompt):
        return prompt[start : start + n]
    return (prompt + seq.output_token_ids)[start : start + n]
