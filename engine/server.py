"""The engine's HTTP front end (aiohttp), in the master's event loop.

  POST /v1/completions        OpenAI completions (SSE chunks + `data: [DONE]` when streaming)
  POST /v1/chat/completions   OpenAI chat (the checkpoint's chat template, else Llama-2's format)
  GET  /v1/models             the served model (a request naming another model gets 404, as vLLM)
  POST /generate              TGI style: {"inputs", "parameters", "stream"}
  GET  /health               200 while the agents are alive, else 503
  GET  /metrics               Prometheus text

Per request: validate (api_schema), tokenize, hand the ids to the master, relay its
deltas (the master's output processor cuts them at stop strings). A request whose client
goes away is aborted so its KV blocks are freed. Bad input is always a 4xx JSON error, never a 5xx.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from dataclasses import dataclass, replace

import orjson
from aiohttp import web

import llmtrace
from llmtrace import names
from llmtrace.errors import UserError

from . import api_schema as api
from .api_schema import GenerateRequest, RequestError
from .chat_template import ChatTemplate, ChatTemplateError
from .config import RunConfig
from .master import EngineDead, Master
from .metrics import CONTENT_TYPE, EngineMetrics, RequestTimes
from .output_processor import Delta
from .sampling_params import SamplingParams, SamplingParamsError
from .scheduler import QueueFull, RequestRejected

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MIN_BODY_LIMIT = 1 << 20
BODY_BYTES_PER_TOKEN = 64  # generous: a token is a few bytes of UTF-8 text, JSON escapes x6
RETRY_AFTER_S = 1
SHUTDOWN_GRACE_S = 5.0  # in-flight requests may finish this long at shutdown, then they are cancelled
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}


class Generation:
    """One request in flight: relays the master's deltas and keeps counts."""

    def __init__(
        self, master, rid: str, greq: GenerateRequest, prompt_ids: list[int], params: SamplingParams, t_arrival: float
    ):
        self.master, self.rid, self.greq = master, rid, greq
        self.prompt_tokens = len(prompt_ids)
        self.t_arrival = t_arrival
        self.ttft_s: float | None = None
        self._last_token_s: float | None = None
        self.token_gaps_s: list[float] = []  # between successive output tokens (a delta's tokens share its gap)
        self.output_tokens = 0
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.by_stop_string = False  # finished by a stop string in the text, not by a token
        self.text: list[str] = []
        self.stream = master.add_request(rid, prompt_ids, params)

    def accept(self, delta: Delta) -> str:
        """Account for one delta from the master; returns the text the client sees."""
        token_ids, text = delta.token_ids, delta.text
        if token_ids:
            now = time.perf_counter()
            if self.ttft_s is None:
                self.ttft_s = now - self.t_arrival
                gaps = len(token_ids) - 1
            else:
                gaps = len(token_ids)
            if gaps and self._last_token_s is not None:
                self.token_gaps_s += [(now - self._last_token_s) / len(token_ids)] * gaps
            self._last_token_s = now
        self.output_tokens += len(token_ids)
        self.token_ids += token_ids
        self.finish_reason, self.by_stop_string = delta.finish_reason, delta.stop_reason is not None
        self.text.append(text)
        return text

    async def collect(self) -> str:
        """Run to the end (non-streaming responses); the whole text."""
        async for delta in self.stream:
            self.accept(delta)
            if self.finish_reason is not None:
                break
        return "".join(self.text)

    def close(self, metrics: EngineMetrics) -> None:
        """Abort what the master still runs (client gone); count the request."""
        if self.finish_reason is None:
            self.master.abort(self.rid)
        metrics.observe_request(self._times())

    def _times(self) -> RequestTimes:
        """Its phases from the scheduler's timestamps (one clock: perf_counter)."""
        seq, now_ns = self.stream.seq, time.perf_counter_ns()
        sched, first = seq.first_scheduled_ns, seq.first_token_ns
        return RequestTimes(
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens,
            e2e_s=time.perf_counter() - self.t_arrival,
            finish_reason=self.finish_reason or "abort",
            ttft_s=self.ttft_s,
            token_gaps_s=tuple(self.token_gaps_s),
            queue_s=None if sched is None else (sched - seq.arrival_ns) / 1e9,
            prefill_s=None if sched is None or first is None else (first - sched) / 1e9,
            decode_s=None if first is None else (now_ns - first) / 1e9,
        )

    def usage(self) -> dict:
        return api.usage(self.prompt_tokens, self.output_tokens)

    def logprobs(
        self, tokenizer, start: int = 0, end: int | None = None
    ) -> tuple[list[str], list[float], api.Alternatives | None] | None:
        """The chosen tokens [start, end) as text with their log-probabilities, and the most
        likely tokens at each position with theirs, when asked for."""
        if not self.greq.logprobs:
            return None
        ids = self.token_ids[start:end]
        top = self.stream.top_logprobs[start : start + len(ids)] if self.greq.top_logprobs else None
        return (
            [_piece(tokenizer, t) for t in ids],
            [float(x) for x in self.stream.logprobs[start : start + len(ids)]],
            None if top is None else [[(_piece(tokenizer, t), float(lp)) for t, lp in alts] for alts in top],
        )


def _piece(tokenizer, token_id: int) -> str:
    """A token as the text it stands for (sentencepiece marks a leading space with U+2581)."""
    return tokenizer.id_to_piece(int(token_id)).replace("\u2581", " ")


class ApiServer:
    def __init__(self, master, tokenizer, cfg: RunConfig):
        self.master, self.tokenizer = master, tokenizer
        self.max_model_len = cfg.engine.max_model_len
        self.capture_text = cfg.trace.capture_text
        self.model_name = cfg.model.preset or cfg.model.path
        self.chat_template = ChatTemplate.for_checkpoint(cfg.model.path)
        self.metrics = EngineMetrics(self.model_name, cfg.engine.metrics_prefix)
        self._ids = itertools.count(1)
        self._started = int(time.time())

    def build_app(self) -> web.Application:
        limit = max(MIN_BODY_LIMIT, self.max_model_len * BODY_BYTES_PER_TOKEN)
        app = web.Application(client_max_size=limit, middlewares=[self._errors])
        app.add_routes(
            [
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
                web.get("/v1/models", self.models),
                web.post("/generate", self.generate),
                web.get("/health", self.health),
                web.get("/metrics", self.metrics_page),
            ]
        )
        return app

    # ---- endpoints -----------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, api.parse_completion, self._openai_stream, self._openai_response)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(
            request, lambda body, n: api.parse_chat(body, n, self._render_chat), self._chat_stream, self._chat_response
        )

    async def models(self, request: web.Request) -> web.Response:
        return _json(api.models_list(self.model_name, self._started, self.max_model_len))

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, api.parse_generate, self._tgi_stream, self._tgi_response)

    async def health(self, request: web.Request) -> web.Response:
        if self.master.healthy:
            return _json({"status": "ok", **self.master.stats()})
        return _json({"status": "unavailable", "message": self.master.failure or "the engine is not running"}, 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(self.master.stats()).encode(), headers={"Content-Type": CONTENT_TYPE}
        )

    # ---- one request ---------------------------------------------------------------------

    async def _serve(self, request, parse, stream_out, respond) -> web.StreamResponse:
        """One request: n generations (choices) of one prompt; stream_out(request, gen) for a
        stream (n = 1), else respond(gens)."""
        t_arrival = time.perf_counter()
        rid = self._request_id(request)
        with llmtrace.span(names.HTTP_REQUEST, req=rid) as sp:
            greq = parse(api.parse_json(await request.read()), self.max_model_len)
            if greq.model is not None and greq.model != self.model_name:
                raise api.model_not_found(greq.model)
            gens = self._admit(rid, greq, t_arrival)
            try:
                resp = await (stream_out(request, gens[0]) if greq.stream else respond(gens))
            finally:
                for gen in gens:
                    gen.close(self.metrics)
                sp.set(
                    prompt_tokens=gens[0].prompt_tokens,
                    output_tokens=sum(g.output_tokens for g in gens),
                    ttft_us=-1 if gens[0].ttft_s is None else int(gens[0].ttft_s * 1e6),
                )
                if self.capture_text:
                    llmtrace.instant("http.text", req=rid, prompt=greq.prompt, completion="".join(gens[0].text))
        if not resp.prepared:  # an SSE response sent its headers already
            resp.headers[REQUEST_ID_HEADER] = rid
        return resp

    def _render_chat(self, messages: list[dict]) -> tuple[str, bool]:
        try:
            text = self.chat_template.render(messages)
        except ChatTemplateError as e:
            raise RequestError(str(e), "messages") from None
        return text, self.chat_template.adds_bos(text)

    def _request_id(self, request: web.Request) -> str:
        given = request.headers.get(REQUEST_ID_HEADER)
        if given is None:
            return f"req-{next(self._ids)}"
        if not _REQUEST_ID.fullmatch(given):
            raise RequestError(
                f"{REQUEST_ID_HEADER} must be 1 to 64 characters of A-Z a-z 0-9 . _ : -", REQUEST_ID_HEADER
            )
        return given

    def _admit(self, rid: str, greq: GenerateRequest, t_arrival: float) -> list[Generation]:
        """The request's n generations, admitted to the master (choice i has id rid, rid.1,
        ...; with a seed, choice i samples with seed + i so that the choices differ)."""
        with llmtrace.span("tokenize", req=rid):
            prompt_ids = self.tokenizer.encode(greq.prompt, add_bos=greq.add_bos)
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                f"{self.max_model_len} tokens and must leave room for at least one output token",
                greq.prompt_param,
            )
        if greq.fills_context:
            greq = replace(greq, max_tokens=self.max_model_len - len(prompt_ids))
        gens: list[Generation] = []
        try:
            for i in range(greq.n):
                gens.append(self._generation(rid, i, greq, prompt_ids, t_arrival))
        except BaseException:
            for gen in gens:  # the choices admitted before the one that failed
                gen.close(self.metrics)
            raise
        return gens

    def _generation(
        self, rid: str, i: int, greq: GenerateRequest, prompt_ids: list[int], t_arrival: float
    ) -> Generation:
        try:
            params = greq.sampling_params()
            if i and params.seed is not None:
                params = replace(params, seed=(params.seed + i) % api.MAX_SEED)
            return Generation(self.master, rid if i == 0 else f"{rid}.{i}", greq, prompt_ids, params, t_arrival)
        except SamplingParamsError as e:
            raise RequestError(str(e), greq.max_tokens_param if e.field == "max_tokens" else e.field) from None
        except QueueFull as e:
            raise RequestError(str(e), None, 429, "rate_limit_error") from None
        except RequestRejected as e:
            raise RequestError(str(e), None) from None

    # ---- OpenAI --------------------------------------------------------------------------

    def _logprobs(self, gen: Generation, shape, start: int = 0, end: int | None = None) -> dict | None:
        got = gen.logprobs(self.tokenizer, start, end)
        return None if got is None else shape(*got)

    async def _openai_response(self, gens: list[Generation]) -> web.Response:
        texts = await asyncio.gather(*(gen.collect() for gen in gens))
        choices = [
            api.completion_choice(i, text, gen.finish_reason, self._logprobs(gen, api.completion_logprobs))
            for i, (gen, text) in enumerate(zip(gens, texts))
        ]
        return _json(api.completion_object(gens[0].rid, int(time.time()), self._model(gens[0]), choices, _usage(gens)))

    async def _chat_response(self, gens: list[Generation]) -> web.Response:
        texts = await asyncio.gather(*(gen.collect() for gen in gens))
        choices = [
            api.chat_choice(i, text, gen.finish_reason, self._logprobs(gen, api.chat_logprobs))
            for i, (gen, text) in enumerate(zip(gens, texts))
        ]
        return _json(api.chat_object(gens[0].rid, int(time.time()), self._model(gens[0]), choices, _usage(gens)))

    async def _chat_stream(self, request: web.Request, gen: Generation) -> web.StreamResponse:
        resp = await _open_sse(request, gen.rid)
        created, model = int(time.time()), self._model(gen)
        async with _stream_errors(resp):
            await _sse(resp, api.chat_chunk(gen.rid, created, model, {"role": "assistant", "content": ""}))
            async for delta in gen.stream:
                n0 = gen.output_tokens
                text = gen.accept(delta)
                if text or gen.finish_reason is not None:
                    lps = self._logprobs(gen, api.chat_logprobs, n0, gen.output_tokens)
                    await _sse(
                        resp,
                        api.chat_chunk(
                            gen.rid, created, model, {"content": text} if text else {}, gen.finish_reason, logprobs=lps
                        ),
                    )
                if gen.finish_reason is not None:
                    break
            if gen.greq.include_usage:
                await _sse(resp, api.chat_chunk(gen.rid, created, model, None, usage_=gen.usage()))
            await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _openai_stream(self, request: web.Request, gen: Generation) -> web.StreamResponse:
        resp = await _open_sse(request, gen.rid)
        created, model = int(time.time()), self._model(gen)
        async with _stream_errors(resp):
            async for delta in gen.stream:
                n0 = gen.output_tokens
                text = gen.accept(delta)
                if text or gen.finish_reason is not None:
                    lps = self._logprobs(gen, api.completion_logprobs, n0, gen.output_tokens)
                    await _sse(
                        resp,
                        api.completion_object(
                            gen.rid, created, model, [api.completion_choice(0, text, gen.finish_reason, lps)]
                        ),
                    )
                if gen.finish_reason is not None:
                    break
            if gen.greq.include_usage:
                await _sse(resp, api.completion_usage_chunk(gen.rid, created, model, gen.usage()))
            await resp.write(b"data: [DONE]\n\n")
        return resp

    def _model(self, gen: Generation) -> str:
        return gen.greq.model or self.model_name

    # ---- TGI -----------------------------------------------------------------------------

    def _tgi_details(self, gen: Generation) -> dict | None:
        if not gen.greq.details:
            return None
        reason = api.tgi_finish_reason(gen.finish_reason or "abort", gen.by_stop_string)
        return api.tgi_details(reason, gen.output_tokens, gen.greq.seed)

    async def _tgi_response(self, gens: list[Generation]) -> web.Response:
        gen = gens[0]  # TGI has no n
        body = {"generated_text": await gen.collect()}
        details = self._tgi_details(gen)
        if details is not None:
            body["details"] = details
        return _json(body)

    async def _tgi_stream(self, request: web.Request, gen: Generation) -> web.StreamResponse:
        """One event per token; a delta's text rides on its last token, and the final token's
        event carries generated_text (and details)."""
        resp = await _open_sse(request, gen.rid)
        async with _stream_errors(resp):
            async for delta in gen.stream:
                index, token_ids = gen.output_tokens, delta.token_ids
                text = gen.accept(delta)
                done = gen.finish_reason is not None
                for i, tid in enumerate(token_ids, 1):
                    if i < len(token_ids):
                        event = api.tgi_token_event(index + i, int(tid), "")
                    elif done:
                        event = api.tgi_token_event(
                            index + i, int(tid), text, "".join(gen.text), self._tgi_details(gen)
                        )
                    else:
                        event = api.tgi_token_event(index + i, int(tid), text)
                    await _sse(resp, event)
                if done:
                    break
        return resp

    # ---- errors --------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except RequestError as e:
            err = e
        except EngineDead as e:
            err = RequestError(f"the engine is not running: {e}", None, 503, "service_unavailable")
        except web.HTTPException as e:  # aiohttp's own: 404, 405, 413 (body over client_max_size)
            if e.status < 400:
                raise
            err = RequestError(e.reason if e.status != 413 else e.text, None, e.status)
        except Exception:
            log.exception("request %s %s failed", request.method, request.path)
            err = RequestError("internal error", None, 500, "internal_error")
        self.metrics.rejected.inc(1, str(err.status))
        resp = _json(err.to_json(), err.status)
        if err.status == 429:
            resp.headers["Retry-After"] = str(RETRY_AFTER_S)
        return resp


def _usage(gens: list[Generation]) -> dict:
    """One prompt, n completions: the prompt counted once, as OpenAI does."""
    return api.usage(gens[0].prompt_tokens, sum(g.output_tokens for g in gens))


def _json(obj, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


async def _open_sse(request: web.Request, rid: str) -> web.StreamResponse:
    resp = web.StreamResponse(headers={**SSE_HEADERS, REQUEST_ID_HEADER: rid})
    await resp.prepare(request)
    return resp


async def _sse(resp: web.StreamResponse, obj) -> None:
    await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")


class _stream_errors:
    """After the SSE headers are out, the engine dying can only be reported as an error event."""

    def __init__(self, resp: web.StreamResponse):
        self.resp = resp

    async def __aenter__(self):
        return self

    async def __aexit__(self, et, ev, tb):
        if not isinstance(ev, EngineDead):
            return False
        err = RequestError(f"the engine stopped while generating: {ev}", None, 503, "service_unavailable")
        await _sse(self.resp, err.to_json())
        return True


@dataclass
class EngineHandle:
    """A running master + HTTP server inside the caller's event loop."""

    url: str
    master: Master
    server: ApiServer
    runner: web.AppRunner

    async def close(self) -> None:
        """Stop serving, then stop the agents and release the shared memory."""
        try:
            await self.runner.cleanup()
        finally:
            await self.master.stop()


async def start_engine(cfg: RunConfig, host: str | None = None, port: int | None = None) -> EngineHandle:
    """Start the master (which spawns the agents) and the HTTP server in this event loop.

    host/port default to engine.host (127.0.0.1 unless configured) and engine.port (8000
    unless configured; 0: any free port). On any failure everything started so far is stopped again."""
    host = cfg.engine.host if host is None else host
    port = cfg.engine.port if port is None else port
    master = Master(cfg)
    await master.start()
    runner = None
    try:
        server = ApiServer(master, master.tokenizer, cfg)
        # handler_cancellation: a client that disconnects cancels its handler, which aborts its request
        runner = web.AppRunner(
            server.build_app(), handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        return EngineHandle(_url(runner.addresses[0]), master, server, runner)
    except BaseException:
        if runner is not None:
            await runner.cleanup()
        await master.stop()
        raise


def _url(sockname: tuple) -> str:
    """http://host:port of a bound socket; a wildcard address is reached through loopback."""
    host, port = sockname[0], sockname[1]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
