"""The suggestion rules: one module per finding, each with a stable kebab-case `ID` and
`check(ctx) -> list[Suggestion]` (the `Rule` protocol). A rule that explains functions
claims them (`ctx.claim`); a rule that reads the claims declares whose it needs with
`AFTER` (rule IDs, or ALL: every other rule), and `ordered` runs the rules so that
each comes after those it names: `hot-function-in-stage` (AFTER = ALL) reports only what
no specific finding explained.

A finding that promises time but less than MIN_SAVING_SHARE of the per-token time is
noise and dropped, a zero saving included; findings whose worth is not time (wrong
timing, memory, what is not recorded) say so in their `impact` and stay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from . import (
    concat_padding,
    cpu_starved,
    detokenize_whole_sequence,
    full_logits_transfer,
    gc_pauses,
    gil_contention,
    hot_function_in_stage,
    idle_wait,
    kv_cache_pressure,
    launch_bound,
    log_in_hot_path,
    no_kv_cache,
    polling_sleep,
    serialization,
    small_prefill_batch,
    straggler_rank,
    tcp_nodelay,
    unbatched_requests,
    underfilled_batch,
    unsynced_gpu_timing,
)

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion

RULES: tuple[Rule, ...] = (
    log_in_hot_path,
    concat_padding,
    full_logits_transfer,
    gc_pauses,
    tcp_nodelay,
    polling_sleep,
    serialization,
    detokenize_whole_sequence,
    idle_wait,
    no_kv_cache,
    unsynced_gpu_timing,
    small_prefill_batch,
    kv_cache_pressure,
    underfilled_batch,
    unbatched_requests,
    launch_bound,
    straggler_rank,
    cpu_starved,
    gil_contention,
    hot_function_in_stage,
)
MIN_SAVING_SHARE = 0.005
ALL = "*"


class Rule(Protocol):
    """A rule module: its ID and its check; optionally AFTER (rule IDs, or ALL)."""

    @property
    def ID(self) -> str: ...

    def check(self, ctx: Analysis) -> list[Suggestion]: ...


def ordered(rules: Sequence[Rule]) -> list[Rule]:
    """`rules` in their given order, except that each runs after the rules its AFTER names."""
    ids = {r.ID for r in rules}
    needs = {
        r.ID: (ids - {r.ID}) if getattr(r, "AFTER", ()) == ALL else set(getattr(r, "AFTER", ())) & ids for r in rules
    }
    out: list[Rule] = []
    while len(out) < len(rules):
        done = {r.ID for r in out}
        ready = next((r for r in rules if r.ID not in done and needs[r.ID] <= done), None)
        if ready is None:
            raise ValueError(f"rules order themselves in a cycle: {sorted(ids - done)}")
        out.append(ready)
    return out


def run_rules(ctx: Analysis) -> list[Suggestion]:
    """Every rule's suggestions, ranked by estimated saving per token. A rule that fails on
    this trace (a bug) costs its own finding only: the failure goes to `ctx.rule_errors`
    (the report lists it) and the other rules still run."""
    floor = MIN_SAVING_SHARE * ctx.per_token_ms
    found: list[Suggestion] = []
    for rule in ordered(RULES):
        try:
            found += rule.check(ctx)
        except Exception as e:  # noqa: BLE001 (one rule's bug must not cost the whole report)
            ctx.rule_errors.append(f"{rule.ID}: {type(e).__name__}: {e}")
    found = [s for s in found if s.impact or (s.est_saving_ms_per_token >= floor and s.est_saving_ms_per_token > 0)]
    return sorted(found, key=lambda s: -s.est_saving_ms_per_token)
