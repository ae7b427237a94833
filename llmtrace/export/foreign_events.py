"""Other tools' Chrome trace events, made safe for llmtrace's timeline: integer pids and
tids, and complete (`X`) events where the tool wrote `B`/`E` pairs.

What the tools really write: torch.profiler names some tracks with string pids and tids
("Spans", "Traces", "PyTorch Profiler"); viztracer and Chrome's own tracing write `B`/`E`
pairs for durations, and a trace cut short leaves `B` events without their `E`. The
analyzer keys events by (pid, tid) integers and reads durations from `X` events, so
every foreign input goes through `normalize` once, where it enters (merge, load).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import defaultdict

UNCLOSED = "unclosed"  # arg on an `X` made from a `B` that had no `E`: it ends at its thread's last event
EMBEDDED = "embedded"  # trace meta: digests of the other tools' files a recording already holds


def file_digest(path: str) -> str:
    """What identifies a tool's output file (merge skips one a trace already embeds)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


def normalize(events: list[dict], used_pids: set[int], label: str) -> list[dict]:
    """`events` with every non-integer pid replaced by a fresh one (not in `used_pids`,
    which the caller holds; added to it), named "<label>: <old pid>" unless the file names it), non-integer tids
    numbered per process (named after the old tid), and B/E pairs made `X` events."""
    pids = _pid_map(events, used_pids)
    tids = _tid_map(events, pids)
    out = []
    for e in events:
        ev = dict(e)
        pid, tid = e.get("pid", 0), e.get("tid", 0)
        ev["pid"] = pids.get(_key(pid), pid)
        ev["tid"] = tids.get((ev["pid"], _key(tid)), tid)
        out.append(ev)
    out = _complete_pairs(out)
    named = {(e["pid"], e.get("name")) for e in out if e.get("ph") == "M"}
    for old, new in pids.items():
        if (new, "process_name") not in named:
            out.append(
                {"ph": "M", "name": "process_name", "pid": new, "tid": 0, "args": {"name": f"{label}: {old or '?'}"}}
            )
    for (pid, old), new in tids.items():
        out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": new, "args": {"name": str(old) or "?"}})
    return out


def _key(v):
    return v if isinstance(v, int) and not isinstance(v, bool) else str(v)


def _pid_map(events: list[dict], used: set[int]) -> dict[str, int]:
    strange = sorted({k for e in events if not isinstance(k := _key(e.get("pid", 0)), int)})
    out = {}
    for p in strange:
        out[p] = next(n for n in itertools.count(max(used, default=0) + 1) if n not in used)
        used.add(out[p])
    return out


def _tid_map(events: list[dict], pids: dict) -> dict[tuple[int, str], int]:
    """Per process, each non-integer tid -> the next integer above the process's own tids."""
    ints, strange = defaultdict(set), defaultdict(set)
    for e in events:
        pid = pids.get(_key(e.get("pid", 0)), e.get("pid", 0))
        tid = _key(e.get("tid", 0))
        (ints if isinstance(tid, int) else strange)[pid].add(tid)
    out = {}
    for pid, olds in strange.items():
        nxt = max(ints[pid], default=0) + 1
        for old in sorted(olds):
            out[(pid, old)] = nxt
            nxt += 1
    return out


def _complete_pairs(events: list[dict]) -> list[dict]:
    """B/E pairs (a stack per thread) as X events; a B never closed ends at its thread's
    last timestamp and says so; an E without its B is dropped."""
    open_: dict[tuple, list[dict]] = defaultdict(list)
    last: dict[tuple, float] = {}
    out = []
    for e in sorted(events, key=lambda e: e.get("ts", 0) if isinstance(e.get("ts"), (int, float)) else 0):
        key, ph = (e["pid"], e["tid"]), e.get("ph")
        if not isinstance(e.get("ts"), (int, float)):
            out.append(e)  # metadata
            continue
        last[key] = max(last.get(key, e["ts"]), e["ts"] + (e.get("dur") or 0))
        if ph == "B":
            open_[key].append(e)
        elif ph == "E":
            if open_[key]:
                b = open_[key].pop()
                out.append(_as_complete(b, e["ts"], {**(b.get("args") or {}), **(e.get("args") or {})}))
        else:
            out.append(e)
    for key, stack in open_.items():
        for b in stack:
            out.append(_as_complete(b, last[key], {**(b.get("args") or {}), UNCLOSED: True}))
    return out


def _as_complete(b: dict, end: float, args: dict) -> dict:
    return {**b, "ph": "X", "dur": max(0.0, end - b["ts"]), "args": args}
