"""Device busy time (llmtrace/device_activity.py) against the kernel timeline, and what the
kernel records cost, on one GPU: random-weight Llama-2-7B shape in bf16, the engine's
ModelRunner in-process, context 512, decode steps one at a time.

Per case (batch x CUDA graphs or eager), STEPS decode steps with llmtrace recording and a
device-activity window over their `forward` and `sampling` spans:
  event ms/step   the spans' CUDA-event device time (what the breakdown called model)
  busy ms/step    llmtrace's busy time: per span, the union of the kernels and copies its
                  host interval launched (correlation ids), summed
  CUPTI ms/step   the reference, computed independently from the same profiler's Chrome
                  export: the union of every kernel/memcpy/memset interval inside each
                  span's device interval (GPU time, no launch mapping)
  idle us/kernel  (event - busy) / kernels: the gap a kernel leaves (graphs: what remains)
Then the cost: step wall time with the window collecting vs llmtrace without it,
ROUNDS interleaved rounds, medians.

Run (GPU):  python3 benchmarks/gpu_device_busy.py [--batches 1 32] [--json FILE]
Goal (issue 19): busy within 2% of CUPTI's; the window costs <= 1% of step time.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_decode import BLOCK, CONTEXT, PRESET, decode, prefill, prompts  # noqa: E402

STEPS = 40
WARMUP = 3
ROUNDS = 3
BUSY_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def prefilled(runner, batch: int, tables):
    """Prompts of `batch` sequences, prefilled and WARMUP decode steps in."""
    tokens = prompts(batch, runner.model.config.vocab_size, batch)
    prefill(runner, tokens, tables)
    decode(runner, tokens, WARMUP, tables)
    return tokens


def _try(e, method: str):
    try:
        return getattr(e, method)()
    except Exception as x:  # noqa: BLE001 (a diagnostic print)
        return f"<{type(x).__name__}>"


def reference_busy(chrome: str, spans, offset_ns: int) -> dict[int, int]:
    """span id -> union of the export's device intervals inside the span's device interval."""
    from llmtrace.device_activity import union_ns

    opener = gzip.open if chrome.endswith(".gz") else open
    with opener(chrome, "rt") as f:
        doc = json.load(f)
    base = int(doc.get("baseTimeNanoseconds") or 0)
    dev = sorted(
        (int(e["ts"] * 1000) + base - offset_ns, int(e.get("dur", 0) * 1000))
        for e in doc["traceEvents"]
        if e.get("cat") in BUSY_CATS and e.get("ph") == "X"
    )
    out = {}
    for s in spans:
        inside = [
            (max(a, s.device_start_ns), min(a + d, s.device_end_ns))
            for a, d in dev
            if a < s.device_end_ns and a + d > s.device_start_ns
        ]
        out[s.span_id] = union_ns(inside)
    return out


def case(runner, batch: int, tables, graphs, out_dir: str, log) -> dict:
    import torch

    import llmtrace
    from llmtrace import device_activity, gpu, names, recorder
    from llmtrace.load import load_trace

    runner.graphs = graphs
    tokens = prefilled(runner, batch, tables)
    llmtrace.configure(out=out_dir, process_name="runner", propagate=False)
    window = device_activity.Window(2 * STEPS)
    timer = gpu.DeviceTimer(torch, window)
    recorder.set_device_hook(timer)
    decode(runner, tokens, STEPS, tables)
    torch.cuda.synchronize()
    timer.poll()
    recorder.set_device_hook(None)
    llmtrace.shutdown()  # the window reads its records and emits the busy times
    chrome = os.path.join(out_dir, "kineto.json")
    window.profiler.export_chrome_trace(chrome)
    trace = load_trace(out_dir)
    spans = [s for s in trace.spans if s.name in ("forward", "sampling") and names.A_BUSY_NS in s.attrs]
    if not spans:  # the launch mapping found nothing: say what the records looked like
        ev = window.profiler.profiler.kineto_results.events()
        log(
            f"no busy times: {len(window.spans)} window spans {window.spans[:2]}, offset {window.offset_ns}, "
            f"{len(ev)} events, e.g. "
            + "; ".join(
                f"{e.name()[:30]} {_try(e, 'activity_type')} {_try(e, 'start_ns')} "
                f"corr {_try(e, 'correlation_id')} dev {_try(e, 'device_type')}"
                for e in ev[:: max(1, len(ev) // 16)]
            )
        )
        return {"batch": batch, "mode": "graphs" if graphs is not None else "eager", "spans": 0}
    ref = reference_busy(chrome, spans, window.offset_ns)
    event = sum(s.device_dur_ns for s in spans)
    busy = sum(s.attrs[names.A_BUSY_NS] for s in spans)
    kernels = sum(s.attrs[names.A_KERNELS] for s in spans)
    steps = len({s.step for s in spans})
    per_step = [
        (sum(s.attrs[names.A_BUSY_NS] for s in spans if s.step == k), sum(ref[s.span_id] for s in spans if s.step == k))
        for k in sorted({s.step for s in spans})
    ]
    row = {
        "batch": batch,
        "mode": "graphs" if graphs is not None else "eager",
        "spans": len(spans),
        "steps": steps,
        "event_ms": event / steps / 1e6,
        "busy_ms": busy / steps / 1e6,
        "cupti_ms": sum(ref.values()) / steps / 1e6,
        "kernels_per_step": kernels / steps,
        "launches_per_step": sum(s.attrs[names.A_LAUNCHES] for s in spans) / steps,
        "idle_us_per_kernel": (event - busy) / kernels / 1e3 if kernels else None,
        "step_max_rel_diff": max(abs(b - r) / r for b, r in per_step if r) if per_step else None,
        "outside": sum(c.value for c in trace.counters if c.name == names.C_DEVICE_WORK_OUTSIDE),
    }
    log(f"{row['mode']} batch {batch}: {row}")
    return row


def cost(runner, batch: int, tables, graphs, log) -> dict:
    """Median step wall time, llmtrace with the device-activity window vs without, interleaved."""
    import torch

    from llmtrace import device_activity, gpu, recorder

    runner.graphs = graphs
    on, off = [], []
    for _ in range(ROUNDS):
        for with_window, into in ((True, on), (False, off)):
            tokens = prefilled(runner, batch, tables)
            window = device_activity.Window(10 * STEPS) if with_window else None
            recorder.set_device_hook(gpu.DeviceTimer(torch, window))
            into.append(statistics.median(decode(runner, tokens, STEPS, tables)) * 1e3)
            recorder.set_device_hook(None)
            if window is not None:
                window.profiler.stop()
                window.emitted = True  # timing only: no records to read
    row = {
        "batch": batch,
        "mode": "graphs" if graphs is not None else "eager",
        "on_ms": statistics.median(on),
        "off_ms": statistics.median(off),
        "on_all": on,
        "off_all": off,
    }
    log(f"cost {row}")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        print("gpu_device_busy: needs a CUDA GPU", file=sys.stderr)
        return 2
    import llmtrace
    from engine.config import ModelConfig
    from engine.model_runner import ModelRunner

    log = lambda m: print(m, flush=True)  # noqa: E731
    max_b = max(args.batches)
    per_seq = -(-(CONTEXT + WARMUP + STEPS * (2 + 2 * ROUNDS) + 1) // BLOCK)
    runner = ModelRunner(
        ModelConfig(preset=PRESET, dtype="bfloat16", device="cuda", seed=0),
        block_size=BLOCK,
        num_blocks=max_b * per_seq,
        cuda_graphs=True,
        max_num_seqs=max_b,
        max_model_len=per_seq * BLOCK,
    )
    tables = np.arange(max_b * per_seq, dtype=np.int32).reshape(max_b, per_seq)
    graphs = runner.graphs
    rows, costs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.batches:
            for g in (graphs, None):
                rows.append(case(runner, b, tables[:b], g, os.path.join(tmp, f"{b}_{g is not None}"), log))
        llmtrace.configure(out=os.path.join(tmp, "cost"), process_name="runner", propagate=False)
        for b in args.batches:
            for g in (graphs, None):
                costs.append(cost(runner, b, tables[:b], g, log))
        llmtrace.shutdown()
        log(f"spools: {len(glob.glob(tmp + '/*/spool/*.lts'))}")
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {PRESET} bf16, context {CONTEXT}, "
        f"{STEPS} decode steps per case"
    )
    print(
        "| batch, mode | event ms/step | busy ms/step | CUPTI ms/step | busy/CUPTI | event/busy | kernels/step "
        "| launches/step | idle us/kernel | worst step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in (r for r in rows if r["spans"]):
        print(
            f"| {r['batch']}, {r['mode']} | {r['event_ms']:.3f} | {r['busy_ms']:.3f} | {r['cupti_ms']:.3f} | "
            f"{r['busy_ms'] / r['cupti_ms']:.4f} | {r['event_ms'] / r['busy_ms']:.2f}x | "
            f"{r['kernels_per_step']:.0f} | {r['launches_per_step']:.0f} | {r['idle_us_per_kernel']:.2f} | "
            f"{r['step_max_rel_diff']:.2%} |"
        )
    print(f"\nstep wall time, window on vs off ({ROUNDS} interleaved rounds, medians of {STEPS} steps):")
    print("| batch, mode | on ms | off ms | cost | rounds on | rounds off |")
    print("|---|---|---|---|---|---|")
    for c in costs:
        print(
            f"| {c['batch']}, {c['mode']} | {c['on_ms']:.3f} | {c['off_ms']:.3f} | "
            f"{c['on_ms'] / c['off_ms'] - 1:+.2%} | {', '.join(f'{x:.3f}' for x in c['on_all'])} | "
            f"{', '.join(f'{x:.3f}' for x in c['off_all'])} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "cost": costs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
