"""Iteration-level (continuous) batching, vLLM v0 / nano-vllm style.

Every engine step is either a prefill of newly admitted sequences or one decode token for
every running sequence. Prefill comes first: waiting sequences are admitted in arrival
order while KV blocks, `max_num_seqs`, `prefill_batch_size` and `max_batched_tokens`
allow. When a decode step runs out of blocks, the most recently admitted running sequence
is preempted by recompute: its blocks are freed and it goes back to the front of the
waiting queue, to be prefilled again with the tokens it has generated so far.

Async scheduling (vLLM's): `schedule_ahead(in_flight)` plans step n+1 while the device
still runs step n. A sequence of step n takes a PLACEHOLDER for the token being sampled
(postprocess(n) writes the real id over it; the agent feeds step n+1 from its own
output); a sequence that token finishes by length sits step n+1 out, one that a stop
token finishes is known only at postprocess(n), and its row in step n+1 is discarded.
Lookahead never preempts: when step n+1 would need to, it returns None and the caller
schedules after step n's outputs are in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import NamedTuple

import llmtrace
from llmtrace import names

from .block_manager import BlockManager
from .config import ConfigError, EngineConfig
from .sequence import PLACEHOLDER, Sequence, SequenceStatus


class RequestRejected(ValueError):
    """A request the engine cannot take as given (e.g. a prompt longer than the model's context)."""


class QueueFull(RequestRejected):
    """The waiting queue holds `max_waiting` requests already; try again later."""


class ScheduledSeq(NamedTuple):
    seq: Sequence
    num_new_tokens: int  # tokens whose KV this step computes
    start_pos: int  # position of the first of them


@dataclass
class SchedulerOutput:
    is_prefill: bool
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        engine_cfg: EngineConfig,
        block_manager: BlockManager,
        eos_token_id: int | None,
        prefill_batch_1: bool = False,
    ):
        """prefill_batch_1: the antipattern of the same name, at most one request per prefill."""
        capacity = block_manager.num_blocks * block_manager.block_size
        if engine_cfg.max_model_len > capacity:
            # A sequence alone must always fit, or it could be preempted forever.
            raise ConfigError(
                f"engine.max_model_len: {engine_cfg.max_model_len} exceeds the KV cache capacity of "
                f"{capacity} tokens ({block_manager.num_blocks} blocks of {block_manager.block_size}); "
                f"lower engine.max_model_len or raise engine.num_blocks",
                "engine.max_model_len",
            )
        self.cfg = engine_cfg
        self.block_manager = block_manager
        self.eos_token_id = eos_token_id
        self.max_prefill_seqs = 1 if prefill_batch_1 else engine_cfg.prefill_batch_size
        self.max_prompt_len = min(engine_cfg.max_model_len, engine_cfg.max_batched_tokens)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self._unfinished: dict[str, Sequence] = {}
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self._unfinished)

    def add(self, seq: Sequence) -> None:
        """Queue a new request; raises RequestRejected (or QueueFull) if it cannot be taken."""
        if seq.req_id in self._unfinished:
            raise RequestRejected(f"request id {seq.req_id!r} is already in use")
        n = seq.num_tokens
        if n == 0:
            raise RequestRejected("the prompt is empty")
        if n > self.max_prompt_len:
            raise RequestRejected(
                f"the prompt has {n} tokens, more than the {self.max_prompt_len} "
                f"the engine takes (max_model_len {self.cfg.max_model_len}, "
                f"max_batched_tokens {self.cfg.max_batched_tokens})"
            )
        if len(self.waiting) >= self.cfg.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are waiting already (engine.max_waiting)")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._unfinished[seq.req_id] = seq

    def abort(self, req_id: str, status: SequenceStatus = SequenceStatus.FINISHED_ABORTED) -> Sequence | None:
        """Finish a request wherever it is (with `status`: a stop string the output showed
        finishes it as stopped) and free its blocks; None if it is not unfinished.

        Safe between schedule() and postprocess(): postprocess skips finished sequences."""
        seq = self._unfinished.pop(req_id, None)
        if seq is None:
            return None
        (self.waiting if seq.status is SequenceStatus.WAITING else self.running).remove(seq)
        self.block_manager.free(seq)
        seq.finish(status)
        return seq

    def schedule(self) -> SchedulerOutput:
        return self._schedule_prefill() or self._schedule_decode()

    def schedule_ahead(self, in_flight: SchedulerOutput) -> SchedulerOutput | None:
        """The step after `in_flight`, planned before its tokens are known; None when
        there is nothing to run without them (see the module docstring)."""
        out = self._schedule_prefill()
        if out is not None:
            return out
        ahead = frozenset(s.seq.seq_id for s in in_flight.scheduled if not s.seq.is_finished)
        batch = [seq for seq in self.running if seq.seq_id not in ahead or not self._last_by_length(seq)]
        if not batch or not self.block_manager.can_append(batch, ahead):
            return None
        out = SchedulerOutput(False)
        for seq in batch:
            if seq.seq_id in ahead:
                seq.append_token(PLACEHOLDER)
            self.block_manager.append_slot(seq)
            out.scheduled.append(ScheduledSeq(seq, 1, seq.num_tokens - 1))
        return out

    def _last_by_length(self, seq: Sequence) -> bool:
        """Whether the token being sampled for `seq` ends it by max_tokens or max_model_len."""
        return (
            seq.num_output_tokens + 1 >= seq.sampling_params.max_tokens or seq.num_tokens + 1 >= self.cfg.max_model_len
        )

    def _schedule_prefill(self) -> SchedulerOutput | None:
        bm, now = self.block_manager, perf_counter_ns()
        scheduled: list[ScheduledSeq] = []
        num_tokens = 0
        while self.waiting and len(scheduled) < self.max_prefill_seqs and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            # The whole sequence: the prompt, plus what a preempted one had generated.
            n = seq.num_tokens - seq.num_cached_tokens
            if num_tokens + n > self.cfg.max_batched_tokens or not bm.can_allocate(seq):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_ns is None:
                seq.first_scheduled_ns = now
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n, seq.num_cached_tokens))
            num_tokens += n
        return SchedulerOutput(True, scheduled) if scheduled else None

    def _schedule_decode(self) -> SchedulerOutput:
        bm = self.block_manager
        out = SchedulerOutput(False)
        batch: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not bm.can_append((seq,)):
                # running is in admission order: the newest sequence gives its blocks up.
                victim = self.running.pop() if self.running else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.append_slot(seq)
                batch.append(seq)
                out.scheduled.append(ScheduledSeq(seq, 1, seq.num_tokens - 1))
        self.running.extend(batch)
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        llmtrace.instant(names.I_PREEMPT, req=seq.req_id)

    def postprocess(self, output: SchedulerOutput, token_ids) -> list[Sequence]:
        """Put each scheduled sequence's sampled token in place (over its placeholder when
        the next step was scheduled ahead), apply the stop rules and free the finished ones'
        blocks. Returns the sequences that finished in this step."""
        now = perf_counter_ns()
        finished: list[Sequence] = []
        for (seq, num_new_tokens, start_pos), token_id in zip(output.scheduled, token_ids, strict=True):
            if seq.is_finished:  # aborted while the step ran, or stopped by the step before
                continue
            seq.num_cached_tokens = start_pos + num_new_tokens
            seq.set_token(start_pos + num_new_tokens, int(token_id))
            if seq.first_token_ns is None:
                seq.first_token_ns = now
            status = self._stop_status(seq)
            if status is not None:
                seq.finish(status)
                self.block_manager.free(seq)
                del self._unfinished[seq.req_id]
                self.running.remove(seq)
                finished.append(seq)
        return finished

    def _stop_status(self, seq: Sequence) -> SequenceStatus | None:
        params, token_id = seq.sampling_params, seq.output_token_ids[-1]
        if (token_id == self.eos_token_id and not params.ignore_eos) or token_id in params.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.cfg.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def check_invariants(self) -> None:
        """Raise AssertionError if the queues or the block tables are inconsistent."""
        if len(self.running) > self.cfg.max_num_seqs:
            raise AssertionError(f"{len(self.running)} running sequences, max_num_seqs is {self.cfg.max_num_seqs}")
        if any(s.status is not SequenceStatus.WAITING or s.block_table for s in self.waiting):
            raise AssertionError("a waiting sequence is not WAITING or holds blocks")
        if any(s.status is not SequenceStatus.RUNNING for s in self.running):
            raise AssertionError("a running sequence is not RUNNING")
        if len(self.waiting) + len(self.running) != len(self._unfinished):
            raise AssertionError("waiting + running disagree with the unfinished requests")
        self.block_manager.check_invariants([*self.waiting, *self.running])
