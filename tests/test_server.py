"""The HTTP front end against a real engine (tiny model, one agent process), over loopback.

One engine serves the whole module from a background thread with its own event loop, so
plain blocking clients (http.client, hypothesis) and async ones can both talk to it.
The last test kills the agent, so it must stay last.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import threading
import time
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import drain_recorded_trace

from engine import api_schema
from engine.chat_template import ChatTemplate
from engine.config import load_config
from engine.server import start_engine
from engine.stop_strings import StopStringMatcher
from llmtrace import recorder, sink
from llmtrace.timeline import Trace

MAX_MODEL_LEN = 128
PROMPT = "The quick brown fox jumps over the lazy dog."  # 17 tokens with BOS
ENGINE = {
    "max_model_len": MAX_MODEL_LEN,
    "max_batched_tokens": 256,
    "max_num_seqs": 4,
    "max_waiting": 4,
    "num_blocks": 64,
}


class EngineThread:
    """A running engine (master + agent + server) in its own thread's event loop."""

    def __init__(self, cfg):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self.thread.start()
        self.handle = self.call(start_engine(cfg, port=0))
        parts = urlsplit(self.handle.url)
        self.url, self.host, self.port = self.handle.url, parts.hostname, parts.port

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self) -> dict:
        async def read():
            return self.handle.master.stats()

        return self.call(read())

    def wait_idle(self, timeout: float = 10) -> dict:
        """Stats once nothing runs or waits and every KV block is free (fails after timeout)."""
        end = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s["running"] == 0 and s["waiting"] == 0 and s["kv_blocks_used"] == 0:
                return s
            assert time.monotonic() < end, f"engine not idle after {timeout} s: {s}"
            time.sleep(0.05)

    def close(self):
        try:
            self.call(self.handle.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def engine():
    e = EngineThread(load_config({"engine": ENGINE}))
    yield e
    e.close()


def post(engine, path: str, body, headers: dict | None = None, timeout: float = 30):
    """(status, headers, parsed JSON or raw bytes) of one blocking request."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()  # orjson stops at 64-bit ints
    conn = http.client.HTTPConnection(engine.host, engine.port, timeout=timeout)
    try:
        conn.request("POST", path, raw, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.getheader("Content-Type", "").startswith("application/json"):
        data = orjson.loads(data)
    return resp.status, resp, data


def get(engine, path: str):
    conn = http.client.HTTPConnection(engine.host, engine.port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp, resp.read()
    finally:
        conn.close()


def sse_events(raw: bytes) -> list:
    """Payloads of `data:` lines; "[DONE]" stays a string."""
    out = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            data = line[5:].strip()
            out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


# ---- the endpoints -----------------------------------------------------------------------------


def test_completion_non_stream_and_stream_agree(engine):
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
        # benchmark clients send these unsupported fields at their "off" values
        "n": 1,
        "best_of": 1,
        "logprobs": None,
        "echo": False,
        "frequency_penalty": 0.0,
    }
    status, resp, data = post(engine, "/v1/completions", body, {"X-Request-Id": "same-1"})
    assert status == 200 and resp.getheader("X-Request-Id") == "same-1"
    assert data["object"] == "text_completion" and data["model"] == "tiny" and data["id"] == "cmpl-same-1"
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"]
    assert data["usage"] == {"prompt_tokens": 17, "completion_tokens": 12, "total_tokens": 29}

    status, resp, raw = post(
        engine, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert {e["id"] for e in events[:-1]} == {"cmpl-" + resp.getheader("X-Request-Id")}
    chunks, usage_chunk = events[:-2], events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == data["usage"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]  # greedy: same text
    engine.wait_idle()


CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}]


def test_chat_non_stream_and_stream_agree(engine):
    body = {
        "model": "tiny",
        "messages": CHAT,
        "max_completion_tokens": 10,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": False,
        "min_tokens": 0,
    }
    status, resp, data = post(engine, H, body, {"X-Request-Id": "chat-1"})
    assert status == 200 and data["object"] == "chat.completion" and data["id"] == "chatcmpl-chat-1"
    (choice,) = data["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 10
    prompt = ChatTemplate().render(CHAT)  # the default (Llama-2) template: what the prompt count says
    assert prompt.startswith("[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nName a colour. [/INST]")
    assert data["usage"]["prompt_tokens"] == len(engine.handle.server.tokenizer.encode(prompt))
    status, _, raw = post(engine, H, {**body, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(raw)
    assert status == 200 and events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    chunks = [e for e in events[:-1] if e["choices"]]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in chunks)
    assert text == choice["message"]["content"] and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"] == data["usage"] and events[-2]["choices"] == []


def test_logprobs_of_the_chosen_tokens(engine):
    status, _, data = post(
        engine, C, {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    )
    lp = data["choices"][0]["logprobs"]
    assert status == 200 and len(lp["tokens"]) == len(lp["token_logprobs"]) == 5
    assert all(x <= 0 for x in lp["token_logprobs"]) and lp["text_offset"][0] == 0
    body = {"messages": CHAT, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": True}
    status, _, data = post(engine, H, body)
    content = data["choices"][0]["logprobs"]["content"]
    assert status == 200 and len(content) == 5 and all(c["logprob"] <= 0 and c["bytes"] for c in content)
    status, _, raw = post(engine, H, {**body, "stream": True})
    streamed = [
        c
        for e in sse_events(raw)[:-1]
        if e["choices"] and e["choices"][0]["logprobs"]
        for c in e["choices"][0]["logprobs"]["content"]
    ]
    assert [c["logprob"] for c in streamed] == pytest.approx([c["logprob"] for c in content])


def test_top_logprobs_list_the_most_likely_tokens_at_each_position(engine):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": 3}
    status, _, data = post(engine, C, body)
    lp = data["choices"][0]["logprobs"]
    assert status == 200 and len(lp["top_logprobs"]) == len(lp["tokens"]) == 4
    for token, chosen, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        ranked = sorted(top.values(), reverse=True)
        assert len(top) <= 3 and ranked[0] == pytest.approx(chosen)  # greedy: the chosen token is the likeliest
        assert top.get(token, chosen) == pytest.approx(chosen)
    chat = {
        "messages": CHAT,
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 2,
    }
    status, _, data = post(engine, H, chat)
    content = data["choices"][0]["logprobs"]["content"]
    assert status == 200 and [len(c["top_logprobs"]) for c in content] == [2] * 4
    assert all(c["top_logprobs"][0]["logprob"] >= c["top_logprobs"][1]["logprob"] for c in content)
    status, _, raw = post(engine, H, {**chat, "stream": True})
    streamed = [
        c
        for e in sse_events(raw)[:-1]
        if e["choices"] and e["choices"][0]["logprobs"]
        for c in e["choices"][0]["logprobs"]["content"]
    ]
    assert [c["top_logprobs"] for c in streamed] == [c["top_logprobs"] for c in content]
    plain = post(engine, C, {**body, "logprobs": 0})[2]["choices"][0]["logprobs"]
    assert plain["top_logprobs"] is None and plain["token_logprobs"] == pytest.approx(lp["token_logprobs"])


def test_min_tokens_is_accepted_and_generates_at_least_that_many(engine):
    status, _, data = post(engine, C, {"prompt": PROMPT, "max_tokens": 9, "min_tokens": 9, "temperature": 0})
    assert status == 200 and data["usage"]["completion_tokens"] == 9
    status, _, data = post(engine, H, {"messages": CHAT, "max_tokens": 4, "min_tokens": 4})
    assert status == 200 and data["usage"]["completion_tokens"] == 4


def test_chat_without_a_budget_fills_the_context(engine):
    status, _, data = post(engine, H, {"messages": CHAT, "temperature": 0, "ignore_eos": True})
    assert status == 200
    assert data["usage"]["total_tokens"] == MAX_MODEL_LEN and data["choices"][0]["finish_reason"] == "length"


def test_n_choices_models_and_unknown_model(engine):
    status, _, data = post(engine, C, {"prompt": PROMPT, "max_tokens": 6, "n": 3, "seed": 7, "ignore_eos": True})
    assert status == 200 and [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert data["usage"] == {"prompt_tokens": 17, "completion_tokens": 18, "total_tokens": 35}
    assert len({c["text"] for c in data["choices"]}) > 1  # seeds 7, 8, 9
    status, _, raw = get(engine, "/v1/models")
    models = orjson.loads(raw)
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    for path, body in ((C, {"model": "gpt-9", "prompt": "hi"}), (H, {"model": "gpt-9", "messages": CHAT})):
        status, _, data = post(engine, path, body)
        assert status == 404 and data["error"]["message"] == "The model `gpt-9` does not exist."
    engine.wait_idle()


def test_the_openai_client_works(engine):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{engine.url}/v1", api_key="none")
    assert [m.id for m in client.models.list()] == ["tiny"]
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    stream = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == chat.choices[0].message.content
    text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, n=2, seed=1)
    assert len(text.choices) == 2
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CHAT)


def test_generate_non_stream_and_stream(engine):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "ignore_eos": True, "details": True}}
    status, _, data = post(engine, "/generate", body)
    assert status == 200
    assert data["details"] == {"finish_reason": "length", "generated_tokens": 6, "seed": None}
    status, _, raw = post(engine, "/generate", {**body, "stream": True})
    assert status == 200
    events = sse_events(raw)
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert all(isinstance(e["token"]["id"], int) for e in events)
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events) == data["generated_text"]
    assert last["details"]["finish_reason"] == "length"
    # without do_sample and warpers /generate is greedy, like the OpenAI call at temperature 0
    status, _, oai = post(
        engine, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    )
    assert oai["choices"][0]["text"] == data["generated_text"]


def test_stop_string_cuts_the_text_and_frees_the_request(engine):
    base = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = post(engine, "/v1/completions", base)[2]["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.find(stop)]
    status, _, data = post(engine, "/v1/completions", {**base, "stop": [stop]})
    assert status == 200
    assert data["choices"][0] == {"index": 0, "text": cut, "logprobs": None, "finish_reason": "stop"}
    assert data["usage"]["completion_tokens"] < 12
    events = sse_events(post(engine, "/v1/completions", {**base, "stop": stop, "stream": True})[2])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    tgi = post(
        engine,
        "/generate",
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "stop": [stop], "ignore_eos": True, "details": True}},
    )[2]
    assert tgi["generated_text"] == cut and tgi["details"]["finish_reason"] == "stop_sequence"
    engine.wait_idle()


@pytest.mark.parametrize(
    "stops,deltas,expect",
    [
        (("END",), ["abc", "E", "N", "D", "x"], ("abc", "END")),
        (("END",), ["abE", "Nx", "y"], ("abENxy", None)),
        (("a", "bc"), ["xb", "cd"], ("x", "bc")),
        (("aab",), ["aa", "aab"], ("aa", "aab")),
        (("cd", "b"), ["abcd"], ("a", "b")),  # the first in the text, not in the list
    ],
)
def test_stop_string_matcher_holds_back_partial_matches(stops, deltas, expect):
    m, out, hit = StopStringMatcher(stops), "", None
    for d in deltas:
        text, hit = m.feed(d)
        out += text
        if hit:
            break
    if not hit:
        out += m.flush()
    assert (out, hit) == expect


def test_health(engine):
    status, resp, raw = get(engine, "/health")
    data = json.loads(raw)
    assert status == 200 and data["status"] == "ok" and data["kv_blocks_total"] == 64


def test_metrics_parse_as_prometheus_text(engine):
    from prometheus_client.parser import text_string_to_metric_families

    post(engine, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "ignore_eos": True})
    status, resp, raw = get(engine, "/metrics")
    assert status == 200 and resp.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    # vLLM's names and labels, so its dashboards and scrapers read these
    vllm = {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:request_success",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:request_time_per_output_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_inference_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
    }
    assert vllm <= set(families), vllm - set(families)
    assert all(s.labels["model_name"] == "tiny" for f in families.values() for s in f.samples)
    assert families["vllm:num_requests_running"].type == "gauge"
    assert 0 <= families["vllm:kv_cache_usage_perc"].samples[0].value <= 1
    ttft = families["vllm:time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    buckets = [s for s in ttft.samples if s.name.endswith("_bucket")]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf"
    count = next(s.value for s in ttft.samples if s.name.endswith("_count"))
    assert counts[-1] == count >= 1
    finished = {
        s.labels["finished_reason"]: s.value
        for s in families["vllm:request_success"].samples
        if s.name.endswith("_total")
    }
    assert finished["length"] >= 1 and sum(finished.values()) >= count  # every request that got a first token
    assert families["vllm:generation_tokens"].samples[0].value >= 3
    itl = next(s.value for s in families["vllm:inter_token_latency_seconds"].samples if s.name.endswith("_count"))
    queue = next(s.value for s in families["vllm:request_queue_time_seconds"].samples if s.name.endswith("_count"))
    assert itl >= 2 and queue >= 1  # the 3-token request: two gaps


# ---- bad input ---------------------------------------------------------------------------------

LONG = "word " * 200  # 202 tokens > max_model_len
C, G, H = "/v1/completions", "/generate", "/v1/chat/completions"
BAD = [
    (C, b"not json", 400, None),
    (C, b"", 400, None),
    (C, b"[1, 2]", 400, None),
    (C, b'{"prompt": "\xff"}', 400, None),
    (C, b'{"prompt": "hi", "temperature": NaN}', 400, None),
    (C, b'{"prompt": "hi", "temperature": Infinity}', 400, None),
    (C, b'{"prompt": "hi", "temperature": 1e400}', 400, None),
    (C, b'{"prompt": "hi", "user": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    (C, b'{"prompt": "hi", "user": ' + b"[" * 500 + b"]" * 500 + b"}", 400, "user"),
    (C, {}, 400, "prompt"),
    (C, {"prompt": ""}, 400, "prompt"),
    (C, {"prompt": 5}, 400, "prompt"),
    (C, {"prompt": ["a", "b"]}, 400, "prompt"),
    (C, {"prompt": [1, 2, 3]}, 400, "prompt"),
    (C, {"prompt": LONG}, 400, "prompt"),
    (C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": 10**30}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": 2**63}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": MAX_MODEL_LEN + 1}, 400, "max_tokens"),
    (C, {"prompt": PROMPT, "max_tokens": MAX_MODEL_LEN - 10}, 400, "max_tokens"),  # prompt + output too long
    (C, {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    (C, {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    (C, {"prompt": "hi", "temperature": False}, 400, "temperature"),
    (C, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    (C, {"prompt": "hi", "top_k": 0}, 400, "top_k"),
    (C, {"prompt": "hi", "top_k": -2}, 400, "top_k"),
    (C, {"prompt": "hi", "top_k": True}, 400, "top_k"),
    (C, {"prompt": "hi", "seed": -1}, 400, "seed"),
    (C, {"prompt": "hi", "seed": 2**64}, 400, "seed"),
    (C, {"prompt": "hi", "stop": 5}, 400, "stop"),
    (C, {"prompt": "hi", "stop": ["a", 1]}, 400, "stop"),
    (C, {"prompt": "hi", "stop": ["a"] * 5}, 400, "stop"),
    (C, {"prompt": "hi", "stop": [""]}, 400, "stop"),
    (C, {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    (C, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {"prompt": "hi", "stream": True, "stream_options": {"x": 1}}, 400, "stream_options.x"),
    (C, {"prompt": "hi", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    (C, {"prompt": "hi", "n": 2, "stream": True}, 400, "n"),
    (C, {"prompt": "hi", "n": 17}, 400, "n"),
    (C, {"prompt": "hi", "min_tokens": 17}, 400, "min_tokens"),  # more than max_tokens (16)
    (C, {"prompt": "hi", "min_tokens": -1}, 400, "min_tokens"),
    (H, {"messages": []}, 400, "messages"),
    (H, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    (H, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (H, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "messages"),
    (H, {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (H, {"messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, "tools"),
    (C, {"prompt": "hi", "echo": True}, 400, "echo"),
    (H, {"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, 400, "logprobs"),
    (H, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "top_logprobs"),  # no logprobs
    (H, {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (C, {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    (C, {"prompt": "hi", "ignore_eos": 1}, 400, "ignore_eos"),
    (G, {"inputs": ""}, 400, "inputs"),
    (G, {"prompt": "hi"}, 400, "prompt"),
    (G, {"inputs": "hi", "parameters": []}, 400, "parameters"),
    (G, {"inputs": "hi", "parameters": {"max_new_tokens": 0}}, 400, "parameters.max_new_tokens"),
    (G, {"inputs": "hi", "parameters": {"max_new_tokens": MAX_MODEL_LEN + 1}}, 400, "parameters.max_new_tokens"),
    (G, {"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_MODEL_LEN - 10}}, 400, "parameters.max_new_tokens"),
    (G, {"inputs": "hi", "parameters": {"temperature": 0}}, 400, "parameters.temperature"),
    (G, {"inputs": "hi", "parameters": {"top_k": -1}}, 400, "parameters.top_k"),
    (G, {"inputs": "hi", "parameters": {"best_of": 2}}, 400, "parameters.best_of"),
    (G, {"inputs": "hi", "stream": 1}, 400, "stream"),
    (G, {"inputs": LONG}, 400, "inputs"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[0][1:]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_json_error_naming_the_field(engine, path, body, status, param):
    got, resp, data = post(engine, path, body)
    assert got == status, data
    assert set(data) == {"error"}
    err = data["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_bad_request_id_header(engine):
    status, _, data = post(engine, C, {"prompt": "hi", "max_tokens": 1}, {"X-Request-Id": "a b"})
    assert status == 400 and data["error"]["param"] == "X-Request-Id"


def test_oversize_body_unknown_route_and_method_are_json(engine):
    status, _, data = post(engine, C, b'{"prompt": "' + b"a" * (1 << 20) + b'"}')
    assert status == 413 and "body size" in data["error"]["message"]
    status, _, data = post(engine, "/nope", {})
    assert status == 404 and data["error"]["type"] == "invalid_request_error"
    status, resp, raw = get(engine, C)
    assert status == 405 and orjson.loads(raw)["error"]["message"]


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_KEYS = st.sampled_from(sorted(api_schema._COMPLETION_FIELDS | api_schema._GENERATE_FIELDS)) | st.text(max_size=8)
_PARAMS = st.dictionaries(
    st.sampled_from(sorted(api_schema._GENERATE_PARAMETERS)) | st.text(max_size=6), _JSON, max_size=4
)
_BODIES = st.one_of(
    st.dictionaries(_KEYS, _JSON, max_size=6),
    st.fixed_dictionaries({"inputs": _JSON | st.text(min_size=1, max_size=20)}, optional={"parameters": _PARAMS}),
    st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=20)},
        optional={k: _JSON for k in ("max_tokens", "temperature", "top_p", "top_k", "stop")},
    ),
    st.binary(max_size=64),
)
FUZZ_SECONDS = 10


def _cheap(path: str, body):
    """A body the server would accept generates one token only, to keep the loop fast."""
    if not isinstance(body, dict):
        return body
    parse = api_schema.parse_completion if path == C else api_schema.parse_generate
    try:
        parse(body, MAX_MODEL_LEN)
    except api_schema.RequestError:
        return body
    if path == C:
        return {**body, "max_tokens": 1}
    return {**body, "parameters": {**(body.get("parameters") or {}), "max_new_tokens": 1}}


def test_fuzzed_bodies_never_get_a_5xx(engine):
    end = time.monotonic() + FUZZ_SECONDS
    seen = []

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(path=st.sampled_from([C, G]), body=_BODIES)
    def check(path, body):
        if time.monotonic() > end:
            return
        status, _, data = post(engine, path, _cheap(path, body))
        seen.append(status)
        assert status in (200, 400), (path, body, status, data)
        if status == 400:
            assert data["error"]["type"] == "invalid_request_error"

    check()
    assert len(seen) >= 50 and 400 in seen
    status, _, data = post(engine, C, {"prompt": PROMPT, "max_tokens": 2, "ignore_eos": True})
    assert status == 200 and data["usage"]["completion_tokens"] == 2
    engine.wait_idle()


# ---- load, disconnects, tracing ----------------------------------------------------------------


async def test_queue_full_is_429_with_retry_after(engine):
    body = {"prompt": PROMPT, "max_tokens": 6, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:

        async def one():
            async with s.post(engine.url + C, json=body) as r:
                return r.status, r.headers.get("Retry-After"), await r.json()

        results = await asyncio.gather(*(one() for _ in range(16)))
    statuses = sorted(r[0] for r in results)
    assert set(statuses) == {200, 429}, statuses  # 4 running + 4 waiting fit, the rest must wait
    for status, retry, data in results:
        if status == 429:
            assert retry == "1" and data["error"]["type"] == "rate_limit_error"
        else:
            assert data["usage"]["completion_tokens"] == 6
    engine.wait_idle()


@pytest.mark.parametrize(
    "path,body",
    [
        (C, {"prompt": PROMPT, "max_tokens": 100, "ignore_eos": True, "stream": True}),
        (G, {"inputs": PROMPT, "parameters": {"max_new_tokens": 100, "ignore_eos": True}, "stream": True}),
        (C, {"prompt": PROMPT, "max_tokens": 100, "ignore_eos": True}),  # a client that gives up waiting
    ],
)
def test_client_disconnect_aborts_the_request(engine, path, body):
    _, _, raw = get(engine, "/metrics")
    aborted = _finished(raw, "abort")
    conn = http.client.HTTPConnection(engine.host, engine.port, timeout=30)
    conn.request("POST", path, orjson.dumps(body), {"Content-Type": "application/json"})
    if body.get("stream"):
        resp = conn.getresponse()
        assert resp.status == 200
        while not resp.readline().startswith(b"data:"):
            pass
    end = time.monotonic() + 10
    while engine.stats()["kv_blocks_used"] == 0:
        assert time.monotonic() < end, "the request never started"
        time.sleep(0.02)
    conn.close()  # hang up with ~99 tokens to go
    assert engine.wait_idle()["kv_blocks_used"] == 0
    _, _, raw = get(engine, "/metrics")
    assert _finished(raw, "abort") == aborted + 1


def _finished(metrics: bytes, reason: str) -> float:
    series = f'vllm:request_success_total{{model_name="tiny",finished_reason="{reason}"}}'
    m = re.search(re.escape(series) + r" (\S+)", metrics.decode())
    return float(m.group(1)) if m else 0.0


def _traced_request(engine, prompt: str, rid: str) -> Trace:
    recorder.drain()
    recorder.set_enabled(True)
    try:
        status, _, _ = post(engine, C, {"prompt": prompt, "max_tokens": 4, "ignore_eos": True}, {"X-Request-Id": rid})
    finally:
        recorder.set_enabled(False)
    assert status == 200
    return drain_recorded_trace()


def _strings(trace: Trace) -> list[str]:
    return [v for e in (*trace.spans, *trace.instants) for v in e.attrs.values() if isinstance(v, str)]


@pytest.mark.skipif(sink.current() is not None, reason="a spooler in this process would take the records")
def test_request_spans_record_counts_not_text(engine):
    secret = "zebra quartz " * 3
    trace = _traced_request(engine, secret, "traced-1")
    req = next(s for s in trace.spans if s.name == "http.request" and s.attrs.get("req") == "traced-1")
    assert req.attrs["prompt_tokens"] == len(engine.handle.server.tokenizer.encode(secret))
    assert req.attrs["output_tokens"] == 4 and req.attrs["ttft_us"] > 0
    tok = next(s for s in trace.spans if s.name == "tokenize" and s.attrs.get("req") == "traced-1")
    assert req.start_ns <= tok.start_ns <= tok.end_ns <= req.end_ns
    assert not any("zebra" in v for v in _strings(trace))

    engine.handle.server.capture_text = True  # what trace.capture_text: true configures
    try:
        trace = _traced_request(engine, secret, "traced-2")
    finally:
        engine.handle.server.capture_text = False
    text = next(i for i in trace.instants if i.name == "http.text" and i.attrs["req"] == "traced-2")
    assert text.attrs["prompt"] == secret and text.attrs["completion"]


# ---- must stay last: kills the engine's agent --------------------------------------------------


def test_agent_death_is_503_and_ends_open_streams(engine):
    conn = http.client.HTTPConnection(engine.host, engine.port, timeout=30)
    conn.request(
        "POST",
        C,
        orjson.dumps({"prompt": PROMPT, "max_tokens": 100, "ignore_eos": True, "stream": True}),
        {"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    while not resp.readline().startswith(b"data:"):
        pass
    os.kill(engine.handle.master.agent_pids[0], signal.SIGKILL)
    events = sse_events(resp.read())
    conn.close()
    assert events and "error" in events[-1] and "[DONE]" not in events
    assert events[-1]["error"]["type"] == "service_unavailable"
    status, _, raw = get(engine, "/health")
    assert status == 503 and json.loads(raw)["status"] == "unavailable"
    status, _, data = post(engine, C, {"prompt": "hi", "max_tokens": 1})
    assert status == 503 and data["error"]["type"] == "service_unavailable"
    status, _, data = post(engine, C, {"prompt": "hi", "max_tokens": 0})
    assert status == 400  # bad input is still the client's problem
