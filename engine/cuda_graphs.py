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
    into the host twins and starts non-blocking copies of the first `bucket` rows.
    The host twins are rewritten only after the runner waited for the previous step.
    """

    def __init__(self, max_batch: int, max_blocks: int, device: torch.device):
        pin = device.type == "cuda"
        self.host = {name: torch.zeros(shape, dtype=dtype, pin_memory=pin) for name, shape, dtype in (
            ("input_ids", (max_batch,), torch.int64), ("positions", (max_batch,), torch.int64),
            ("slot_mapping", (max_batch,), torch.int64), ("context_lens", (max_batch,), torch.int32),
            ("block_tables", (max_batch, max_blocks), torch.int32))}
        self.np = {name: t.numpy() for name, t in self.host.items()}
        self.dev = {name: t.to(device) for name, t in self.host.items()}
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.last_token_indices = torch.arange(max_batch, dtype=torch.int64, device=device)
        self.max_blocks = max_blocks

    def stage(self, step: StepInput, bucket: int) -> None:
        b, a = step.num_seqs, self.np
        width = step.block_tables.shape[1]
        if width > self.max_blocks:
            raise ValueError(f"decode step needs {width} blocks per sequence; graphs were captured for {self.max_blocks}")
        a["input_ids"][:b] = step.input_ids
        a["positions"][:b] = step.positions
        a["slot_mapping"][:b] = step.slot_mapping
        a["context_lens"][:b] = step.context_lens
        np.maximum(step.block_tables, 0, out=a["block_tables"][:b, :width])
        # Padding rows: store nothing, attend to nothing. Stale block ids past a row's
        # blocks are never read and are valid ids anyway.
        a["slot_mapping"][b:bucket] = -1
        a["context_lens"][b:bucket] = 0
        for name, host in self.host.items():
            self.dev[name][:bucket].copy_(host[:bucket], non_blocking=True)

    def metadata(self, bucket: int, max_context_len: int) -> AttentionMetadata:
        d = self.dev
        return AttentionMetadata(
            is_prefill=False, slot_mapping=d["slot_mapping"][:bucket], block_tables=d["block_tables"][:bucket],
            context_lens=d["context_lens"][:bucket], query_start_loc=self.query_start_loc[:bucket + 1],
            max_query_len=1, max_context_len=max_context_len)


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
        self.inputs.np["slot_mapping"][:] = -1  # capture and warm-up on padding rows: no KV written
        self.inputs.np["context_lens"][:] = 0
        for bucket in reversed(self.sizes):
            for name, host in self.inputs.host.items():
                self.inputs.dev[name][:bucket].copy_(host[:bucket])
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
