"""An engine agent: one process per device/rank that runs the model for the master.

    python -m engine.agent --connect HOST:PORT --rank R

It connects to the master, learns the run config and the shared arenas from the
handshake, builds the ModelRunner, then executes one step per step message: the inputs
are read in place from the step's request slot, the sampled ids written to its reply
slot, and the reply frame says how many rows are ready. While the device runs step n
the agent takes in step n+1 if the master sent it (async scheduling) and launches it
behind n, then waits for n and replies: the device never waits for the host between
them. It exits on `shutdown` or when the master's connection goes away. Spans follow
docs/architecture.md: `agent.step` n spans the work for reply n (with the launch of n+1
inside it when that arrived meanwhile) and follows the master's carrier; waiting for the
next step is in no span.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections import deque
from time import perf_counter_ns
from typing import NamedTuple

import llmtrace
import llmtrace.gpu
from llmtrace import names
from llmtrace.context import Carrier

from . import protocol
from .batch_state import BatchState
from .ipc.shm import ArenaLayout, ShmArena, unlink_name
from .ipc.tcp import ConnectionClosed, FrameSocket, NagleFrameSocket
from .step_io import StepInput

log = logging.getLogger("engine.agent")

POLL_S = 0.0002  # while the device runs a step, how often to look for the next one
TOKEN_ENV = "ENGINE_AGENT_TOKEN"  # set by the master that spawned this agent; proves the connection is its own


def process_name(rank: int) -> str:
    return f"agent-{rank}"


class LaunchedStep(NamedTuple):
    """A step whose device work is queued; `output` is the runner's handle on its result."""

    step: int
    num_seqs: int
    carrier: Carrier | None
    arrival_ns: int
    output: object  # model_runner.PendingOutput


class Agent:
    def __init__(self, conn: FrameSocket, rank: int):
        self.conn, self.rank = conn, rank
        self.launched: deque[LaunchedStep] = deque()  # at most protocol.SLOTS, oldest first
        self.stopping = False  # a shutdown arrived while steps were in flight
        self.batch = BatchState()
        self.runner = None
        self.tp = None  # this rank's tensor-parallel group (models.tensor_parallel.TPGroup)
        self.request: ShmArena | None = None
        self.reply: ShmArena | None = None

    def handshake(self) -> None:
        """hello -> config + arenas -> build the runner -> ready {num_blocks}."""
        from .config import load_config

        token = os.environ.get(TOKEN_ENV, "")
        self.conn.send(protocol.message("hello", rank=self.rank, pid=os.getpid(), token=token))
        setup = protocol.check(self.conn.recv(), "hello")
        cfg = load_config(setup["config"])
        if cfg.antipatterns.no_tcp_nodelay:  # the same socket, mistaken from now on
            self.conn = NagleFrameSocket(self.conn.sock, self.conn.limit)
        arenas = setup["arenas"]
        self.request = ShmArena.attach(arenas["request"]["name"], ArenaLayout.from_wire(arenas["request"]["layout"]))
        self.reply = ShmArena.attach(arenas["reply"]["name"], ArenaLayout.from_wire(arenas["reply"]["layout"]))
        from .mistaken_runner import make_runner  # torch: only once the master is known to speak our protocol

        e = cfg.engine
        if setup.get("process_group"):
            self.tp = join_process_group(
                setup["process_group"], self.rank, setup["world_size"], cfg.model.resolve_device()
            )
        self.runner = make_runner(
            cfg.model,
            block_size=e.block_size,
            num_blocks=e.num_blocks,
            cuda_graphs=e.cuda_graphs,
            max_num_seqs=e.max_num_seqs,
            max_model_len=e.max_model_len,
            antipatterns=cfg.antipatterns,
            tp=self.tp,
        )
        if self.runner.device.type == "cuda":
            llmtrace.gpu.install()
        freeze_heap()
        self.conn.send(
            protocol.message(
                "ready",
                rank=self.rank,
                num_blocks=int(self.runner.num_blocks),
                vocab_size=int(self.runner.model.config.vocab_size),
            )
        )

    def serve(self) -> None:
        """Execute steps until shutdown or until the master goes away."""
        while not self.stopping:
            if self.launched:  # step n was launched during the previous agent.step
                oldest = self.launched[0]
                with llmtrace.span("agent.step", step=oldest.step, follows=oldest.carrier):
                    self._finish_oldest()
                continue
            try:
                self.conn.wait()  # idle: in no span
            except ConnectionClosed:
                log.info("%s: the master closed the connection", process_name(self.rank))
                return
            t0 = perf_counter_ns()
            msg = self.conn.recv()
            decoded = perf_counter_ns()
            if protocol.check(msg, "step", "shutdown")["type"] == "shutdown":
                return
            carrier = Carrier.from_wire(msg.get("carrier"))
            # the step's span starts with the frame's arrival; whom it follows is in the frame
            with llmtrace.span("agent.step", start_ns=t0, follows=carrier):
                llmtrace.record_span("tcp.recv", t0, decoded, **{names.A_MSG: msg["step"], names.A_READY: 1})
                self._launch(msg, carrier, t0)
                self._finish_oldest()

    def _finish_oldest(self) -> None:
        """Wait for the oldest launched step and reply to it. While the device still runs it,
        take in and launch the master's next step (async scheduling) so the device goes from
        one step straight to the next."""
        oldest = self.launched[0]
        while len(self.launched) < protocol.SLOTS and not oldest.output.done() and not self.stopping:
            if self.conn.poll(POLL_S):
                self._receive_next()
        if self.stopping:
            return
        out = oldest.output.result()
        self.launched.popleft()
        n, B = oldest.step, oldest.num_seqs
        if self.rank == 0:  # the ranks sample the same ids; one copy goes back
            with llmtrace.span("shm.write", seqs=B):
                reply = protocol.slot_views(self.reply, n)
                reply["token_ids"][:B] = out.token_ids
                reply["logprobs"][:B] = out.logprobs
                top = out.top_ids.shape[1]
                reply["top_ids"][:B, :top] = out.top_ids
                reply["top_logprobs"][:B, :top] = out.top_logprobs
        carrier = list(llmtrace.context.current())  # agent.step's: the master's tcp.recv follows it
        with llmtrace.span("tcp.send", **{names.A_MSG: n, names.A_NODELAY: int(self.conn.nodelay)}):
            self.conn.send(
                protocol.message(
                    "reply",
                    step=n,
                    carrier=carrier,
                    n=B,
                    top=out.top_ids.shape[1],
                    timings={"arrival_ns": oldest.arrival_ns, "send_ns": perf_counter_ns()},
                )
            )

    def _receive_next(self) -> None:
        t0 = perf_counter_ns()
        msg = self.conn.recv()
        if protocol.check(msg, "step", "shutdown")["type"] == "shutdown":
            self.stopping = True
            return
        carrier = Carrier.from_wire(msg.get("carrier"))
        # a later step arriving inside this agent.step: its decoding carries the sender's step
        llmtrace.record_span(
            "tcp.recv",
            t0,
            perf_counter_ns(),
            step=carrier.step if carrier else -1,
            **{names.A_MSG: msg["step"], names.A_READY: 1},
        )  # after the poll saw it
        self._launch(msg, carrier, t0)

    def _launch(self, msg: dict, carrier: Carrier | None, t_arrival: int) -> None:
        """Read step `msg`'s inputs from its request slot and queue its device work."""
        n, B, T, W = msg["step"], msg["num_seqs"], msg["num_tokens"], msg["block_width"]
        with llmtrace.span("shm.read", step=n, seqs=B, tokens=T):
            views = protocol.step_arrays(self.request, n, B, T, W)
            seq_ids = views.pop("seq_ids")
        with llmtrace.span("preprocess.batch", step=n, new=len(msg["new"]), drop=len(msg["drop"])):
            self.batch.apply(msg["new"], msg["drop"])
            temperature, top_p, top_k, seed, top_logprobs = self.batch.sampling_arrays(seq_ids)
            inp = StepInput(
                step=n,
                is_prefill=bool(msg["prefill"]),
                seq_ids=seq_ids,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed,
                top_logprobs=top_logprobs,
                banned=self.batch.banned(seq_ids, views["context_lens"]),
                **views,
            )
        self.launched.append(LaunchedStep(n, B, carrier, t_arrival, self.runner.launch(inp)))

    def close(self) -> None:
        for arena in (self.request, self.reply):
            if arena is not None:
                # The master unlinks the names once every agent has attached; if it died before
                # that (SIGKILL while the model loaded), the last process to know them is this one.
                unlink_name(arena.name)
                arena.close()
        self.conn.close()
        if self.tp is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def freeze_heap() -> None:
    """Move what start-up built (the model's modules, torch's and the config's objects) out
    of the collected generations, as vLLM does after start-up: a collection in a step then
    walks only what steps allocate. Without it a tuned run still paused for GC in steps."""
    import gc

    gc.collect()
    gc.freeze()


def join_process_group(address: str, rank: int, world: int, device: str):
    """Join the tensor-parallel group (NCCL on GPUs, one per rank; gloo on the CPU)."""
    import torch
    import torch.distributed as dist

    from .models.tensor_parallel import TPGroup

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=address, rank=rank, world_size=world)
    return TPGroup(rank, world)


def _name_process(rank: int) -> None:
    """Name this process in the spool header (recording was started from the environment)."""
    spooler = llmtrace.sink.current()
    if spooler is not None and spooler.process_name != process_name(rank):
        llmtrace.configure(process_name=process_name(rank), propagate=False)


def _parse_address(v: str) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{v!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--connect", required=True, type=_parse_address, metavar="HOST:PORT", help="the master's address")
    p.add_argument("--rank", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # The master owns this process's lifetime: Ctrl-C in the terminal reaches it too and it
    # shuts the agents down in order; a master that dies shows up here as a closed connection.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _name_process(args.rank)
    try:
        conn = FrameSocket.connect(*args.connect)
    except OSError as e:
        print(
            f"{process_name(args.rank)}: cannot connect to the master at {args.connect[0]}:{args.connect[1]}: {e}",
            file=sys.stderr,
        )
        return 1
    agent = Agent(conn, args.rank)
    try:
        agent.handshake()
        agent.serve()
    except ConnectionClosed:
        log.info("%s: the master went away", process_name(args.rank))
    except Exception as e:
        traceback.print_exc()
        _report(conn, f"{process_name(args.rank)} (pid {os.getpid()}): {type(e).__name__}: {e}")
        return 1
    finally:
        agent.close()
    return 0


def _report(conn: FrameSocket, message: str) -> None:
    try:
        conn.send(protocol.message("error", message=message))
    except ConnectionClosed:
        pass  # the master is gone too


if __name__ == "__main__":
    sys.exit(main())
