"""Token sampling on the device: greedy, temperature, top-k, top-p, per-request seeds.

Sampling uses the exponential-race form of categorical sampling (argmax of p / E with
E ~ Exp(1)), so one noise tensor serves the whole batch. Seeded rows draw their noise
from a generator seeded with (seed, position of the sampled token): a request's tokens
then depend only on its own seed, never on what else is in the batch or on preemption.
Only the chosen ids and their logprobs leave the device, and for requests that ask for
them (`top_logprobs`) the step's K most likely tokens per row with theirs (K: the most any
row asked for; the output processor keeps each row's own count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

_SEED_STRIDE = 1_000_003  # mixes (seed, position) into one generator seed


@dataclass
class SamplingTensors:
    """Per-row sampling parameters on the device plus host-side flags to pick the fast paths."""

    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_p: torch.Tensor  # [B] float32, 1 = off
    top_k: torch.Tensor  # [B] int64, <= 0 = off
    seeded_rows: list[tuple[int, int]]  # (row, generator seed) for rows with a request seed
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool
    banned: tuple = ()  # ((row, token ids), ...): tokens a row may not sample yet (min_tokens)
    top_logprobs: int = 0  # the most likely tokens to return per row, with their logprobs

    @classmethod
    def from_numpy(
        cls,
        temperature: np.ndarray,
        top_p: np.ndarray,
        top_k: np.ndarray,
        seed: np.ndarray,
        positions: np.ndarray,
        device: torch.device,
        banned: tuple = (),
        top_logprobs: int = 0,
    ) -> SamplingTensors:
        """seed: -1 = unseeded; positions: position of the token each row samples."""
        greedy = temperature <= 0
        rows = np.flatnonzero((seed >= 0) & ~greedy)
        return cls(
            temperature=torch.from_numpy(np.asarray(temperature, np.float32)).to(device, non_blocking=True),
            top_p=torch.from_numpy(np.asarray(top_p, np.float32)).to(device, non_blocking=True),
            top_k=torch.from_numpy(np.asarray(top_k, np.int64)).to(device, non_blocking=True),
            seeded_rows=[(int(r), int(seed[r]) * _SEED_STRIDE + int(positions[r])) for r in rows],
            all_greedy=bool(greedy.all()),
            any_greedy=bool(greedy.any()),
            any_top_k=bool((top_k > 0).any()),
            any_top_p=bool((top_p < 1).any()),
            banned=banned,
            top_logprobs=top_logprobs,
        )


class Sampled(NamedTuple):
    ids: torch.Tensor  # [B] int64, the chosen tokens
    logprobs: torch.Tensor  # [B] float32, their logprobs under the model
    top_ids: torch.Tensor  # [B, K] int64, the K most likely tokens (K = SamplingTensors.top_logprobs)
    top_logprobs: torch.Tensor  # [B, K] float32, their logprobs


class Sampler:
    def __init__(self, device: torch.device | str, seed: int = 0):
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device).manual_seed(seed)  # unseeded rows

    def __call__(self, logits: torch.Tensor, st: SamplingTensors) -> Sampled:
        """logits [B, V] -> the chosen ids with their logprobs under the model (the logits
        before temperature, top-k and top-p), and the K most likely tokens with theirs."""
        logits = logits.float()
        if st.banned:  # min_tokens: EOS and stop tokens are not candidates yet
            logits = logits.clone()
            for row, ids in st.banned:
                logits[row, list(ids)] = float("-inf")
        greedy_ids = logits.argmax(dim=-1)
        if st.all_greedy:
            ids = greedy_ids
        else:
            ids = self._sample(logits, st)
            if st.any_greedy:
                ids = torch.where(st.temperature <= 0, greedy_ids, ids)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        top_logits, top_ids = logits.topk(st.top_logprobs, dim=-1)  # K = 0: [B, 0], nothing computed
        return Sampled(ids, (logits.gather(1, ids[:, None]) - lse).squeeze(1), top_ids, top_logits - lse)

    def _sample(self, logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
        temp = torch.where(st.temperature > 0, st.temperature, 1.0)
        logits = logits / temp[:, None]
        sorted_idx = None
        if st.any_top_k or st.any_top_p:
            logits, sorted_idx = logits.sort(dim=-1, descending=True)
            logits = _mask_top_k_top_p(logits, st.top_k, st.top_p)
        probs = torch.softmax(logits, dim=-1)
        noise = self._exponential_noise(probs, st.seeded_rows)
        choice = (probs / noise).argmax(dim=-1)
        return choice if sorted_idx is None else sorted_idx.gather(1, choice[:, None]).squeeze(1)

    def _exponential_noise(self, probs: torch.Tensor, seeded_rows: list[tuple[int, int]]) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_(generator=self._generator)
        for row, seed in seeded_rows:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            noise[row].exponential_(generator=gen)
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # a 0 draw would give p/0 = nan for p = 0


def _mask_top_k_top_p(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the sorted (descending) logits outside each row's top-k and top-p nucleus."""
    vocab = sorted_logits.shape[-1]
    rank = torch.arange(vocab, device=sorted_logits.device)
    k = torch.where(top_k > 0, top_k, vocab)
    drop = rank[None, :] >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep a token while the mass strictly before it is below top_p (the first token always stays).
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    return sorted_logits.masked_fill(drop, float("-inf"))
