"""The engine's Llama over the paged KV cache matches transformers' LlamaForCausalLM.

A tiny random model is saved with save_checkpoint, loaded by both sides, and the engine is
driven through ModelRunner with a minimal block allocation built here (blocks handed out
in scrambled order, so block tables are never contiguous).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import ModelConfig
from engine.model_runner import ModelRunner, prepare_inputs
from engine.models.llama import LlamaConfig
from engine.models.loader import build_random_model, load_checkpoint, save_checkpoint
from engine.step_io import StepInput

transformers = pytest.importorskip("transformers")

BLOCK_SIZE = 16


class MiniAllocator:
    """Per-sequence block tables grown on demand from a shuffled free list."""

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE, seed: int = 0):
        self.block_size = block_size
        self.free = [int(b) for b in np.random.default_rng(seed).permutation(num_blocks)]
        self.tables: dict[int, list[int]] = {}

    def ensure(self, seq_id: int, num_tokens: int) -> list[int]:
        table = self.tables.setdefault(seq_id, [])
        while len(table) * self.block_size < num_tokens:
            table.append(self.free.pop())
        return table

    def release(self, seq_id: int) -> None:
        self.free.extend(self.tables.pop(seq_id))


def make_step(
    step: int,
    alloc: MiniAllocator,
    batch: list[tuple[int, list[int], int]],
    *,
    temperature=0.0,
    top_p=1.0,
    top_k=0,
    seed=-1,
) -> StepInput:
    """batch: (seq_id, all token ids, tokens already cached); the rest are this step's new tokens.
    Sampling parameters are scalars or one value per sequence."""
    bs = alloc.block_size
    ids, pos, slots, qsl, tables = [], [], [], [0], []
    for seq_id, tokens, cached in batch:
        table = alloc.ensure(seq_id, len(tokens))
        ids += tokens[cached:]
        pos += range(cached, len(tokens))
        slots += [table[p // bs] * bs + p % bs for p in range(cached, len(tokens))]
        qsl.append(len(ids))
        tables.append(table)
    width = max(map(len, tables))
    b = len(batch)
    full = lambda v, dt: np.broadcast_to(np.asarray(v, dt), (b,)).copy()  # noqa: E731
    return StepInput(
        step=step,
        is_prefill=any(len(t) - c > 1 or c == 0 for _, t, c in batch),
        seq_ids=np.array([s for s, _, _ in batch], np.int64),
        input_ids=np.array(ids, np.int32),
        positions=np.array(pos, np.int32),
        query_start_loc=np.array(qsl, np.int32),
        context_lens=np.array([len(t) for _, t, _ in batch], np.int32),
        block_tables=np.array([t + [-1] * (width - len(t)) for t in tables], np.int32),
        slot_mapping=np.array(slots, np.int64),
        temperature=full(temperature, np.float32),
        top_p=full(top_p, np.float32),
        top_k=full(top_k, np.int32),
        seed=full(seed, np.int64),
    )


class Driver:
    """Runs sequences through a ModelRunner step by step (greedy unless told otherwise)."""

    def __init__(self, runner: ModelRunner, seed: int = 0):
        self.runner = runner
        self.alloc = MiniAllocator(runner.num_blocks, runner.block_size, seed)
        self.tokens: dict[int, list[int]] = {}
        self.cached: dict[int, int] = {}
        self.step_no = 0

    def add(self, seq_id: int, tokens: list[int]) -> None:
        self.tokens[seq_id], self.cached[seq_id] = list(tokens), 0

    def preempt(self, seq_id: int) -> None:
        """Free the blocks; the next step recomputes the cache from prompt + generated tokens."""
        self.alloc.release(seq_id)
        self.cached[seq_id] = 0

    def step(self, seq_ids=None, chunk: dict[int, int] | None = None, **sampling) -> dict[int, int]:
        """One step for seq_ids (default all); chunk[seq] caps its new tokens (a partial prefill
        samples nothing). Returns the tokens appended."""
        seq_ids = list(self.tokens) if seq_ids is None else seq_ids
        chunk = chunk or {}
        batch = []
        for s in seq_ids:
            end = min(len(self.tokens[s]), self.cached[s] + chunk.get(s, 1 << 30))
            batch.append((s, self.tokens[s][:end], self.cached[s]))
        out = self.runner.execute(make_step(self.step_no, self.alloc, batch, **sampling))
        self.step_no += 1
        appended = {}
        for (s, toks, _), tok in zip(batch, out.token_ids.tolist(), strict=True):
            self.cached[s] = len(toks)
            if len(toks) == len(self.tokens[s]):
                self.tokens[s].append(tok)
                appended[s] = tok
        return appended


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    save_checkpoint(build_random_model("tiny", seed=3), d)
    return d


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return transformers.LlamaForCausalLM.from_pretrained(
        str(checkpoint), dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def runner(checkpoint):
    return ModelRunner(
        ModelConfig(path=str(checkpoint), dtype="float32", device="cpu"), block_size=BLOCK_SIZE, num_blocks=96
    )


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    gen = transformers.GenerationConfig(
        max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), generation_config=gen)
    return out[0, len(prompt) :].tolist()


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 30) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, 8000, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def test_alone_matches_transformers(runner, hf_model):
    prompt = prompts(1, seed=1)[0]
    d = Driver(runner)
    d.add(0, prompt)
    for _ in range(8):
        d.step()
    assert d.tokens[0][len(prompt) :] == hf_greedy(hf_model, prompt, 8)


def test_batched_with_staggered_joins_matches_transformers(runner, hf_model):
    """Different lengths in one batch; later sequences join while others decode (mixed steps)."""
    ps = prompts(4, seed=2)
    n = 7
    d = Driver(runner, seed=1)
    d.add(0, ps[0])
    d.add(1, ps[1])
    d.step()
    d.add(2, ps[2])
    d.step()
    d.add(3, ps[3])
    while any(len(d.tokens[i]) - len(ps[i]) < n for i in range(4)):
        d.step([i for i in range(4) if len(d.tokens[i]) - len(ps[i]) < n])
    for i, p in enumerate(ps):
        assert d.tokens[i][len(p) :] == hf_greedy(hf_model, p, n), f"sequence {i}"


def test_crossing_block_boundaries_and_chunked_prefill(runner, hf_model):
    """A 45-token prompt prefilled in chunks of 20 and 25 (cached prefix), then decoded past 48."""
    prompt = prompts(1, seed=3, lo=44, hi=45)[0]
    d = Driver(runner, seed=2)
    d.add(0, prompt)
    d.add(1, prompts(1, seed=4)[0])
    assert d.step(chunk={0: 20}).keys() == {1}
    for _ in range(9):
        d.step()
    assert len(d.tokens[0]) > 3 * BLOCK_SIZE
    assert d.tokens[0][len(prompt) :] == hf_greedy(hf_model, prompt, 9)


def test_recompute_after_preemption_continues_the_same(runner, hf_model):
    ps = prompts(2, seed=5, lo=20, hi=40)
    d = Driver(runner, seed=3)
    d.add(0, ps[0])
    d.add(1, ps[1])
    for _ in range(5):
        d.step()
    d.preempt(0)
    d.step([1])  # the other sequence keeps going while 0 waits
    for _ in range(5):
        d.step()  # 0 comes back as a prefill of prompt + its 5 tokens, batched with 1's decode
    assert d.tokens[0][len(ps[0]) :] == hf_greedy(hf_model, ps[0], 10)
    assert d.tokens[1][len(ps[1]) :] == hf_greedy(hf_model, ps[1], 11)


SMALL = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "model_type": "llama",
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "variant",
    [
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0, "tie_word_embeddings": True},
        {"num_key_value_heads": 4, "head_dim": 48, "rms_norm_eps": 1e-6},
    ],
    ids=["linear-rope", "llama3-rope-tied", "mha-head-dim"],
)
def test_logits_match_transformers(tmp_path, variant):
    model = build_random_model({**SMALL, **variant}, seed=7)
    save_checkpoint(model, tmp_path)
    model = load_checkpoint(tmp_path)  # through the HF-format round trip
    hf = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    ids = np.random.default_rng(0).integers(0, 512, size=70).tolist()
    alloc = MiniAllocator(8)
    step = make_step(0, alloc, [(0, ids, 0)])
    inp = prepare_inputs(step, torch.device("cpu"))
    c = model.config
    kv = [
        tuple(torch.zeros(8, BLOCK_SIZE, c.num_key_value_heads, c.head_dim) for _ in range(2))
        for _ in range(c.num_hidden_layers)
    ]
    with torch.no_grad():
        ours = model.compute_logits(model(inp.input_ids, inp.positions, kv, inp.meta), torch.arange(len(ids)))
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_config_round_trip_and_errors():
    cfg = LlamaConfig.from_hf({**SMALL, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3_ROPE}})
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["rope_type"] == "llama3"
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg
    with pytest.raises(ValueError, match="not a multiple"):
        LlamaConfig.from_hf({**SMALL, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="yarn"):
        build_random_model({**SMALL, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="unknown model preset"):
        build_random_model("gpt-5")


def test_load_checkpoint_rejects_missing_and_misshapen_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    save_checkpoint(build_random_model(SMALL), tmp_path)
    f = tmp_path / "model.safetensors"
    weights = load_file(f)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, f)
    with pytest.raises(ValueError, match="lacks 1 weights"):
        load_checkpoint(tmp_path)
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, f)
    with pytest.raises(ValueError, match="up_proj.weight.*shape"):
        load_checkpoint(tmp_path)


def test_random_init_is_deterministic():
    a, b = build_random_model(SMALL, seed=1), build_random_model(SMALL, seed=1)
    c = build_random_model(SMALL, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    assert 0.015 < sa["lm_head.weight"].std() < 0.025


def test_sharded_checkpoint_loads(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    model = build_random_model({**SMALL, "tie_word_embeddings": True}, seed=4)
    save_checkpoint(model, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: weights[k] for k in keys}, tmp_path / fname)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_checkpoint(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_attention_backend_choice():
    from engine.attention import get_backend, torch_ref
    from engine.attention import triton as triton_backend

    assert get_backend("cpu") is torch_ref
    assert get_backend("cuda") is (triton_backend if triton_backend.AVAILABLE else torch_ref)
