"""Tensor parallelism (Megatron-style) for the Llama model over a torch.distributed group.

Each of N ranks keeps 1/N of the attention heads (and of the KV heads, so 1/N of the KV
cache) and 1/N of the MLP's intermediate columns: qkv_proj and gate_up_proj are column
parallel (a rank computes its own heads / columns, no communication), o_proj and
down_proj row parallel (each rank's partial product, summed by one all-reduce per
sublayer: two per layer). The embedding and the LM head stay whole on every rank, so
every rank computes the same logits and samples the same ids; rank 0 replies.

`shard` slices a full model in place: every rank builds the same full model (the same
seed or checkpoint) and keeps its part, so N ranks compute what one would. An all-reduce
is a span of stage `allreduce` (bytes; device time on a GPU), so each rank's trace shows
what its collectives cost and which rank the others waited for.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import llmtrace
from llmtrace import names


class TPGroup:
    """This rank's place in the tensor-parallel group (torch.distributed's default group)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        with llmtrace.span(names.ALLREDUCE, **{names.A_BYTES: x.numel() * x.element_size()}, device=x.is_cuda):
            dist.all_reduce(x)
        return x


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_rank @ W_rank^T, then the bias once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: TPGroup):
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


def _rows(linear: nn.Linear, parts: list[tuple[int, int]]) -> None:
    """Keep only these row ranges (start, length) of a column-parallel linear, in order."""
    linear.weight = nn.Parameter(
        torch.cat([linear.weight[a : a + n] for a, n in parts]).contiguous(), requires_grad=False
    )
    if linear.bias is not None:
        linear.bias = nn.Parameter(torch.cat([linear.bias[a : a + n] for a, n in parts]), requires_grad=False)
    linear.out_features = linear.weight.shape[0]


def check_divisible(heads: int, kv_heads: int, intermediate: int, world: int) -> None:
    for what, n in (("attention heads", heads), ("KV heads", kv_heads), ("MLP columns", intermediate)):
        if n % world:
            raise ValueError(f"tensor_parallel {world} does not divide the model's {n} {what}")


def shard(model: nn.Module, group: TPGroup) -> nn.Module:
    """Slice a full LlamaForCausalLM in place down to this rank's part."""
    c, r, w = model.config, group.rank, group.world
    check_divisible(c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, w)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        d, q, kv = attn.head_dim, attn.q_size // w, attn.kv_size // w
        _rows(attn.qkv_proj, [(r * q, q), (attn.q_size + r * kv, kv), (attn.q_size + attn.kv_size + r * kv, kv)])
        attn.o_proj = RowParallelLinear(attn.o_proj.weight[:, r * q : (r + 1) * q], attn.o_proj.bias, group)
        attn.heads, attn.kv_heads, attn.q_size, attn.kv_size = q // d, kv // d, q, kv
        i = c.intermediate_size // w
        _rows(mlp.gate_up_proj, [(r * i, i), (c.intermediate_size + r * i, i)])
        mlp.down_proj = RowParallelLinear(mlp.down_proj.weight[:, r * i : (r + 1) * i], None, group)
    return model


def local_kv_heads(model: nn.Module) -> int:
    """KV heads this rank's cache holds (all of them without tensor parallelism)."""
    return model.model.layers[0].self_attn.kv_heads
