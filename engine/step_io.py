"""What the master sends the model side each step, and what comes back (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


@dataclass
class StepInput:
    """One engine step's batch: B sequences, T new tokens in total (flattened in seq order).

    block_tables rows are padded past each sequence's blocks with any value (-1 or 0);
    those entries are never read. seed -1 means unseeded; temperature 0 means greedy;
    top_k <= 0 and top_p 1 are off. is_prefill must be True when any sequence has more
    than one new token (see AttentionMetadata.is_prefill). Every sequence gets a token
    sampled after its last new token; for a partial (chunked) prefill it is meaningless.
    """

    step: int
    is_prefill: bool
    seq_ids: np.ndarray  # [B] int64
    input_ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    query_start_loc: np.ndarray  # [B+1] int32
    context_lens: np.ndarray  # [B] int32, tokens in the cache after this step
    block_tables: np.ndarray  # [B, max_blocks] int32
    slot_mapping: np.ndarray  # [T] int64, block * block_size + offset
    temperature: np.ndarray  # [B] float32
    top_p: np.ndarray  # [B] float32
    top_k: np.ndarray  # [B] int32
    seed: np.ndarray  # [B] int64
    banned: tuple = ()  # ((row, token ids), ...): tokens a row may not sample yet (min_tokens)
    top_logprobs: int = 0  # alternatives per token to return (the most any sequence asked for)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


# StepInput's arrays that travel through the request arena, once: (name, dtype, extent);
# extent "T": one per new token, "B": per sequence, "B+1": sequence starts, "B,M": a row
# of block ids per sequence. protocol.request_layout and step_arrays are built from it.
ARENA_ARRAYS = (
    ("input_ids", "int32", "T"),
    ("positions", "int32", "T"),
    ("slot_mapping", "int64", "T"),
    ("query_start_loc", "int32", "B+1"),
    ("context_lens", "int32", "B"),
    ("block_tables", "int32", "B,M"),
    ("seq_ids", "int64", "B"),
)


def extent(kind: str, B: int, T: int, M: int) -> tuple[int, ...]:
    """The shape of an ARENA_ARRAYS entry for B sequences, T tokens, M blocks per sequence."""
    return {"T": (T,), "B": (B,), "B+1": (B + 1,), "B,M": (B, M)}[kind]


class SampledRows(NamedTuple):
    """A step's sampling as the master reads it from the reply slot, one row per sequence."""

    token_ids: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None  # the step's most likely tokens with theirs, when asked for


@dataclass
class StepOutput:
    token_ids: np.ndarray  # [B] int32, one sampled token per sequence
    logprobs: np.ndarray  # [B] float32, the model's logprob of that token
    top_ids: np.ndarray  # [B, K] int32, the K most likely tokens (K: StepInput.top_logprobs)
    top_logprobs: np.ndarray  # [B, K] float32, their logprobs
