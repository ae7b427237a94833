"""From sampled ids to what each request's client reads (vLLM v1's OutputProcessor): one
`RequestStream` per request, its incremental detokenization, its stop strings (the text
is cut before the first one and the sequence stopped), and the deltas pushed to it once a
step is postprocessed (`detokenize` and `stream.write` spans, with that step's id). The
master runs it while the agents compute the next step."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import llmtrace
from llmtrace import names

from .scheduler import SchedulerOutput
from .sequence import Sequence
from .step_io import SampledRows
from .stop_strings import StopStringMatcher
from .tokenizer import IncrementalDetokenizer, Tokenizer


class Delta(NamedTuple):
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" on the last delta
    stop_reason: str | None = None  # the stop string that ended the output (vLLM's stop_reason)


class UnstreamedStep(NamedTuple):
    """A postprocessed step whose tokens are not streamed yet."""

    step: int
    out: SchedulerOutput
    sampled: SampledRows


class RequestStream:
    """One request's deltas, as an async iterator. It ends after the delta that carries a
    finish_reason, or raises EngineDead if the engine dies first. With
    `SamplingParams.logprobs`, `logprobs` collects each output token's log-probability, and
    with `top_logprobs` `top_logprobs` its most likely tokens with theirs."""

    def __init__(self, seq: Sequence, detokenizer: IncrementalDetokenizer):
        self.seq = seq
        self.detokenizer = detokenizer
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.stops = StopStringMatcher(seq.sampling_params.stop) if seq.sampling_params.stop else None
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


class OutputProcessor:
    """The open requests' streams; `finished(seq)` is called once a sequence's last token is
    out, `stop(seq)` when its output showed a stop string (the scheduler finishes it)."""

    def __init__(self, tokenizer: Tokenizer, finished: Callable[[Sequence], None], stop: Callable[[Sequence], None]):
        self.tokenizer = tokenizer
        self.streams: dict[str, RequestStream] = {}
        self._finished, self._stop = finished, stop

    def add(self, seq: Sequence) -> RequestStream:
        stream = RequestStream(seq, IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids))
        self.streams[seq.req_id] = stream
        return stream

    def abort(self, seq: Sequence) -> None:
        """The request was stopped (client gone): its stream ends with that finish_reason."""
        self._finished(seq)
        stream = self.streams.pop(seq.req_id, None)
        if stream is not None:
            stream.put(Delta([], "", seq.finish_reason))
        llmtrace.instant(names.I_REQ_FINISH, req=seq.req_id, reason=seq.finish_reason)

    def fail_all(self, error: BaseException) -> None:
        for stream in self.streams.values():
            stream.fail(error)
        self.streams.clear()

    def stream(self, output: UnstreamedStep | None) -> None:
        """Detokenize a postprocessed step's tokens and push the deltas (spans carry its step)."""
        if output is None:
            return
        with llmtrace.span("detokenize", step=output.step):
            deltas = self._detokenize(output.out, output.sampled)
        with llmtrace.span("stream.write", step=output.step):
            self._publish(deltas)

    def record_queue_spans(self, out: SchedulerOutput, step: int) -> None:
        """A `queue` span per request scheduled for the first time: arrival -> first scheduled."""
        if not out.is_prefill or not llmtrace.enabled():
            return
        for s in out.scheduled:
            stream = self.streams.get(s.seq.req_id)
            if stream is not None and not stream.queue_recorded:
                stream.queue_recorded = True
                llmtrace.record_span(
                    names.QUEUE_SPAN, s.seq.arrival_ns, s.seq.first_scheduled_ns, parent=0, step=step, req=s.seq.req_id
                )

    def _detokenize(self, out: SchedulerOutput, sampled: SampledRows) -> list[tuple[RequestStream, Delta]]:
        deltas = []
        for row, (s, token_id, logprob) in enumerate(zip(out.scheduled, sampled.token_ids, sampled.logprobs)):
            seq = s.seq
            stream = self.streams.get(seq.req_id)
            if stream is None or stream.seq is not seq:
                continue  # aborted while the step ran
            if seq.sampling_params.logprobs:
                stream.logprobs.append(logprob)
            if seq.sampling_params.top_logprobs and sampled.top is not None:
                stream.top_logprobs.append(sampled.top[row][: seq.sampling_params.top_logprobs])
            text, stop = self._text(stream, token_id)
            if stop is not None and not seq.is_finished:
                self._stop(seq)
            if seq.is_finished:
                del self.streams[seq.req_id]
                self._finished(seq)
            deltas.append((stream, Delta([token_id], text, "stop" if stop else seq.finish_reason, stop)))
        return deltas

    @staticmethod
    def _text(stream: RequestStream, token_id: int) -> tuple[str, str | None]:
        """The text a new token adds to the output, up to a stop string (then also that string)."""
        text = stream.detokenizer.add((token_id,))
        if stream.seq.is_finished:
            text += stream.detokenizer.flush()
        if stream.stops is None:
            return text, None
        text, stop = stream.stops.feed(text)
        if stop is None and stream.seq.is_finished:
            text += stream.stops.flush()
        return text, stop

    def _publish(self, deltas: list[tuple[RequestStream, Delta]]) -> None:
        for stream, delta in deltas:
            stream.put(delta)
            stream.num_streamed += len(delta.token_ids)
            llmtrace.instant(names.I_TOKEN, req=stream.req_id, n=stream.num_streamed)
            if delta.finish_reason is not None:
                llmtrace.instant(names.I_REQ_FINISH, req=stream.req_id, reason=delta.finish_reason)
