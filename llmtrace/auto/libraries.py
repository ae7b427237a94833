"""Tokenizers and HTTP front ends: Hugging Face tokenizers (`tokenize`: __call__, encode,
apply_chat_template; `detokenize`: decode, batch_decode) and sentencepiece; requests of
http.server, aiohttp and Starlette/FastAPI (ASGI) as `http.request` spans with the path."""
from __future__ import annotations

import functools
from time import perf_counter_ns

from .. import names, recorder
from ..timed import record_span
from .patching import on_import, replace, traced

_TOKENIZE = (("__call__", names.TOKENIZE), ("encode", names.TOKENIZE), ("apply_chat_template", names.TOKENIZE),
             ("decode", names.DETOKENIZE), ("batch_decode", names.DETOKENIZE))
_SENTENCEPIECE = (("Encode", names.TOKENIZE), ("encode", names.TOKENIZE), ("EncodeAsIds", names.TOKENIZE),
                  ("Decode", names.DETOKENIZE), ("decode", names.DETOKENIZE), ("DecodeIds", names.DETOKENIZE))


def _patch_methods(cls, table) -> None:
    for attr, stage in table:
        replace(cls, attr, traced(stage, stage))


def _patch_http_server(mod) -> None:
    """The request from its parsed request line to the handler's return (not the keep-alive
    wait for the next request line, which handle_one_request also spans)."""
    handler = mod.BaseHTTPRequestHandler

    def parse(orig):
        def parse_request(self):
            self._llmtrace_t0 = perf_counter_ns()
            return orig(self)
        return parse_request

    def handle(orig):
        def handle_one_request(self):
            self._llmtrace_t0 = 0
            try:
                return orig(self)
            finally:
                if self._llmtrace_t0:
                    record_span(names.HTTP_REQUEST, self._llmtrace_t0, perf_counter_ns(),
                                path=getattr(self, "path", "?"))
        return handle_one_request

    replace(handler, "parse_request", parse)
    replace(handler, "handle_one_request", handle)


def _async_request(path_of):
    def wrap(orig):
        @functools.wraps(orig)
        async def handle(self, first, *args, **kwargs):
            path = path_of(first)
            if path is None or not recorder.is_enabled():
                return await orig(self, first, *args, **kwargs)
            with recorder.span(names.HTTP_REQUEST, path=path):
                return await orig(self, first, *args, **kwargs)
        return handle
    return wrap


def install() -> None:
    on_import("transformers.tokenization_utils_base",
              lambda mod: _patch_methods(mod.PreTrainedTokenizerBase, _TOKENIZE))
    on_import("sentencepiece", lambda mod: _patch_methods(mod.SentencePieceProcessor, _SENTENCEPIECE))
    on_import("http.server", _patch_http_server)
    on_import("aiohttp.web_protocol", lambda mod: replace(mod.RequestHandler, "_handle_request",
                                                          _async_request(lambda req: req.path)))
    on_import("starlette.applications", lambda mod: replace(mod.Starlette, "__call__", _async_request(
        lambda scope: scope.get("path") if scope.get("type") == "http" else None)))
