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
