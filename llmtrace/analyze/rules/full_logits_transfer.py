"""`full-logits-transfer`: the full [batch, vocab] logits copied to the host and sampled
there (argmax/softmax in numpy) instead of sampling on the device and copying the ids.

Fingerprints, on the steps' critical path:
- the engine's `sampling.host` span (host-side sampling; attr `logits_bytes` = bytes of
  logits brought to the host), or any span carrying `logits_bytes`;
- function-level events inside the sampling stage: `Tensor.cpu`, `Tensor.numpy`,
  `Tensor.tolist`, `numpy.argmax`/`np.argmax`, `np.exp`, numpy softmax helpers.
Saving per step: that host time minus what sampling on the device costs: the measured
device time of `sampling` spans when the trace has some, else `logits_bytes` read once
at DEVICE_READ_BYTES_PER_S (GPU) or HOST_READ_BYTES_PER_S (CPU) plus one kernel launch.
"""
from __future__ import annotations

import re

from ..functions import covered
from ..stats import median

ID = "full-logits-transfer"
PATTERN = re.compile(r"^sampling\.host$|(^|\.)Tensor\.(cpu|numpy|tolist)$|(^|\.)(np|numpy)\.(argmax|exp|max|sum)$"
                     r"|(^|\.)(softmax|log_softmax)$")
DEVICE_READ_BYTES_PER_S = 1.0e12  # conservative HBM read rate of a datacenter GPU
HOST_READ_BYTES_PER_S = 1.0e10  # conservative DRAM read rate of one CPU core
LAUNCH_NS = 20_000


def _device_sampling_ns(ctx, logits_bytes: float | None) -> tuple[float, str]:
    dev = [s.device_dur_ns for s in ctx.index.by_stage.get("sampling", ()) if s.device_start_ns is not None]
    if dev:
        return median(dev), "measured device time of sampling"
    if not logits_bytes:
        return 0.0, "no device estimate (no logits_bytes)"
    if ctx.has_device_timing() or ctx.index.by_stage.get("sync"):
        return logits_bytes / DEVICE_READ_BYTES_PER_S * 1e9 + LAUNCH_NS, "logits_bytes at GPU read rate"
    return logits_bytes / HOST_READ_BYTES_PER_S * 1e9, "logits_bytes at CPU read rate"


def check(ctx):
    calls = [c for c in ctx.functions.select(host_side=True)
             if (c.stage == "sampling" and PATTERN.search(c.name)) or (c.span and "logits_bytes" in c.span.attrs)]
    if not calls:
        return []
    _, per_step = covered(calls)
    sizes = [s.attrs["logits_bytes"] for s in ctx.trace.spans if "logits_bytes" in s.attrs]
    logits_bytes = median(sizes) if sizes else None
    device_ns, basis = _device_sampling_ns(ctx, logits_bytes)
    saved_ns = sum(max(0.0, ns - device_ns) for ns in per_step.values())
    saving = ctx.ms_per_token(saved_ns)
    if saving <= 0:
        return []
    ev = ctx.function_evidence(calls)
    ctx.claim(f["name"] for f in ev["functions"])
    return [ctx.suggestion(
        ID, f"Sampling on host over the full logits costs {ctx.ms_per_token(sum(per_step.values())):.2f} ms/token",
        "sampling",
        {**ev, "host_ms_per_step": round(median(per_step.values()) / 1e6, 4),
         "logits_bytes": logits_bytes, "device_sampling_ms_est": round(device_ns / 1e6, 4),
         "device_estimate": basis},
        saving,
        "Sample on the device (torch.argmax / torch.multinomial on the logits tensor, or a fused "
        "top-k/top-p kernel) and copy only the [batch] token ids (and the requested logprobs) to the host.")]
