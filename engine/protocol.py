"""Messages between the master and its agents, and the layout of the shared arenas.

Every message is a small msgpack map with "v" (protocol version) and "type". Bulk arrays
never travel in messages: the master writes them into the request arena, the agent its
sampled ids into the reply arena; a step message only says how many rows to read.

Handshake (per agent):   agent -> hello {rank, pid, token}   (token: from the spawning master)
                          master -> hello {config, arenas, world_size}   (or error)
                          agent -> ready {rank, num_blocks, vocab_size}  (after building its runner)
Each step:               master -> step {step, carrier, prefill, num_seqs, num_tokens, block_width,
                                          new, drop}
                          agent -> reply {step, carrier, n, timings}      (every rank, once done
                                   with the request arena; rank 0 writes the reply arena)
End:                     master -> shutdown; an agent that fails sends error {message}.

Steps carry a diff: a sequence's sampling parameters travel once, in `new`, the first time
it is scheduled; `drop` names sequences the agent can forget (finished or aborted).
Every rank gets the same step message, so tensor-parallel ranks keep identical state.

Up to two steps are in flight (async scheduling: step n+1 is sent before step n's reply),
so each arena holds SLOTS copies of its arrays and step n uses slot `n % SLOTS`: the master
rewrites a request slot only after the reply of the step that used it, and an agent
rewrites a reply slot only for a step sent after the master read it. An input token id of
-1 (engine.sequence.PLACEHOLDER) is the token the agent sampled for that sequence in the
step before.
"""

from __future__ import annotations

from .ipc.shm import ArenaLayout, Field
from .sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from .step_io import ARENA_ARRAYS, extent

VERSION = 2
SLOTS = 2  # steps in flight at most, one arena slot each


def slot(step: int) -> int:
    return step % SLOTS


class ProtocolError(Exception):
    """The peer sent something this side does not understand (version, type, fields)."""


class PeerError(Exception):
    """The peer reported a failure (an `error` message); the text is the peer's."""


def message(type_: str, **fields) -> dict:
    return {"v": VERSION, "type": type_, **fields}


def check(msg: dict, *expected: str) -> dict:
    """Return `msg` if it is one of the `expected` types of this protocol version.

    An `error` message from the peer is raised as PeerError, unless "error" is expected.
    """
    v = msg.get("v")
    if v != VERSION:
        raise ProtocolError(
            f"protocol version mismatch: peer speaks v{v}, this side speaks v{VERSION} "
            "(master and agent must run the same engine version)"
        )
    t = msg.get("type")
    if t == "error" and "error" not in expected:
        raise PeerError(str(msg.get("message", "?")))
    if t not in expected:
        raise ProtocolError(f"unexpected message {t!r}, expected {' or '.join(expected)}")
    return msg


def sampling_to_wire(sp: SamplingParams, num_prompt_tokens: int = 0, eos_token_id: int | None = None) -> list:
    """What the agent needs to sample a sequence's tokens: [temperature, top_p, top_k, seed
    (-1: none), top_logprobs], and with min_tokens [.., ban_until, [token ids]]: those tokens
    (EOS and the stop tokens) cannot be sampled at positions before ban_until."""
    wire = [
        float(sp.temperature),
        float(sp.top_p),
        int(sp.top_k),
        -1 if sp.seed is None else int(sp.seed),
        int(sp.top_logprobs),
    ]
    banned = ([] if eos_token_id is None else [int(eos_token_id)]) + [int(t) for t in sp.stop_token_ids]
    if sp.min_tokens and banned:
        wire += [num_prompt_tokens + sp.min_tokens, banned]
    return wire


def request_layout(max_num_seqs: int, max_batched_tokens: int, max_blocks_per_seq: int) -> ArenaLayout:
    """The step's input arrays (step_io.ARENA_ARRAYS, after the slot index), written by the
    master; rows past num_tokens / num_seqs are stale."""
    return ArenaLayout(
        [
            Field(name, dtype, (SLOTS, *extent(kind, max_num_seqs, max_batched_tokens, max_blocks_per_seq)))
            for name, dtype, kind in ARENA_ARRAYS
        ]
    )


def reply_layout(max_num_seqs: int) -> ArenaLayout:
    """The step's outputs (after the slot index), written by agent rank 0: one sampled token
    per sequence, its logprob, and the step's most likely tokens with theirs (the first
    `top` columns, `top` in the reply message: the most any sequence of the step asked for)."""
    return ArenaLayout(
        [
            Field("token_ids", "int32", (SLOTS, max_num_seqs)),
            Field("logprobs", "float32", (SLOTS, max_num_seqs)),
            Field("top_ids", "int32", (SLOTS, max_num_seqs, MAX_TOP_LOGPROBS)),
            Field("top_logprobs", "float32", (SLOTS, max_num_seqs, MAX_TOP_LOGPROBS)),
        ]
    )


def slot_views(arena, step: int) -> dict:
    """Step `step`'s slot of every array of `arena` (an ShmArena)."""
    i = slot(step)
    return {name: a[i] for name, a in arena.arrays.items()}


def step_arrays(arena, step: int, num_seqs: int, num_tokens: int, block_width: int) -> dict:
    """Step `step`'s input arrays in the request arena, cut to its sequences, tokens and
    block-table width: what the master fills and StepInput's arrays on the agent."""
    views = slot_views(arena, step)
    return {
        name: views[name][tuple(slice(0, n) for n in extent(kind, num_seqs, num_tokens, block_width))]
        for name, _, kind in ARENA_ARRAYS
    }
