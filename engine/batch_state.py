"""The agent's view of the running batch, kept in step with the master's diffs.

A sequence's sampling parameters arrive once (in a step's `new`) and stay until the
master drops the sequence, so a step message names only what changed and the per-row
sampling arrays are rebuilt here from the sequence ids in the request arena.
"""

from __future__ import annotations

import numpy as np

from .protocol import ProtocolError


class BatchState:
    def __init__(self):
        # seq_id -> (temperature, top_p, top_k, seed, top_logprobs); seed -1 = unseeded
        self.params: dict[int, tuple[float, float, int, int, int]] = {}
        self.bans: dict[int, tuple[int, tuple[int, ...]]] = {}  # seq_id -> (ban_until position, token ids)

    def __len__(self) -> int:
        return len(self.params)

    def apply(self, new: list, drop: list) -> None:
        """new: [[seq_id, [temperature, top_p, top_k, seed, top_logprobs(, ban_until, [token ids])]], ...]
        (protocol.sampling_to_wire); drop: [seq_id, ...]."""
        for seq_id in drop:
            self.params.pop(seq_id, None)
            self.bans.pop(seq_id, None)
        for seq_id, (temperature, top_p, top_k, seed, top_logprobs, *ban) in new:
            self.params[seq_id] = (float(temperature), float(top_p), int(top_k), int(seed), int(top_logprobs))
            if ban:
                self.bans[seq_id] = (int(ban[0]), tuple(int(t) for t in ban[1]))

    def banned(self, seq_ids: np.ndarray, positions: np.ndarray) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """(row, token ids) that row may not sample: its sampled token's position (the
        sequence's length after the step) is before its min_tokens end."""
        if not self.bans:
            return ()
        return tuple(
            (row, ban[1])
            for row, (s, pos) in enumerate(zip(seq_ids.tolist(), positions.tolist()))
            if (ban := self.bans.get(s)) is not None and pos < ban[0]
        )

    def sampling_arrays(self, seq_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """(temperature f32, top_p f32, top_k i32, seed i64), one row per sequence of the step,
        and the most alternatives per token any of them asked for."""
        try:
            rows = [self.params[s] for s in seq_ids.tolist()]
        except KeyError as e:
            raise ProtocolError(
                f"step schedules sequence {e.args[0]}, whose sampling parameters were never sent"
            ) from None
        t, p, k, s, top = zip(*rows) if rows else ((), (), (), (), ())
        return (
            np.array(t, np.float32),
            np.array(p, np.float32),
            np.array(k, np.int32),
            np.array(s, np.int64),
            max(top, default=0),
        )
