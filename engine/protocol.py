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
"""
from __future__ import annotations

from .ipc.shm import ArenaLayout, Field
from .sampling_params import SamplingParams

VERSION = 1


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
        raise ProtocolError(f"protocol version mismatch: peer speaks v{v}, this side speaks v{VERSION} "
                            "(master and agent must run the same engine version)")
    t = msg.get("type")
    if t == "error" and "error" not in expected:
        raise PeerError(str(msg.get("message", "?")))
    if t not in expected:
        raise ProtocolError(f"unexpected message {t!r}, expected {' or '.join(expected)}")
    return msg


def sampling_to_wire(sp: SamplingParams) -> list:
    """What the agent needs to sample a sequence's tokens: [temperature, top_p, top_k, seed (-1: none)]."""
    return [float(sp.temperature), float(sp.top_p), int(sp.top_k), -1 if sp.seed is None else int(sp.seed)]


def request_layout(max_num_seqs: int, max_batched_tokens: int, max_blocks_per_seq: int) -> ArenaLayout:
    """The step's input arrays (StepInput's names and dtypes), written by the master; rows past
    num_tokens / num_seqs are stale."""
    T, B, M = max_batched_tokens, max_num_seqs, max_blocks_per_seq
    return ArenaLayout([
        Field("input_ids", "int32", (T,)),
        Field("positions", "int32", (T,)),
        Field("slot_mapping", "int64", (T,)),
        Field("query_start_loc", "int32", (B + 1,)),
        Field("context_lens", "int32", (B,)),
        Field("block_tables", "int32", (B, M)),
        Field("seq_ids", "int64", (B,)),
    ])


def reply_layout(max_num_seqs: int) -> ArenaLayout:
    """The step's outputs, written by agent rank 0: one sampled token per sequence."""
    return ArenaLayout([
        Field("token_ids", "int32", (max_num_seqs,)),
        Field("logprobs", "float32", (max_num_seqs,)),
    ])
