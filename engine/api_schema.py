"""Request bodies of the HTTP APIs, validated into one `GenerateRequest`.

`POST /v1/completions` and `POST /v1/chat/completions` (OpenAI, as vLLM serves them) and
`POST /generate` (TGI style) name the same knobs differently; all land here so the
server has a single path from body to SamplingParams. Every rejection is a
`RequestError` that names the offending field and
renders as OpenAI's error object. Checks here are about the wire format (types, names,
the API's documented ranges); limits that need the tokenized prompt live in the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import orjson

from .chat_template import ROLES
from .sampling_params import MAX_TOP_LOGPROBS, SamplingParams

MAX_SEED = 2**63 - 1
MAX_TOP_K = 2**31 - 1
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_N = 16  # choices per request
MAX_MIN_TOKENS = 2**31 - 1  # above max_tokens it is refused when the sampling params are built
OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default
TGI_DEFAULT_MAX_NEW_TOKENS = 20  # TGI's default
Alternatives = list[list[tuple[str, float]]]  # per token: the most likely tokens' text and logprob


class RequestError(Exception):
    """A request the client must fix (4xx); `param` names the field when there is one."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, err_type: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.err_type = message, param, status, err_type

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": None}}


@dataclass(frozen=True)
class GenerateRequest:
    """What either API asks for, in engine terms. temperature 0 means greedy."""

    prompt: str
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage
    details: bool = False  # TGI details object in the response
    model: str | None = None
    n: int = 1  # choices: n sequences generated for the prompt
    logprobs: bool = False  # return each chosen token's log-probability
    top_logprobs: int = 0  # and this many of the most likely tokens at each position
    min_tokens: int = 0  # EOS and stop tokens banned before this many output tokens
    add_bos: bool = True  # False when a chat template's text starts with BOS already
    # how this API names the prompt and the output budget, for errors found after tokenizing
    prompt_param: str = "prompt"
    max_tokens_param: str = "max_tokens"

    @property
    def fills_context(self) -> bool:
        """No output budget given (chat): what the context leaves after the prompt."""
        return self.max_tokens == 0

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
            min_tokens=self.min_tokens,
            stop=self.stop,
        )


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object (orjson: rejects NaN/Infinity literals, caps nesting depth)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {_kind(body)}")
    return body


def parse_completion(body: dict, max_model_len: int) -> GenerateRequest:
    """OpenAI `POST /v1/completions`."""
    _reject_unknown(body, _COMPLETION_FIELDS, "")
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        raise RequestError("prompt must be a string; lists of prompts or token ids are not supported", "prompt")
    _only_neutral(body, _NEUTRAL)
    top = _int(body, "logprobs", "logprobs", None, 0, MAX_TOP_LOGPROBS)  # the chosen token's and `top` others
    return GenerateRequest(
        prompt=_prompt(body, "prompt"),
        max_tokens=_int(body, "max_tokens", "max_tokens", OPENAI_DEFAULT_MAX_TOKENS, 1, max_model_len),
        logprobs=top is not None,
        top_logprobs=top or 0,
        **_openai_common(body),
    )


def parse_chat(body: dict, max_model_len: int, render) -> GenerateRequest:
    """OpenAI `POST /v1/chat/completions`; render(messages) -> (prompt text, adds BOS) is the
    model's chat template. Without max_completion_tokens (or the older max_tokens) the
    output may fill what the context leaves, as vLLM does."""
    _reject_unknown(body, _CHAT_FIELDS, "")
    _only_neutral(body, _CHAT_NEUTRAL)
    budget = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    logprobs = _bool(body, "logprobs", "logprobs", False)
    top = _int(body, "top_logprobs", "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    text, has_bos = render(_messages(body))
    return GenerateRequest(
        prompt=text,
        max_tokens=_int(body, budget, budget, 0, 1, max_model_len),
        add_bos=not has_bos,
        prompt_param="messages",
        max_tokens_param=budget,
        logprobs=logprobs,
        top_logprobs=top,
        **_openai_common(body),
    )


def _openai_common(body: dict) -> dict:
    """The knobs both OpenAI endpoints share."""
    _str(body, "user", "user", None)
    stream = _bool(body, "stream", "stream", False)
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(opts, dict):
            raise RequestError(f"stream_options must be an object, got {_kind(opts)}", "stream_options")
        _reject_unknown(opts, {"include_usage"}, "stream_options.")
        include_usage = _bool(opts, "include_usage", "stream_options.include_usage", False)
    n = _int(body, "n", "n", 1, 1, MAX_N)
    if n > 1 and stream:
        raise RequestError("n > 1 is supported without stream only", "n")
    return dict(
        temperature=_number(body, "temperature", "temperature", 1.0, 0.0, 2.0),
        top_p=_top_p(body, "top_p", "top_p"),
        top_k=_top_k(body, "top_k", "top_k", allow_off=True),
        seed=_int(body, "seed", "seed", None, 0, MAX_SEED),
        stop=_stop(body, "stop", "stop"),
        ignore_eos=_bool(body, "ignore_eos", "ignore_eos", False),
        stream=stream,
        include_usage=include_usage,
        model=_str(body, "model", "model", None),
        n=n,
        min_tokens=_int(body, "min_tokens", "min_tokens", 0, 0, MAX_MIN_TOKENS),
    )


def _messages(body: dict) -> list[dict]:
    """[{"role", "content"}] with text content (a string, or text parts joined)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("messages must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object, got {_kind(m)}", where)
        _reject_unknown(m, {"role", "content", "name"}, where + ".")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", where + ".role")
        out.append({"role": role, "content": _content(m.get("content"), where + ".content")})
    return out


def _content(v, param: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v
    ):
        return "".join(p["text"] for p in v)
    raise RequestError(
        f'{param} must be a string or an array of text parts ({{"type": "text", '
        f'"text": ...}}); images and audio are not supported',
        param,
    )


def parse_generate(body: dict, max_model_len: int) -> GenerateRequest:
    """TGI-style `POST /generate`: {"inputs": ..., "parameters": {...}, "stream": bool}.

    As in TGI, do_sample=false (the default) is greedy unless temperature, top_p or
    top_k is given."""
    _reject_unknown(body, _GENERATE_FIELDS, "")
    params = body.get("parameters")
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        raise RequestError(f"parameters must be an object, got {_kind(params)}", "parameters")
    _reject_unknown(params, _GENERATE_PARAMETERS, "parameters.")
    p = "parameters."
    do_sample = _bool(params, "do_sample", p + "do_sample", False)
    sampling = do_sample or any(params.get(k) is not None for k in ("temperature", "top_p", "top_k"))
    temperature = _number(params, "temperature", p + "temperature", 1.0, 0.0, 2.0, low_open=True)
    return GenerateRequest(
        prompt=_prompt(body, "inputs"),
        max_tokens=_int(params, "max_new_tokens", p + "max_new_tokens", TGI_DEFAULT_MAX_NEW_TOKENS, 1, max_model_len),
        temperature=temperature if sampling else 0.0,
        top_p=_top_p(params, "top_p", p + "top_p"),
        top_k=_top_k(params, "top_k", p + "top_k", allow_off=False),
        seed=_int(params, "seed", p + "seed", None, 0, MAX_SEED),
        stop=_stop(params, "stop", p + "stop"),
        ignore_eos=_bool(params, "ignore_eos", p + "ignore_eos", False),
        stream=_bool(body, "stream", "stream", False),
        details=_bool(params, "details", p + "details", False),
        prompt_param="inputs",
        max_tokens_param=p + "max_new_tokens",
    )


# OpenAI (and vLLM) fields the engine does not implement, accepted at the value that means
# "off" so that benchmark clients which always send them work; any other value is refused by name.
_NEUTRAL = {"best_of": 1, "echo": False, "suffix": None, "presence_penalty": 0, "frequency_penalty": 0}
_CHAT_NEUTRAL = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "parallel_tool_calls": None,
    "tool_choice": "none",
}
_OPENAI_FIELDS = {
    "model",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "ignore_eos",
    "user",
    "n",
    "min_tokens",
}
_COMPLETION_FIELDS = frozenset({*_OPENAI_FIELDS, "prompt", "max_tokens", "logprobs", *_NEUTRAL})
_CHAT_FIELDS = frozenset(
    {*_OPENAI_FIELDS, "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", *_CHAT_NEUTRAL}
)
_GENERATE_FIELDS = frozenset({"inputs", "parameters", "stream"})
_GENERATE_PARAMETERS = frozenset(
    {"max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "seed", "stop", "ignore_eos", "details"}
)


def _kind(v) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
        type(None): "null",
    }.get(type(v), type(v).__name__)


def _reject_unknown(obj: dict, known: frozenset | set, prefix: str) -> None:
    for key in obj:
        if key not in known:
            raise RequestError(f"unknown field '{prefix}{key}' (accepted: {', '.join(sorted(known))})", prefix + key)


def _only_neutral(body: dict, neutral: dict) -> None:
    for key, off in neutral.items():
        v = body.get(key, off)
        same_type = type(v) is type(off) or isinstance(off, int) and type(v) is float
        if v is not None and not (same_type and v == off):
            raise RequestError(f"{key} is not supported; leave it out or send {orjson.dumps(off).decode()}", key)


def _prompt(body: dict, key: str) -> str:
    v = body.get(key)
    if v is None:
        raise RequestError(f"{key} is required", key)
    if not isinstance(v, str):
        raise RequestError(f"{key} must be a string, got {_kind(v)}", key)
    if not v:
        raise RequestError(f"{key} must not be empty", key)
    return v


def _int(obj: dict, key: str, param: str, default, lo: int, hi: int):
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{param} must be an integer, got {_kind(v)}", param)
    if not lo <= v <= hi:
        raise RequestError(f"{param} must be between {lo} and {hi}, got {v}", param)
    return v


def _number(obj: dict, key: str, param: str, default: float, lo: float, hi: float, low_open: bool = False) -> float:
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"{param} must be a number, got {_kind(v)}", param)
    v = float(v)
    if not math.isfinite(v) or v > hi or v < lo or (low_open and v == lo):
        bracket = "(" if low_open else "["
        raise RequestError(f"{param} must be in {bracket}{lo:g}, {hi:g}], got {v:g}", param)
    return v


def _top_p(obj: dict, key: str, param: str) -> float:
    return _number(obj, key, param, 1.0, 0.0, 1.0, low_open=True)


def _top_k(obj: dict, key: str, param: str, allow_off: bool) -> int:
    """vLLM's convention: -1 turns top-k off (OpenAI side); TGI requires a positive k."""
    v = _int(obj, key, param, -1, -1 if allow_off else 1, MAX_TOP_K)
    if v == 0:
        raise RequestError(f"{param} must be -1 (off) or at least 1, got 0", param)
    return v


def _typed(obj: dict, key: str, param: str, default, typ: type, what: str):
    v = obj.get(key)
    if v is None:
        return default
    if not isinstance(v, typ):
        raise RequestError(f"{param} must be {what}, got {_kind(v)}", param)
    return v


def _bool(obj: dict, key: str, param: str, default: bool) -> bool:
    return _typed(obj, key, param, default, bool, "a boolean")


def _str(obj: dict, key: str, param: str, default):
    return _typed(obj, key, param, default, str, "a string")


def _stop(obj: dict, key: str, param: str) -> tuple[str, ...]:
    v = obj.get(key)
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise RequestError(f"{param} must be a string or an array of strings", param)
    if len(items) > MAX_STOP_STRINGS:
        raise RequestError(f"{param} may hold at most {MAX_STOP_STRINGS} strings, got {len(items)}", param)
    for s in items:
        if not s or len(s) > MAX_STOP_CHARS:
            raise RequestError(f"{param} strings must be 1 to {MAX_STOP_CHARS} characters long", param)
    return tuple(items)


# ---- responses -------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_object(rid: str, created: int, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    """OpenAI text_completion: the whole response, or one stream chunk (usage only at the end)."""
    obj = {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        obj["usage"] = usage_
    return obj


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_logprobs(tokens: list[str], logprobs: list[float], top: Alternatives | None, offset: int = 0) -> dict:
    """OpenAI completions' logprobs object: the chosen tokens, and per token a {token: logprob}
    of the most likely ones when asked for (`top`)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "text_offset": offsets,
        "top_logprobs": None if top is None else [dict(alts) for alts in top],
    }


def chat_logprobs(tokens: list[str], logprobs: list[float], top: Alternatives | None) -> dict:
    """OpenAI chat's logprobs object: per chosen token, its logprob and the most likely
    tokens with theirs (empty unless asked for)."""
    return {
        "content": [
            {**_chat_token(t, lp), "top_logprobs": [_chat_token(a, alp) for a, alp in alts]}
            for t, lp, alts in zip(tokens, logprobs, top if top is not None else [[]] * len(tokens))
        ]
    }


def _chat_token(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def completion_usage_chunk(rid: str, created: int, model: str, usage_: dict) -> dict:
    """The extra last chunk that stream_options.include_usage asks for (empty choices)."""
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_,
    }


def chat_object(rid: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    """OpenAI chat.completion (the whole response)."""
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    delta: dict | None,
    finish_reason: str | None = None,
    usage_: dict | None = None,
    logprobs: dict | None = None,
) -> dict:
    """One chat.completion.chunk: a delta ({"role"} first, then {"content"}), the finish
    reason on the last, or (delta None) the usage chunk with empty choices."""
    obj = {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if usage_ is not None:
        obj["usage"] = usage_
    return obj


def models_list(model: str, created: int, max_model_len: int) -> dict:
    """`GET /v1/models`: the one model this server serves."""
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "llmtrace",
                "root": model,
                "parent": None,
                "max_model_len": max_model_len,
            }
        ],
    }


def model_not_found(model: str) -> RequestError:
    """vLLM's answer to a model name it does not serve."""
    return RequestError(f"The model `{model}` does not exist.", "model", 404, "NotFoundError")


def tgi_finish_reason(reason: str, by_stop_string: bool) -> str:
    """Engine reasons (stop/length/abort) in TGI's words."""
    if reason == "stop":
        return "stop_sequence" if by_stop_string else "eos_token"
    return reason


def tgi_details(finish_reason: str, generated_tokens: int, seed: int | None) -> dict:
    return {"finish_reason": finish_reason, "generated_tokens": generated_tokens, "seed": seed}


def tgi_token_event(
    index: int, token_id: int, text: str, generated_text: str | None = None, details: dict | None = None
) -> dict:
    """One TGI stream event; the last one carries the full text (and details when asked for)."""
    return {
        "index": index,
        "token": {"id": token_id, "text": text, "logprob": None, "special": False},
        "generated_text": generated_text,
        "details": details,
    }
