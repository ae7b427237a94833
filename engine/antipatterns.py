"""Faithful versions of the mistakes that cost real serving stacks their per-token time.

`antipatterns:` in the run config switches them on inside the engine so a user sees the
diagnosis and the fix. They are written the way they appear in the wild, and they do
not announce themselves: the analyzer finds them from stage times, function-level data
(stack samples, viztracer, py-spy) and what the engine honestly records (d2h_bytes).
"""

from __future__ import annotations

import logging
import sys

import numpy as np

from .step_io import StepInput

log = logging.getLogger("engine.agent")


def log_step_arrays(step: StepInput) -> None:
    """logging.debug with an f-string: the arrays are formatted even though DEBUG is off."""
    full = sys.maxsize
    log.debug(
        f"step {step.step} prefill={step.is_prefill} "
        f"input_ids={np.array2string(step.input_ids, threshold=full)} "
        f"positions={np.array2string(step.positions, threshold=full)} "
        f"slot_mapping={np.array2string(step.slot_mapping, threshold=full)} "
        f"block_tables={np.array2string(step.block_tables, threshold=full)}"
    )


def pad_by_concatenate(step: StepInput, block_size: int) -> StepInput:
    """Rebuild the step's arrays sequence by sequence with repeated np.concatenate, padding
    each block-table row by concatenation, instead of using the preallocated arena views."""
    qsl = step.query_start_loc
    input_ids = np.zeros(0, np.int32)
    positions = np.zeros(0, np.int32)
    slots = np.zeros(0, np.int64)
    width = step.block_tables.shape[1]
    tables = np.zeros((0, width), np.int32)
    for i in range(step.num_seqs):
        lo, hi = qsl[i], qsl[i + 1]
        for t in range(lo, hi):  # token by token, as the padded-batch code did
            input_ids = np.concatenate([input_ids, step.input_ids[t : t + 1]])
            positions = np.concatenate([positions, step.positions[t : t + 1]])
            slots = np.concatenate([slots, step.slot_mapping[t : t + 1]])
        row = step.block_tables[i, : -(-int(step.context_lens[i]) // block_size)]
        while len(row) < width:  # pad one entry at a time
            row = np.concatenate([row, np.array([-1], np.int32)])
        tables = np.concatenate([tables, row[None, :]])
    return StepInput(
        step.step,
        step.is_prefill,
        step.seq_ids,
        input_ids,
        positions,
        qsl,
        step.context_lens,
        tables,
        slots,
        step.temperature,
        step.top_p,
        step.top_k,
        step.seed,
    )


def host_sample(
    logits_host: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sampling in numpy over the full [B, V] logits copied to the host."""
    ids = np.empty(len(logits_host), np.int32)
    logprobs = np.empty(len(logits_host), np.float32)
    for i, row in enumerate(logits_host):
        lse = np.log(np.sum(np.exp(row - row.max()))) + row.max()
        if temperature[i] <= 0:
            ids[i] = int(np.argmax(row))
        else:
            order = np.argsort(-row)  # a full sort of the vocabulary per row
            if top_k[i] > 0:
                order = order[: top_k[i]]
            p = np.exp((row[order] - row[order[0]]) / temperature[i])
            p /= p.sum()
            if top_p[i] < 1:
                keep = np.searchsorted(np.cumsum(p), top_p[i]) + 1
                order, p = order[:keep], p[:keep] / p[:keep].sum()
            ids[i] = int(order[rng.choice(len(order), p=p)])
        logprobs[i] = row[ids[i]] - lse
    return ids, logprobs


class GarbageChurn:
    """Per-step request bookkeeping built as cyclic object graphs and dropped a step later:
    only the cycle collector can free them, so collections land inside steps."""

    def __init__(self, objects_per_token: int = 64):
        self.objects_per_token = objects_per_token
        self._previous: list = []

    def step(self, num_tokens: int) -> None:
        events = []
        for i in range(num_tokens * self.objects_per_token):
            node = {"i": i, "children": []}
            node["parent"] = node  # a reference cycle
            events.append(node)
        self._previous = events
