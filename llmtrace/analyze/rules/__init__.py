"""The suggestion rules: one module per finding, each with a stable kebab-case `ID` and
`check(ctx) -> list[Suggestion]`. The specific rules run first and claim the functions
they explain, so `hot-function-in-stage` (last) reports only what is left."""
from __future__ import annotations

from . import (concat_padding, full_logits_transfer, gc_pauses, hot_function_in_stage, kv_cache_pressure,
               log_in_hot_path, small_prefill_batch, tcp_nodelay, underfilled_batch, unsynced_gpu_timing)

RULES = (log_in_hot_path, concat_padding, full_logits_transfer, gc_pauses, tcp_nodelay, unsynced_gpu_timing,
         small_prefill_batch, kv_cache_pressure, underfilled_batch, hot_function_in_stage)


def run_rules(ctx) -> list:
    """Every rule's suggestions, ranked by estimated saving per token."""
    found = []
    for rule in RULES:
        found.extend(rule.check(ctx))
    return sorted(found, key=lambda s: -s.est_saving_ms_per_token)
