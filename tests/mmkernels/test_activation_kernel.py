"""silu_and_mul: the Triton kernel against its torch reference (HF's MLP activation).

Triton's CPU interpreter (3.8) truncates fp32 -> bf16, so bf16 is compared exactly only on
the GPU; fp16 must match exactly on CPU.
"""

import pytest
import torch
import torch.nn.functional as F

from mmkernels.activation import silu_and_mul, silu_and_mul_torch

torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_reference_is_silu_of_first_half_times_second_half() -> None:
    x = torch.randn(4, 2 * 48)
    assert torch.equal(silu_and_mul_torch(x), F.silu(x[:, :48]) * x[:, 48:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_reference_across_several_column_blocks(dtype: torch.dtype) -> None:
    # 1500 output columns: two programs per row, the second one masked.
    x = (3 * torch.randn(5, 2 * 1500, generator=torch.Generator().manual_seed(0))).to(dtype)
    out = silu_and_mul(x, use_triton_kernel=True)
    ref = silu_and_mul_torch(x)
    assert out.shape == (5, 1500) and out.dtype == dtype
    if dtype == torch.bfloat16:
        # Two truncations (silu, product) instead of two roundings: within 2 bf16 ulps.
        torch.testing.assert_close(out, ref, atol=1e-2, rtol=2**-6)
    elif dtype == torch.float16:
        # exp may differ from torch's in its last fp32 bit: allow a rare one-ulp flip.
        assert (out != ref).float().mean() < 1e-3
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    else:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_triton_accepts_strided_rows_and_leading_dims() -> None:
    base = torch.randn(2, 3, 2 * 40 + 8)
    x = base[..., : 2 * 40]  # rows strided past their length
    torch.testing.assert_close(
        silu_and_mul(x, use_triton_kernel=True), silu_and_mul_torch(x), atol=1e-6, rtol=1e-6
    )


@pytest.mark.gpu
@requires_cuda
def test_gpu_bf16_matches_reference_almost_to_the_bit() -> None:
    x = torch.randn(4096, 2 * 11008, device="cuda", dtype=torch.bfloat16)
    out = silu_and_mul(x)
    ref = silu_and_mul_torch(x)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=2**-7)
    assert (out != ref).float().mean() < 1e-3
