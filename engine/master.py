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

Along vLLM v1's seams: the `Executor` (executor.py) owns the agent processes, the arenas
and the frames (a step goes out, token ids come back); the `OutputProcessor`
(output_processor.py) turns a postprocessed step into each request's deltas, read from a
`RequestStream`; this module is the step loop between them and the Scheduler. If an agent
dies, every stream fails with `EngineDead`, which names the process and how it ended, and
the master stops stepping.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import perf_counter_ns
from typing import NamedTuple

import llmtrace
from llmtrace import names

from . import protocol
from .agent import freeze_heap
from .block_manager import BlockManager
from .config import RunConfig
from .executor import EXIT_GRACE_S, AgentLost, EngineDead, Executor
from .ipc.tcp import FrameError
from .output_processor import OutputProcessor, RequestStream, UnstreamedStep
from .protocol import PeerError, ProtocolError
from .sampling_params import SamplingParams
from .scheduler import RequestRejected, Scheduler, SchedulerOutput
from .sequence import Sequence, SequenceStatus
from .tokenizer import Tokenizer, tokenizer_path

__all__ = ["EngineDead", "Master", "RequestStream"]
log = logging.getLogger("engine.master")


class InFlight(NamedTuple):
    """A step sent to the agents whose reply is not read yet."""

    step: int
    out: SchedulerOutput
    sent_ns: int


class Master:
    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer | None = None):
        if tokenizer is None:
            tokenizer = Tokenizer(tokenizer_path(cfg.model))
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.scheduler: Scheduler | None = None
        self.num_steps = 0
        self.executor = Executor(cfg, tokenizer.eos_id)
        self.outputs = OutputProcessor(tokenizer, self.executor.forget, self._stop_at_string)
        self._work = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._watchers: list[asyncio.Task] = []
        self._dead: EngineDead | None = None
        self._stopped = False

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
        return self.executor.pids

    @property
    def vocab_size(self) -> int:
        return self.executor.vocab_size

    async def start(self) -> None:
        """Start the agents and the step loop."""
        eng = self.cfg.engine
        num_blocks = await self.executor.start()
        self.scheduler = Scheduler(
            eng,
            BlockManager(num_blocks, eng.block_size),
            self.tokenizer.eos_id,
            prefill_batch_1=self.cfg.antipatterns.prefill_batch_1,
        )
        self._watchers = self.executor.watch(self._die)
        freeze_heap()
        self._loop_task = asyncio.create_task(self._run(), name="master-step-loop")
        log.info(
            "engine started: %d agent(s), %d KV blocks of %d tokens",
            len(self.executor.agents),
            num_blocks,
            eng.block_size,
        )

    async def stop(self) -> None:
        """Graceful stop: stop stepping, tell the agents to shut down, wait for them, unlink the arenas."""
        if self._stopped:
            return
        self._stopped = True
        tasks = [t for t in (self._loop_task, *self._watchers) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.outputs.fail_all(self._dead or EngineDead("the engine stopped"))
        await self.executor.shutdown()

    def _die(self, error: EngineDead) -> None:
        """An agent is gone: fail every stream, stop stepping, take the other agents down."""
        if self._dead is not None or self._stopped:
            return
        self._dead = error
        log.error("engine stopped: %s", error)
        self.outputs.fail_all(error)
        self.executor.kill()
        if self._loop_task is not None and self._loop_task is not asyncio.current_task():
            self._loop_task.cancel()

    # ---- requests --------------------------------------------------------------------------

    def add_request(
        self, req_id: str, prompt_token_ids, sampling_params: SamplingParams | None = None
    ) -> RequestStream:
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
        if req_id in self.outputs.streams:  # finished in the scheduler, its last delta not streamed yet
            raise RequestRejected(f"request id {req_id!r} is already in use")
        seq = Sequence(req_id, ids, params)
        self.scheduler.add(seq)
        stream = self.outputs.add(seq)
        self._work.set()
        return stream

    def abort(self, req_id: str) -> None:
        """Stop a request (client gone); its stream ends with finish_reason "abort"."""
        seq = self.scheduler.abort(req_id) if self.scheduler is not None else None
        if seq is not None:
            self.outputs.abort(seq)

    def _stop_at_string(self, seq: Sequence) -> None:
        """Its output showed a stop string: finished as stopped, its blocks freed."""
        if self.scheduler is not None:
            self.scheduler.abort(seq.req_id, SequenceStatus.FINISHED_STOPPED)

    def stats(self) -> dict:
        s = self.scheduler
        if s is None:
            return {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_total": 0, "steps": 0}
        steps = max(self.num_steps, 1)
        return {
            "running": s.num_running,
            "waiting": s.num_waiting,
            "kv_blocks_used": s.block_manager.num_used_blocks,
            "kv_blocks_total": s.block_manager.num_blocks,
            "preemptions": s.num_preemptions,
            "steps": self.num_steps,
            "agent_ms_per_step": self.executor.agent_ns / steps / 1e6,
            "transport_ms_per_step": self.executor.transport_ns / steps / 1e6,
        }

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
        except AgentLost as e:
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
                    self.outputs.stream(prev)
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
            with llmtrace.span("agent.wait"):
                self.outputs.stream(prev)
                waiting_ns = perf_counter_ns()
                await self.executor.wait()
            sampled = await self.executor.receive(done.step, B, done.sent_ns, waiting_ns)
            with llmtrace.span("postprocess"):
                # rows of sequences that the step before stopped (or that were aborted) are discarded
                kept = sum(1 for s in out.scheduled if not s.seq.is_finished)
                sched.postprocess(out, sampled.token_ids)
            step_span.set(output_tokens=kept)
            output: UnstreamedStep | None = UnstreamedStep(done.step, out, sampled)
            if not sched.has_unfinished():  # no next step to hide behind
                self.outputs.stream(output)
                output = None
        bm = sched.block_manager
        llmtrace.counter(names.C_RUNNING, sched.num_running)
        llmtrace.counter(names.C_WAITING, sched.num_waiting)
        llmtrace.counter(names.C_BATCH_SIZE, B)
        llmtrace.counter(names.C_KV_BLOCKS_USED, bm.num_used_blocks)
        llmtrace.counter(names.C_KV_BLOCKS_TOTAL, bm.num_blocks)
        return output

    async def _send(self, out: SchedulerOutput, in_flight: deque[InFlight]) -> None:
        n = self.num_steps
        self.num_steps += 1
        self.outputs.record_queue_spans(out, n)
        in_flight.append(InFlight(n, out, perf_counter_ns()))
        await self.executor.send(out, n)
