"""rms_norm: the torch reference against HF's LlamaRMSNorm, the Triton kernel against the
reference.

Triton's CPU interpreter (3.8) truncates fp32 -> bf16 instead of rounding to nearest, so
on CPU bf16 is checked to a few ulps; fp16 and fp32 must match exactly, and the GPU tests check
bf16 to the bit.
"""

import pytest
import torch

from mmkernels.rms_norm import rms_norm, rms_norm_torch

torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
EPS = 1e-6


def hf_rms_norm(weight: torch.Tensor, eps: float):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(weight.shape[0], eps=eps).to(weight.device, weight.dtype)
    norm.weight.data.copy_(weight)
    return norm


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = ulps * torch.finfo(expected.dtype).eps * expected.float().abs().clamp_min(1e-3)
    assert ((actual.float() - expected.float()).abs() <= tol).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_hf_llama_rms_norm_including_residual_add(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(5, 96, generator=gen).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
    norm = hf_rms_norm(weight, EPS)
    with torch.no_grad():
        assert torch.equal(rms_norm_torch(x, weight, EPS), norm(x))
        # HF's decoder layer: hidden = residual + hidden, then the next norm.
        out, new_residual = rms_norm_torch(x, weight, EPS, residual)
        assert torch.equal(new_residual, residual + x)
        assert torch.equal(out, norm(residual + x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_reference_with_and_without_residual(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(7, 200, generator=gen).to(dtype) for _ in range(2))
    weight = torch.randn(200, generator=gen).to(dtype)
    out = rms_norm(x, weight, EPS, use_triton_kernel=True)
    out_r, new_residual = rms_norm(x, weight, EPS, residual, use_triton_kernel=True)
    ref = rms_norm_torch(x, weight, EPS)
    ref_r, ref_residual = rms_norm_torch(x, weight, EPS, residual)
    if dtype == torch.bfloat16:
        for actual, expected in [(out, ref), (out_r, ref_r), (new_residual, ref_residual)]:
            # Truncation at three roundings (residual sum, normalized x, × weight).
            assert_within_ulps(actual, expected, ulps=3)
    elif dtype == torch.float16:
        assert torch.equal(out, ref) and torch.equal(out_r, ref_r)
        assert torch.equal(new_residual, ref_residual)
    else:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out_r, ref_r, atol=1e-6, rtol=1e-6)
        assert torch.equal(new_residual, ref_residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_op_form_launches_the_same_kernel_as_the_custom_op(dtype: torch.dtype) -> None:
    # `mmengine::add_rms_norm_triton` (extra norm_triton_op): the kernel launched through
    # torch.library.wrap_triton, which torch.compile inlines; called eagerly it must give
    # the plain launch's results to the bit.
    import mmengine.models.custom_ops  # noqa: F401  (registers the ops)

    gen = torch.Generator().manual_seed(3)
    x, residual = (torch.randn(5, 160, generator=gen).to(dtype) for _ in range(2))
    weight = torch.randn(160, generator=gen).to(dtype)
    out, new_residual = torch.ops.mmengine.add_rms_norm_triton(x, residual, weight, EPS)
    ref_out, ref_residual = rms_norm(x, weight, EPS, residual, use_triton_kernel=True)
    assert torch.equal(out, ref_out) and torch.equal(new_residual, ref_residual)
    torch_out, _ = rms_norm_torch(x, weight, EPS, residual)
    torch.testing.assert_close(out, torch_out, atol=1e-3, rtol=1e-3)


def test_triton_normalizes_each_head_of_a_strided_qk_view() -> None:
    # Qwen3's per-head q norm: [T, heads, head_dim] sliced out of a fused QKV output.
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(6, 5 * 64, generator=gen, dtype=torch.float16)
    q = qkv[:, : 3 * 64].view(6, 3, 64)
    weight = torch.randn(64, generator=gen, dtype=torch.float16)
    out = rms_norm(q, weight, EPS, use_triton_kernel=True)
    assert out.shape == (6, 3, 64)
    assert torch.equal(out, rms_norm_torch(q, weight, EPS))


def test_output_dtype_promotes_like_hf_for_fp32_weight() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 64, generator=gen, dtype=torch.float16)
    weight = torch.randn(64, generator=gen)
    out = rms_norm(x, weight, EPS, use_triton_kernel=True)
    assert out.dtype == torch.float32
    # The normalized value is rounded to fp16 before the fp32 weight multiplies it; Triton's
    # CPU interpreter truncates that cast instead of rounding, so allow one fp16 ulp here
    # (the GPU test checks the exact rounding).
    torch.testing.assert_close(out, rms_norm_torch(x, weight, EPS), atol=4e-3, rtol=2e-3)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("hidden", [2048, 3584, 4096])
def test_gpu_bf16_matches_reference_to_the_bit_almost_everywhere(hidden: int) -> None:
    x, residual = (torch.randn(1000, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    out, new_residual = rms_norm(x, weight, EPS, residual)
    ref, ref_residual = rms_norm_torch(x, weight, EPS, residual)
    assert torch.equal(new_residual, ref_residual)
    # The fp32 variance is summed in another order, which may flip the rounding of the
    # normalized x now and then; × weight can make that one ulp two.
    assert_within_ulps(out, ref, ulps=2)
    assert (out != ref).float().mean() < 1e-3
