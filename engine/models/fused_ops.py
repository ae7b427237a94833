"""The decoder's elementwise ops, each one Triton kernel on CUDA, plain PyTorch elsewhere.

At batch 1 a decode step's GEMMs read the weights near copy bandwidth, and what is left is
launch-bound: unfused, RMSNorm, rotary, SiLU * up and the residual adds are ~28 tiny
kernels per layer (benchmarks/GPU_NOTES.md). Each op here is one kernel instead:

  rms_norm          RMSNorm of x, or of x + residual, also returning that sum (the new residual)
  apply_rotary      rotary embedding of q and k, in place in the fused qkv output
  silu_and_mul      SiLU(gate) * up of the fused gate_up output

The PyTorch versions beside each kernel are the reference (HF's rounding: float32 norm,
scale in the model dtype) and the path on CPU or without triton. The kernels compute in
float32 and round once where the reference rounds per op, so they agree within the
dtype's rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # CPU-only installs: the module imports and every op takes its PyTorch path.
    triton = tl = None

    def _jit(fn):
        return fn


def _on_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


# ---- RMSNorm, with the residual add ----------------------------------------------------


@_jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    eps,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(res_out_ptr.dtype.element_ty)  # the residual stream keeps the model dtype
        tl.store(res_out_ptr + row * N + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [T, N]; with `residual`, of x + residual, returned as (normed, x + residual)."""
    if not _on_triton(x):
        return _rms_norm_torch(x, weight, eps, residual)
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("rms_norm needs rows with contiguous columns")
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    res = residual if residual is not None else x
    block = triton.next_power_of_2(n)
    if rows:
        _rms_norm_kernel[(rows,)](
            x,
            res,
            weight,
            out,
            res_out,
            x.stride(0),
            res.stride(0),
            eps,
            N=n,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block // 512)),
        )
    return out if residual is None else (out, res_out)


def _rms_norm_torch(x, weight, eps, residual):
    if residual is not None:
        x = x + residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(x.dtype)
    return out if residual is None else (out, x)


# ---- rotary embedding ------------------------------------------------------------------


@_jit
def _rotate_heads(ptr, t, stride_t, stride_h, n, cos, sin, HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)[:, None]
    lo = ptr + t * stride_t + h * stride_h + tl.arange(0, HALF)[None, :]
    mask = h < n
    x1 = tl.load(lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(lo, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(lo + HALF, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)


@_jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    heads,
    kv_heads,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    t = tl.program_id(0)
    d = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + t * stride_ct + d)[None, :]
    sin = tl.load(cos_sin_ptr + t * stride_ct + HALF + d)[None, :]
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, heads, cos, sin, HEADS_PAD, HALF)
    _rotate_heads(k_ptr, t, stride_kt, stride_kh, kv_heads, cos, sin, HEADS_PAD, HALF)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, heads, D], k [T, kv_heads, D] rotated in half-split layout (HF `rotate_half`).

    cos_sin [T, D] float32 holds each token's [cos | sin] of its D/2 frequencies.
    The Triton path rotates q and k in place and returns them; the PyTorch path returns new
    tensors, so callers use the returned pair.
    """
    if not _on_triton(q):
        cos, sin = cos_sin.to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
        return _rotate_torch(q, cos, sin), _rotate_torch(k, cos, sin)  # cos, sin [T, 1, D/2]
    tokens, heads, dim = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin.stride(-1) != 1 or dim & (dim - 1):
        raise ValueError("apply_rotary needs contiguous head dims of a power-of-two size")
    if tokens:
        kv_heads = k.shape[1]
        _rotary_kernel[(tokens,)](
            q,
            k,
            cos_sin,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos_sin.stride(0),
            heads,
            kv_heads,
            HEADS_PAD=triton.next_power_of_2(max(heads, kv_heads)),
            HALF=dim // 2,
            num_warps=4,
        )
    return q, k


def _rotate_torch(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---- SiLU(gate) * up -------------------------------------------------------------------


@_jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu rounds here
    tl.store(out_ptr + row * N + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] -> SiLU(gate) * up [T, I]."""
    if not _on_triton(x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    if x.stride(-1) != 1:
        raise ValueError("silu_and_mul needs rows with contiguous columns")
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = 1024
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, x.stride(0), N=n, BLOCK=block, num_warps=4)
    return out
