"""Load generator: replays a workload against the engine's OpenAI API, measuring like a
serving benchmark client does (streaming, client-side TTFT / ITL / end-to-end latency).

Arrivals are Poisson at `rate` requests/s or a closed loop of `concurrency` requests in
flight, for `num_requests` or `duration_s`. Prompt and output lengths are drawn from the
config's distributions with a seeded RNG, so a workload is reproducible. Prompts of N
tokens are slices of the tokenizer's shipped corpus. Every request is also an llmtrace
span `client.request` (req) in the caller's process, for the analyzer's cross-check.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import orjson

import llmtrace

from .config import LengthDist, WorkloadConfig

CORPUS = Path(__file__).parent / "assets" / "tokenizer_corpus.txt"
PROMPT_FIT_TRIES = 4  # decode/re-encode rounds to hit the exact token count
REQUEST_ID_PREFIX = "wl"


@dataclass(frozen=True)
class RequestSpec:
    req_id: str
    prompt: str
    prompt_len: int  # tokens, as the server will count them (BOS included)
    max_tokens: int


@dataclass
class RequestResult:
    req_id: str
    prompt_len: int
    max_tokens: int
    start_s: float = 0.0  # since the workload started
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    prompt_tokens: int = 0  # the server's usage numbers
    output_tokens: int = 0
    chunks: int = 0  # streamed chunks with text (about one per token)

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class Progress:
    """What a live progress bar shows; passed to the callback on every streamed chunk."""

    done: int
    total: int | None  # None with duration_s
    output_tokens: int
    errors: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class WorkloadSummary:
    requests: int
    completed: int
    errors: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    throughput_tok_s: float
    request_rate: float
    ttft_ms: dict
    tpot_ms: dict
    itl_ms: dict
    e2e_ms: dict

    def to_dict(self) -> dict:
        return asdict(self)


# ---- request building ----------------------------------------------------------------------


def sample_length(dist: LengthDist, rng: random.Random) -> int:
    if dist.dist == "fixed":
        return dist.value
    if dist.dist == "uniform":
        return rng.randint(dist.min, dist.max)
    return max(1, round(rng.gauss(dist.mean, dist.std)))


class PromptBuilder:
    """Text of an exact token length: a random slice of the corpus's ids, decoded.

    Decoding and re-encoding can merge or split pieces at the edges, so the slice is
    resized until the text re-encodes to the asked length (a few rounds at most)."""

    def __init__(self, tokenizer, corpus: str | None = None):
        self.tokenizer = tokenizer
        text = corpus if corpus is not None else CORPUS.read_text(encoding="utf-8")
        self.ids = tokenizer.encode(text, add_bos=False)
        self.bos = 1 if tokenizer.bos_id >= 0 else 0  # the server's encode adds it

    def build(self, num_tokens: int, rng: random.Random) -> tuple[str, int]:
        """(prompt text, its token count as the server will see it)."""
        want = max(1, num_tokens - self.bos)
        start = rng.randrange(max(1, len(self.ids) - want))
        n, text, got = want, "", 0
        for _ in range(PROMPT_FIT_TRIES):
            text = self.tokenizer.decode(self._slice(start, n))
            got = len(self.tokenizer.encode(text, add_bos=False))
            if got == want:
                break
            n = max(1, n + want - got)
        return text, got + self.bos

    def _slice(self, start: int, n: int) -> list[int]:
        """n ids from start, wrapping around the corpus (prompts may be longer than it)."""
        ids = self.ids
        reps = -(-(start + n) // len(ids))
        return (ids * reps)[start : start + n] if reps > 1 else ids[start : start + n]


def iter_requests(
    wl: WorkloadConfig, tokenizer, max_model_len: int | None = None, corpus: str | None = None
) -> Iterator[RequestSpec]:
    """The workload's requests in order (endless when the workload runs for duration_s).

    max_model_len caps prompt + output so no request is refused for length."""
    rng = random.Random(wl.seed)
    builder = PromptBuilder(tokenizer, corpus) if wl.prompt == "random" else None
    fixed_len = None if builder else len(tokenizer.encode(wl.prompt))
    i = 0
    while wl.num_requests is None or i < wl.num_requests:
        if builder is not None:
            input_len = sample_length(wl.input_len, rng)
            if max_model_len is not None:
                input_len = min(input_len, max_model_len - 1)
            prompt, prompt_len = builder.build(input_len, rng)
        else:
            prompt, prompt_len = wl.prompt, fixed_len
        max_tokens = sample_length(wl.output_len, rng)
        if max_model_len is not None:
            max_tokens = max(1, min(max_tokens, max_model_len - prompt_len))
        yield RequestSpec(f"{REQUEST_ID_PREFIX}-{wl.seed}-{i}", prompt, prompt_len, max_tokens)
        i += 1


# ---- the client ----------------------------------------------------------------------------


class LoadGenerator:
    def __init__(
        self,
        base_url: str,
        wl: WorkloadConfig,
        requests: Iterator[RequestSpec],
        progress: Callable[[Progress], None] | None = None,
    ):
        self.url = base_url.rstrip("/") + "/v1/completions"
        self.wl, self.requests, self.progress = wl, requests, progress
        self.results: list[RequestResult] = []
        self._t0 = 0.0
        self._tokens = self._done = self._errors = 0

    async def run(self) -> list[RequestResult]:
        self._t0 = time.perf_counter()
        connector = aiohttp.TCPConnector(limit=0)  # Poisson arrivals may exceed any fixed pool
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as s:
            if self.wl.arrival == "poisson":
                await self._poisson(s)
            else:
                await asyncio.gather(*(self._closed_worker(s) for _ in range(self.wl.concurrency)))
        return self.results

    def _next(self) -> RequestSpec | None:
        if self.wl.duration_s is not None and time.perf_counter() - self._t0 >= self.wl.duration_s:
            return None
        return next(self.requests, None)

    async def _closed_worker(self, session) -> None:
        while (spec := self._next()) is not None:
            await self._send(session, spec)

    async def _poisson(self, session) -> None:
        rng = random.Random(self.wl.seed + 1)  # arrival gaps independent of the lengths
        tasks = []
        while (spec := self._next()) is not None:
            tasks.append(asyncio.ensure_future(self._send(session, spec)))
            await asyncio.sleep(rng.expovariate(self.wl.rate))
        await asyncio.gather(*tasks)

    async def _send(self, session, spec: RequestSpec) -> None:
        res = RequestResult(spec.req_id, spec.prompt_len, spec.max_tokens)
        self.results.append(res)
        body = {
            "prompt": spec.prompt,
            "max_tokens": spec.max_tokens,
            "ignore_eos": self.wl.ignore_eos,
            "temperature": 0.0,
            "stream": self.wl.stream,
        }
        if self.wl.stream:
            body["stream_options"] = {"include_usage": True}
        start = time.perf_counter()
        res.start_s = start - self._t0
        with llmtrace.span("client.request", req=spec.req_id) as sp:
            try:
                async with session.post(
                    self.url,
                    data=orjson.dumps(body),
                    headers={"Content-Type": "application/json", "X-Request-Id": spec.req_id},
                ) as resp:
                    if resp.status != 200:
                        res.error = f"HTTP {resp.status}: {_error_message(await resp.read())}"
                    elif self.wl.stream:
                        await self._read_stream(resp, res, start)
                    else:
                        self._read_usage(orjson.loads(await resp.read()), res)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as e:
                res.error = f"{type(e).__name__}: {e}"
            res.e2e_s = time.perf_counter() - start
            self._tokens += res.output_tokens - res.chunks  # progress counted chunks; settle with usage
            res.ok = res.error is None
            sp.set(output_tokens=res.output_tokens, ok=res.ok)
        self._done += 1
        self._errors += not res.ok
        self._report()

    async def _read_stream(self, resp, res: RequestResult, start: float) -> None:
        last = None
        async for line in resp.content:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            chunk = orjson.loads(data)
            if "error" in chunk:
                res.error = chunk["error"].get("message", "stream error")
                return
            if chunk.get("usage"):
                self._read_usage(chunk, res)
            if chunk.get("choices"):
                now = time.perf_counter()
                if last is None:
                    res.ttft_s = now - start
                else:
                    res.itl_s.append(now - last)
                last = now
                res.chunks += 1
                self._tokens += 1
                self._report()
        res.error = "stream ended without [DONE]"

    def _read_usage(self, obj: dict, res: RequestResult) -> None:
        u = obj["usage"]
        res.prompt_tokens, res.output_tokens = u["prompt_tokens"], u["completion_tokens"]

    def _report(self) -> None:
        if self.progress is None:
            return
        self.progress(
            Progress(self._done, self.wl.num_requests, self._tokens, self._errors, time.perf_counter() - self._t0)
        )


def _error_message(raw: bytes) -> str:
    try:
        return orjson.loads(raw)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return raw[:200].decode(errors="replace")


# ---- summary -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _ms_stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {"mean": sum(values) / len(values) * 1e3, **{f"p{q}": percentile(values, q) * 1e3 for q in (50, 90, 99)}}


def summarize(results: list[RequestResult], duration_s: float) -> WorkloadSummary:
    ok = [r for r in results if r.ok]
    out = sum(r.output_tokens for r in ok)
    return WorkloadSummary(
        requests=len(results),
        completed=len(ok),
        errors=len(results) - len(ok),
        duration_s=duration_s,
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        output_tokens=out,
        throughput_tok_s=out / duration_s if duration_s > 0 else 0.0,
        request_rate=len(ok) / duration_s if duration_s > 0 else 0.0,
        ttft_ms=_ms_stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_ms=_ms_stats([t for r in ok if (t := r.tpot_s) is not None]),
        itl_ms=_ms_stats([x for r in ok for x in r.itl_s]),
        e2e_ms=_ms_stats([r.e2e_s for r in ok]),
    )


async def run_workload(
    base_url: str,
    wl: WorkloadConfig,
    tokenizer,
    *,
    max_model_len: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    corpus: str | None = None,
) -> tuple[list[RequestResult], WorkloadSummary]:
    """Run the whole workload against a server; returns per-request results and the summary."""
    requests = iter_requests(wl, tokenizer, max_model_len, corpus)
    if wl.num_requests is not None:  # build every prompt up front, off the measured path
        requests = iter(list(requests))
    gen = LoadGenerator(base_url, wl, requests, progress)
    t0 = time.perf_counter()
    results = await gen.run()
    return results, summarize(results, time.perf_counter() - t0)
