"""What torch.compile makes of the decoder's residual adds (CPU Inductor, tiny shapes).

Left as torch ops, `o_proj(x) + residual` becomes `addmm(residual, x, W, out=buf)`, and
ATen's addmm with a separate `out` copies the residual into it first: one extra
hidden-size copy per projection on the GPU. Under compile the runner makes the add + norm
one opaque op (`mmengine::add_rms_norm`) so the add never meets the matmul.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmengine.models.layers import RMSNorm

torch.set_num_threads(1)


class ProjThenNorm(nn.Module):
    """o_proj, then the post-attention norm with the residual, as in DecoderLayer."""

    def __init__(self, as_op: bool) -> None:
        super().__init__()
        self.o_proj = nn.Linear(32, 32, bias=False)
        self.norm = RMSNorm(32, 1e-6)
        self.norm.use_triton = False  # the compiled mode's setting
        self.norm.residual_as_custom_op = as_op

    def forward(self, x: torch.Tensor, residual: torch.Tensor):  # noqa: ANN201
        return self.norm(self.o_proj(x), residual)


@pytest.mark.parametrize("as_op", [False, True], ids=["torch_ops", "custom_op"])
def test_residual_add_reaches_addmm_only_without_the_custom_op(as_op: bool) -> None:
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    module = ProjThenNorm(as_op)
    x, residual = torch.randn(6, 32), torch.randn(6, 32)
    with torch.no_grad():
        expected = ProjThenNorm.forward(module, x, residual)
        (out, new_residual), codes = run_and_get_code(torch.compile(module), x, residual)
    code = "\n".join(codes)
    assert ("addmm" in code) == (not as_op)
    assert ("mmengine.add_rms_norm" in code) == as_op
    torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_residual, expected[1], rtol=1e-5, atol=1e-5)


def _tiny_spec(num_layers: int):  # noqa: ANN202
    """A Qwen2-shaped decoder spec small enough to build on the CPU in milliseconds."""
    from mmengine.config import ModelSpec

    return ModelSpec(
        architecture="Qwen2ForCausalLM", model_type="qwen2", text_model_type="qwen2",
        hidden_size=32, num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=64, vocab_size=50, rms_norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=64, tie_word_embeddings=False, qkv_bias=True, qk_norm=False,
        mrope_section=None, rope_scaling=None, eos_token_ids=[0], dtype="float32", hf_config={},
    )  # fmt: skip


def test_compiled_mode_keeps_the_triton_norm_only_outside_the_compiled_layers() -> None:
    # Only the decoder layers are compiled: their norms take torch forms for the compiler
    # to fuse, but the model's final norm runs eagerly (inside the decode CUDA graph), where
    # its torch form would be ~7 separate kernels; it keeps the Triton kernel.
    from mmengine.models.decoder import DecoderModel
    from mmengine.models.layers import set_kernel_mode

    spec = _tiny_spec(num_layers=2)
    model = DecoderModel(spec, max_position=64)
    set_kernel_mode(model, compiled=True, gemv_max_tokens=1)
    assert model.norm.use_triton is None
    layer_norms = [m for layer in model.layers for m in layer.modules() if isinstance(m, RMSNorm)]
    assert layer_norms and all(m.use_triton is False for m in layer_norms)
    set_kernel_mode(model, compiled=False)
    assert model.norm.use_triton is None and all(m.use_triton is None for m in layer_norms)


def test_norm_triton_op_switch_reaches_the_norms_only_when_compiled() -> None:
    # extra norm_triton_op: under compile the layers' add + norm take the triton_op form
    # (on CUDA tensors; CPU tensors keep the custom op); the final norm stays eager.
    from mmengine.models.decoder import DecoderModel
    from mmengine.models.layers import set_kernel_mode

    model = DecoderModel(_tiny_spec(num_layers=2), max_position=64)
    norms = [m for layer in model.layers for m in layer.modules() if isinstance(m, RMSNorm)]
    set_kernel_mode(model, compiled=True, norm_triton_op=True)
    assert norms and all(m.residual_as_triton_op and m.residual_as_custom_op for m in norms)
    set_kernel_mode(model, compiled=False, norm_triton_op=True)
    assert not any(m.residual_as_triton_op or m.residual_as_custom_op for m in norms)
    set_kernel_mode(model, compiled=True)
    assert not any(m.residual_as_triton_op for m in norms)
    # On the CPU the custom op (its torch reference) still runs: same numbers either way.
    set_kernel_mode(model, compiled=True, norm_triton_op=True)
    x, residual = torch.randn(3, 32), torch.randn(3, 32)
    out, new_residual = norms[1](x, residual)
    norms[1].residual_as_custom_op = False
    ref_out, ref_residual = norms[1](x, residual)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(new_residual, ref_residual)


def test_gemv_norm_out_op_passes_opcheck_and_equals_the_two_step_form() -> None:
    # o_proj + residual with the post-attention norm of its output (extra gemv_norm_out):
    # the op torch.compile sees, checked for schema, fake tensor and autograd registration,
    # and equal to o_proj + residual then the norm (CPU: the torch reference).
    from mmengine.models import custom_ops  # noqa: F401  (registers the op)
    from mmkernels.gemv import gemv_torch
    from mmkernels.rms_norm import rms_norm_torch

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 24, generator=gen), torch.randn(16, 24, generator=gen)
    residual, nw = torch.randn(1, 16, generator=gen), torch.rand(16, generator=gen) + 0.5
    args = (x, w, residual, nw, 1e-6, torch.zeros(1, dtype=torch.int32))
    torch.library.opcheck(torch.ops.mmengine.gemv_norm_out.default, args)
    out, normed = torch.ops.mmengine.gemv_norm_out(*args)
    expected = gemv_torch(x, w, residual=residual)
    assert torch.equal(out, expected)
    assert torch.equal(normed, rms_norm_torch(expected, nw, 1e-6))


def test_mlp_flow_op_passes_opcheck_and_equals_the_three_projections() -> None:
    # o_proj -> norm -> gate_up -> down of a one-token step as one op (extra mlp_flow):
    # schema, fake tensor and registration checks; CPU runs its torch reference.
    from mmengine.models import custom_ops  # noqa: F401  (registers the op)
    from mmkernels.gemv import gemv_torch
    from mmkernels.mlp_flow import mlp_flow_counters
    from mmkernels.rms_norm import rms_norm_torch

    gen = torch.Generator().manual_seed(0)
    x, wo = torch.randn(1, 24, generator=gen), torch.randn(16, 24, generator=gen)
    residual, nw = torch.randn(1, 16, generator=gen), torch.rand(16, generator=gen) + 0.5
    wgu, wd = torch.randn(40, 16, generator=gen), torch.randn(16, 20, generator=gen)
    args = (x, wo, residual, nw, 1e-6, wgu, wd, mlp_flow_counters(16, 20, "cpu"))
    torch.library.opcheck(torch.ops.mmengine.mlp_flow.default, args)
    s = gemv_torch(x, wo, residual=residual)
    act = gemv_torch(rms_norm_torch(s, nw, 1e-6), wgu, gated=True)
    assert torch.equal(torch.ops.mmengine.mlp_flow(*args), gemv_torch(act, wd, residual=s))
