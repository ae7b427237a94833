"""`full-logits-transfer`: the full [batch, vocab] logits copied to the host and sampled
there (argmax/softmax/sort in numpy) instead of sampling on the device and copying the ids.

Fingerprints, on the steps' critical path:
- a span whose attr `d2h_bytes` (bytes the span copies device -> host; the engine's
  `sampling` span records it), `logits_bytes` or `bytes` (automatic instrumentation's
  `sync.wait` around Tensor.tolist/.cpu/.numpy, a transport send) is at least 1 KiB per
  sequence of the step (`breakdown.moves_logits`): it moved logits, not ids;
- a `sampling.host` span (host-side sampling nested in `sampling`);
- function-level events inside the sampling stage: `Tensor.cpu`, `Tensor.numpy`,
  `Tensor.tolist`, numpy `argmax`/`argsort`/`exp`, softmax helpers, `host_sample`.
- the program's functions that made such a copy (the span's `caller`, set by automatic
  instrumentation), where the host argmax / softmax over the copied rows runs, unless
  they also run the model (the step loop itself);
- a receive on the critical path of at least RECEIVED_BYTES_PER_SEQ per sequence in at
  least half of the steps (a process that samples logits another computed: the sender's
  send is off the path, on its own thread), counted from the start of the send that
  ended it (before that it waited for the sender's work, which the breakdown charges).
Saving per step: that host time (less what a log call there explains) minus what sampling
on the device costs: the measured device time of `sampling` spans when the trace has
some, else the logits read once at DEVICE_READ_BYTES_PER_S (GPU) or HOST_READ_BYTES_PER_S
(CPU) plus one kernel launch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

from ... import names
from ...frame_labels import is_user_code
from ...names import is_receive
from ..breakdown import LOGITS_BYTES_ATTRS, MODEL_STAGES, moves_logits
from ..functions import Call
from ..stats import median

if TYPE_CHECKING:
    from ...timeline import Span
    from ..analysis import Analysis, Suggestion

ID = "full-logits-transfer"
AFTER = ("log-in-hot-path",)  # a top-k computed only to be logged, in the sampling function, is the log's
PATTERN = re.compile(
    r"^sampling\.host$|(^|\.)Tensor\.(cpu|numpy|tolist)$"
    r"|(^|\.)(np|numpy)\.(argmax|argsort|exp|max|sum)$|(^|\.)(softmax|log_softmax|host_sample)$"
)
DEVICE_READ_BYTES_PER_S = 1.0e12  # conservative HBM read rate of a datacenter GPU
HOST_READ_BYTES_PER_S = 1.0e10  # conservative DRAM read rate of one CPU core
LAUNCH_NS = 20_000
RECEIVED_BYTES_PER_SEQ = 4096  # a received vocab row (>= 1k floats), not ids nor a short prompt
RECEIVED_STEP_SHARE = 0.5  # of the steps with such a receive: every step's logits, not prompts


def _logits_bytes(span: Span, seqs: int) -> float | None:
    if not moves_logits(span, seqs):
        return None
    return float(max(v for k in LOGITS_BYTES_ATTRS if isinstance(v := span.attrs.get(k), (int, float))))


def _device_sampling_ns(ctx: Analysis, logits_bytes: float | None) -> tuple[float, str]:
    dev = [d for s in ctx.index.by_stage.get(names.SAMPLING, ()) if (d := s.device_dur_ns) is not None]
    if dev:
        return median(dev), "measured device time of sampling"
    if not logits_bytes:
        return 0.0, "no device estimate (no logits size recorded)"
    if ctx.has_device_timing() or ctx.index.by_stage.get(names.SYNC):
        return logits_bytes / DEVICE_READ_BYTES_PER_S * 1e9 + LAUNCH_NS, "logits bytes at GPU read rate"
    return logits_bytes / HOST_READ_BYTES_PER_S * 1e9, "logits bytes at CPU read rate"


def _transfer(s: Span) -> bool:
    """A copy or a send (not a receive, whose time is mostly waiting for the sender)."""
    return not (is_receive(s) or s.name == names.PIPE_READ)


def _host_sampling(ctx: Analysis) -> tuple[list[Call], list[float]]:
    """Calls doing host-side sampling, and the logits sizes seen."""
    sizes, calls = [], []
    for sc in ctx.steps:
        for stage, s in sc.stage_spans:
            b = _logits_bytes(s, sc.tokens) if _transfer(s) else None
            if b:
                sizes.append(b)
                calls.append(Call(stage, sc.step, s.pid, s.start_ns, s.end_ns, s.name, "span", True, s))
    seqs = {sc.step: sc.tokens for sc in ctx.steps}
    for c in ctx.functions.select(host_side=True):
        b = _logits_bytes(c.span, seqs.get(c.step, 1)) if c.span is not None and _transfer(c.span) else None
        if b or (c.stage == names.SAMPLING and PATTERN.search(c.name)):
            calls.append(c)
            if b:
                sizes.append(b)
    received = _received_logits(ctx, seqs)
    if len({c.step for c in received}) >= RECEIVED_STEP_SHARE * len(ctx.steps):
        calls += received
        sizes += [float(c.span.attrs[names.A_BYTES]) for c in received if c.span is not None]
    return calls, sizes


def _received_logits(ctx: Analysis, seqs: dict[int, int]) -> list[Call]:
    """Receives on the path that took a vocab row per sequence, from their sender's send on."""
    out = []
    for c in ctx.functions.select(host_side=True):
        s = c.span
        if s is None or _transfer(s):
            continue
        n = s.attrs.get(names.A_BYTES)
        if not isinstance(n, int) or n < RECEIVED_BYTES_PER_SEQ * max(1, seqs.get(c.step, 1)):
            continue
        receive = s if is_receive(s) else ctx.index.by_id.get(s.parent_id)  # a pipe read's receive
        peer = ctx.breakdown.peers.sender_of(receive) if receive is not None else None
        start = max(c.start, peer.hop.start_ns) if peer is not None else c.end
        if start < c.end:
            out.append(dataclasses.replace(c, start=start))
    return out


def _with_sampling_functions(ctx: Analysis, calls: list[Call]) -> list[Call]:
    """The transfers plus the program's functions that made them (the Python argmax over
    the copied rows runs there), unless such a function also runs the model (the step
    loop itself: only its transfer is the finding's)."""
    model_side = {c.name for st in MODEL_STAGES for c in ctx.functions.select(stage=st) if c.sample is not None}
    by = {c.span.attrs.get(names.A_CALLER) for c in calls if c.span is not None}  # named by the instrumentation
    owners = {name for name in by if isinstance(name, str) and name not in model_side and is_user_code(name)}
    return calls + [c for c in ctx.functions.select(host_side=True) if c.name in owners]


def check(ctx: Analysis) -> list[Suggestion]:
    calls, sizes = _host_sampling(ctx)
    if not calls:
        return []
    calls, per_step = ctx.unexplained(_with_sampling_functions(ctx, calls))
    logits_bytes = median(sizes) if sizes else None
    device_ns, basis = _device_sampling_ns(ctx, logits_bytes)
    saving = ctx.ms_per_token(sum(max(0.0, ns - device_ns) for ns in per_step.values()))
    if saving <= 0:
        return []
    ev = ctx.function_evidence(calls)
    ctx.claim_calls(calls)
    return [
        ctx.suggestion(
            ID,
            f"Sampling on the host over the full logits costs {ctx.ms_per_token(sum(per_step.values())):.2f} ms/token",
            names.SAMPLING,
            {
                **ev,
                "host_ms_per_step": round(median(per_step.values()) / 1e6, 4),
                "logits_bytes": logits_bytes,
                "device_sampling_ms_est": round(device_ns / 1e6, 4),
                "device_estimate": basis,
            },
            saving,
            "Sample where the logits are: on the device (torch.argmax / torch.multinomial on the logits "
            "tensor, or a fused top-k/top-p kernel), in the process that computes them, and copy or send "
            "only the [batch] token ids (and the requested logprobs).",
        )
    ]
