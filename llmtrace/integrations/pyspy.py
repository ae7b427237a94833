"""py-spy over a whole recorded run: stack samples of every process, taken from outside
(no GIL bias, C-level waits included), turned into `Trace.samples` (source "py-spy") on
llmtrace's clock so the analyzer gives each stage its top functions.

Format: py-spy's `chrometrace` is the only output with times: per thread, B/E slices that
change only when the sampled stack changes, `ts` in µs since py-spy's own start, `tid` the
pthread id. With `--threads` every stack carries a "thread (<native id>)" frame, which is
the thread id llmtrace uses. Samples are rebuilt at the sampling rate between the
changes (a thread that went idle keeps its last stack: py-spy shows no gap there).

Clock: py-spy's zero is some time after it was started. To pin it, the program's first
Python process waits at a gate (in its sitecustomize, before the program's code) spinning
through two functions, `_beacon_tick` / `_beacon_tock`, for irregular lengths it stamps
with perf_counter_ns (a quarter to 1.25 sampling periods: shorter ones drown in py-spy's
timing jitter); once py-spy has taken about BEACON_SAMPLES samples, `record` opens the
gate. The offset that puts py-spy's beacon samples inside the matching stamped intervals
is the alignment (within py-spy's own jitter, under a millisecond on an idle machine; the
start time alone would be off by py-spy's start-up).

Permissions: py-spy reads the program's memory, which needs ptrace permission. Yama
`ptrace_scope=1` only lets ancestors trace; the bootstrap then names any tracer allowed
(prctl PR_SET_PTRACER) while py-spy runs. Scope 2 needs CAP_SYS_PTRACE (root), scope 3
forbids it; containers need `--cap-add SYS_PTRACE`. When py-spy cannot attach, the gate
tells the program to fall back to llmtrace's in-process sampler.
"""

from __future__ import annotations

import bisect
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from time import sleep as _sleep  # the original: llmtrace.instrument() wraps time.sleep

ENV_GATE = "LLMTRACE_PYSPY_GATE"  # the gate file; taken by the first process that starts
ENV_ACTIVE = "LLMTRACE_PYSPY"  # py-spy samples this process tree at this rate (Hz)
ENV_EXECUTABLE = "LLMTRACE_PY_SPY"  # which py-spy to run
DIR = "pyspy"
OUTPUT, CLOCK, BEACON, GATE = "pyspy.json", "clock.json", "beacon.json", "gate"
HELD = ".held"  # gate + HELD: the program is at the gate, beaconing
SOURCE = "py-spy"
FALLBACK = "fallback:"  # gate verdict: sample in-process at this rate instead
GATE_TIMEOUT_S = 30.0
BEACON_SAMPLES, BEACON_MIN_S = 100, 0.3  # beacon this many samples, at least this long
ATTACH_TIMEOUT_S = 20.0
FIT_WINDOW_NS = 3_000_000
_THREAD = re.compile(r"^thread \((\d+)\)")
_PROCESS = re.compile(r"^process \d+:")
_PR_SET_PTRACER, _PR_SET_PTRACER_ANY = 0x59616D61, -1
_YAMA = "/proc/sys/kernel/yama/ptrace_scope"
_CAP_SYS_PTRACE = 19


# -- in the recorded program -----------------------------------------------------------
def child_start() -> None:
    if os.environ.get(ENV_ACTIVE):
        _allow_any_tracer()
    gate = os.environ.pop(ENV_GATE, None)
    if gate:
        _hold_at_gate(gate)


def _allow_any_tracer() -> None:
    """Under Yama ptrace_scope=1 py-spy (not our ancestor) may attach only if we say so."""
    if _read(_YAMA).strip() != "1":
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PTRACER, ctypes.c_ulong(_PR_SET_PTRACER_ANY), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _beacon_tick(until_ns: int) -> None:
    while time.perf_counter_ns() < until_ns:
        pass


def _beacon_tock(until_ns: int) -> None:
    while time.perf_counter_ns() < until_ns:
        pass


def beacon_lengths(rate: int) -> tuple[int, int]:
    """(shortest, spread) of the beacon's interval lengths in ns for py-spy at `rate` Hz."""
    period = int(1e9 / max(1, rate))
    shortest = max(400_000, period // 4)
    return shortest, max(2_400_000, period * 5 // 4) - shortest


def _beacon(gate: str, timeout_s: float, rate: int) -> list[int]:
    """Alternate tick/tock for irregular stamped lengths (a quarter to 1.25 sampling
    periods, 0.4-2.4 ms at least) until the gate opens; returns the switch times (tick
    starts at marks[0], tock at marks[1], ...; last = end)."""
    shortest, spread = beacon_lengths(rate)
    marks: list[int] = []
    deadline = time.perf_counter_ns() + int(timeout_s * 1e9)
    state = 0x2545F491
    parent = os.getppid()  # if `record` dies, nobody opens the gate
    open(gate + HELD, "w").close()
    while True:
        for fn in (_beacon_tick, _beacon_tock):
            state = (state * 1103515245 + 12345) & 0x7FFFFFFF
            now = time.perf_counter_ns()
            marks.append(now)
            fn(now + shortest + state % spread)
        if os.path.exists(gate) or marks[-1] > deadline or os.getppid() != parent:
            marks.append(time.perf_counter_ns())
            return marks


def _hold_at_gate(gate: str) -> None:
    """Beacon until `record` opens the gate, then follow its verdict. A process arriving
    at an open gate (a sibling of the first, started by a shell) just follows it."""
    if not os.path.exists(gate):
        marks = _beacon(gate, GATE_TIMEOUT_S, int(os.environ.get(ENV_ACTIVE) or 0))
        _write_json(
            {"pid": os.getpid(), "tid": threading.get_native_id(), "marks": marks},
            os.path.join(os.path.dirname(gate), BEACON),
        )
    verdict = _read(gate).strip()
    if verdict.startswith(FALLBACK):
        from .. import ENV_SAMPLE_HZ, stack_sampler

        hz = float(verdict[len(FALLBACK) :])
        os.environ[ENV_SAMPLE_HZ] = str(hz)  # this process's children sample too
        stack_sampler.start(1.0 / hz)


# -- in `llmtrace record` --------------------------------------------------------------
def find_executable() -> str | None:
    """$LLMTRACE_PY_SPY, else py-spy next to this interpreter (a virtualenv's bin/), else on PATH."""
    if os.environ.get(ENV_EXECUTABLE):
        return os.environ[ENV_EXECUTABLE]
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.access(here, os.X_OK) else shutil.which("py-spy")


def recorder_for(run_dir: str, rate: int, command: str) -> PySpyRecorder | None:
    """A recorder, or None (said on stderr) when py-spy is not installed."""
    exe = find_executable()
    if exe is None:
        print(
            f"llmtrace {command}: py-spy not found (pip install py-spy); sampling in-process at {rate} Hz instead",
            file=sys.stderr,
        )
        return None
    return PySpyRecorder(exe, run_dir, rate)


class PySpyRecorder:
    """`py-spy record --pid PID --subprocesses` into RUN/pyspy/, and the gate it opens."""

    def __init__(self, executable: str, run_dir: str, rate: int):
        self.executable, self.rate = executable, rate
        self.dir = os.path.join(run_dir, DIR)
        os.makedirs(self.dir, exist_ok=True)
        self.gate = os.path.join(self.dir, GATE)
        self.proc: subprocess.Popen | None = None
        self._sampling = threading.Event()
        self._lines: list[str] = []
        self.started_ns = 0

    def gate_env(self) -> dict[str, str]:
        """What makes a program's first Python process wait at the gate for py-spy."""
        return {ENV_GATE: self.gate, ENV_ACTIVE: str(self.rate)}

    def start(self, pid: int) -> None:
        cmd = [
            self.executable,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--threads",
            "--nonblocking",
            "--format",
            "chrometrace",
            "--rate",
            str(self.rate),
            "--output",
            os.path.join(self.dir, OUTPUT),
        ]
        self.started_ns = time.perf_counter_ns()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        threading.Thread(target=self._read_output, name="llmtrace-pyspy-output", daemon=True).start()

    def _read_output(self) -> None:
        for line in self.proc.stdout:
            self._lines.append(line.rstrip())
            if "Sampling process" in line:
                self._sampling.set()

    def attach(self, program_alive) -> bool:
        """Wait until py-spy samples and the program beacons at its gate (True), or py-spy
        gives up (False); the caller then opens the gate."""
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while not self._sampling.wait(0.05):
            if self.proc.poll() is not None or not program_alive() or time.monotonic() > deadline:
                return False
        attached_ns = time.perf_counter_ns()
        while not os.path.exists(self.gate + HELD) and program_alive() and time.monotonic() < deadline:
            _sleep(0.005)
        _write_json(
            {"started_ns": self.started_ns, "attached_ns": attached_ns, "rate": self.rate},
            os.path.join(self.dir, CLOCK),
        )
        _sleep(max(BEACON_MIN_S, BEACON_SAMPLES / self.rate))
        return True

    def open_gate_when_sampling(self, program_alive, fallback_hz: float, command: str) -> None:
        """Open the gate once py-spy samples the program; if it cannot, say why and let
        the program sample itself at `fallback_hz`."""
        if self.attach(program_alive):
            self.open_gate()
            return
        print(
            f"llmtrace {command}: {self.failure()}\nllmtrace {command}: sampling in-process at {fallback_hz:g} Hz "
            f"instead",
            file=sys.stderr,
        )
        self.open_gate(fallback_hz)

    def open_gate(self, fallback_hz: float | None = None) -> None:
        tmp = self.gate + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{FALLBACK}{fallback_hz}" if fallback_hz else SOURCE)
        os.replace(tmp, self.gate)

    def failure(self) -> str:
        """Why py-spy could not sample, with what to grant when it is a permission."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _sleep(0.05)  # let the reader thread take py-spy's last lines
        said = " | ".join(line for line in self._lines if line.strip())[-600:] or f"exit code {self.proc.returncode}"
        if re.search(r"permission denied|operation not permitted|EPERM", said, re.I):
            return f"py-spy was not allowed to read the program ({said}). {ptrace_advice()}"
        return f"py-spy could not sample the program: {said}"

    def finish(self, timeout_s: float = 10.0) -> None:
        """py-spy stops by itself when the program's processes are gone; make sure."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output and exits
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ptrace_advice() -> str:
    """What this machine lacks for ptrace, and what to grant."""
    scope = _read(_YAMA).strip()
    cap = _has_cap_sys_ptrace()
    facts = [
        f"kernel.yama.ptrace_scope={scope}" if scope else "no Yama LSM",
        "CAP_SYS_PTRACE present" if cap else "no CAP_SYS_PTRACE",
    ]
    if _in_container():
        facts.append("inside a container")
    grant = ["run llmtrace as root (`sudo -E env PATH=$PATH llmtrace record ...`)"]
    if scope in ("2", "3"):
        grant.append("`echo 1 | sudo tee /proc/sys/kernel/yama/ptrace_scope` (0 works too; scope 3 needs a reboot)")
    if _in_container() or not cap:
        grant.append(
            "in Docker `docker run --cap-add SYS_PTRACE ...` (Kubernetes: "
            "securityContext.capabilities.add: [SYS_PTRACE])"
        )
    return f"ptrace is not permitted here ({', '.join(facts)}); grant one of: " + "; ".join(grant) + "."


def _has_cap_sys_ptrace() -> bool:
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_SYS_PTRACE & 1)
    return False


def _in_container() -> bool:
    return os.path.exists("/.dockerenv") or bool(re.search(r"docker|kubepods|containerd|lxc", _read("/proc/1/cgroup")))


# -- after the run ---------------------------------------------------------------------
def run_files(run_dir: str) -> list[str]:
    """py-spy's output in a run ([] without one)."""
    path = os.path.join(run_dir, DIR, OUTPUT)
    return [path] if os.path.isfile(path) else []


def load_run_samples(run_dir: str) -> list:
    """py-spy's samples of a recorded run on the trace's clock ([] without py-spy data)."""
    from ..export.load_chrome import read_json

    d = os.path.join(run_dir, DIR)
    path = os.path.join(d, OUTPUT)
    if not os.path.isfile(path):
        return []
    events = read_json(path)
    clock = read_json(os.path.join(d, CLOCK)) if os.path.isfile(os.path.join(d, CLOCK)) else {}
    beacon = read_json(os.path.join(d, BEACON)) if os.path.isfile(os.path.join(d, BEACON)) else None
    threads = stack_changes(events)
    offset = clock_offset_ns(threads, beacon, clock)
    return to_samples(threads, offset, int(clock.get("rate") or 100))


def stack_changes(events: list[dict]) -> dict[tuple[int, int], list[tuple[int, tuple]]]:
    """{(pid, native tid): [(ts_ns on py-spy's clock, frames outermost first)...]}: the
    thread's stack from each change on. Frames are (name, filename, line)."""
    stacks: dict[tuple[int, int], list] = {}
    out: dict[tuple[int, int], list[tuple[int, tuple]]] = {}
    for e in events:
        ph = e.get("ph")
        if ph not in ("B", "E"):
            continue
        key = (int(e["pid"]), int(e["tid"]))
        stack = stacks.setdefault(key, [])
        args = e.get("args") or {}
        frame = (str(e.get("name", "?")), str(args.get("filename") or ""), int(args.get("line") or 0))
        if ph == "B":
            stack.append(frame)
        elif stack:
            stack.pop()
        ts = int(float(e["ts"]) * 1000)
        changes = out.setdefault(key, [])
        snapshot = tuple(stack)
        if changes and changes[-1][0] == ts:
            changes[-1] = (ts, snapshot)
        else:
            changes.append((ts, snapshot))
    native = native_tids(events)
    return {(pid, native.get((pid, tid), tid)): changes for (pid, tid), changes in out.items()}


def native_tids(events: list[dict]) -> dict[tuple[int, int], int]:
    """{(pid, pthread id): native tid}, read from the "thread (N)" frames (`--threads`)."""
    out = {}
    for e in events:
        if e.get("ph") == "B" and not (e.get("args") or {}).get("filename"):
            m = _THREAD.match(str(e.get("name", "")))
            if m:
                out[(e.get("pid"), e.get("tid"))] = int(m.group(1))
    return out


def _python_frames(frames: tuple) -> tuple:
    return tuple(f for f in frames if f[1] or not (_THREAD.match(f[0]) or _PROCESS.match(f[0])))


def _labels(frames: tuple) -> tuple[str, ...]:
    """Frames as the in-process sampler names them: 'module:qualname', the innermost with ':line'."""
    from . import module_of

    labels = [f"{module_of(fn) if fn else '?'}:{name}" for name, fn, _ in frames]
    if labels:
        labels[-1] += f":{frames[-1][2]}"
    return tuple(labels)


def clock_offset_ns(threads: dict, beacon: dict | None, clock: dict) -> int:
    """ns to add to py-spy's times to put them on CLOCK_MONOTONIC."""
    lo = int(clock.get("started_ns", 0))
    hi = int(clock.get("attached_ns", lo))
    if beacon:
        changes = threads.get((int(beacon["pid"]), int(beacon["tid"])), [])
        obs = [
            (ts, frames[-1][0] == _beacon_tick.__name__)
            for ts, frames in changes
            if frames and frames[-1][0] in (_beacon_tick.__name__, _beacon_tock.__name__)
        ]
        if len(obs) >= 3:
            return fit_beacon(obs, beacon["marks"], lo, hi)
    return lo


def fit_beacon(obs: list[tuple[int, bool]], marks: list[int], lo: int, hi: int) -> int:
    """The offset putting most observations (py-spy ts, saw tick) inside a stamped interval
    of that function: coarse over [lo - 50 ms, hi + 50 ms] from a few observations, then
    exact from all of them near the coarse answer."""
    margin = 50_000_000
    coarse = _best_offset(obs, marks, _candidates(obs[:12], marks, lo - margin, hi + margin))
    return _best_offset(obs, marks, _candidates(obs, marks, coarse - FIT_WINDOW_NS, coarse + FIT_WINDOW_NS))


def _candidates(obs, marks, lo: int, hi: int) -> list[int]:
    """Offsets where some observation crosses a mark: the score changes only there."""
    out = set()
    for ts, _ in obs:
        i, j = bisect.bisect_left(marks, lo + ts), bisect.bisect_right(marks, hi + ts)
        out.update(m - ts for m in marks[i:j])
    return sorted(out)


def _best_offset(obs, marks, cands: list[int]) -> int:
    def score(o: int) -> int:
        n = 0
        for ts, tick in obs:
            j = bisect.bisect_right(marks, ts + o) - 1
            if 0 <= j < len(marks) - 1 and (j % 2 == 0) == tick:
                n += 1
        return n

    mids = [(a + b) // 2 for a, b in zip(cands, cands[1:])]
    if not mids:
        return cands[0] if cands else 0
    scores = [score(m) for m in mids]
    best = max(scores)
    first = scores.index(best)
    last = first
    while last + 1 < len(scores) and scores[last + 1] == best:
        last += 1
    return (cands[first] + cands[last + 1]) // 2  # the middle of the best run's interval


def to_samples(threads: dict, offset_ns: int, rate: int) -> list:
    """`Sample`s, one per sampling interval between stack changes, on our clock."""
    from ..timeline import Sample  # not at import: the bootstrap imports this module

    period = max(1, int(1e9 / rate))
    out = []
    for (pid, tid), changes in threads.items():
        for (ts, frames), nxt in zip(changes, changes[1:] + [(None, ())]):
            frames = _python_frames(frames)
            if not frames or nxt[0] is None:
                continue
            stack = _labels(frames)
            for t in range(ts, nxt[0], period):
                out.append(Sample(pid, tid, t + offset_ns, stack, SOURCE))
    return out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _write_json(data: dict, path: str) -> None:
    import json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
