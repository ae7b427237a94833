"""Where each step's (and each output token's) wall time goes.

A step's wall time is its root span, as the pipeline profile says (profile.py: the
engine declares `master.step`; other pipelines' steps are `llmtrace.step()` spans, the
longest top-level span of each step id, or inferred from the model's cadence).
Every nanosecond of it is given to exactly one label, highest claim first:

  model       device time of `forward`/`sampling` (CUDA events) inside the root's window,
              of whichever step (async scheduling overlaps steps), less `device.idle`:
              the share of it with no kernel running, where the GPU's records say
              (device_activity.py; launch-bound eager steps idle half); without device time
              their host time, less host-side work nested in them (and not a span that
              copied whole logits to the host: that is host sampling)
  <stage>     host-side work nested in a model stage (`logging.debug` inside `forward`,
              `sampling.host`), reported under that model stage's name
  <stage>     each span on the critical path (the root's children), by its stage
              (`@llmtrace.trace` functions of stage "user": by their name)
  gap         inside a step root (or the agent's `agent.step`) but in no child span
  tcp         the part of the master's `agent.wait` not covered by the agent's step
  <stage>     in a pipeline without a declared wait, the peer's work during a blocking
              receive (tcp / ipc): the spans of the thread in another process whose
              send ended the wait (peers.py's hop matching, `_peer_work`), and `gap`
              for the rest of that thread's time up to its send; likewise during a
              blocking send, the receiving thread's work until it started reading

A declared wait (the engine's `agent.wait`) is replaced by the remote root's breakdown:
the `agent.step` of the same step that finished last (the slowest rank is the critical
one), clipped to the wait.
Master work nested in the wait (the previous step's `detokenize`/`stream.write`, run
while the agent computes) is hidden while the agent's step or the transport before it
covers it; only what outlasts the agent's step (its reply) counts, under its stage
(all of it when no agent step is traced).
So for every step: model + stages + gap == wall time.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from .. import names
from ..decorator import USER_STAGE
from ..timeline import Span
from .index import TraceIndex
from .peers import Peers
from .profile import Profile, Steps, find_steps
from .report_schema import BreakdownView, StageRow
from .stats import percentile

MODEL_STAGES = names.MODEL_STAGES
MODEL = "model"
GAP = "gap"
DEVICE_IDLE = "device.idle"  # the device idle between a model stage's kernels (device_activity.py)
TRANSPORT = names.TCP
HOST_SUFFIX = ".host"  # `<stage>.host`: host-side work inside a model stage (e.g. argmax on host logits)
LOGITS_BYTES_PER_SEQ = 1024  # ids + logprobs are a few bytes per sequence; a vocab row is > 100 KB

# Claim priorities: a higher one takes the time first; among equals the later-starting
# (inner) segment wins.
# The root's own stages rank below the agent's step: with async scheduling the master's
# work overlaps the agent's, and only counts while the agent (the critical path) is idle.
_P_ROOT, _P_WAIT, _P_ROOT_STAGE, _P_AGENT_ROOT, _P_STAGE, _P_HOST_IN_MODEL, _P_DEVICE = range(7)


@dataclass(slots=True)
class _Segment:
    start: int
    end: int
    label: str
    prio: int
    span: Span | None = None


@dataclass
class StepCost:
    step: int
    root: Span
    tokens: int
    prefill: bool
    batch: int | None
    parts: dict[str, int] = field(default_factory=dict)  # label -> ns on the critical path
    counts: dict[str, int] = field(default_factory=dict)  # label -> spans contributing
    transport_ns: int = 0  # the agent.wait residual alone (part of parts["tcp"])
    wait: Span | None = None
    agent_root: Span | None = None
    # (stage label, span) for every span on the critical path, for function evidence
    stage_spans: list[tuple[str, Span]] = field(default_factory=list)
    # (pid, tid, start, end, label of the wait) of peer threads' work standing for a blocking receive
    peer_windows: list[tuple[int, int, int, int, str]] = field(default_factory=list)
    # where the root thread's own part ends: a pool thread's step hands on to the thread of
    # the next forward, and the thread itself goes back to wait for work
    own_end_ns: int | None = None

    @property
    def wall_ns(self) -> int:
        return self.root.dur_ns

    @property
    def own_ns(self) -> tuple[int, int]:
        """The part of the step the root's thread works on: (start, end)."""
        return self.root.start_ns, self.own_end_ns if self.own_end_ns is not None else self.root.end_ns


def is_host_side(s: Span, model_stage: str) -> bool:
    """A span nested in a model stage that is host work, not model compute."""
    return s.stage != model_stage or s.name.endswith(HOST_SUFFIX)


def stage_label(s: Span) -> str:
    """The breakdown row of a critical-path span: its stage, or for `@llmtrace.trace`
    functions without one (stage "user") the function's name."""
    return s.name if s.stage == USER_STAGE else s.stage


LOGITS_BYTES_ATTRS = (names.A_D2H_BYTES, names.A_LOGITS_BYTES, names.A_BYTES)


def moves_logits(s: Span, seqs: int) -> bool:
    """A span that moved logits (not ids): `d2h_bytes`, `logits_bytes` or (a host copy,
    a transport send) `bytes` of at least LOGITS_BYTES_PER_SEQ per sequence. In a model
    stage that is host sampling: its time is host work, not model. Sequences: the span's
    own `seqs` attr when it has one (with async scheduling a window holds the next
    step's spans too), else `seqs`."""
    own = s.attrs.get(names.A_SEQS)
    if isinstance(own, int):
        seqs = own
    for key in LOGITS_BYTES_ATTRS:
        v = s.attrs.get(key)
        if isinstance(v, (int, float)) and v >= LOGITS_BYTES_PER_SEQ * max(1, seqs):
            return True
    return False


def step_tokens(root: Span) -> int:
    """Output tokens a step produced: its `output_tokens` (the engine's: rows not discarded),
    else one per sequence in the batch (prefill and decode alike), else a generic
    pipeline's `tokens` attr, else one."""
    for key in (names.A_OUTPUT_TOKENS, names.A_BATCH, names.A_TOKENS):
        v = root.attrs.get(key)
        if isinstance(v, (int, float)) and v >= 0:
            return int(v)
    return 1


def _claim(segments: list[_Segment]) -> list[tuple[_Segment, int]]:
    """Give every instant to the highest-priority segment covering it; returns (segment, ns)."""
    taken: list[tuple[int, int]] = []  # disjoint, sorted
    out = []
    for seg in sorted(segments, key=lambda g: (-g.prio, -g.start)):
        free, cur = 0, seg.start
        for a, b in taken:
            if b <= cur:
                continue
            if a >= seg.end:
                break
            if a > cur:
                free += a - cur
            cur = max(cur, b)
            if cur >= seg.end:
                break
        if cur < seg.end:
            free += seg.end - cur
        if free:
            taken = _merge(taken, seg.start, seg.end)
        out.append((seg, free))
    return out


def _merge(taken: list[tuple[int, int]], a: int, b: int) -> list[tuple[int, int]]:
    out, placed = [], False
    for x, y in taken:
        if y < a:
            out.append((x, y))
        elif x > b:
            if not placed:
                out.append((a, b))
                placed = True
            out.append((x, y))
        else:
            a, b = min(a, x), max(b, y)
    if not placed:
        out.append((a, b))
    return out


def device_idle_share(s: Span) -> float:
    """The share of a model span's device interval with no kernel or copy running (0 when
    its busy time was not recorded)."""
    busy, dur = s.attrs.get(names.A_BUSY_NS), s.device_dur_ns
    if busy is None or not dur:
        return 0.0
    return min(1.0, max(0.0, 1.0 - float(busy) / dur))


class _DeviceTimeline:
    """Device intervals of the model stages, of every step, by process and start time: a
    step root's model time is the device work inside its window, whichever step it belongs
    to (with async scheduling step n+1 runs on the device while the host still finishes
    step n), on the critical rank's device when an agent step stands for the wait."""

    def __init__(self, index: TraceIndex, model_stages: tuple[str, ...]):
        by_pid: dict[int, list[tuple[int, int, Span]]] = defaultdict(list)  # (device start, end, span)
        for stage in model_stages:
            for s in index.by_stage.get(stage, ()):
                ds, de = s.device_start_ns, s.device_end_ns
                if ds is not None and de is not None:
                    by_pid[s.pid].append((ds, de, s))
        self.tracks: dict[int, tuple[list[tuple[int, int, Span]], list[int], int]] = {}
        for pid, rows in by_pid.items():
            rows.sort(key=lambda r: r[0])
            self.tracks[pid] = (rows, [r[0] for r in rows], max(de - ds for ds, de, _ in rows))

    def segments(self, lo: int, hi: int, pid: int | None) -> Iterator[_Segment]:
        """pid None: every process's device."""
        for p in self.tracks if pid is None else (pid,):
            rows, starts, longest = self.tracks.get(p, ([], [], 0))
            i = bisect_left(starts, lo - longest)
            while i < len(rows) and starts[i] < hi:
                ds, de, s = rows[i]
                a, b = max(ds, lo), min(de, hi)
                if b > a:
                    yield _Segment(a, b, MODEL, _P_DEVICE, s)
                i += 1


class _StepWalker:
    def __init__(self, index: TraceIndex, profile: Profile, peers: Peers):
        self.index, self.profile = index, profile
        self.model_stages = profile.model_stages
        self.device = _DeviceTimeline(index, profile.model_stages)
        self.peers = None if profile.waits else peers  # a declared wait names its remote root
        self.agent_steps: dict[int, list[Span]] = defaultdict(list)
        self.agent_timeline: dict[int, list[Span]] = defaultdict(list)  # pid -> its remote roots by start
        for s in (s for n in profile.remote_roots for s in index.by_name.get(n, ())):
            self.agent_steps[s.step].append(s)
            self.agent_timeline[s.pid].append(s)
        for steps in self.agent_timeline.values():
            steps.sort(key=lambda s: s.start_ns)
        self.agent_ends = {pid: [s.end_ns for s in steps] for pid, steps in self.agent_timeline.items()}

    def cost(self, step: int, root: Span, handoff: tuple[int, int, int, int] | None = None) -> StepCost:
        """The step's parts; `handoff` (pid, tid, lo, hi): another thread whose work in
        [lo, hi) is on the step's path (the pool thread that runs the next forward)."""
        sc = StepCost(
            step,
            root,
            step_tokens(root),
            bool(root.attrs.get(names.A_PREFILL)),
            _int_or_none(root.attrs.get(names.A_BATCH)),
        )
        segs = [_Segment(root.start_ns, root.end_ns, GAP, _P_ROOT, root)]
        self._children(root, root.start_ns, root.end_ns, segs, sc, _P_ROOT_STAGE)
        if handoff is not None:
            pid, tid, lo, hi = handoff
            sc.own_end_ns = lo
            self._thread_work(pid, tid, self.index.in_window(self.index.top_level(pid, tid), lo, hi), lo, hi, segs, sc)
        if sc.agent_root is not None:
            self._neighbours(sc.agent_root, root.start_ns, root.end_ns, segs, sc)
        segs += self.device.segments(root.start_ns, root.end_ns, sc.agent_root.pid if sc.agent_root else None)
        parts: dict[str, int] = defaultdict(int)
        counts: dict[str, int] = defaultdict(int)
        for seg, ns in _claim(segs):
            if seg.prio == _P_DEVICE and seg.span and (idle := round(ns * device_idle_share(seg.span))):
                parts[DEVICE_IDLE] += idle  # launch-bound time inside the model stage: overhead
                ns -= idle
            parts[seg.label] += ns
            if seg.span is not None and seg.label != GAP and seg.prio != _P_AGENT_ROOT:
                counts[seg.label] += 1
            if seg.prio == _P_WAIT:
                sc.transport_ns += ns
        sc.parts, sc.counts = dict(parts), dict(counts)
        return sc

    def _children(
        self, parent: Span, lo: int, hi: int, segs: list[_Segment], sc: StepCost, prio: int = _P_STAGE
    ) -> None:
        """Segments of `parent`'s children in [lo, hi); `prio` ranks its plain stage spans."""
        for c in self.index.children.get(parent.span_id, ()):
            a, b = max(c.start_ns, lo), min(c.end_ns, hi)
            if b <= a:
                continue
            if c.name in self.profile.waits:
                self._agent(c, a, b, segs, sc)
            elif c.stage in self.model_stages and not moves_logits(c, sc.tokens):
                self._model_stage(c, a, b, segs, sc)
            else:
                label = stage_label(c)
                segs.append(_Segment(a, b, label, prio, c))
                sc.stage_spans.append((label, c))
                if self.peers is not None:
                    self._peer_work(c, a, b, segs, sc)

    def _agent(self, wait: Span, a: int, b: int, segs: list[_Segment], sc: StepCost) -> None:
        segs.append(_Segment(a, b, TRANSPORT, _P_WAIT, wait))
        sc.wait = wait
        candidates = [s for s in self.agent_steps.get(sc.step, ()) if s.start_ns < b and s.end_ns > a]
        agent = max(candidates, key=lambda s: s.end_ns) if candidates else None
        self._overlapped(wait, a if agent is None else max(a, agent.end_ns), b, segs, sc)
        if agent is None:
            return
        sc.agent_root = agent
        # the whole root window: with async scheduling the agent starts step n before the
        # master's wait for it (the master is still sending step n+1)
        self._walk_agent(agent, sc.root.start_ns, sc.root.end_ns, segs, sc)

    def _walk_agent(self, agent: Span, lo: int, hi: int, segs: list[_Segment], sc: StepCost) -> None:
        a, b = max(agent.start_ns, lo), min(agent.end_ns, hi)
        if b > a:
            segs.append(_Segment(a, b, GAP, _P_AGENT_ROOT, agent))
            self._children(agent, lo, hi, segs, sc)

    def _neighbours(self, agent: Span, lo: int, hi: int, segs: list[_Segment], sc: StepCost) -> None:
        """The critical rank's other agent steps inside the root's window: with async
        scheduling the agent runs step n+1 while the master still postprocesses step n."""
        steps, ends = self.agent_timeline[agent.pid], self.agent_ends[agent.pid]
        i = bisect_right(ends, lo)
        while i < len(steps) and steps[i].start_ns < hi:
            if steps[i] is not agent:
                self._walk_agent(steps[i], lo, hi, segs, sc)
            i += 1

    def _overlapped(self, wait: Span, lo: int, hi: int, segs: list[_Segment], sc: StepCost) -> None:
        """Master spans nested in `agent.wait`: only their part in [lo, hi), after the
        agent's reply, is on the critical path."""
        for c in self.index.children.get(wait.span_id, ()):
            a, b = max(c.start_ns, lo), min(c.end_ns, hi)
            if b > a:
                label = stage_label(c)
                segs.append(_Segment(a, b, label, _P_ROOT_STAGE, c))
                sc.stage_spans.append((label, c))

    def _peer_work(self, wait: Span, a: int, b: int, segs: list[_Segment], sc: StepCost) -> None:
        """A blocking receive (or send): what the sending (receiving) thread of the other
        process did meanwhile is on the critical path, by its stages, up to its side of the
        hop (the wait's own label keeps the rest)."""
        peer = self.peers.peer_of(wait) if self.peers is not None else None
        if peer is None:
            return
        hi = min(b, peer.hop.start_ns)  # from there on: the hop itself, the wait's own
        if hi <= a:
            return
        self._thread_work(peer.pid, peer.tid, peer.spans(a, hi), a, hi, segs, sc)

    def _thread_work(
        self, pid: int, tid: int, spans: list[Span], a: int, hi: int, segs: list[_Segment], sc: StepCost
    ) -> None:
        """Another thread's `spans` in [a, hi), on the step's critical path, by their stages;
        its unannotated code there is the step's gap (its samples count: peer_windows)."""
        sc.peer_windows.append((pid, tid, a, hi, GAP))
        segs.append(_Segment(a, hi, GAP, _P_AGENT_ROOT, None))
        for c in spans:
            ca, cb = max(c.start_ns, a), min(c.end_ns, hi)
            if cb > ca:
                label = stage_label(c)
                segs.append(_Segment(ca, cb, label, _P_STAGE, c))
                sc.stage_spans.append((label, c))

    def _model_stage(self, c: Span, a: int, b: int, segs: list[_Segment], sc: StepCost) -> None:
        sc.stage_spans.append((c.stage, c))
        if c.device_start_ns is not None:
            # host launch, overhead when the device idles; the device time itself comes
            # from _DeviceTimeline, by time window
            segs.append(_Segment(a, b, c.stage, _P_STAGE, c))
        else:
            segs.append(_Segment(a, b, MODEL, _P_STAGE, c))
        for d in self._outer_host_side(c):
            da, db = max(d.start_ns, a), min(d.end_ns, b)
            if db > da:
                segs.append(_Segment(da, db, c.stage, _P_HOST_IN_MODEL, d))

    def _outer_host_side(self, c: Span) -> Iterator[Span]:
        """Outermost host-side spans nested in model stage span `c`."""
        stack = list(self.index.children.get(c.span_id, ()))
        while stack:
            d = stack.pop()
            if is_host_side(d, c.stage):
                yield d
            else:
                stack.extend(self.index.children.get(d.span_id, ()))


def _int_or_none(v: object) -> int | None:
    return int(v) if isinstance(v, (int, float)) else None


class Breakdown:
    def __init__(self, steps: list[StepCost], found: Steps, peers: Peers):
        self.steps = steps
        self.found = found
        self.peers = peers  # the trace's message hops, for the rules that judge receives

    @classmethod
    def of(cls, index: TraceIndex) -> Breakdown:
        found, peers = find_steps(index), Peers(index)
        walker = _StepWalker(index, found.profile, peers)
        return cls(
            [walker.cost(step, root, found.handoffs.get(root.span_id)) for step, root in found.roots], found, peers
        )

    @property
    def profile(self) -> Profile:
        return self.found.profile

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.steps)

    @property
    def wall_ns(self) -> int:
        return sum(s.wall_ns for s in self.steps)

    @property
    def per_token_ms(self) -> float:
        return self.wall_ns / self.tokens / 1e6 if self.tokens else 0.0

    def ms_per_token(self, label: str, steps: list[StepCost] | None = None) -> float:
        steps = self.steps if steps is None else steps
        tokens = sum(s.tokens for s in steps)
        return sum(s.parts.get(label, 0) for s in steps) / tokens / 1e6 if tokens else 0.0

    def decode_steps(self) -> list[StepCost]:
        return [s for s in self.steps if not s.prefill]

    def prefill_steps(self) -> list[StepCost]:
        return [s for s in self.steps if s.prefill]

    def view(self, steps: list[StepCost] | None = None) -> BreakdownView | None:
        """The report's breakdown numbers over `steps` (default all)."""
        return breakdown_view(self.steps if steps is None else steps)


def breakdown_view(steps: list[StepCost]) -> BreakdownView | None:
    """The report's breakdown numbers over `steps` (None without tokens)."""
    tokens = sum(s.tokens for s in steps)
    if not tokens:
        return None
    wall = sum(s.wall_ns for s in steps)
    per_token = wall / tokens / 1e6
    model = sum(s.parts.get(MODEL, 0) for s in steps) / tokens / 1e6
    labels = {lab for s in steps for lab in s.parts if lab != MODEL}
    stages: list[StageRow] = []
    for lab in labels:
        per_step = sorted(s.parts.get(lab, 0) / 1e6 for s in steps)
        total = sum(per_step)
        stages.append(
            {
                "name": lab,
                "ms_per_step": total / len(steps),
                "ms_per_token": total / tokens,
                "share": total / tokens / per_token if per_token else 0.0,
                "count": sum(s.counts.get(lab, 0) for s in steps),
                "p50_ms": percentile(per_step, 50),
                "p99_ms": percentile(per_step, 99),
            }
        )
    stages.sort(key=lambda r: -r["ms_per_token"])
    return {
        "steps": len(steps),
        "tokens": tokens,
        "ms_per_step": wall / len(steps) / 1e6,
        "per_token_ms": per_token,
        "model_ms": model,
        "overhead_ms": per_token - model,
        "overhead_fraction": (per_token - model) / per_token if per_token else 0.0,
        "stages": stages,
        "headline": headline(per_token, model, stages),
    }


def headline(per_token: float, model: float, stages: list[StageRow], shown: int = 5) -> str:
    """'40.0 ms/token = 25.0 model + 12.5 preprocess + 2.5 sampling + 0.9 other'."""
    fmt = "{:.1f}" if per_token >= 10 else "{:.2f}"
    visible = [r for r in stages if r["ms_per_token"] >= per_token * 0.005]
    terms = [f"{fmt.format(model)} model"] + [f"{fmt.format(r['ms_per_token'])} {r['name']}" for r in visible[:shown]]
    rest = sum(r["ms_per_token"] for r in stages) - sum(r["ms_per_token"] for r in visible[:shown])
    if rest >= per_token * 0.005:
        terms.append(f"{fmt.format(rest)} other")
    return f"{fmt.format(per_token)} ms/token = " + " + ".join(terms)
