"""The model runner with the deliberate mistakes of `cfg.antipatterns` (engine/antipatterns.py
holds the mistakes themselves): overrides of ModelRunner's hooks, so the clean runner has
no branch for them. `make_runner` picks the class at the agent's handshake."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import torch

import llmtrace

from . import antipatterns as mistakes
from .model_runner import ModelRunner, PendingOutput
from .sampler import SamplingTensors
from .step_io import StepInput, StepOutput


class MistakenModelRunner(ModelRunner):
    def __init__(self, model_cfg, *, antipatterns, **kw):
        super().__init__(model_cfg, **kw)
        self.antipatterns = antipatterns
        self.device_timed = not antipatterns.host_timed_forward
        self._churn = mistakes.GarbageChurn()
        self._host_rng = np.random.default_rng(model_cfg.seed)

    def _before_inputs(self, step: StepInput) -> StepInput:
        ap = self.antipatterns
        if ap.log_arrays:
            mistakes.log_step_arrays(step)
        if ap.concat_padding:
            step = mistakes.pad_by_concatenate(step, self.block_size)
        if ap.gc_churn:
            self._churn.step(step.num_tokens)
        return step

    def _sample(self, step: StepInput, logits: torch.Tensor, sampling: SamplingTensors) -> PendingOutput:
        if self.antipatterns.host_sampling:
            out = self._sample_on_host(step, logits)
            return self._pending(step, torch.from_numpy(out.token_ids).to(self.device), output=out)
        if self.device_timed:
            return super()._sample(step, logits, sampling)
        # host_timed_forward: no sync span; the blocking copy waits for forward inside sampling
        with llmtrace.span(
            "sampling", step=step.step, seqs=step.num_seqs, d2h_bytes=8 * step.num_seqs * (1 + step.top_logprobs)
        ):
            got = self.sampler(logits, sampling)
            out = StepOutput(
                got.ids.to(torch.int32).cpu().numpy(),
                got.logprobs.cpu().numpy(),
                got.top_ids.to(torch.int32).cpu().numpy(),
                got.top_logprobs.cpu().numpy(),
            )
        return self._pending(step, got.ids, output=out)

    def _sample_on_host(self, step: StepInput, logits: torch.Tensor) -> StepOutput:
        """The host_sampling mistake: the whole [B, V] logits cross to the host."""
        with llmtrace.span("sampling", step=step.step, seqs=step.num_seqs, d2h_bytes=logits.numel() * 4):
            host = logits.float().cpu().numpy()
            ids, logprobs = mistakes.host_sample(host, step.temperature, step.top_k, step.top_p, self._host_rng)
            top_logprobs, top_ids = torch.from_numpy(host).log_softmax(-1).topk(step.top_logprobs, dim=-1)
        return StepOutput(ids, logprobs, top_ids.to(torch.int32).numpy(), top_logprobs.numpy())


def make_runner(model_cfg, antipatterns=None, **kw) -> ModelRunner:
    """The clean runner, or the mistaken one when any mistake is switched on."""
    if antipatterns is not None and any(getattr(antipatterns, f.name) for f in fields(antipatterns)):
        return MistakenModelRunner(model_cfg, antipatterns=antipatterns, **kw)
    return ModelRunner(model_cfg, **kw)
