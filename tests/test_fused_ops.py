"""engine.models.fused_ops: the PyTorch path equals HF's math (CPU); each Triton kernel
equals the PyTorch path within the dtype's rounding (CUDA, skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models import fused_ops

cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and fused_ops.triton is not None), reason="needs CUDA and triton"
)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def hf_rms_norm(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def hf_rotary(x, positions, inv_freq):
    """HF's rotate_half form, cos/sin in the model dtype."""
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def cos_sin_rows(positions, inv_freq):
    freqs = torch.outer(positions.float(), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], -1)


def make(shape, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_equals_the_reference_on_cpu(dtype):
    x, res, w = make((5, 64), dtype, "cpu", 1), make((5, 64), dtype, "cpu", 2), make((64,), dtype, "cpu", 3)
    assert torch.equal(fused_ops.rms_norm(x, w, 1e-6), hf_rms_norm(x, w, 1e-6))
    out, new_res = fused_ops.rms_norm(x, w, 1e-6, res)
    assert torch.equal(new_res, x + res) and torch.equal(out, hf_rms_norm(x + res, w, 1e-6))

    gate_up = make((5, 2 * 48), dtype, "cpu", 4)
    assert torch.equal(fused_ops.silu_and_mul(gate_up), F.silu(gate_up[:, :48]) * gate_up[:, 48:])

    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    pos = torch.tensor([0, 3, 7, 100, 511])
    q, k = make((5, 4, 16), dtype, "cpu", 5), make((5, 2, 16), dtype, "cpu", 6)
    q_rot, k_rot = fused_ops.apply_rotary(q, k, cos_sin_rows(pos, inv_freq))
    torch.testing.assert_close(q_rot, hf_rotary(q, pos, inv_freq), **TOL[dtype])
    torch.testing.assert_close(k_rot, hf_rotary(k, pos, inv_freq), **TOL[dtype])
    assert torch.equal(q_rot[0], q[0])  # position 0: no rotation


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (7, 4096), (33, 5120), (3, 96)])
def test_rms_norm_kernel_matches_torch(dtype, rows, hidden):
    x, res = make((rows, hidden), dtype, "cuda", 1), make((rows, hidden), dtype, "cuda", 2)
    w = make((hidden,), dtype, "cuda", 3)
    want = fused_ops._rms_norm_torch(x, w, 1e-5, None)
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-5), want, **TOL[dtype])
    out, new_res = fused_ops.rms_norm(x, w, 1e-5, res)
    ref_out, ref_res = fused_ops._rms_norm_torch(x, w, 1e-5, res)
    assert torch.equal(new_res, ref_res)  # one rounding of an exact fp32 sum, same as torch's add
    torch.testing.assert_close(out, ref_out, **TOL[dtype])


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "tokens,heads,kv_heads,dim", [(1, 32, 32, 128), (9, 32, 8, 128), (4, 12, 4, 64), (2, 4, 2, 16)]
)
def test_rotary_kernel_matches_torch_in_the_fused_qkv_output(dtype, tokens, heads, kv_heads, dim):
    qkv = make((tokens, (heads + 2 * kv_heads) * dim), dtype, "cuda", 7)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    pos = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(0)).cuda()
    cos_sin = cos_sin_rows(pos, inv_freq)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    v_before = v.clone()
    want_q, want_k = fused_ops.apply_rotary(q.cpu(), k.cpu(), cos_sin.cpu())  # the PyTorch path
    cos, sin = cos_sin.double().unsqueeze(1).chunk(2, dim=-1)
    exact_q = fused_ops._rotate_torch(q.double(), cos, sin).to(dtype)  # rounded once, like the kernel
    got_q, got_k = fused_ops.apply_rotary(q, k, cos_sin)
    assert got_q.data_ptr() == q.data_ptr()  # in place, in the qkv buffer
    tol = dict(atol=6e-2, rtol=2e-2) if dtype == torch.bfloat16 else TOL[dtype]
    torch.testing.assert_close(got_q.cpu(), want_q, **tol)
    torch.testing.assert_close(got_k.cpu(), want_k, **tol)
    torch.testing.assert_close(got_q, exact_q, **TOL[dtype])
    assert torch.equal(v, v_before)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,inter", [(1, 11008), (5, 14336), (3, 100)])
def test_silu_and_mul_kernel_matches_torch(dtype, rows, inter):
    gate_up = make((rows, 2 * inter), dtype, "cuda", 8)
    want = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    torch.testing.assert_close(fused_ops.silu_and_mul(gate_up), want, **TOL[dtype])
