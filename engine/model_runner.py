"""ModelRunner: the model side of one engine step (StepInput -> StepOutput).

Owns the model, its paged KV cache and the sampler. `launch` queues a step's device work
and returns a `PendingOutput`; its `result()` waits for the sampled ids. Step n+1 can be
launched before step n is read (async scheduling): its placeholder input ids are step n's
samples, gathered on the device. Spans (docs/architecture.md): preprocess, forward,
sampling at launch, sync.wait in result(); the host waits for the device only there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import llmtrace

from .attention import AttentionMetadata
from .cuda_graphs import DecodeGraphRunner
from .models.llama import KVCache, LlamaForCausalLM
from .models.loader import load_model
from .models.tensor_parallel import TPGroup, local_kv_heads, shard
from .sampler import Sampler, SamplingTensors
from .step_io import StepInput, StepOutput

CPU_KV_CACHE_BYTES = 256 << 20  # default KV budget on CPU, where memory is not measured
PIPELINE_DEPTH = 2  # launched steps whose results are not read yet, at most (async scheduling)


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    last_token_indices: torch.Tensor  # row of each sequence's last new token: the one sampled
    sampling: SamplingTensors


def prepare_inputs(step: StepInput, device: torch.device) -> ModelInputs:
    """numpy step arrays -> device tensors (the only host->device copies of a step)."""

    def dev(a: np.ndarray, dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(device, non_blocking=True)

    qsl = step.query_start_loc
    meta = AttentionMetadata(
        is_prefill=step.is_prefill,
        slot_mapping=dev(step.slot_mapping, np.int64),
        block_tables=dev(np.maximum(step.block_tables, 0), np.int32),
        context_lens=dev(step.context_lens, np.int32),
        query_start_loc=dev(qsl, np.int32),
        max_query_len=int((qsl[1:] - qsl[:-1]).max()),
        max_context_len=int(step.context_lens.max()),
    )
    return ModelInputs(
        dev(step.input_ids, np.int64),
        dev(step.positions, np.int64),
        meta,
        dev(qsl[1:] - 1, np.int64),
        sampling_tensors(step, device),
    )


def sampling_tensors(step: StepInput, device: torch.device) -> SamplingTensors:
    return SamplingTensors.from_numpy(
        step.temperature,
        step.top_p,
        step.top_k,
        step.seed,
        positions=step.context_lens,
        device=device,
        banned=step.banned,
        top_logprobs=step.top_logprobs,
    )


def kv_block_bytes(model: LlamaForCausalLM, block_size: int) -> int:
    c = model.config
    elem = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * block_size * local_kv_heads(model) * c.head_dim * elem


class ModelRunner:
    """model_cfg: see `models.loader.load_model`. The KV cache holds `num_blocks` blocks when
    given, else as many as fit in `kv_cache_memory` bytes, else (CUDA) in
    `gpu_memory_utilization` of the memory free after loading, else (CPU) 256 MiB.
    With `cuda_graphs` on a CUDA device, decode steps of up to `max_num_seqs` sequences
    replay CUDA graphs captured for contexts up to `max_model_len` (engine.cuda_graphs).
    With `tp` (a tensor-parallel group) the model and the KV cache hold this rank's heads
    only. The deliberate mistakes live in a subclass (mistaken_runner.py) that overrides
    the hooks `_before_inputs` and `_sample`; this class is the clean path only."""

    device_timed = True  # forward/sampling carry CUDA-event device time

    def __init__(
        self,
        model_cfg,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float = 0.9,
        cuda_graphs: bool = False,
        max_num_seqs: int = 32,
        max_model_len: int = 2048,
        tp: TPGroup | None = None,
    ):
        self.model, _ = load_model(model_cfg)
        if tp is not None and tp.world > 1:
            shard(self.model, tp)
        self.device = next(self.model.parameters()).device
        self.block_size = block_size
        self.num_blocks = num_blocks or self._blocks_that_fit(kv_cache_memory, gpu_memory_utilization)
        self.kv_caches = self._allocate_kv_cache()
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphRunner(
                self.model,
                self.kv_caches,
                max_num_seqs=max_num_seqs,
                max_model_len=max_model_len,
                block_size=block_size,
            )
        self._host_out = [{} for _ in range(PIPELINE_DEPTH)]  # pinned reply buffers, one per output
        self._launches = 0
        self._unread = 0  # launched steps whose result() has not run
        self._last_ids: tuple[np.ndarray, torch.Tensor] | None = None  # (seq ids, sampled ids) of the last launch
        self.sampler = Sampler(self.device, seed=model_cfg.seed)

    def _blocks_that_fit(self, kv_cache_memory: int | None, gpu_memory_utilization: float) -> int:
        if kv_cache_memory is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_cache_memory = int(free * gpu_memory_utilization)
            else:
                kv_cache_memory = CPU_KV_CACHE_BYTES
        blocks = kv_cache_memory // kv_block_bytes(self.model, self.block_size)
        if blocks < 1:
            raise ValueError(f"KV cache budget of {kv_cache_memory} bytes holds no block of {self.block_size} tokens")
        return int(blocks)

    def _allocate_kv_cache(self) -> list[KVCache]:
        c = self.model.config
        dtype = next(self.model.parameters()).dtype
        shape = (self.num_blocks, self.block_size, local_kv_heads(self.model), c.head_dim)

        def zeros():
            return torch.zeros(shape, dtype=dtype, device=self.device)

        return [(zeros(), zeros()) for _ in range(c.num_hidden_layers)]

    def execute(self, step: StepInput) -> StepOutput:
        """Run one step to completion."""
        return self.launch(step).result()

    @torch.inference_mode()
    def launch(self, step: StepInput) -> PendingOutput:
        """Queue the step's device work and return at once (CPU: run it). At most
        PIPELINE_DEPTH launched steps may be unread; step n+1 may be launched before step
        n's result is read, its placeholder input ids then come from step n's samples."""
        n = step.step
        if self._unread >= PIPELINE_DEPTH:
            raise RuntimeError(f"{PIPELINE_DEPTH} launched steps are unread; read one before launching step {n}")
        with llmtrace.span("preprocess", step=n, seqs=step.num_seqs, tokens=step.num_tokens):
            step = self._before_inputs(step)
            graphed = self.graphs is not None and self.graphs.can_run(step)
            if graphed:
                bucket = self.graphs.stage(step)
                input_ids = self.graphs.inputs.dev["input_ids"]
                sampling = sampling_tensors(step, self.device)
            else:
                inp = prepare_inputs(step, self.device)
                input_ids, sampling = inp.input_ids, inp.sampling
            self._fill_placeholders(step, input_ids)
        with llmtrace.span("forward", step=n, device=self.device_timed, graph=graphed):
            if graphed:
                logits = self.graphs.replay(bucket, step.num_seqs)
            else:
                hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta)
                logits = self.model.compute_logits(hidden, inp.last_token_indices)
        return self._sample(step, logits, sampling)

    def _before_inputs(self, step: StepInput) -> StepInput:
        """Hook: the step as the inputs are built from it (the mistaken runner's input-side mistakes)."""
        return step

    def _sample(self, step: StepInput, logits: torch.Tensor, sampling: SamplingTensors) -> PendingOutput:
        """Sample on the device and start the copy of ids and logprobs (and the alternatives
        asked for) to the host."""
        # d2h_bytes: what this stage copies to the host, for the analyzer.
        d2h = 8 * step.num_seqs * (1 + step.top_logprobs)
        with llmtrace.span("sampling", step=step.step, device=True, seqs=step.num_seqs, d2h_bytes=d2h):
            got = self.sampler(logits, sampling)
            host = self._copy_to_host(
                got.ids.to(torch.int32), got.logprobs, got.top_ids.to(torch.int32), got.top_logprobs
            )
        return self._pending(step, got.ids, *host)

    def _pending(
        self, step: StepInput, ids: torch.Tensor, *host: torch.Tensor, output: StepOutput | None = None
    ) -> PendingOutput:
        """The step's handle; its sampled ids (on the device) stay for the next step's placeholders."""
        self._last_ids = (step.seq_ids.copy(), ids)
        return PendingOutput(self, step.step, *host, output=output)

    def _fill_placeholders(self, step: StepInput, input_ids: torch.Tensor) -> None:
        """Input ids the master wrote as PLACEHOLDER are the tokens the previous launched step
        sampled for the same sequences: gather them on the device, no host round trip."""
        rows = np.flatnonzero(step.input_ids[: step.num_tokens] < 0)
        if not rows.size:
            return
        seq_rows = np.searchsorted(step.query_start_loc, rows, side="right") - 1
        prev_seq_ids, prev_ids = self._last_ids if self._last_ids is not None else (np.empty(0, np.int64), None)
        where = {int(s): i for i, s in enumerate(prev_seq_ids)}
        try:
            src = [where[int(s)] for s in step.seq_ids[seq_rows]]
        except KeyError as e:
            raise ValueError(
                f"step {step.step}: a placeholder input for sequence {e.args[0]}, which the step before did not sample"
            ) from None
        dst = torch.from_numpy(rows.astype(np.int64)).to(self.device, non_blocking=True)
        src_t = torch.tensor(src, dtype=torch.int64).to(self.device, non_blocking=True)
        input_ids.index_copy_(0, dst, prev_ids.index_select(0, src_t).to(input_ids.dtype))

    def _copy_to_host(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Start async copies into pinned host memory (CUDA); on CPU the tensors already are host memory.

        Pinned buffers come from a ring of PIPELINE_DEPTH sets: a set is rewritten two
        launches later, when the step that used it has been read."""
        if self.device.type != "cuda":
            return list(tensors)
        ring = self._host_out[self._launches % PIPELINE_DEPTH]
        self._launches += 1
        out = []
        for i, t in enumerate(tensors):  # one buffer per output (ids and top ids share a dtype)
            buf = ring.get(i)
            if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype:
                buf = ring[i] = torch.empty(max(t.numel(), 256), dtype=t.dtype, pin_memory=True)
            out.append(buf[: t.numel()].view(t.shape).copy_(t, non_blocking=True))
        return out


class PendingOutput:
    """A launched step's result: `done()` asks the device without blocking, `result()` waits
    for it (the `sync.wait` span, the step's only wait) and returns the StepOutput."""

    def __init__(self, runner: ModelRunner, step: int, *host: torch.Tensor, output: StepOutput | None = None):
        """host: the step's ids, logprobs, top ids and top logprobs being copied to the host."""
        self.runner, self.step, self.host, self.output = runner, step, host, output
        self.event = None
        if output is None and runner.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()
        runner._unread += 1

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def result(self) -> StepOutput:
        """The step's output; the first call waits for the device."""
        if self.runner is None:
            return self.output
        if self.output is None:
            with llmtrace.span("sync.wait", step=self.step):
                if self.event is not None:
                    self.event.synchronize()
                # Copies: the pinned buffers are rewritten two launches later.
                self.output = StepOutput(*(t.numpy().copy() for t in self.host))
            self.host = ()
        self.runner._unread -= 1
        self.runner = None
        return self.output
