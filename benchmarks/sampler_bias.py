"""Where the in-process stack sampler puts a thread's time, against where the time went:
the GIL-free reader (llmtrace._frames) and the GIL reader (sys._current_frames()), in
rounds that alternate them, 250 Hz.

A worker thread runs a serving step of known parts, each timed with perf_counter (the
truth): host work in pure Python or in numpy calls that hold the GIL (a deepcopy of the
scheduler's state, np.pad of the batch, an f-string formatting the logits), then the
model's matmuls, which release it. Each sample is given to the part its stack is in; a
part's share of the samples is set against its share of the time. The same rounds time
the step with no sampler, to show what each reader costs it.

    python benchmarks/sampler_bias.py [--rounds 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

import llmtrace
from llmtrace import recorder, stack_sampler
from llmtrace.load import drain_recorded

H, V = 512, 8000
rng = np.random.default_rng(0)
W1, W2 = (rng.standard_normal(s, dtype=np.float32) / 20 for s in ((H, 4 * H), (4 * H, H)))
E = rng.standard_normal((V, H), dtype=np.float32) / 20
STATE = {"history": list(range(300)), "requests": [{"id": i, "ids": list(range(40))} for i in range(8)]}


def scheduler_state_copy() -> None:
    copy.deepcopy(STATE)


def pad_batch() -> np.ndarray:
    seqs = [np.arange(20 + 3 * i) for i in range(8)]
    width = max(len(s) for s in seqs)
    return np.stack([np.pad(s, (0, width - len(s))) for s in seqs])


def format_logits(logits: np.ndarray) -> str:
    return f"step logits {logits}"


def model(batch: np.ndarray) -> np.ndarray:
    x = E[batch[:, -1] % V]
    for _ in range(3):
        x = x + np.maximum(x @ W1, 0) @ W2
    return x @ E.T


PARTS = ("scheduler_state_copy", "pad_batch", "format_logits", "model")


def run(seconds: float, reader: str | None) -> dict:
    """Steps for `seconds` on a worker thread, sampled by `reader` ('gil-free', 'gil' or
    None): the parts' true and sampled shares, steps per second, the ticks' CPU."""
    spent = dict.fromkeys(PARTS, 0.0)
    steps, stop = [0], threading.Event()

    def timed(name: str, fn: Callable, *args: object) -> object:
        t0 = time.perf_counter()
        out = fn(*args)
        spent[name] += time.perf_counter() - t0
        return out

    def work() -> None:
        logits = np.zeros((8, V), dtype=np.float32)
        while not stop.is_set():
            timed("scheduler_state_copy", scheduler_state_copy)
            batch = timed("pad_batch", pad_batch)
            timed("format_logits", format_logits, logits)
            logits = timed("model", model, batch)
            steps[0] += 1

    recorder.drain()
    sampler = stack_sampler.StackSampler(0.004, gil_free=reader == "gil-free") if reader else None
    worker = threading.Thread(target=work)
    worker.start()
    if sampler is not None:
        sampler.start()
    time.sleep(seconds)
    if sampler is not None:
        sampler.stop()
    stop.set()
    worker.join()
    counts = dict.fromkeys(PARTS, 0)
    for smp in drain_recorded().samples if sampler else ():
        if smp.tid != worker.native_id:
            continue
        for frame in reversed(smp.stack):
            part = frame.split(":")[1] if frame.count(":") >= 2 else ""
            if part in counts:
                counts[part] += 1
                break
    total_s, total_n = sum(spent.values()), sum(counts.values())
    return {
        "steps_per_s": steps[0] / seconds,
        "truth": {p: spent[p] / total_s for p in PARTS},
        "sampled": {p: counts[p] / total_n for p in PARTS} if total_n else None,
        "samples": total_n,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", help="also write the rounds here")
    args = ap.parse_args(argv)
    llmtrace.configure(enabled=True, propagate=False)
    readers = ("none", "gil", "gil-free")
    rounds: dict[str, list[dict]] = {r: [] for r in readers}
    for _ in range(args.rounds):
        for r in readers:
            rounds[r].append(run(args.seconds, None if r == "none" else r))

    def cell(values: list[float], pct: bool = True) -> str:
        med, half = statistics.median(values), (max(values) - min(values)) / 2
        return f"{100 * med:.1f}% (± {100 * half:.1f})" if pct else f"{med:.1f} (± {half:.1f})"

    print(f"{args.rounds} rounds of {args.seconds:.0f} s per reader, alternating; median (± half the range)\n")
    print("| part | true share of the step | GIL reader's share of samples | GIL-free reader's share |")
    print("| --- | --- | --- | --- |")
    for p in PARTS:
        truth = [x["truth"][p] for r in readers for x in rounds[r]]
        print(
            f"| {p} | {cell(truth)} | {cell([x['sampled'][p] for x in rounds['gil']])} | "
            f"{cell([x['sampled'][p] for x in rounds['gil-free']])} |"
        )
    base = [x["steps_per_s"] for x in rounds["none"]]
    print("\n| reader | steps/s | vs no sampler | samples of the worker per round |")
    print("| --- | --- | --- | --- |")
    for r in readers:
        rate = [x["steps_per_s"] for x in rounds[r]]
        cost = [a / b - 1 for a, b in zip(rate, base)]
        samples = [float(x["samples"]) for x in rounds[r]]
        print(f"| {r} | {cell(rate, pct=False)} | {cell(cost) if r != 'none' else '-'} | {cell(samples, pct=False)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rounds, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
