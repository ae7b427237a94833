"""Llama-family decoder over a flat token batch and a paged KV cache.

Same math and weight names as HF `LlamaForCausalLM`, with q/k/v and gate/up fused into
one matmul each; `load_weights` fuses HF tensors on the way in and `hf_weights` splits
them again on the way out. Attention goes through a backend module (engine.attention).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from types import ModuleType

import torch
from torch import nn

from ..attention import AttentionMetadata
from . import fused_ops

KVCache = tuple[torch.Tensor, torch.Tensor]  # per layer: k, v [num_blocks, block_size, kv_heads, head_dim]


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # other HF keys, written back unchanged

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """From an HF config.json dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
            raise ValueError("only Llama MLPs with hidden_act 'silu' and no bias are supported")
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kw = {k: v for k, v in hf.items() if k in names}
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", 10000.0)  # 5.x keeps it in rope_parameters
        kw["rope_theta"] = hf.get("rope_theta", theta)
        kind = rope.get("rope_type", rope.get("type", "default"))
        kw["rope_scaling"] = None if kind == "default" else {**rope, "rope_type": kind}
        kw["num_key_value_heads"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]  # absent: MHA
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        derived = ("rope_parameters", "torch_dtype", "dtype")
        kw["extra"] = {k: v for k, v in hf.items() if k not in names and k not in derived}
        return cls(**kw)

    def to_hf(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {
            **extra,
            **d,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "mlp_bias": False,
        }


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] with `rope_scaling` applied (default, linear, llama3)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    else:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    return inv_freq.float()


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short kept, a smooth ramp between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    ramp = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)  # 0: long wavelengths, 1: short
    return inv_freq / factor * (1 - ramp) + inv_freq * ramp


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with `residual` (norm(x + residual), x + residual): the add rides along."""
        return fused_ops.rms_norm(x, self.weight, self.eps, residual)


class RotaryEmbedding(nn.Module):
    """[cos | sin] rows [T, head_dim] float32 per position, looked up once per step and shared by every layer."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), rope_inv_freq(cfg))
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], -1), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.cos_sin[positions]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, backend: ModuleType):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = self.head_dim**-0.5
        self.backend = backend

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = fused_ops.apply_rotary(
            q.view(n, self.heads, self.head_dim), k.view(n, self.kv_heads, self.head_dim), rope
        )
        k_cache, v_cache = kv_cache
        self.backend.store_kv(k, v.view(n, self.kv_heads, self.head_dim), k_cache, v_cache, meta.slot_mapping)
        out = self.backend.attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(n, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused_ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, backend: ModuleType):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, residual, rope, kv_cache, meta):
        """x: the last sublayer's output, not yet added to `residual` (None at the first layer),
        so each add runs inside the next RMSNorm; returns the same pair for the next layer."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, rope, kv_cache, meta), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, backend: ModuleType):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, backend) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def forward(self, input_ids, positions, kv_caches, meta):
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary_emb(positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, kv_cache, meta)
        return self.norm(x, residual)[0]


# HF projection name -> (fused parameter, index of its part along dim 0)
_PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig, backend: ModuleType):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, backend)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor, last_token_indices: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of only the rows that get sampled."""
        return self.lm_head(hidden.index_select(0, last_token_indices))

    def _part_sizes(self, fused: str) -> list[int]:
        c = self.config
        if fused == "qkv_proj":
            return [c.num_attention_heads * c.head_dim] + [c.num_key_value_heads * c.head_dim] * 2
        return [c.intermediate_size] * 2

    def _locate(self, hf_name: str) -> tuple[str, int, int]:
        """HF tensor name -> (own parameter name, row offset, rows); rows 0 means the whole tensor."""
        parts = hf_name.split(".")
        for i, p in enumerate(parts):
            if p in _PACKED:
                fused, idx = _PACKED[p]
                sizes = self._part_sizes(fused)
                return ".".join(parts[:i] + [fused] + parts[i + 1 :]), sum(sizes[:idx]), sizes[idx]
        return hf_name, 0, 0

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in (fusing q/k/v and gate/up); every weight must be present."""
        params = dict(self.named_parameters())
        expected = {name for name, _ in self.hf_weights()}
        seen = set()
        for name, w in weights:
            if name not in expected:
                tied = name == "lm_head.weight" and self.config.tie_word_embeddings
                if name.endswith("rotary_emb.inv_freq") or tied:
                    continue
                raise ValueError(f"unexpected weight {name!r} for a Llama model")
            own, start, rows = self._locate(name)
            dst = params[own].data
            dst = dst[start : start + rows] if rows else dst
            if dst.shape != w.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(w.shape)}, the model expects {tuple(dst.shape)}")
            dst.copy_(w)
            seen.add(name)
        if missing := sorted(expected - seen):
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor view) pairs, fused parameters split; tied lm_head left out."""
        for name, p in self.named_parameters():
            fused = next((f for f in ("qkv_proj", "gate_up_proj") if f".{f}." in name), None)
            if fused is None:
                yield name, p.data
                continue
            hf_parts = [k for k, (f, _) in _PACKED.items() if f == fused]
            for hf, chunk in zip(hf_parts, p.data.split(self._part_sizes(fused), dim=0), strict=True):
                yield name.replace(fused, hf), chunk
