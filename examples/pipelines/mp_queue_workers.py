"""Model replicas in multiprocessing worker processes (fork), fed through one
multiprocessing.Queue each, with results coming back on a shared Queue that a collector
thread of the front end reads; an http.server front end dispatches requests round-robin.
Each worker batches its running requests and decodes one step at a time.

    python examples/pipelines/mp_queue_workers.py [--requests 32 --concurrency 8 --workers 2]
    llmtrace record -- python examples/pipelines/mp_queue_workers.py

Planted mistakes (on by default; PLANT_<NAME>=0 switches one off, PIPELINE_CLEAN=1 all):
  wait_for_work  every step waits up to 4 ms on its inbox for new requests, even while it
                 has requests running (a `get(timeout=...)` meant for the idle case)
  log_arrays     an f-string in log.debug sorts the logits and formats the top candidates
                 every step, DEBUG off or on
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import queue
import threading

import numpy as np
from common import EOS, TinyLM, drive, load_args, planted, print_result, serve_generate, tokenizer

log = logging.getLogger("mp_queue_workers")
WINDOW, MAX_BATCH = 16, 8


def take_new(inbox, running: dict, wait_for_work: bool) -> bool:
    """Move queued requests into `running`; blocks only when idle (or, the mistake, up to
    4 ms every step). False on the shutdown message."""
    timeout = None if not running else (0.004 if wait_for_work else 0)
    while len(running) < MAX_BATCH:
        try:
            item = inbox.get_nowait() if timeout == 0 else inbox.get(timeout=timeout)
        except queue.Empty:
            return True
        if item is None:
            return False
        rid, ids, n = item
        running[rid] = (list(ids), [], n)
        timeout = 0  # after an arrival, take only what is queued already
    return True


def worker(inbox, results) -> None:
    import torch

    torch.set_num_threads(1)
    model = TinyLM()
    wait_for_work, log_arrays = planted("wait_for_work"), planted("log_arrays")
    running: dict[int, tuple[list[int], list[int], int]] = {}
    with torch.no_grad():
        while take_new(inbox, running, wait_for_work):
            rids = list(running)
            x = torch.tensor([(running[r][0][-WINDOW:] + [0] * WINDOW)[:WINDOW] for r in rids])
            logits = model(x).numpy()
            if log_arrays:
                log.debug(f"top candidates {np.sort(logits, axis=-1)[:, -64:].tolist()}")
            for r, t in zip(rids, logits.argmax(axis=-1).tolist()):
                ids, out, n = running[r]
                ids.append(t)
                out.append(t)
                if len(out) >= n or t == EOS:
                    del running[r]
                    results.put((r, out))


def main() -> None:
    ap = load_args(__doc__)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    inboxes, results = [mp.Queue() for _ in range(args.workers)], mp.Queue()
    procs = [mp.Process(target=worker, args=(q, results), name=f"model-worker-{i}") for i, q in enumerate(inboxes)]
    for p in procs:
        p.start()
    waiting: dict[int, tuple[threading.Event, list]] = {}
    ids, rr = itertools.count(), itertools.cycle(inboxes)
    lock = threading.Lock()

    def collect() -> None:
        while (item := results.get()) is not None:
            ev, box = waiting.pop(item[0])
            box.append(item[1])
            ev.set()

    def submit(prompt_ids: list[int], max_tokens: int) -> list[int]:
        ev, box = threading.Event(), []
        with lock:
            rid = next(ids)
            waiting[rid] = (ev, box)
            inbox = next(rr)
        inbox.put((rid, prompt_ids, max_tokens))
        ev.wait()
        return box[0]

    threading.Thread(target=collect, name="collector", daemon=True).start()
    server, url = serve_generate(submit, tokenizer())
    result = drive(url, args.requests, args.concurrency, args.max_tokens)
    server.shutdown()
    for q in inboxes:
        q.put(None)
    for p in procs:
        p.join(timeout=30)
    results.put(None)
    print_result("mp_queue_workers", result)


if __name__ == "__main__":
    main()
