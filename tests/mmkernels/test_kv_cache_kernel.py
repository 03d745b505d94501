"""write_kv_cache: the Triton kernel against its torch reference."""

import pytest
import torch

from mmkernels.kv_cache import write_kv_cache, write_kv_cache_torch

torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def fused_qkv_slices(num_tokens: int, num_kv_heads: int, head_size: int, device: str = "cpu"):
    """key and value as strided views of one fused QKV projection output."""
    qkv = torch.randn(num_tokens, (2 + 2 * num_kv_heads) * head_size, device=device)
    k0 = 2 * head_size
    v0 = k0 + num_kv_heads * head_size
    key = qkv[:, k0:v0].view(num_tokens, num_kv_heads, head_size)
    value = qkv[:, v0:].view(num_tokens, num_kv_heads, head_size)
    return key, value


@pytest.mark.parametrize(("num_kv_heads", "head_size"), [(2, 64), (3, 80)])
def test_triton_writes_the_same_slots_as_reference_and_skips_negative_ones(
    num_kv_heads: int, head_size: int
) -> None:
    key, value = fused_qkv_slices(7, num_kv_heads, head_size)
    slots = torch.tensor([3, -1, 17, 159, 40, -1, 16], dtype=torch.int64)
    caches = [torch.randn(10, 16, num_kv_heads, head_size) for _ in range(2)]
    expected = [c.clone() for c in caches]
    write_kv_cache(key, value, *caches, slots, use_triton_kernel=True)
    write_kv_cache_torch(key, value, *expected, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    assert torch.equal(caches[0][159 // 16, 159 % 16], key[3])


def test_triton_writes_fp16_cache_blocks_beyond_int32_offsets() -> None:
    # slot × position stride past 2**32 elements: an 8 GiB fp16 cache, virtual until written.
    block_size, num_kv_heads, head_size = 16, 1, 64
    num_blocks = 2**32 // (block_size * num_kv_heads * head_size) + 4
    key_cache = torch.empty(num_blocks, block_size, num_kv_heads, head_size, dtype=torch.float16)
    value_cache = torch.empty_like(key_cache)
    key = torch.randn(3, num_kv_heads, head_size, dtype=torch.float16)
    value = torch.randn(3, num_kv_heads, head_size, dtype=torch.float16)
    slots = torch.tensor([num_blocks * block_size - 1, -1, (num_blocks - 2) * block_size + 5])
    write_kv_cache(key, value, key_cache, value_cache, slots, use_triton_kernel=True)
    assert torch.equal(key_cache[num_blocks - 1, block_size - 1], key[0])
    assert torch.equal(value_cache[num_blocks - 2, 5], value[2])


@pytest.mark.gpu
@requires_cuda
def test_gpu_bf16_write_matches_reference() -> None:
    key, value = fused_qkv_slices(4096, 8, 128, device="cuda")
    key, value = key.bfloat16(), value.bfloat16()
    slots = torch.randperm(2000 * 16, device="cuda")[:4096]
    slots[::7] = -1
    caches = [torch.zeros(2000, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    expected = [c.clone() for c in caches]
    write_kv_cache(key, value, *caches, slots)
    write_kv_cache_torch(key, value, *expected, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
