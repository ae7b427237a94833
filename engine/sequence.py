"""One request's token sequence as the scheduler and block manager see it."""

from __future__ import annotations

import enum
import itertools
from time import perf_counter_ns

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS or a stop token
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"


_FINISHED = frozenset(
    {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH, SequenceStatus.FINISHED_ABORTED}
)
_seq_ids = itertools.count()

# An output token the device is sampling while the scheduler already plans the next step
# (async scheduling): postprocess writes the real id over it; the agent feeds the next
# step from its own sampled ids wherever the master wrote this.
PLACEHOLDER = -1


class Sequence:
    """Prompt + generated tokens, the KV blocks holding them and the request's timestamps.

    num_cached_tokens counts the tokens whose KV is already in the cache; the scheduler
    computes the rest (the whole sequence again after a preemption by recompute).
    """

    __slots__ = (
        "seq_id",
        "req_id",
        "prompt_token_ids",
        "output_token_ids",
        "sampling_params",
        "status",
        "block_table",
        "num_tokens",
        "num_cached_tokens",
        "arrival_ns",
        "first_scheduled_ns",
        "first_token_ns",
        "finish_reason",
        "num_preemptions",
    )

    def __init__(
        self,
        req_id: str,
        prompt_token_ids,
        sampling_params: SamplingParams | None = None,
        arrival_ns: int | None = None,
        seq_id: int | None = None,
    ):
        self.seq_id = next(_seq_ids) if seq_id is None else seq_id
        self.req_id = req_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling_params = sampling_params or SamplingParams()
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_tokens = len(self.prompt_token_ids)  # prompt + output; kept by append_token (hot path)
        self.num_cached_tokens = 0
        self.arrival_ns = perf_counter_ns() if arrival_ns is None else arrival_ns
        self.first_scheduled_ns: int | None = None  # end of the `queue` span
        self.first_token_ns: int | None = None
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.num_preemptions = 0

    def __repr__(self) -> str:
        return (
            f"Sequence(req={self.req_id!r}, seq_id={self.seq_id}, {self.status.name}, "
            f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, blocks={len(self.block_table)})"
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status in _FINISHED

    def num_blocks_needed(self, block_size: int) -> int:
        """Blocks that hold every token of the sequence."""
        return -(-self.num_tokens // block_size)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.num_tokens += 1

    def set_token(self, pos: int, token_id: int) -> None:
        """The token sampled for position `pos`: fills its placeholder, or appends it."""
        i = pos - len(self.prompt_token_ids)
        out = self.output_token_ids
        if i == len(out):
            self.append_token(token_id)
        elif 0 <= i < len(out) and out[i] == PLACEHOLDER:
            out[i] = token_id
        else:
            raise ValueError(f"{self!r}: no room for a token at position {pos}")

    def finish(self, status: SequenceStatus) -> None:
        """Finished: placeholders of tokens sampled after the last one are dropped."""
        out = self.output_token_ids
        while out and out[-1] == PLACEHOLDER:
            out.pop()
            self.num_tokens -= 1
        self.status = status
        self.finish_reason = status.value
