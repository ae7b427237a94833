"""An asyncio front end (aiohttp) whose scheduler coroutine drives a model worker process
over a multiprocessing Pipe, one decode step per round trip: it sends the step's new
requests, waits for the worker's next tokens, and resolves each request's future.

    python examples/pipelines/asyncio_pipe_worker.py [--requests 32 --concurrency 8]
    llmtrace record -- python examples/pipelines/asyncio_pipe_worker.py

Planted mistakes (on by default; PLANT_<NAME>=0 switches one off, PIPELINE_CLEAN=1 all):
  poll_sleep     the scheduler polls the pipe with `await asyncio.sleep(0.002)` instead of
                 waiting on its file descriptor
  pickle_logits  the worker sends the whole logits array back (pickled) and the front end
                 takes the argmax
  log_arrays     every step is logged at INFO with the step's token array
"""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing as mp
import threading

import numpy as np
from aiohttp import web
from common import EOS, TinyLM, drive, load_args, planted, print_result, tokenizer

log = logging.getLogger("asyncio_pipe_worker")
WINDOW, MAX_BATCH = 16, 8


def worker(conn) -> None:
    import torch

    torch.set_num_threads(1)
    model = TinyLM()
    seqs: dict[int, list[int]] = {}
    send_logits = planted("pickle_logits")
    with torch.no_grad():
        while True:
            msg = conn.recv()
            if msg is None:
                return
            for rid, t in msg["sampled"]:  # the tokens the front end chose from the logits
                seqs[rid].append(t)
            for rid, ids in msg["new"]:
                seqs[rid] = list(ids)
            for rid in msg["done"]:
                seqs.pop(rid, None)
            rids = list(seqs)
            x = torch.tensor([(seqs[r][-WINDOW:] + [0] * WINDOW)[:WINDOW] for r in rids])
            logits = model(x)
            if send_logits:
                conn.send({"rids": rids, "logits": logits.numpy()})
                continue
            ids = logits.argmax(dim=-1).tolist()
            for r, t in zip(rids, ids):
                seqs[r].append(t)
            conn.send({"rids": rids, "ids": ids})


class Scheduler:
    def __init__(self, conn):
        self.conn, self.step_n = conn, 0
        self.waiting: list[tuple[int, list[int], int, asyncio.Future]] = []
        self.running: dict[int, tuple[list[int], int, asyncio.Future]] = {}
        self.wake = asyncio.Event()
        self.ids = 0
        self.poll_sleep, self.log_arrays = planted("poll_sleep"), planted("log_arrays")

    def submit(self, prompt_ids: list[int], max_tokens: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.ids += 1
        self.waiting.append((self.ids, prompt_ids, max_tokens, fut))
        self.wake.set()
        return fut

    async def reply(self) -> dict:
        if self.poll_sleep:
            while not self.conn.poll():
                await asyncio.sleep(0.002)
            return self.conn.recv()
        ready = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(self.conn.fileno())
        return self.conn.recv()

    async def run(self) -> None:
        done: list[int] = []
        sampled: list[tuple[int, int]] = []
        while True:
            if not self.waiting and not self.running:
                self.wake.clear()
                await self.wake.wait()
            take = self.waiting[: MAX_BATCH - len(self.running)]
            del self.waiting[: len(take)]
            for rid, _, n, fut in take:
                self.running[rid] = ([], n, fut)
            self.conn.send({"new": [(rid, ids) for rid, ids, _, _ in take], "done": done, "sampled": sampled})
            msg = await self.reply()
            next_ids = np.argmax(msg["logits"], axis=-1).tolist() if "logits" in msg else msg["ids"]
            sampled = list(zip(msg["rids"], next_ids)) if "logits" in msg else []
            if self.log_arrays:
                log.info("step %d tokens %s", self.step_n, np.array(next_ids))
            self.step_n += 1
            done = self.advance(msg["rids"], next_ids)

    def advance(self, rids: list[int], next_ids: list[int]) -> list[int]:
        done = []
        for rid, t in zip(rids, next_ids):
            out, n, fut = self.running[rid]
            out.append(t)
            if len(out) >= n or t == EOS:
                del self.running[rid]
                fut.set_result(out)
                done.append(rid)
        return done


def make_app(sched: Scheduler, sp) -> web.Application:
    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        out = await sched.submit(sp.encode(body["prompt"]), int(body.get("max_tokens", 16)))
        return web.json_response({"text": sp.decode(out), "token_ids": out})

    app = web.Application()
    app.router.add_post("/generate", generate)
    return app


async def serve(conn, port_box: list, ready: threading.Event, stop: threading.Event) -> None:
    sched = Scheduler(conn)
    runner = web.AppRunner(make_app(sched, tokenizer()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port_box.append(site._server.sockets[0].getsockname()[1])
    ready.set()
    task = asyncio.create_task(sched.run())
    while not stop.is_set():
        await asyncio.sleep(0.05)
    task.cancel()
    await runner.cleanup()


def main() -> None:
    args = load_args(__doc__).parse_args()
    if planted("log_arrays"):
        logging.basicConfig(level=logging.INFO, stream=io.StringIO())  # logged, and written somewhere
    ours, theirs = mp.Pipe()
    proc = mp.Process(target=worker, args=(theirs,), name="model-worker")
    proc.start()
    port, ready, stop = [], threading.Event(), threading.Event()
    front = threading.Thread(target=lambda: asyncio.run(serve(ours, port, ready, stop)), name="front-end")
    front.start()
    ready.wait()
    result = drive(f"http://127.0.0.1:{port[0]}/generate", args.requests, args.concurrency, args.max_tokens)
    stop.set()
    front.join()
    ours.send(None)
    proc.join(timeout=30)
    print_result("asyncio_pipe_worker", result)


if __name__ == "__main__":
    main()
