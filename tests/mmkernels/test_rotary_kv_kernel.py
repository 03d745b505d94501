"""rotary_write_kv (rotary fused with the KV-cache write): the Triton kernel against its
torch reference and against the unfused kernels it replaces."""

import pytest
import torch

from mmkernels.kv_cache import write_kv_cache
from mmkernels.rotary import apply_rotary, build_cos_sin_cache
from mmkernels.rotary_kv import rotary_write_kv, rotary_write_kv_torch

torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GEN = torch.Generator().manual_seed(0)


def fused_qkv_views(num_tokens: int, q_heads: int, kv_heads: int, head: int, dtype, device="cpu"):
    """q, k, v as strided views of one fused QKV projection output, as the model has them."""
    width = (q_heads + 2 * kv_heads) * head
    qkv = torch.randn(num_tokens, width, generator=GEN).to(device=device, dtype=dtype)
    q = qkv[:, : q_heads * head].view(num_tokens, q_heads, head)
    k = qkv[:, q_heads * head : (q_heads + kv_heads) * head].view(num_tokens, kv_heads, head)
    v = qkv[:, (q_heads + kv_heads) * head :].view(num_tokens, kv_heads, head)
    return qkv, q, k, v


def caches(num_blocks: int, block_size: int, kv_heads: int, head: int, dtype, hnd: bool = False):
    """Two caches with random contents (so skipped slots are seen to stay as they were)."""
    out = []
    for _ in range(2):
        if hnd:  # stored [blocks, heads, block_size, head], viewed as the kernels' shape
            c = torch.randn(num_blocks, kv_heads, block_size, head, generator=GEN)
            out.append(c.to(dtype).transpose(1, 2))
        else:
            out.append(torch.randn(num_blocks, block_size, kv_heads, head, generator=GEN).to(dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mrope", [False, True], ids=["1d", "mrope"])
@pytest.mark.parametrize(("q_heads", "kv_heads", "head"), [(6, 2, 64), (5, 1, 80), (4, 4, 96)])
def test_triton_matches_reference_and_leaves_its_inputs_alone(
    dtype: torch.dtype, mrope: bool, q_heads: int, kv_heads: int, head: int
) -> None:
    t = 9
    qkv, q, k, v = fused_qkv_views(t, q_heads, kv_heads, head, dtype)
    qkv_before = qkv.clone()
    cos_sin = build_cos_sin_cache(head, 300, 10000.0)
    if mrope:
        section = {64: [8, 12, 12], 80: [10, 15, 15], 96: [16, 16, 16]}[head]
        positions = torch.randint(0, 300, (3, t), generator=GEN)
    else:
        section, positions = None, torch.randint(0, 300, (t,), generator=GEN)
    # Shuffled slots over 6 blocks of 16, two padding rows (-1).
    slots = torch.tensor([37, -1, 5, 90, 16, 64, -1, 0, 95], dtype=torch.int64)
    kc, vc = caches(6, 16, kv_heads, head, dtype)
    ref_kc, ref_vc = kc.clone(), vc.clone()

    q_ref = rotary_write_kv_torch(
        q, k, v, positions, cos_sin, ref_kc, ref_vc, slots, mrope_section=section
    )
    q_out = rotary_write_kv(
        q, k, v, positions, cos_sin, kc, vc, slots, mrope_section=section, use_triton_kernel=True
    )
    assert q_out.is_contiguous() and q_out.shape == q.shape
    assert torch.equal(q_out, q_ref)
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)
    assert torch.equal(qkv, qkv_before)  # q, k, v untouched
    assert torch.equal(vc[90 // 16, 90 % 16], v[3])  # v lands unrotated in its slot
    assert not torch.equal(q_out, q)  # and q did get rotated


def test_triton_equals_the_unfused_rotary_then_cache_write() -> None:
    # What the decoder did before: apply_rotary in place on q/k, then write_kv_cache.
    qkv, q, k, v = fused_qkv_views(7, 8, 2, 64, torch.float16)
    cos_sin = build_cos_sin_cache(64, 200, 1e6)
    positions = torch.randint(0, 200, (7,), generator=GEN)
    slots = torch.tensor([3, 17, 40, -1, 41, 8, 79], dtype=torch.int64)
    kc, vc = caches(5, 16, 2, 64, torch.float16)
    old_kc, old_vc = kc.clone(), vc.clone()

    q_out = rotary_write_kv(q, k, v, positions, cos_sin, kc, vc, slots, use_triton_kernel=True)
    apply_rotary(q, k, positions, cos_sin, use_triton_kernel=True)  # in place on qkv
    write_kv_cache(k, v, old_kc, old_vc, slots, use_triton_kernel=True)
    assert torch.equal(q_out, q)
    assert torch.equal(kc, old_kc) and torch.equal(vc, old_vc)


def test_triton_writes_head_major_cache_storage_through_its_strides() -> None:
    _, q, k, v = fused_qkv_views(5, 4, 2, 64, torch.float32)
    cos_sin = build_cos_sin_cache(64, 100, 10000.0)
    positions = torch.randint(0, 100, (5,), generator=GEN)
    slots = torch.tensor([0, 33, 17, 2, 47], dtype=torch.int64)
    kc, vc = caches(3, 16, 2, 64, torch.float32, hnd=True)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    rotary_write_kv_torch(q, k, v, positions, cos_sin, ref_kc, ref_vc, slots)
    rotary_write_kv(q, k, v, positions, cos_sin, kc, vc, slots, use_triton_kernel=True)
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)


def test_triton_writes_fp16_cache_blocks_beyond_int32_offsets() -> None:
    # slot × position stride past 2**32 elements: an 8 GiB fp16 cache, virtual until written.
    block_size, kv_heads, head = 16, 1, 64
    num_blocks = 2**32 // (block_size * kv_heads * head) + 4
    kc = torch.empty(num_blocks, block_size, kv_heads, head, dtype=torch.float16)
    vc = torch.empty_like(kc)
    _, q, k, v = fused_qkv_views(2, 2, 1, 64, torch.float16)
    cos_sin = build_cos_sin_cache(64, 10, 10000.0)
    positions = torch.tensor([3, 7])
    slots = torch.tensor([num_blocks * block_size - 1, (num_blocks - 2) * block_size + 5])
    rotary_write_kv(q, k, v, positions, cos_sin, kc, vc, slots, use_triton_kernel=True)
    k_rot = torch.empty(k.shape, dtype=k.dtype).copy_(k)
    apply_rotary(torch.empty(q.shape, dtype=q.dtype).copy_(q), k_rot, positions, cos_sin)
    assert torch.equal(kc[num_blocks - 1, block_size - 1], k_rot[0])
    assert torch.equal(vc[num_blocks - 2, 5], v[1])


def test_partial_rotary_is_refused() -> None:
    _, q, k, v = fused_qkv_views(2, 2, 1, 64, torch.float32)
    kc, vc = caches(1, 16, 1, 64, torch.float32)
    with pytest.raises(ValueError, match="rotary_dim"):
        rotary_write_kv(
            q, k, v, torch.tensor([0, 1]), build_cos_sin_cache(32, 4, 1e4), kc, vc,
            torch.tensor([0, 1]), use_triton_kernel=True,
        )  # fmt: skip


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mrope", [False, True], ids=["1d", "mrope"])
def test_gpu_bf16_matches_reference_to_the_bit(mrope: bool) -> None:
    t = 4096
    _, q, k, v = fused_qkv_views(t, 16, 2, 128, torch.bfloat16, device="cuda")
    cos_sin = build_cos_sin_cache(128, 32768, 1000000.0).cuda()
    shape, section = ((3, t), [16, 24, 24]) if mrope else ((t,), None)
    positions = torch.randint(0, 32768, shape, device="cuda")
    slots = torch.randperm(8192 * 16, device="cuda")[:t]
    slots[::7] = -1
    kc = torch.randn(8192, 16, 2, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    q_ref = rotary_write_kv_torch(
        q, k, v, positions, cos_sin, ref_kc, ref_vc, slots, mrope_section=section
    )
    q_out = rotary_write_kv(q, k, v, positions, cos_sin, kc, vc, slots, mrope_section=section)
    assert torch.equal(q_out, q_ref)
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)
