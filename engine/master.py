"""The engine's master: scheduling, detokenization and streaming, in the server's event loop.

`Master` owns the Scheduler, BlockManager and Tokenizer and drives the agent processes
(`engine.agent`) it spawns. One background task steps the engine while there is work:

    master.step n: [schedule -> shm.write -> tcp.send of step n+1] -> agent.wait (n)
                   -> tcp.recv -> shm.read -> postprocess (n)
                   (inside agent.wait: detokenize -> stream.write of step n-1)

With `engine.async_scheduling` (the default) step n+1 is scheduled and sent before step n's
reply arrives (Scheduler.schedule_ahead: the tokens being sampled are placeholders), so the
agents start it the moment step n is done and the master's work overlaps theirs; without
it, or when lookahead would need a preemption, an iteration schedules and sends step n
itself. Step n's outputs are detokenized and streamed while the agents run step n+1
(vLLM's async output processing). The last step before the engine idles (or a step that
schedules nothing) streams its outputs at once.

Inputs go to the agents through the request arena, sampled ids come back through the
reply arena; the TCP frames carry a step's counts and its diff (sampling parameters of
sequences new to the agents, ids they can forget). Each request's deltas are read from
a `RequestStream`. If an agent dies, every stream fails with `EngineDead`, which names
the process and how it ended, and the master stops stepping.
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
from collections import deque
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import NamedTuple

import llmtrace
from llmtrace import names
from llmtrace.context import Carrier

from . import protocol
from .agent import TOKEN_ENV
from .block_manager import BlockManager, slot_mapping
from .config import RunConfig
from .ipc.shm import ShmArena
from .ipc.tcp import AsyncFrameStream, ConnectionClosed, FrameError
from .protocol import PeerError, ProtocolError
from .sampling_params import SamplingParams
from .scheduler import RequestRejected, Scheduler, SchedulerOutput
from .sequence import Sequence
from .tokenizer import IncrementalDetokenizer, Tokenizer, tokenizer_path

log = logging.getLogger("engine.master")

START_TIMEOUT_S = 600.0  # model loading included
HELLO_TIMEOUT_S = 10.0  # an agent says hello as soon as it connects; a silent peer is not one
STOP_TIMEOUT_S = 10.0
EXIT_GRACE_S = 2.0  # how long a closed connection may wait for the agent's exit status


class EngineDead(RuntimeError):
    """The engine cannot generate any more: an agent died or failed, or the master stopped.
    The HTTP server answers 503."""


class Delta(NamedTuple):
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" on the last delta


class InFlight(NamedTuple):
    """A step sent to the agents whose reply is not read yet."""
    step: int
    out: SchedulerOutput
    sent_ns: int


class UnstreamedStep(NamedTuple):
    """A postprocessed step whose tokens are not streamed yet."""
    step: int
    out: SchedulerOutput
    token_ids: list[int]
    logprobs: list[float]


class RequestStream:
    """One request's deltas, as an async iterator. It ends after the delta that carries a
    finish_reason, or raises EngineDead if the engine dies first. With
    `SamplingParams.logprobs`, `logprobs` collects each output token's log-probability."""

    def __init__(self, seq: Sequence, detokenizer: IncrementalDetokenizer):
        self.seq = seq
        self.detokenizer = detokenizer
        self.logprobs: list[float] = []
        self.queue_recorded = False  # its `queue` span is emitted when it is first scheduled
        self.num_streamed = 0  # tokens put so far (the sequence may hold later ones already)
        self._deltas: deque[Delta] = deque()
        self._waiter: asyncio.Future | None = None
        self._error: BaseException | None = None
        self._ended = False

    @property
    def req_id(self) -> str:
        return self.seq.req_id

    def put(self, delta: Delta) -> None:
        self._deltas.append(delta)
        self._wake()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        while not self._deltas:
            if self._ended:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        delta = self._deltas.popleft()
        if delta.finish_reason is not None:
            self._ended = True
        return delta


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


class _AgentLost(Exception):
    def __init__(self, agent: AgentHandle):
        super().__init__(agent.name)
        self.agent = agent


class Master:
    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer | None = None):
        if tokenizer is None:
            tokenizer = Tokenizer(tokenizer_path(cfg.model))
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.scheduler: Scheduler | None = None
        self.vocab_size = 0
        self.num_steps = 0
        # Sums over steps, from the agents' timings: time in the agent vs the rest of the round trip.
        self._agent_ns = 0
        self._transport_ns = 0
        self._agents: list[AgentHandle] = []
        self._request: ShmArena | None = None
        self._reply: ShmArena | None = None
        self._streams: dict[str, RequestStream] = {}
        self._known: set[int] = set()  # seq ids whose sampling parameters the agents hold
        self._drop: list[int] = []  # known seq ids finished since the last step
        self._work = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._dead: EngineDead | None = None
        self._stopped = False
        self._token = secrets.token_hex(16)

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self.scheduler is not None and self._dead is None and not self._stopped

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer generate (which process, how it ended); None until then."""
        return None if self._dead is None else str(self._dead)

    @property
    def agent_pids(self) -> list[int]:
        return [a.proc.pid for a in self._agents]

    async def start(self) -> None:
        """Create the arenas, spawn the agents, handshake, and start stepping."""
        from .protocol import reply_layout, request_layout

        eng = self.cfg.engine
        max_blocks = -(-eng.max_model_len // eng.block_size)
        self._request = ShmArena.create(request_layout(eng.max_num_seqs, eng.max_batched_tokens, max_blocks))
        self._reply = ShmArena.create(reply_layout(eng.max_num_seqs))
        incoming: asyncio.Queue = asyncio.Queue()
        # the agents' listener takes any free port: engine.port is the HTTP server's
        listener = await asyncio.start_server(lambda r, w: incoming.put_nowait((r, w)), eng.host, 0)
        try:
            port = listener.sockets[0].getsockname()[1]
            self._agents = [AgentHandle(r, await self._spawn(r, eng.host, port)) for r in range(eng.num_agents)]
            num_blocks = await self._unless_an_agent_exits(self._handshake(incoming))
            self.scheduler = Scheduler(eng, BlockManager(num_blocks, eng.block_size), self.tokenizer.eos_id,
                                       prefill_batch_1=self.cfg.antipatterns.prefill_batch_1)
        except BaseException:
            await self._shutdown_agents()
            self._release_arenas()
            raise
        finally:
            listener.close()
        # Every agent has mapped the arenas; their names are no longer needed by anyone.
        self._request.unlink()
        self._reply.unlink()
        for a in self._agents:
            a.watcher = asyncio.create_task(self._watch(a), name=f"watch-agent-{a.rank}")
        self._loop_task = asyncio.create_task(self._run(), name="master-step-loop")
        log.info("engine started: %d agent(s), %d KV blocks of %d tokens", len(self._agents), num_blocks,
                 eng.block_size)

    async def stop(self) -> None:
        """Graceful stop: stop stepping, tell the agents to shut down, wait for them, unlink the arenas."""
        if self._stopped:
            return
        self._stopped = True
        tasks = [t for t in (self._loop_task, *(a.watcher for a in self._agents)) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_streams(self._dead or EngineDead("the engine stopped"))
        await self._shutdown_agents()
        self._release_arenas()

    async def _spawn(self, rank: int, host: str, port: int) -> asyncio.subprocess.Process:
        env = {**os.environ, llmtrace.ENV_PROCESS_NAME: f"agent-{rank}", TOKEN_ENV: self._token}
        connect = "127.0.0.1" if host in ("", "0.0.0.0") else host
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.agent", "--connect", f"{connect}:{port}", "--rank", str(rank),
            env=env, stdin=asyncio.subprocess.DEVNULL)

    async def _handshake(self, incoming: asyncio.Queue) -> int:
        """Accept one connection per rank, send each the config and arenas, collect `ready`.
        Returns the KV-cache size every agent can hold (in blocks)."""
        nodelay = not self.cfg.antipatterns.no_tcp_nodelay
        pending = {a.rank: a for a in self._agents}
        group = process_group_address(self.cfg.engine)
        while pending:
            conn = AsyncFrameStream(*await incoming.get(), nodelay=nodelay)
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
            await conn.send(protocol.message(
                "hello", config=self.cfg.to_dict(), world_size=len(self._agents), process_group=group,
                arenas={"request": self._request.to_wire(), "reply": self._reply.to_wire()}))
        ready = [protocol.check(await a.conn.recv(), "ready") for a in self._agents]
        self.vocab_size = min(int(r["vocab_size"]) for r in ready)
        return min(int(r["num_blocks"]) for r in ready)

    async def _unless_an_agent_exits(self, coro):
        """Run the handshake; fail with EngineDead if an agent exits or it times out."""
        task = asyncio.ensure_future(coro)
        exits = {asyncio.ensure_future(a.proc.wait()): a for a in self._agents}
        try:
            done, _ = await asyncio.wait([task, *exits], timeout=START_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
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

    async def _shutdown_agents(self) -> None:
        for a in self._agents:
            if a.conn is None:  # never finished its handshake: nothing to be graceful about
                if a.proc.returncode is None:
                    a.proc.kill()
            else:
                try:
                    await asyncio.wait_for(a.conn.send(protocol.message("shutdown")), STOP_TIMEOUT_S)
                except (FrameError, asyncio.TimeoutError):
                    pass  # already gone; reaped below
        for a in self._agents:
            try:
                await asyncio.wait_for(a.proc.wait(), STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("%s did not exit within %.0f s; killing it", a.name, STOP_TIMEOUT_S)
                a.proc.kill()
                await a.proc.wait()
            if a.conn is not None:
                await a.conn.close()

    def _release_arenas(self) -> None:
        for arena in (self._request, self._reply):
            if arena is not None:
                arena.unlink()
                arena.close()

    async def _watch(self, agent: AgentHandle) -> None:
        await agent.proc.wait()
        self._die(EngineDead(agent.exit_text()))

    def _die(self, error: EngineDead) -> None:
        """An agent is gone: fail every stream, stop stepping, take the other agents down."""
        if self._dead is not None or self._stopped:
            return
        self._dead = error
        log.error("engine stopped: %s", error)
        self._fail_streams(error)
        for a in self._agents:
            if a.proc.returncode is None:
                a.proc.kill()
        self._release_arenas()
        if self._loop_task is not None and self._loop_task is not asyncio.current_task():
            self._loop_task.cancel()

    def _fail_streams(self, error: EngineDead) -> None:
        for stream in self._streams.values():
            stream.fail(error)
        self._streams.clear()

    # ---- requests --------------------------------------------------------------------------

    def add_request(self, req_id: str, prompt_token_ids,
                    sampling_params: SamplingParams | None = None) -> RequestStream:
        """Queue a request. Raises RequestRejected (a ValueError; QueueFull when the waiting
        queue is full), SamplingParamsError for parameters that do not fit, EngineDead if the
        engine is not running."""
        if not self.healthy:
            raise EngineDead(str(self._dead) if self._dead else "the engine is not running")
        params = sampling_params or SamplingParams()
        ids = list(prompt_token_ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            raise RequestRejected(f"token id {bad} is outside the model's vocabulary (0..{self.vocab_size - 1})")
        params.check_fits(len(ids), self.cfg.engine.max_model_len)
        if req_id in self._streams:  # finished in the scheduler, its last delta not streamed yet
            raise RequestRejected(f"request id {req_id!r} is already in use")
        seq = Sequence(req_id, ids, params)
        self.scheduler.add(seq)
        stream = RequestStream(seq, IncrementalDetokenizer(self.tokenizer, ids))
        self._streams[req_id] = stream
        self._work.set()
        return stream

    def abort(self, req_id: str) -> None:
        """Stop a request (client gone); its stream ends with finish_reason "abort"."""
        seq = self.scheduler.abort(req_id) if self.scheduler is not None else None
        if seq is None:
            return
        self._forget(seq)
        stream = self._streams.pop(req_id, None)
        if stream is not None:
            stream.put(Delta([], "", seq.finish_reason))
        llmtrace.instant(names.I_REQ_FINISH, req=req_id, reason=seq.finish_reason)

    def _forget(self, seq: Sequence) -> None:
        if seq.seq_id in self._known:
            self._known.discard(seq.seq_id)
            self._drop.append(seq.seq_id)

    def stats(self) -> dict:
        s = self.scheduler
        if s is None:
            return {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_total": 0, "steps": 0}
        steps = max(self.num_steps, 1)
        return {"running": s.num_running, "waiting": s.num_waiting,
                "kv_blocks_used": s.block_manager.num_used_blocks, "kv_blocks_total": s.block_manager.num_blocks,
                "preemptions": s.num_preemptions, "steps": self.num_steps,
                "agent_ms_per_step": self._agent_ns / steps / 1e6,
                "transport_ms_per_step": self._transport_ns / steps / 1e6}

    # ---- the step loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            in_flight: deque[InFlight] = deque()  # sent, reply not read yet; oldest first
            pending: UnstreamedStep | None = None
            while self._dead is None:
                if not in_flight and not self.scheduler.has_unfinished():
                    self._work.clear()
                    await self._work.wait()
                    continue
                pending = await self._step(in_flight, pending)
        except _AgentLost as e:
            try:
                await asyncio.wait_for(e.agent.proc.wait(), EXIT_GRACE_S)
            except asyncio.TimeoutError:
                pass
            self._die(EngineDead(e.agent.exit_text()))
        except PeerError as e:
            self._die(EngineDead(str(e)))
        except (ProtocolError, FrameError) as e:
            self._die(EngineDead(f"the agent channel broke: {e}"))
        except Exception as e:
            log.exception("engine step failed")
            self._die(EngineDead(f"engine step failed: {type(e).__name__}: {e}"))

    async def _step(self, in_flight: deque[InFlight], prev: UnstreamedStep | None) -> UnstreamedStep | None:
        """One iteration, `master.step` n for the step n whose reply it reads: schedule and
        send n if nothing is in flight; with async scheduling schedule and send n+1 too
        (the agents start it as soon as n is done); then wait for n, streaming `prev`
        (step n-1's outputs) meanwhile, and postprocess n. Returns step n's outputs when a
        next step will stream them, else streams them now."""
        sched = self.scheduler
        n = in_flight[0].step if in_flight else self.num_steps
        with llmtrace.span("master.step", step=n) as step_span:
            if not in_flight:
                with llmtrace.span("schedule"):
                    out = sched.schedule()
                if out.is_empty:  # everything was preempted; the next step prefills it again
                    self.num_steps += 1  # this root's step id is used up
                    step_span.set(batch=0, tokens=0, prefill=0)
                    self._stream_outputs(prev)
                    return None
                await self._send(out, in_flight)
            if self.cfg.engine.async_scheduling and len(in_flight) < protocol.SLOTS:
                with llmtrace.span("schedule", ahead=1):
                    ahead = sched.schedule_ahead(in_flight[-1].out)
                if ahead is not None:
                    await self._send(ahead, in_flight)
            done = in_flight.popleft()
            out, B = done.out, len(done.out.scheduled)
            step_span.set(batch=B, tokens=out.num_batched_tokens, prefill=int(out.is_prefill))
            # Every rank replies once it is done with the step's request slot; rank 0's reply
            # is the one whose rows are in the reply arena.
            with llmtrace.span("agent.wait"):
                self._stream_outputs(prev)
                waiting_ns = perf_counter_ns()
                for a in self._agents:
                    await _guard(a, a.conn.wait())
            ready_ns = perf_counter_ns()
            with llmtrace.span("tcp.recv", **{names.A_MSG: done.step, names.A_READY: 1}) as recv_span:
                replies = [protocol.check(await _guard(a, a.conn.recv()), "reply") for a in self._agents]
                recv_span.follow(Carrier.from_wire(replies[0].get("carrier")))
            self._account(replies, done, B, waiting_ns, ready_ns)
            with llmtrace.span("shm.read", seqs=B):
                reply = protocol.slot_views(self._reply, done.step)
                token_ids = reply["token_ids"][:B].tolist()
                logprobs = reply["logprobs"][:B].tolist()
            with llmtrace.span("postprocess"):
                # rows of sequences that the step before stopped (or that were aborted) are discarded
                kept = sum(1 for s in out.scheduled if not s.seq.is_finished)
                sched.postprocess(out, token_ids)
            step_span.set(output_tokens=kept)
            output = UnstreamedStep(done.step, out, token_ids, logprobs)
            if not sched.has_unfinished():  # no next step to hide behind
                self._stream_outputs(output)
                output = None
        bm = sched.block_manager
        llmtrace.counter(names.C_RUNNING, sched.num_running)
        llmtrace.counter(names.C_WAITING, sched.num_waiting)
        llmtrace.counter(names.C_BATCH_SIZE, B)
        llmtrace.counter(names.C_KV_BLOCKS_USED, bm.num_used_blocks)
        llmtrace.counter(names.C_KV_BLOCKS_TOTAL, bm.num_blocks)
        return output

    async def _send(self, out: SchedulerOutput, in_flight: deque[InFlight]) -> None:
        """Write a scheduled step into its request slot and send its header to every agent."""
        n = self.num_steps
        self.num_steps += 1
        B = len(out.scheduled)
        self._record_queue_spans(out, n)
        with llmtrace.span("shm.write", seqs=B):
            T, W = self._write_inputs(out, n)
        # The carrier names the step sent, which is not the enclosing master.step's when ahead.
        carrier = list(llmtrace.context.current()._replace(step=n))
        msg = protocol.message("step", step=n, carrier=carrier, prefill=out.is_prefill, num_seqs=B,
                               num_tokens=T, block_width=W, new=self._new_seqs(out), drop=self._take_drop())
        in_flight.append(InFlight(n, out, perf_counter_ns()))
        # msg: the step sent (this root's, or the next one's ahead), as the agents' tcp.recv says
        with llmtrace.span("tcp.send", **{names.A_MSG: n}):
            for a in self._agents:
                await _guard(a, a.conn.send(msg))

    def _stream_outputs(self, output: UnstreamedStep | None) -> None:
        """Detokenize a postprocessed step's tokens and push the deltas (spans carry its step)."""
        if output is None:
            return
        with llmtrace.span("detokenize", step=output.step):
            deltas = self._detokenize(output.out, output.token_ids, output.logprobs)
        with llmtrace.span("stream.write", step=output.step):
            self._publish(deltas)

    def _account(self, replies: list[dict], done: InFlight, num_seqs: int, waiting_ns: int, ready_ns: int) -> None:
        """Check the replies answer this step; add its agent time and its transport time: the
        step message's way to the slowest rank, and the reply's way back as far as the master
        was waiting for it (a reply that arrived while the master was busy elsewhere waited
        for the master, not for the wire; with async scheduling most do). Agents and master
        share the host's CLOCK_MONOTONIC."""
        for r in replies:
            if r.get("step") != done.step or r.get("n") != num_seqs:
                raise ProtocolError(f"reply for step {r.get('step')} with {r.get('n')} rows, "
                                    f"expected step {done.step} with {num_seqs}")
        arrival = max(r["timings"]["arrival_ns"] for r in replies)
        sent_back = max(r["timings"]["send_ns"] for r in replies)
        self._agent_ns += max(r["timings"]["send_ns"] - r["timings"]["arrival_ns"] for r in replies)
        self._transport_ns += max(0, arrival - done.sent_ns) + max(0, ready_ns - max(sent_back, waiting_ns))

    def _record_queue_spans(self, out: SchedulerOutput, step: int) -> None:
        """A `queue` span per request scheduled for the first time: arrival -> first scheduled."""
        if not out.is_prefill or not llmtrace.enabled():
            return
        for s in out.scheduled:
            stream = self._streams.get(s.seq.req_id)
            if stream is not None and not stream.queue_recorded:
                stream.queue_recorded = True
                llmtrace.record_span(names.QUEUE_SPAN, s.seq.arrival_ns, s.seq.first_scheduled_ns, parent=0, step=step,
                                     req=s.seq.req_id)

    def _write_inputs(self, out: SchedulerOutput, step: int) -> tuple[int, int]:
        """Fill the step's request slot with its flattened inputs; returns (tokens, block-table width)."""
        a, bs = protocol.slot_views(self._request, step), self.cfg.engine.block_size
        B = len(out.scheduled)
        W = max(len(s.seq.block_table) for s in out.scheduled)
        tables = a["block_tables"]
        tables[:B, :W] = -1
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        query_start_loc = [0]
        for row, (seq, num_new, start) in enumerate(out.scheduled):
            ids += _token_ids(seq, start, num_new)
            positions += range(start, start + num_new)
            slots += slot_mapping(seq.block_table, start, num_new, bs)
            context_lens.append(start + num_new)
            query_start_loc.append(query_start_loc[-1] + num_new)
            tables[row, :len(seq.block_table)] = seq.block_table
        T = len(ids)
        a["input_ids"][:T] = ids
        a["positions"][:T] = positions
        a["slot_mapping"][:T] = slots
        a["context_lens"][:B] = context_lens
        a["query_start_loc"][:B + 1] = query_start_loc
        a["seq_ids"][:B] = [s.seq.seq_id for s in out.scheduled]
        return T, W

    def _new_seqs(self, out: SchedulerOutput) -> list:
        new = []
        for s in out.scheduled:
            if s.seq.seq_id not in self._known:
                self._known.add(s.seq.seq_id)
                new.append([s.seq.seq_id, protocol.sampling_to_wire(s.seq.sampling_params, s.seq.num_prompt_tokens,
                                                                     self.tokenizer.eos_id)])
        return new

    def _take_drop(self) -> list[int]:
        drop, self._drop = self._drop, []
        return drop

    def _detokenize(self, out: SchedulerOutput, token_ids: list[int],
                    logprobs: list[float]) -> list[tuple[RequestStream, Delta]]:
        deltas = []
        for s, token_id, logprob in zip(out.scheduled, token_ids, logprobs):
            seq = s.seq
            stream = self._streams.get(seq.req_id)
            if stream is None or stream.seq is not seq:
                continue  # aborted while the step ran
            if seq.sampling_params.logprobs:
                stream.logprobs.append(logprob)
            text = stream.detokenizer.add((token_id,))
            if seq.is_finished:
                text += stream.detokenizer.flush()
                del self._streams[seq.req_id]
                self._forget(seq)
            deltas.append((stream, Delta([token_id], text, seq.finish_reason)))
        return deltas

    def _publish(self, deltas: list[tuple[RequestStream, Delta]]) -> None:
        for stream, delta in deltas:
            stream.put(delta)
            stream.num_streamed += len(delta.token_ids)
            llmtrace.instant(names.I_TOKEN, req=stream.req_id, n=stream.num_streamed)
            if delta.finish_reason is not None:
                llmtrace.instant(names.I_REQ_FINISH, req=stream.req_id, reason=delta.finish_reason)


async def _guard(agent: AgentHandle, aw):
    """Await channel I/O with `agent`; a closed connection means the agent is gone."""
    try:
        return await aw
    except ConnectionClosed:
        raise _AgentLost(agent) from None


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


def _token_ids(seq: Sequence, start: int, n: int) -> list[int]:
    """The sequence's tokens at positions [start, start + n) without copying the whole sequence."""
    prompt = seq.prompt_token_ids
    if start >= len(prompt):
        o = start - len(prompt)
        return seq.output_token_ids[o:o + n]
    if start + n <= len(prompt):
        return prompt[start:start + n]
    return (prompt + seq.output_token_ids)[start:start + n]
