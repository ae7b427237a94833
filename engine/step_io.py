"""What the master sends the model side each step, and what comes back (numpy only)."""
from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class StepOutput:
    token_ids: np.ndarray  # [B] int32, one sampled token per sequence
    logprobs: np.ndarray  # [B] float32, the model's logprob of that token
