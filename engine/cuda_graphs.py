"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with static buffers.

A decode step is ~10 launches per layer on small tensors, so eager decode at small
batches is bound by the host launching kernels, not by the GPU. A graph replays the
whole forward (embedding .. logits) in one launch. Each bucket's graph reads its inputs
from static device buffers that the step's arrays are copied into (through pinned
staging buffers, non-blocking); rows past the real batch are padding that the attention
kernels skip (slot -1: nothing stored; context length 0: zero output). Every capture
uses `max_model_len` as max_context_len, because the Triton decode grid is sized from
it. Sampling runs on the device right after the replay (engine.sampler), eagerly: its
per-request generators cannot live inside a graph. Prefill stays eager.
"""

from __future__ import annotations

import numpy as np
import torch

from .attention import AttentionMetadata
from .step_io import StepInput

SMALL_BUCKETS = (1, 2, 4, 8)
BUCKET_STRIDE = 8  # buckets above 8 go 16, 24, 32, ...
STAGING_SETS = 2  # host twins in turn: one per step in flight


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every multiple of 8, up to max_num_seqs (included)."""
    sizes = [b for b in SMALL_BUCKETS if b < max_num_seqs]
    sizes += range(2 * BUCKET_STRIDE, max_num_seqs, BUCKET_STRIDE)
    return sorted(set(sizes) | {max_num_seqs})


def bucket_for(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest captured batch size that holds num_seqs (None: too many, run eagerly)."""
    return next((b for b in sizes if b >= num_seqs), None)


class StagedInputs:
    """The decode inputs a graph reads: static device buffers plus pinned host twins.

    `stage(step, bucket)` writes the step's rows (and harmless padding up to `bucket`)
    into a set of host twins and starts non-blocking copies of the first `bucket` rows.
    There are STAGING_SETS sets, taken in turn: a step can be staged while the one before
    still runs (async scheduling), and a set is rewritten only after the step that used it
    two launches earlier was waited for (ModelRunner.PIPELINE_DEPTH).
    """

    def __init__(self, max_batch: int, max_blocks: int, device: torch.device):
        pin = device.type == "cuda"
        shapes = (
            ("input_ids", (max_batch,), torch.int64),
            ("positions", (max_batch,), torch.int64),
            ("slot_mapping", (max_batch,), torch.int64),
            ("context_lens", (max_batch,), torch.int32),
            ("block_tables", (max_batch, max_blocks), torch.int32),
        )
        self.hosts = [
            {name: torch.zeros(shape, dtype=dtype, pin_memory=pin) for name, shape, dtype in shapes}
            for _ in range(STAGING_SETS)
        ]
        self._np = [{name: t.numpy() for name, t in host.items()} for host in self.hosts]
        self.dev = {name: torch.zeros(shape, dtype=dtype, device=device) for name, shape, dtype in shapes}
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.last_token_indices = torch.arange(max_batch, dtype=torch.int64, device=device)
        self.max_blocks = max_blocks
        self._turn = 0

    def stage(self, step: StepInput, bucket: int) -> None:
        b = step.num_seqs
        width = step.block_tables.shape[1]
        if width > self.max_blocks:
            raise ValueError(
                f"decode step needs {width} blocks per sequence; graphs were captured for {self.max_blocks}"
            )
        host, a = self.hosts[self._turn], self._np[self._turn]
        self._turn = (self._turn + 1) % STAGING_SETS
        a["input_ids"][:b] = step.input_ids
        a["positions"][:b] = step.positions
        a["slot_mapping"][:b] = step.slot_mapping
        a["context_lens"][:b] = step.context_lens
        np.maximum(step.block_tables, 0, out=a["block_tables"][:b, :width])
        # Padding rows: token 0 at position 0 (a stale placeholder id would index the
        # embedding out of bounds), store nothing, attend to nothing. Stale block ids past
        # a row's blocks are never read and are valid ids anyway.
        a["input_ids"][b:bucket] = 0
        a["positions"][b:bucket] = 0
        a["slot_mapping"][b:bucket] = -1
        a["context_lens"][b:bucket] = 0
        self.copy_in(host, bucket)

    def copy_in(self, host: dict[str, torch.Tensor], bucket: int) -> None:
        for name, t in host.items():
            self.dev[name][:bucket].copy_(t[:bucket], non_blocking=True)

    def metadata(self, bucket: int, max_context_len: int) -> AttentionMetadata:
        d = self.dev
        return AttentionMetadata(
            is_prefill=False,
            slot_mapping=d["slot_mapping"][:bucket],
            block_tables=d["block_tables"][:bucket],
            context_lens=d["context_lens"][:bucket],
            query_start_loc=self.query_start_loc[: bucket + 1],
            max_query_len=1,
            max_context_len=max_context_len,
        )


class DecodeGraphRunner:
    """Captures `model` decode (forward + logits) per bucket over `kv_caches`; `run` replays one."""

    def __init__(self, model, kv_caches, *, max_num_seqs: int, max_model_len: int, block_size: int):
        self.model, self.kv_caches = model, kv_caches
        self.device = next(model.parameters()).device
        self.max_model_len = max_model_len
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.inputs = StagedInputs(self.sizes[-1], -(-max_model_len // block_size), self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture_all()

    def can_run(self, step: StepInput) -> bool:
        return not step.is_prefill and bucket_for(step.num_seqs, self.sizes) is not None

    def stage(self, step: StepInput) -> int:
        """Copy the step into the static inputs; returns the bucket to replay."""
        bucket = bucket_for(step.num_seqs, self.sizes)
        self.inputs.stage(step, bucket)
        return bucket

    def replay(self, bucket: int, num_seqs: int) -> torch.Tensor:
        """Logits [num_seqs, vocab] of the staged step (a view of the graph's output)."""
        self.graphs[bucket].replay()
        return self.logits[bucket][:num_seqs]

    @torch.inference_mode()
    def _capture_all(self) -> None:
        # Largest first: the smaller graphs reuse its pool's blocks.
        pool = torch.cuda.graph_pool_handle()
        padding = self.inputs.hosts[0]
        padding["slot_mapping"].fill_(-1)  # capture and warm-up on padding rows: no KV written
        padding["context_lens"].fill_(0)
        for bucket in reversed(self.sizes):
            self.inputs.copy_in(padding, bucket)
            self._forward(bucket)  # compiles the Triton kernels for this shape outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bucket] = self._forward(bucket)
            self.graphs[bucket] = graph
        torch.cuda.synchronize(self.device)

    def _forward(self, bucket: int) -> torch.Tensor:
        inp = self.inputs
        meta = inp.metadata(bucket, self.max_model_len)
        hidden = self.model(inp.dev["input_ids"][:bucket], inp.dev["positions"][:bucket], self.kv_caches, meta)
        return self.model.compute_logits(hidden, inp.last_token_indices[:bucket])
