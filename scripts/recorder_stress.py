"""Exercise the recorder's object lifetimes the way a GPU agent does, without a GPU.

Device spans through the real `gpu.DeviceTimer` over fake CUDA events that complete a
little later, a spool flush thread and a second thread polling the timer, nested and
early-returning spans, exceptions, generators, asyncio tasks and @trace wrappers, all
under gc pressure. It checks what a lifetime error breaks first: the device hook is
still the same object with the same reference count, every device span was resolved,
and the process did not crash. Run it with PYTHONMALLOC=malloc and MALLOC_PERTURB_ set
(fresh and freed memory filled with garbage) or under AddressSanitizer:
tests/test_recorder_memory.py and scripts/check_recorder_memory.sh do.

    python scripts/recorder_stress.py [seconds]      # prints "ok <steps> <device spans>"
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tempfile
import threading
import time
import types

import llmtrace
from llmtrace import gpu, recorder


class FakeEvent:
    """torch.cuda.Event's surface: done 20 µs after record(), timed on the host clock."""

    def __init__(self, enable_timing: bool = False):
        self.t = 0

    def record(self) -> None:
        self.t = time.perf_counter_ns()

    def query(self) -> bool:
        return time.perf_counter_ns() - self.t > 20_000

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: FakeEvent) -> float:
        return (other.t - self.t) / 1e6


FAKE_TORCH = types.SimpleNamespace(cuda=types.SimpleNamespace(Event=FakeEvent, synchronize=lambda: None))


class Pending:
    """Stands for the step handle the agent allocates right after the device spans."""

    def __init__(self, step: int, data: dict):
        self.step, self.data, self.junk = step, data, [object() for _ in range(3)]


@llmtrace.trace("postprocess")
def postprocess(p: Pending) -> int:
    return len(p.data)


def launch(n: int) -> Pending:
    with llmtrace.span("preprocess", step=n, seqs=4):
        [bytearray(64) for _ in range(8)]
    with llmtrace.span("forward", step=n, device=True):
        data = {i: str(i) for i in range(16)}
    with llmtrace.span("sampling", step=n, device=True, seqs=4):
        return Pending(n, data)  # returns inside the span, as the model runner does


def failing(n: int) -> None:
    with llmtrace.span("forward", step=n, device=True):
        raise ValueError(n)


def spans_in_generator(n: int):
    with llmtrace.span("stream.write", step=n, device=True):
        yield n
        yield n + 1


async def task(n: int) -> int:
    with llmtrace.span("http.request", req=n):
        await asyncio.sleep(0)
        with llmtrace.span("forward", step=n, device=True):
            await asyncio.sleep(0)
    return n


def poll_forever() -> None:
    while True:
        gpu.poll()
        time.sleep(0.0002)


def one_round(n: int) -> None:
    held = [launch(n + i) for i in range(2)]  # two steps in flight, as with async scheduling
    for p in held:
        postprocess(p)
    try:
        failing(n)
    except ValueError:
        pass
    for _ in spans_in_generator(n):
        pass
    abandoned = spans_in_generator(n)
    next(abandoned)
    del abandoned  # closed by the collector inside its span
    asyncio.run(tasks(n))


async def tasks(n: int) -> list[int]:
    return await asyncio.gather(*(task(n + i) for i in range(3)))


def main(seconds: float) -> int:
    llmtrace.configure(out=tempfile.mkdtemp(prefix="llmtrace-stress-"), gc=True)
    timer = gpu.DeviceTimer(FAKE_TORCH)
    gpu._timer = timer
    recorder.set_device_hook(timer)
    refs = sys.getrefcount(timer)
    threading.Thread(target=poll_forever, name="poller", daemon=True).start()
    steps, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        one_round(steps)
        steps += 2
        if steps % 200 == 0:
            gc.collect()
        if gpu._timer is not timer or not isinstance(gpu._timer, gpu.DeviceTimer):
            raise SystemExit(f"the device hook was freed: gpu._timer is now {type(gpu._timer).__name__}")
    while timer._pending:
        time.sleep(0.001)
    gc.collect()
    if sys.getrefcount(timer) != refs:
        raise SystemExit(f"device hook references: {refs} before, {sys.getrefcount(timer)} after")
    llmtrace.shutdown()
    print("ok", steps, recorder.BACKEND)
    return 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 2.0))
