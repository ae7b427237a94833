"""Names that producers (the engine, llmtrace's automatic instrumentation, users' spans)
and the analyzer both rely on: one place, imported by both sides, never a string literal
repeated across the boundary. docs/architecture.md describes them; this module owns them.

A span's stage is the first dotted part of its name (`tcp.send` -> `tcp`) unless given.
"""

from __future__ import annotations

from typing import Protocol

# ---- stages
HTTP = "http"
TOKENIZE = "tokenize"
DETOKENIZE = "detokenize"
QUEUE = "queue"
SCHEDULE = "schedule"
TCP = "tcp"  # sockets
IPC = "ipc"  # pipes, multiprocessing connections and queues, zmq
SHM = "shm"  # shared memory, mmap
SERIALIZE = "serialize"  # pickle / json / msgpack encode and decode
PREPROCESS = "preprocess"
FORWARD = "forward"
SAMPLING = "sampling"
SYNC = "sync"  # the host blocked on the device
ALLREDUCE = "allreduce"  # a collective of a tensor-parallel group (span name and stage; attr bytes)
POSTPROCESS = "postprocess"
STREAM = "stream"
LOGGING = "logging"
SLEEP = "sleep"
GC = "gc"
STEP = "step"  # llmtrace.step() / llmtrace.steps(): a user-marked step of the serving loop
CPU = "cpu"  # findings only: waiting for a CPU (analyze/rules/cpu_starved.py)
GIL = "gil"  # findings only: waiting for the GIL (analyze/rules/gil_contention.py)
MODEL_STAGES = (FORWARD, SAMPLING)  # device work on a GPU; their host-side children are overhead

# ---- transport span names: "<stage>.<verb>" (tcp.send, ipc.get, ...)
PIPE_WRITE = "ipc.write"  # the bytes a multiprocessing Connection writes (in its ipc.send)
PIPE_READ = "ipc.read"  # and reads (in its ipc.recv): a receive's size
PUT_VERB = ".put"  # queued a message that a thread of the process sends later (a Queue's feeder)
SEND_VERBS = (".send", PUT_VERB)  # handed a message to the transport
RECEIVE_VERBS = (".recv", ".get", ".poll")  # waited for a message (a poll: for one to arrive)
MESSAGE_STAGES = (TCP, IPC)  # transports that carry a message to another process


class Named(Protocol):
    """A span, or anything with a stage and a name."""

    @property
    def stage(self) -> str: ...

    @property
    def name(self) -> str: ...


def is_send(span: Named) -> bool:
    """A span (anything with .stage and .name) that handed a message to another process."""
    return span.stage in MESSAGE_STAGES and span.name.endswith(SEND_VERBS)


def is_receive(span: Named) -> bool:
    """A span that took (or waited for) a message from another process."""
    return span.stage in MESSAGE_STAGES and span.name.endswith(RECEIVE_VERBS)


# ---- span names with a meaning of their own
SYNC_WAIT = "sync.wait"
HTTP_REQUEST = "http.request"  # attrs: req, output_tokens, ttft_us
QUEUE_SPAN = "queue"  # a request from arrival to its first schedule (attr req)

# ---- instants
I_TOKEN = "token"  # a streamed delta (attrs: req, n = tokens so far)
I_REQ_FINISH = "req.finish"  # attrs: req, reason
I_PREEMPT = "preempt"  # attr: req
I_DEVICE_BUSY = "device.busy"  # a model span's busy device time (parent: the span; attrs busy_ns, kernels, launches)
I_PROCESS_EXIT = "process.exit"  # a parent saw a child exit (attrs: child_pid, exit_code; < 0: -signal)
I_HANDOFF_PUT = "handoff.put"  # an object put on an in-process queue inside a span (parent: that span; attr handoff)
I_HANDOFF_GET = "handoff.get"  # the same object taken by another thread or task (attr handoff: the put's)

# ---- attributes
A_TOKENS = "tokens"  # tokens a step (or span) processed
A_BATCH = "batch"  # sequences in a step
A_OUTPUT_TOKENS = "output_tokens"  # tokens a step emitted (rows not discarded)
A_SEQS = "seqs"  # sequences a span worked on
A_IDS = "ids"  # token ids a tokenizer call decoded
A_NONBLOCKING = "nonblocking"  # 1 on a receive asked not to wait (get_nowait, block=False, timeout 0)
A_PREFILL = "prefill"
A_D2H_BYTES = "d2h_bytes"  # bytes a span copied from the device to the host
A_LOGITS_BYTES = "logits_bytes"
A_BYTES = "bytes"  # bytes a transport call moved
A_NODELAY = "nodelay"  # TCP_NODELAY of the socket a tcp span used (1/0)
A_MSG = "msg"  # a message's id, the same on the span that sent it and the one that received it
A_READY = "ready"  # 1 on a receive that began with its message there (it waited outside the span)
A_REQ = "req"  # request id
A_TTFT_US = "ttft_us"
A_TOKENS_SO_FAR = "n"
A_FUNCTION = "fn"  # the instrumented library function (auto-instrumentation)
A_CALLER = "caller"  # the program's function that called it ('module.qualname')
A_INFERRED = "inferred"  # on a span llmtrace placed from what it saw (auto/hot_loop.py): how
A_BUSY_NS = "busy_ns"  # device time a model span's kernels and copies ran (their union)
A_KERNELS = "kernels"  # kernels and copies a model span ran on the device
A_LAUNCHES = "launches"  # host calls that launched them (one per kernel eagerly, one per CUDA graph)
A_HANDOFF = "handoff"  # the key shared by a hand-off's put and get
A_CHILD_PID = "child_pid"
A_EXIT_CODE = "exit_code"

# ---- counters
C_RUNNING = "running"
C_WAITING = "waiting"
C_BATCH_SIZE = "batch_size"
C_KV_BLOCKS_USED = "kv_blocks_used"
C_KV_BLOCKS_TOTAL = "kv_blocks_total"
C_DEVICE_WORK_OUTSIDE = "device.work_outside"  # device records launched in the activity window outside model spans

# ---- trace meta
M_CLOCK_ALIGNMENT = "clock_alignment"  # how processes of other hosts were put on one clock (clock_align.py)

# ---- process resource (llmtrace.configure(resource=...))
R_MAX_NUM_SEQS = "max_num_seqs"
R_PROFILE = "llmtrace.profile"  # a pipeline's declared profile (analyze/profile.py)
R_SETTINGS = "llmtrace.settings"  # {knob below: the pipeline's own config key}: fix texts name the key

# ---- knobs a finding's fix turns, as the pipeline calls them in R_SETTINGS (a pipeline that
# declares none gets a description of the knob instead of someone else's setting name)
K_KV_BLOCKS = "kv_blocks"  # how many KV-cache blocks are allocated
K_KV_BLOCK_SIZE = "kv_block_size"  # tokens per KV-cache block
K_MAX_NUM_SEQS = "max_num_seqs"  # sequences in one step
K_MAX_BATCHED_TOKENS = "max_batched_tokens"  # tokens in one step (bounds a prefill batch)
K_CUDA_GRAPHS = "cuda_graphs"  # whether decode steps replay CUDA graphs
KNOBS = (K_KV_BLOCKS, K_KV_BLOCK_SIZE, K_MAX_NUM_SEQS, K_MAX_BATCHED_TOKENS, K_CUDA_GRAPHS)
