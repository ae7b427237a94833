"""The paged KV cache's bookkeeping: which fixed-size block holds which sequence's tokens.

Token `pos` of a sequence lives in cache slot
`block_table[pos // block_size] * block_size + pos % block_size`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from .sequence import Sequence

FREE = -1


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"BlockManager needs num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        # The seq_id holding each block (FREE if none): lets check_invariants find leaks.
        self._owner = [FREE] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def _missing(self, seq: Sequence, extra: int = 0) -> int:
        """Blocks the sequence lacks to hold its tokens plus `extra` more."""
        return -(-(seq.num_tokens + extra) // self.block_size) - len(seq.block_table)

    def can_allocate(self, seq: Sequence) -> bool:
        return self._missing(seq) <= len(self.free_blocks)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every current token of a sequence that holds none (prefill)."""
        if seq.block_table:
            raise RuntimeError(f"{seq!r} already holds blocks")
        self._grow(seq)

    def can_append(self, seqs: Iterable[Sequence], ahead: frozenset[int] = frozenset()) -> bool:
        """Whether the next decode step of `seqs` finds the new blocks it needs; sequences
        whose seq_id is in `ahead` will hold one more token (being sampled) by then."""
        need = 0
        for seq in seqs:
            need += self._missing(seq, seq.seq_id in ahead)
        return need <= len(self.free_blocks)

    def append_slot(self, seq: Sequence) -> None:
        """Make room for the sequence's last token: a new block when that token starts one."""
        self._grow(seq)

    def _grow(self, seq: Sequence) -> None:
        n = self._missing(seq)
        if n > len(self.free_blocks):
            raise RuntimeError(f"out of KV blocks: {seq!r} needs {n}, {len(self.free_blocks)} free")
        for _ in range(n):
            block = self.free_blocks.popleft()
            self._owner[block] = seq.seq_id
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Return the sequence's blocks; a sequence holding none is left as is."""
        for block in seq.block_table:
            if self._owner[block] != seq.seq_id:
                raise RuntimeError(f"{seq!r} frees block {block}, held by seq {self._owner[block]}")
            self._owner[block] = FREE
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []

    def check_invariants(self, live_seqs: Iterable[Sequence]) -> None:
        """Raise AssertionError unless every block is either free or in exactly one live
        sequence's table, and each table fits its sequence (no leaks, no accidental sharing)."""
        free = self.free_blocks
        if len(set(free)) != len(free):
            raise AssertionError("free list holds a block twice")
        if any(self._owner[b] != FREE for b in free):
            raise AssertionError("a block is both free and owned by a sequence")
        held = 0
        for seq in live_seqs:
            for block in seq.block_table:
                if not 0 <= block < self.num_blocks or self._owner[block] != seq.seq_id:
                    raise AssertionError(f"{seq!r} lists block {block}, which it does not own")
            if len(set(seq.block_table)) != len(seq.block_table):
                raise AssertionError(f"{seq!r} lists a block twice")
            if len(seq.block_table) > seq.num_blocks_needed(self.block_size):
                raise AssertionError(f"{seq!r} holds more blocks than its tokens need")
            if len(seq.block_table) * self.block_size < seq.num_cached_tokens:
                raise AssertionError(f"{seq!r} has cached tokens outside its blocks")
            held += len(seq.block_table)
        if held + len(free) != self.num_blocks:
            raise AssertionError(
                f"{self.num_blocks - len(free) - held} blocks leaked (owned by no live sequence and not free)"
            )


def slot_mapping(block_table: list[int], start_pos: int, num_tokens: int, block_size: int) -> list[int]:
    """Cache slots of the tokens at positions [start_pos, start_pos + num_tokens)."""
    slots: list[int] = []
    pos, end = start_pos, start_pos + num_tokens
    while pos < end:
        index, offset = divmod(pos, block_size)
        n = min(block_size - offset, end - pos)
        base = block_table[index] * block_size + offset
        slots.extend(range(base, base + n))
        pos += n
    return slots
