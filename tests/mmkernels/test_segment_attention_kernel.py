"""segment_attention: the torch reference against SDPA per segment, the Triton kernel
(short segments, one program per segment and head) against the reference."""

import pytest
import torch
import torch.nn.functional as F

from mmkernels.segment_attention import segment_attention, segment_attention_torch

torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def packed(lengths: list[int], heads: int, head_dim: int, dtype, device="cpu", seed=0):  # noqa: ANN001, ANN201
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, generator=gen).to(dtype).to(device)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return qkv, torch.tensor(bounds, dtype=torch.int32, device=device)


def test_reference_equals_sdpa_applied_to_each_segment() -> None:
    lengths = [5, 1, 17, 64]
    qkv, cu = packed(lengths, heads=3, head_dim=16, dtype=torch.float32)
    out = segment_attention_torch(qkv, cu)
    start = 0
    for n in lengths:
        q, k, v = (qkv[start : start + n, i].transpose(0, 1)[None] for i in range(3))
        ref = F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1).reshape(n, -1)
        torch.testing.assert_close(out[start : start + n], ref, rtol=1e-5, atol=1e-6)
        start += n


@pytest.mark.parametrize("head_dim", [16, 80])  # 80: Qwen2.5-VL's, not a power of two
@pytest.mark.parametrize("lengths", [[64, 64, 37, 1, 64, 16], [3], [100, 128, 2]])
def test_triton_matches_reference_in_float32(head_dim: int, lengths: list[int]) -> None:
    qkv, cu = packed(lengths, heads=2, head_dim=head_dim, dtype=torch.float32, seed=len(lengths))
    out = segment_attention(qkv, cu, max(lengths), use_triton_kernel=True)
    torch.testing.assert_close(out, segment_attention_torch(qkv, cu), rtol=1e-4, atol=1e-5)


def test_triton_reads_strided_qkv_and_leaves_other_segments_alone() -> None:
    # qkv as a view into a wider projection output (token stride > 3 * H * D): the kernel
    # must use the strides; a segment's output must not depend on its neighbours.
    lengths = [9, 30, 4]
    base, cu = packed(lengths, heads=2, head_dim=16, dtype=torch.float32, seed=3)
    wide = torch.zeros(base.shape[0], 4, 2, 16)
    wide[:, :3] = base
    qkv = wide[:, :3]
    assert not qkv.is_contiguous()
    out = segment_attention(qkv, cu, 30, use_triton_kernel=True)
    torch.testing.assert_close(out, segment_attention_torch(base, cu), rtol=1e-4, atol=1e-5)
    changed = base.clone()
    changed[9:39] += 1.0  # only the middle segment
    out2 = segment_attention(changed, cu, 30, use_triton_kernel=True)
    torch.testing.assert_close(out2[:9], out[:9])
    torch.testing.assert_close(out2[39:], out[39:])


def test_segments_longer_than_the_kernel_holds_are_refused() -> None:
    qkv, cu = packed([129], heads=1, head_dim=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="segments up to 128"):
        segment_attention(qkv, cu, 129, use_triton_kernel=True)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_kernel_close_to_float32_reference_at_qwen2_5_vl_window_shapes(dtype) -> None:  # noqa: ANN001
    # One 1288x728 image: 84 windows of <= 64 patches (edge windows shorter), 16 heads of 80.
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 65, (84,), generator=gen).tolist()
    lengths[:60] = [64] * 60
    qkv, cu = packed(lengths, heads=16, head_dim=80, dtype=dtype, device="cuda", seed=6)
    out = segment_attention(qkv, cu, max(lengths))
    ref = segment_attention_torch(qkv.float(), cu)
    err = (out.float() - ref).abs().max().item()
    assert err < 2e-2, err
