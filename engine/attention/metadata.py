"""Per-step attention metadata shared by every attention backend."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and which cached tokens each query attends to.

    Tokens of all sequences are flattened into one batch of T rows (sequence b owns rows
    query_start_loc[b]:query_start_loc[b+1]); the query of a sequence covers its last
    q_len tokens, so query i sits at position context_lens[b] - q_len + i and sees every
    cached token up to and including itself.

    is_prefill       False promises exactly one new token per sequence (backends may take a
                     decode fast path); True allows any query lengths, mixed batches included.
    slot_mapping     [T] int64   flat cache slot (block * block_size + offset) per new token
    block_tables     [B, M] int32 physical blocks of each sequence, in order. Entries past a
                     sequence's last block are ignored; they must be valid block ids (the
                     runner pads with 0, so gathers stay in bounds).
    context_lens     [B] int32   tokens in the cache after this step (prefix + new)
    query_start_loc  [B+1] int32 row offsets of each sequence's new tokens
    max_query_len / max_context_len are host ints so backends size buffers without a sync.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_context_len: int
    # Derived tensors a backend computes once per step and reuses in every layer.
    scratch: dict = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]
