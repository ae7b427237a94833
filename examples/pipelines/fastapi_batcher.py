"""One process, one event loop: FastAPI handlers under uvicorn put each request on an
asyncio.Queue and await a future; a background task batches the running requests, runs
the model and resolves the futures. uvicorn's own tasks (its periodic 0.1 s tick, the
handlers awaiting their results) share the loop with the batching task.

    python examples/pipelines/fastapi_batcher.py [--requests 32 --concurrency 8]
    llmtrace record -- python examples/pipelines/fastapi_batcher.py

Planted mistakes (on by default; PLANT_<NAME>=0 switches one off, PIPELINE_CLEAN=1 all):
  poll_sleep   the batching task sleeps 3 ms after every step "to let requests arrive"
               (and polls with a sleep while idle) instead of awaiting the queue
  host_argmax  the next token is an argmax in Python over logits.tolist() (the vocabulary)
  log_json     each step logs every sequence's top logits as JSON at DEBUG, the message
               built eagerly (json.dumps of 500 floats per sequence) with DEBUG off
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time

import torch
import uvicorn
from common import EOS, TinyLM, drive, load_args, planted, print_result, tokenizer
from fastapi import FastAPI
from pydantic import BaseModel

log = logging.getLogger("fastapi_batcher")
WINDOW, MAX_BATCH, LOGGED = 16, 8, 500


class GenerateRequest(BaseModel):
    prompt: str
    max_tokens: int = 16


class Batcher:
    def __init__(self, model: TinyLM):
        self.model = model
        self.queue: asyncio.Queue | None = None
        self.running: list[tuple[list[int], list[int], int, asyncio.Future]] = []  # (ids, out, max, future)
        self.poll_sleep, self.host_argmax, self.log_json = (
            planted("poll_sleep"),
            planted("host_argmax"),
            planted("log_json"),
        )

    async def submit(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((list(prompt_ids), [], max_tokens, fut))
        return await fut

    async def run(self) -> None:
        self.queue = asyncio.Queue()
        while True:
            await self.admit()
            self.step()
            if self.poll_sleep:
                await asyncio.sleep(0.003)
            else:
                await asyncio.sleep(0)  # let the handlers run

    async def admit(self) -> None:
        while not self.running:
            if not self.poll_sleep:
                self.running.append(await self.queue.get())
            elif self.queue.empty():
                await asyncio.sleep(0.003)
            else:
                break
        while not self.queue.empty() and len(self.running) < MAX_BATCH:
            self.running.append(self.queue.get_nowait())

    @torch.no_grad()
    def step(self) -> None:
        x = torch.tensor([(ids[-WINDOW:] + [0] * WINDOW)[:WINDOW] for ids, _, _, _ in self.running])
        logits = self.model(x)
        if self.log_json:
            log.debug("step logits %s", json.dumps([row[:LOGGED] for row in logits.tolist()]))
        next_ids = self.argmax_on_host(logits) if self.host_argmax else logits.argmax(dim=-1).tolist()
        still = []
        for (ids, out, n, fut), t in zip(self.running, next_ids):
            ids.append(t)
            out.append(t)
            if len(out) >= n or t == EOS:
                fut.set_result(out)
            else:
                still.append((ids, out, n, fut))
        self.running = still

    @staticmethod
    def argmax_on_host(logits: torch.Tensor) -> list[int]:
        return [max(range(len(row)), key=row.__getitem__) for row in logits.tolist()]


def make_app(batcher: Batcher, sp) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.post("/generate")
    async def generate(req: GenerateRequest) -> dict:
        out = await batcher.submit(sp.encode(req.prompt), req.max_tokens)
        return {"text": sp.decode(out), "token_ids": out}

    return app


def main() -> None:
    args = load_args(__doc__).parse_args()
    torch.set_num_threads(1)
    sp = tokenizer()
    server = uvicorn.Server(
        uvicorn.Config(make_app(Batcher(TinyLM()), sp), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="uvicorn")
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    result = drive(f"http://127.0.0.1:{port}/generate", args.requests, args.concurrency, args.max_tokens)
    server.should_exit = True
    thread.join(timeout=30)
    print_result("fastapi_batcher", result)


if __name__ == "__main__":
    main()
