"""What the master tells its trace about itself once (`llmtrace.configure(resource=...)`):
the scheduler's limits the analyzer compares batches with, the engine's pipeline
profile (which spans are its steps, waits and the agents' steps standing for a wait),
and the config keys of the knobs the analyzer's fixes turn (SETTINGS: every key exists in
RunConfig, which a test checks)."""

from __future__ import annotations

from llmtrace import names
from llmtrace.analyze.profile import Profile

from .config import RunConfig

MASTER_ROOT = "master.step"
AGENT_ROOT = "agent.step"
AGENT_WAIT = "agent.wait"
PROFILE = Profile(roots=(MASTER_ROOT,), waits=(AGENT_WAIT,), remote_roots=(AGENT_ROOT,))
SETTINGS = {
    names.K_KV_BLOCKS: "engine.num_blocks",
    names.K_KV_BLOCK_SIZE: "engine.block_size",
    names.K_MAX_NUM_SEQS: "engine.max_num_seqs",
    names.K_MAX_BATCHED_TOKENS: "engine.max_batched_tokens",
    names.K_CUDA_GRAPHS: "engine.cuda_graphs",
}


def resource(cfg: RunConfig) -> dict:
    return {
        names.R_MAX_NUM_SEQS: cfg.engine.max_num_seqs,
        names.R_PROFILE: PROFILE.to_resource(),
        names.R_SETTINGS: SETTINGS,
    }
