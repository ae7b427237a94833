"""Tokenizers and HTTP front ends: Hugging Face tokenizers (`tokenize`: __call__, encode,
apply_chat_template; `detokenize`: decode, batch_decode) and sentencepiece; requests of
http.server, wsgiref (WSGI), aiohttp and Starlette/FastAPI (ASGI) as `http.request` spans
with the path.
A decode records how many ids it decoded (`ids`): a streaming server that decodes each
whole sequence again for every new token shows as ids growing with the output."""

from __future__ import annotations

import functools
from time import perf_counter_ns

from .. import names, recorder
from .caller import name_if_slow
from .patching import on_import, replace, traced

_TOKENIZE = ("__call__", "encode", "apply_chat_template")
_DETOKENIZE = ("decode", "batch_decode")
_SP_TOKENIZE = ("Encode", "encode", "EncodeAsIds")
_SP_DETOKENIZE = ("Decode", "decode", "DecodeIds")


def _patch_methods(cls, tokenize: tuple[str, ...], detokenize: tuple[str, ...]) -> None:
    for attr in tokenize:
        replace(cls, attr, traced(names.TOKENIZE, names.TOKENIZE))
    for attr in detokenize:
        replace(cls, attr, _decoder)


def _id_count(ids) -> int:
    """Token ids in a decode's input: a list (of lists), a tensor or an array; 1 for an id."""
    for size in ("numel", "size"):  # torch.Tensor.numel(), ndarray.size
        n = getattr(ids, size, None)
        if n is not None:
            return int(n() if callable(n) else n)
    try:
        return sum(map(len, ids)) if ids and hasattr(ids[0], "__len__") else len(ids)
    except TypeError:
        return 1


_IDS_KEYWORDS = ("token_ids", "sequences", "input", "ids")  # HF decode / batch_decode, sentencepiece


def _decoder(orig):
    def decode(tok, *args, **kwargs):
        if not recorder.is_enabled():
            return orig(tok, *args, **kwargs)
        ids = args[0] if args else next((kwargs[k] for k in _IDS_KEYWORDS if k in kwargs), ())
        with recorder.span(names.DETOKENIZE, stage=names.DETOKENIZE, **{names.A_IDS: _id_count(ids)}) as sp:
            try:
                return orig(tok, *args, **kwargs)
            finally:
                name_if_slow(sp)

    return decode


def _patch_http_server(mod) -> None:
    """The request from its parsed request line to the handler's return (not the keep-alive
    wait for the next request line, which handle_one_request also spans), open while the
    handler runs: what it does (a put on a queue) has the request for its parent."""
    handler = mod.BaseHTTPRequestHandler

    def parse(orig):
        def parse_request(self):
            t0 = perf_counter_ns()
            parsed = orig(self)
            if recorder.is_enabled():
                self._llmtrace_span = recorder.span(names.HTTP_REQUEST, start_ns=t0, path=getattr(self, "path", "?"))
                self._llmtrace_span.__enter__()
            return parsed

        return parse_request

    def handle(orig):
        def handle_one_request(self):
            self._llmtrace_span = None
            try:
                result = orig(self)
            except BaseException as e:
                if self._llmtrace_span is not None:
                    self._llmtrace_span.__exit__(type(e), e, e.__traceback__)
                raise
            if self._llmtrace_span is not None:
                self._llmtrace_span.__exit__(None, None, None)
            return result

        return handle_one_request

    replace(handler, "parse_request", parse)
    replace(handler, "handle_one_request", handle)


def _wsgi_run(orig):
    """wsgiref's handler runs the application and writes the response in `run` (the
    request's environ: `base_env`, given to the handler before)."""

    def run(self, application):
        if not recorder.is_enabled():
            return orig(self, application)
        with recorder.span(names.HTTP_REQUEST, path=(getattr(self, "base_env", None) or {}).get("PATH_INFO", "?")):
            return orig(self, application)

    return run


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
    on_import(
        "transformers.tokenization_utils_base",
        lambda mod: _patch_methods(mod.PreTrainedTokenizerBase, _TOKENIZE, _DETOKENIZE),
    )
    on_import("sentencepiece", lambda mod: _patch_methods(mod.SentencePieceProcessor, _SP_TOKENIZE, _SP_DETOKENIZE))
    on_import("http.server", _patch_http_server)
    on_import("wsgiref.handlers", lambda mod: replace(mod.BaseHandler, "run", _wsgi_run))
    on_import(
        "aiohttp.web_protocol",
        lambda mod: replace(mod.RequestHandler, "_handle_request", _async_request(lambda req: req.path)),
    )
    on_import(
        "starlette.applications",
        lambda mod: replace(
            mod.Starlette,
            "__call__",
            _async_request(lambda scope: scope.get("path") if scope.get("type") == "http" else None),
        ),
    )
