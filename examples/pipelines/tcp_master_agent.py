"""The motivating stack's shape: an HTTP front end and a scheduler (the master) in one
process, the model in an agent process reached over TCP, token ids passed through shared
memory. Each step the master writes the batch's token windows into the shared block,
sends a small header frame, and waits for the agent's reply with the next token ids.

    python examples/pipelines/tcp_master_agent.py [--requests 32 --concurrency 8]
    llmtrace record -- python examples/pipelines/tcp_master_agent.py

Planted mistakes (on by default; PLANT_<NAME>=0 switches one off, PIPELINE_CLEAN=1 all):
  nagle          the master's socket keeps Nagle's algorithm and sends each step header
                 as two writes (length, then body): the classic write-write-read stall
  json_topk      the agent replies with the top-256 logits of every row as JSON and the
                 master picks the token from them in Python
  concat_padding the master builds each sequence's window by growing an array with
                 np.concatenate, one token at a time, over the whole sequence
  log_arrays     the master logs the padded batch with %-formatting of the array
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import struct
import subprocess
import sys
import threading
from multiprocessing import resource_tracker, shared_memory

import numpy as np
from common import Request, advance, blocking, drive, load_args, planted, print_result, serve_generate, tokenizer

log = logging.getLogger("tcp_master_agent")
WINDOW, MAX_BATCH = 16, 8
HEADER = struct.Struct("<I")


def send_frame(sock: socket.socket, obj: dict, split: bool) -> None:
    body = json.dumps(obj).encode()
    if split:  # two small writes: with Nagle on, the second waits for the peer's delayed ACK
        sock.sendall(HEADER.pack(len(body)))
        sock.sendall(body)
    else:
        sock.sendall(HEADER.pack(len(body)) + body)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> dict:
    (n,) = HEADER.unpack(recv_exact(sock, HEADER.size))
    return json.loads(recv_exact(sock, n))


# ---------------------------------------------------------------- agent process


def agent_main(port: int, shm_name: str) -> None:
    import torch
    from common import TinyLM

    torch.set_num_threads(1)
    model = TinyLM()
    shm = shared_memory.SharedMemory(name=shm_name)
    resource_tracker.unregister(shm._name, "shared_memory")  # the master owns (and unlinks) it
    ids = np.ndarray((MAX_BATCH, WINDOW), dtype=np.int64, buffer=shm.buf)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies go out in one write anyway
    json_topk = planted("json_topk")
    with torch.no_grad():
        while True:
            msg = recv_frame(sock)
            if msg.get("stop"):
                break
            logits = model(torch.from_numpy(ids[: msg["batch"]].copy()))
            if json_topk:
                top = logits.topk(256, dim=-1)
                reply = {"top_logits": top.values.tolist(), "top_ids": top.indices.tolist()}
            else:
                reply = {"ids": logits.argmax(dim=-1).tolist()}
            send_frame(sock, reply, split=False)
    del ids
    shm.close()


# ---------------------------------------------------------------- master process


class Master(threading.Thread):
    def __init__(self, sock: socket.socket, shm: shared_memory.SharedMemory):
        super().__init__(name="scheduler", daemon=True)
        self.sock, self.shm = sock, shm
        self.ids = np.ndarray((MAX_BATCH, WINDOW), dtype=np.int64, buffer=shm.buf)
        self.pending: list[Request] = []
        self.lock = threading.Condition()
        self.running: list[Request] = []
        self.nagle, self.concat, self.log_arrays = planted("nagle"), planted("concat_padding"), planted("log_arrays")

    def submit(self, req: Request) -> None:
        with self.lock:
            self.pending.append(req)
            self.lock.notify()

    def run(self) -> None:
        while True:
            with self.lock:
                while not self.pending and not self.running:
                    self.lock.wait()
                take = MAX_BATCH - len(self.running)
                self.running += self.pending[:take]
                del self.pending[:take]
            self.step()

    def pad(self, seq: list[int]) -> np.ndarray:
        if self.concat:
            row = np.zeros(0, dtype=np.int64)
            for t in seq:  # grows the whole sequence one element at a time, keeps its window
                row = np.concatenate([row, np.array([t], dtype=np.int64)])
            row = row[-WINDOW:]
            return np.concatenate([row, np.zeros(WINDOW - len(row), dtype=np.int64)])
        tail = seq[-WINDOW:]
        out = np.zeros(WINDOW, dtype=np.int64)
        out[: len(tail)] = tail
        return out

    def step(self) -> None:
        batch = np.stack([self.pad(r.ids) for r in self.running])
        if self.log_arrays:
            log.debug("batch %s" % batch)
        self.ids[: len(batch)] = batch
        send_frame(self.sock, {"batch": len(batch)}, split=self.nagle)
        reply = recv_frame(self.sock)
        if "top_logits" in reply:
            next_ids = [
                ids[max(range(len(row)), key=row.__getitem__)]
                for row, ids in zip(reply["top_logits"], reply["top_ids"])
            ]
        else:
            next_ids = reply["ids"]
        self.running = advance(self.running, next_ids)


def main() -> None:
    ap = load_args(__doc__, requests=16)
    ap.add_argument("--agent", nargs=2, metavar=("PORT", "SHM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.agent:
        agent_main(int(args.agent[0]), args.agent[1])
        return
    shm = shared_memory.SharedMemory(create=True, size=MAX_BATCH * WINDOW * 8)
    listener = socket.create_server(("127.0.0.1", 0))
    agent = subprocess.Popen([sys.executable, __file__, "--agent", str(listener.getsockname()[1]), shm.name])
    try:
        sock, _ = listener.accept()
        if not planted("nagle"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        master = Master(sock, shm)
        master.start()
        server, url = serve_generate(blocking(master.submit), tokenizer())
        result = drive(url, args.requests, args.concurrency, args.max_tokens)
        server.shutdown()
        with master.lock:
            send_frame(sock, {"stop": True}, split=False)
        agent.wait(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
        del master.ids
        shm.close()
        shm.unlink()
    print_result("tcp_master_agent", result)


if __name__ == "__main__":
    main()
