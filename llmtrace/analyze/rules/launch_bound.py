"""`launch-bound`: the device sits idle between the model's kernels: the host cannot launch
them as fast as the GPU runs them (eager mode, many small kernels), so the CUDA-event
time of `forward`/`sampling` is partly the GPU waiting for the host.

Fingerprint: the GPU's own kernel records (device_activity.py, `LLMTRACE_DEVICE_ACTIVITY`)
leave more than MIN_IDLE_SHARE of the model spans' device time idle.
Saving: the idle time beyond what a CUDA graph still leaves between its kernels
(GRAPH_IDLE_NS_PER_KERNEL each), as a share of the model spans' device time, applied to
the model time of every step (the records cover a window of spans; the share is theirs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import names
from ..breakdown import DEVICE_IDLE, MODEL

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion

ID = "launch-bound"
MIN_IDLE_SHARE = 0.10
# The idle gap between consecutive kernels of a replayed CUDA graph, what remains after
# graphs: an assumption of a few µs per kernel until benchmarks/gpu_device_busy.py has
# measured it on an H100 (GPU_NOTES.md says it is still to run).
GRAPH_IDLE_NS_PER_KERNEL = 1_500


def _fix(ctx: Analysis, eager: bool) -> str:
    graphs = ctx.setting(names.K_CUDA_GRAPHS, "torch.cuda.CUDAGraph, or torch.compile(mode='reduce-overhead')")
    how = (
        f"Capture the step in a CUDA graph ({graphs}) so one launch runs all its kernels"
        if eager
        else "The step already replays a CUDA graph: fuse small kernels (torch.compile, fused norm/rotary/"
        "activation kernels) so fewer gaps remain"
    )
    return how + "; then the device runs the kernels back to back instead of waiting for each launch."


def check(ctx: Analysis) -> list[Suggestion]:
    d = ctx.device
    if d is None or d.idle_share < MIN_IDLE_SHARE:
        return []
    avoidable = max(0, d.idle_ns - d.kernels * GRAPH_IDLE_NS_PER_KERNEL)
    share = avoidable / d.device_ns
    model_ms = ctx.breakdown.ms_per_token(MODEL) + ctx.breakdown.ms_per_token(DEVICE_IDLE)
    eager = d.launches_per_span * 2 > d.kernels_per_span
    return [
        ctx.suggestion(
            ID,
            f"The GPU idles {d.idle_share:.0%} of the model's device time between kernels"
            f"{' (eager launches)' if eager else ' (inside CUDA graphs)'}",
            names.FORWARD,
            {
                **d.to_dict(),
                "model_device_ms_per_token": round(model_ms, 4),
                "graph_idle_us_per_kernel": GRAPH_IDLE_NS_PER_KERNEL / 1e3,
            },
            model_ms * share,
            _fix(ctx, eager),
        )
    ]
