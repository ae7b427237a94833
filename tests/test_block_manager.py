"""BlockManager: allocation, growth, freeing, invariants (property test) and slot mapping."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.block_manager import BlockManager, slot_mapping
from engine.sequence import Sequence


def seq_of(n: int) -> Sequence:
    return Sequence(f"r{n}", range(n))


def test_allocate_append_free():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = seq_of(5)  # 2 blocks
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 2 and bm.num_used_blocks == 2 and bm.num_free_blocks == 2
    assert bm.usage == 0.5
    for _ in range(3):  # tokens 6..8 fit in the second block
        seq.append_token(0)
        assert bm.can_append([seq])
        bm.append_slot(seq)
        assert len(seq.block_table) == 2
    seq.append_token(0)  # token 9 starts block 3
    bm.append_slot(seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 1
    bm.check_invariants([seq])
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 4
    bm.check_invariants([])
    bm.free(seq)  # a sequence without blocks: nothing to do
    assert bm.num_free_blocks == 4


def test_out_of_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    big = seq_of(9)
    assert not bm.can_allocate(big)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(big)
    a, b = seq_of(4), seq_of(4)
    bm.allocate(a)
    bm.allocate(b)
    a.append_token(1)
    b.append_token(1)
    assert not bm.can_append([a]) and not bm.can_append([a, b])
    with pytest.raises(RuntimeError, match="already holds blocks"):
        bm.allocate(a)


def test_check_invariants_catches_leaks_and_sharing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = seq_of(4), seq_of(4)
    bm.allocate(a)
    bm.allocate(b)
    with pytest.raises(AssertionError, match="1 blocks leaked"):
        bm.check_invariants([a])  # b is not live but still holds its block
    b.block_table = list(a.block_table)  # shared by accident
    with pytest.raises(AssertionError, match="does not own"):
        bm.check_invariants([a, b])
    b.block_table = []
    bm.free_blocks.append(bm.free_blocks[0])
    with pytest.raises(AssertionError, match="free list holds a block twice"):
        bm.check_invariants([a])


def test_freeing_someone_elses_block_is_refused():
    bm = BlockManager(num_blocks=2, block_size=4)
    a, b = seq_of(4), seq_of(4)
    bm.allocate(a)
    b.block_table = list(a.block_table)
    with pytest.raises(RuntimeError, match="held by seq"):
        bm.free(b)


@given(
    table=st.lists(st.integers(0, 50), min_size=1, max_size=8, unique=True),
    block_size=st.sampled_from([1, 8, 16]),
    data=st.data(),
)
@settings(max_examples=200, deadline=None)
def test_slot_mapping_matches_the_formula(table, block_size, data):
    capacity = len(table) * block_size
    start = data.draw(st.integers(0, capacity))
    n = data.draw(st.integers(0, capacity - start))
    expected = [table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
    assert slot_mapping(table, start, n, block_size) == expected


class BlockManagerMachine(RuleBasedStateMachine):
    """Random prefill / decode / preempt / finish: every block stays free or in one live table."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=4)
        self.live: list[Sequence] = []

    @rule(n=st.integers(1, 30))
    def prefill(self, n):
        seq = seq_of(n)
        if self.bm.can_allocate(seq):
            free = self.bm.num_free_blocks
            self.bm.allocate(seq)
            assert len(seq.block_table) == -(-n // 4) == free - self.bm.num_free_blocks
            seq.num_cached_tokens = n
            self.live.append(seq)
        else:
            assert seq.num_blocks_needed(4) > self.bm.num_free_blocks

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def decode(self, i):
        seq = self.live[i % len(self.live)]
        seq.append_token(7)
        if self.bm.can_append([seq]):
            self.bm.append_slot(seq)
            seq.num_cached_tokens = seq.num_tokens
        else:  # preempt: the sequence gives its blocks back
            self.bm.free(seq)
            self.live.remove(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def finish(self, i):
        seq = self.live.pop(i % len(self.live))
        self.bm.free(seq)
        assert seq.block_table == []

    @invariant()
    def blocks_accounted(self):
        self.bm.check_invariants(self.live)
        slots = [s for seq in self.live for s in slot_mapping(seq.block_table, 0, seq.num_cached_tokens, 4)]
        assert len(slots) == len(set(slots))  # no two cached tokens share a cache slot

    def teardown(self):
        for seq in self.live:
            self.bm.free(seq)
        self.bm.check_invariants([])
        assert self.bm.num_free_blocks == self.bm.num_blocks


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
