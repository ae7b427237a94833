"""The call chain of one step across processes: the master's step, the hop to each agent
(grafted under the master's `agent.wait`), the agent's stages, and the reply, with times."""

from __future__ import annotations

from collections import defaultdict

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static, Tree

from llmtrace.timeline import Process, Span

from .model import StepView


def _ms(ns: int | float) -> str:
    return f"{ns / 1e6:.3f} ms"


def span_label(s: Span, parent: Span | None, processes: dict[int, Process]) -> Text:
    t = Text.assemble((s.name, "bold" if parent is None or s.pid != parent.pid else ""), "  ", (_ms(s.dur_ns), "cyan"))
    if s.device_dur_ns is not None:
        t.append(f"  device {_ms(s.device_dur_ns)}", "green")
    if parent is None or s.pid != parent.pid:
        proc = processes.get(s.pid)
        t.append(f"  [{proc.name if proc else s.pid}]", "magenta")
        if parent is not None:
            t.append(f"  +{_ms(s.start_ns - parent.start_ns)} after {parent.name} began", "dim")
    if s.failed:
        t.append("  raised", "red")
    return t


def build_tree(root_node, view: StepView, processes: dict[int, Process]) -> None:
    """Nest the step's spans under `root_node`: the step's root, with the roots other
    processes recorded for this step (the agents' steps) under its agent.wait; the root's
    own process's other spans of the step (e.g. requests' `queue`) follow it."""
    ids = {s.span_id for s in view.spans}
    children: dict[int, list[Span]] = defaultdict(list)
    main = view.cost.root
    hop = view.cost.wait or main
    tops = [main]
    for s in view.spans:  # sorted by start
        if s.parent_id in ids:
            children[s.parent_id].append(s)
        elif s.pid != main.pid:
            children[hop.span_id].append(s)
        elif s is not main:
            tops.append(s)
    children[hop.span_id].sort(key=lambda s: s.start_ns)

    def add(node, s: Span, parent: Span | None) -> None:
        kids = children.get(s.span_id, ())
        label = span_label(s, parent, processes)
        if s is view.cost.wait:
            label.append(f"  (transport {_ms(view.cost.transport_ns)})", "yellow")
        if not kids:
            node.add_leaf(label)
            return
        sub = node.add(label, expand=True)
        for k in kids:
            add(sub, k, s)

    for top in tops:
        add(root_node, top, None)


class CallChain(Vertical):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.heading = Static("", classes="panel-title")
        self.spans_tree: Tree = Tree("step")
        self.spans_tree.show_root = False

    def compose(self) -> ComposeResult:
        yield self.heading
        yield self.spans_tree

    def show(self, view: StepView | None, processes: dict[int, Process], slowest: bool = False) -> None:
        self.spans_tree.clear()
        if view is None:
            self.heading.update(Text("No step to show yet", style="dim"))
            return
        c = view.cost
        self.heading.update(
            Text.assemble(
                ("step ", "bold"),
                (str(c.step), "bold"),
                f"  {_ms(c.wall_ns)}  {c.tokens} tokens  ",
                ("prefill" if c.prefill else "decode", "yellow"),
                ("  (slowest in window)" if slowest else "", "red"),
                ("   [ ] previous/next  s slowest", "dim"),
            )
        )
        build_tree(self.spans_tree.root, view, processes)
        self.spans_tree.root.expand_all()
