"""Per-request sampling settings, checked at construction so the HTTP server can answer 400."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (vLLM's default limit)


class SamplingParamsError(ValueError):
    """A sampling field with a bad value; `field` names it (as in the request body)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = all tokens
    max_tokens: int = 16
    seed: int | None = None  # per-request generator seed; None = the engine's
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # also return the sampled token's log-probability
    top_logprobs: int = 0  # and this many of the most likely tokens at each position, with theirs
    min_tokens: int = 0  # EOS and the stop tokens cannot be sampled before this many output tokens
    stop: tuple[str, ...] = ()  # strings that end the output (cut before them) where the text shows one

    def __post_init__(self):
        _number(self.temperature, "temperature")
        if not self.temperature >= 0:
            raise SamplingParamsError("temperature", f"{self.temperature} is not allowed; use a value >= 0")
        _number(self.top_p, "top_p")
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError("top_p", f"{self.top_p} is not allowed; use 0 < top_p <= 1")
        _integer(self.top_k, "top_k")
        if self.top_k != -1 and self.top_k < 1:
            raise SamplingParamsError("top_k", f"{self.top_k} is not allowed; use -1 (off) or a value >= 1")
        _integer(self.max_tokens, "max_tokens")
        if self.max_tokens < 1:
            raise SamplingParamsError("max_tokens", f"{self.max_tokens} is not allowed; use a value >= 1")
        if self.seed is not None:
            _integer(self.seed, "seed")
            if not 0 <= self.seed < 2**63:
                raise SamplingParamsError("seed", f"{self.seed} is not allowed; use 0 <= seed < 2**63")
        if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
            raise SamplingParamsError("stop_token_ids", f"{self.stop_token_ids!r} is not a list of token ids")
        ids = tuple(self.stop_token_ids)
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise SamplingParamsError("stop_token_ids", f"{t!r} is not a token id (an integer >= 0)")
        object.__setattr__(self, "stop_token_ids", ids)
        if isinstance(self.stop, (str, bytes)) or not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingParamsError("stop", f"{self.stop!r} is not a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        _integer(self.min_tokens, "min_tokens")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingParamsError(
                "min_tokens", f"{self.min_tokens} is not allowed; use 0 <= min_tokens <= max_tokens ({self.max_tokens})"
            )
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"{getattr(self, name)!r} is not allowed; use true or false")
        _integer(self.top_logprobs, "top_logprobs")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingParamsError(
                "top_logprobs", f"{self.top_logprobs} is not allowed; use 0 <= top_logprobs <= {MAX_TOP_LOGPROBS}"
            )
        if self.top_logprobs and not self.logprobs:
            raise SamplingParamsError("top_logprobs", "needs logprobs: true")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check_fits(self, num_prompt_tokens: int, max_model_len: int) -> None:
        """max_tokens must fit in the context the prompt leaves (the 1 <= max_tokens <= limit rule)."""
        limit = max_model_len - num_prompt_tokens
        if self.max_tokens > limit:
            raise SamplingParamsError(
                "max_tokens",
                f"{self.max_tokens} is not allowed; the {num_prompt_tokens}-token prompt leaves "
                f"{max(limit, 0)} of the model's {max_model_len}-token context",
            )


def _number(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SamplingParamsError(name, f"{value!r} is not a finite number")


def _integer(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(name, f"{value!r} is not an integer")
