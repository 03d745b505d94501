"""Rotary embedding: the cos/sin table and the torch reference against HF's own rotary
code (Llama 1-D rope, Qwen2-VL M-RoPE), the Triton kernel against the reference.

Triton's CPU interpreter (3.8) truncates fp32 -> bf16, so bf16 is compared exactly only on
the GPU; on CPU fp32 and fp16 must match exactly.
"""

import pytest
import torch

from mmkernels.rotary import apply_rotary, apply_rotary_torch, build_cos_sin_cache

torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GEN = torch.Generator().manual_seed(0)


def fused_qk_views(num_tokens: int, q_heads: int, k_heads: int, head_size: int, dtype):
    """q and k as strided views of one fused QKV output, the way a model hands them over."""
    qkv = torch.randn(num_tokens, (q_heads + 2 * k_heads) * head_size, generator=GEN).to(dtype)
    q = qkv[:, : q_heads * head_size].view(num_tokens, q_heads, head_size)
    k = qkv[:, q_heads * head_size : (q_heads + k_heads) * head_size]
    return q, k.view(num_tokens, k_heads, head_size)


def test_cos_sin_cache_equals_hf_llama_rotary_embedding() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=512,
        num_attention_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    positions = torch.arange(4096)[None]
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions)
    cache = build_cos_sin_cache(128, 4096, 500000.0)
    # Same float32 operations on the same device: identical values.
    assert torch.equal(cache[:, :64], hf_cos[0, :, :64])
    assert torch.equal(cache[:, 64:], hf_sin[0, :, :64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_hf_apply_rotary_pos_emb(dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cache = build_cos_sin_cache(64, 1000, 10000.0)
    q, k = fused_qk_views(11, 6, 2, 64, dtype)
    positions = torch.randint(0, 1000, (11,), generator=GEN)
    cos = torch.cat([cache[positions, :32]] * 2, dim=-1)[None].to(dtype)  # [1, T, 64]
    sin = torch.cat([cache[positions, 32:]] * 2, dim=-1)[None].to(dtype)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    out_q, out_k = apply_rotary_torch(q.clone(), k.clone(), positions, cache)
    assert torch.equal(out_q, hf_q[0].transpose(0, 1))
    assert torch.equal(out_k, hf_k[0].transpose(0, 1))


def test_reference_mrope_equals_hf_qwen2_vl() -> None:
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VLRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    section = [16, 24, 24]
    config = Qwen2VLTextConfig(
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
    )
    # Image-like positions: the three rows differ.
    positions = torch.randint(0, 512, (3, 9), generator=GEN)
    hf_cos, hf_sin = Qwen2VLRotaryEmbedding(config)(torch.zeros(1), positions[:, None, :])
    q, k = fused_qk_views(9, 2, 1, 128, torch.float32)
    hf_q, hf_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin
    )
    cache = build_cos_sin_cache(128, 512, 1000000.0)
    out_q, out_k = apply_rotary_torch(q.clone(), k.clone(), positions, cache, mrope_section=section)
    torch.testing.assert_close(out_q, hf_q[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_k, hf_k[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mrope", [False, True], ids=["1d", "mrope"])
def test_triton_matches_reference_in_place_on_strided_views(
    dtype: torch.dtype, mrope: bool
) -> None:
    cache = build_cos_sin_cache(64, 300, 10000.0)
    q, k = fused_qk_views(13, 6, 2, 64, dtype)
    if mrope:
        positions, section = torch.randint(0, 300, (3, 13), generator=GEN), [8, 12, 12]
    else:
        positions, section = torch.randint(0, 300, (13,), generator=GEN), None
    ref_q, ref_k = apply_rotary_torch(q.clone(), k.clone(), positions, cache, mrope_section=section)
    out_q, out_k = apply_rotary(
        q, k, positions, cache, mrope_section=section, use_triton_kernel=True
    )
    assert out_q is q and out_k is k
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)


def test_partial_rotary_leaves_the_tail_of_each_head_unchanged() -> None:
    cache = build_cos_sin_cache(32, 100, 10000.0)
    q, k = fused_qk_views(5, 3, 1, 80, torch.float32)
    q_before, k_before = q.clone(), k.clone()
    positions = torch.randint(1, 100, (5,), generator=GEN)
    ref_q, ref_k = apply_rotary_torch(q.clone(), k.clone(), positions, cache, rotary_dim=32)
    apply_rotary(q, k, positions, cache, rotary_dim=32, use_triton_kernel=True)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    assert torch.equal(q[..., 32:], q_before[..., 32:]) and torch.equal(
        k[..., 32:], k_before[..., 32:]
    )
    assert not torch.equal(q[..., :32], q_before[..., :32])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mrope", [False, True], ids=["1d", "mrope"])
def test_gpu_bf16_matches_reference_to_the_bit(mrope: bool) -> None:
    cache = build_cos_sin_cache(128, 32768, 1000000.0).cuda()
    q = torch.randn(4096, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4096, 8, 128, device="cuda", dtype=torch.bfloat16)
    shape, section = ((3, 4096), [16, 24, 24]) if mrope else ((4096,), None)
    positions = torch.randint(0, 32768, shape, device="cuda")
    ref_q, ref_k = apply_rotary_torch(q.clone(), k.clone(), positions, cache, mrope_section=section)
    apply_rotary(q, k, positions, cache, mrope_section=section)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
