"""What the master tells its trace about itself once (`llmtrace.configure(resource=...)`):
the scheduler's limits the analyzer compares batches with, and the engine's pipeline
profile (which spans are its steps, waits and the agents' steps standing for a wait)."""
from __future__ import annotations

from llmtrace import names
from llmtrace.analyze.profile import Profile

from .config import RunConfig

MASTER_ROOT = "master.step"
AGENT_ROOT = "agent.step"
AGENT_WAIT = "agent.wait"
PROFILE = Profile(roots=(MASTER_ROOT,), waits=(AGENT_WAIT,), remote_roots=(AGENT_ROOT,))


def resource(cfg: RunConfig) -> dict:
    return {names.R_MAX_NUM_SEQS: cfg.engine.max_num_seqs, names.R_PROFILE: PROFILE.to_resource()}
