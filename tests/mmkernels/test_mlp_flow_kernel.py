"""The one-launch MLP half (`mmkernels/mlp_flow.py`) against the three-step reference."""

import pytest
import torch

from mmkernels.mlp_flow import MlpFlowConfig, mlp_flow, mlp_flow_counters, mlp_flow_torch

torch.set_num_threads(1)

EPS = 1e-6


def _case(kin: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def w(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)

    attn = torch.randn(1, kin, generator=gen).to(dtype)
    residual = torch.randn(1, hidden, generator=gen).to(dtype)
    norm_w = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(dtype)
    return attn, w(hidden, kin), residual, norm_w, w(2 * inter, hidden), w(hidden, inter)


# hidden 40 and inter 88 are not powers of two: masked columns, a last K chunk of 24 of 32.
CONFIGS = {
    "ticket": MlpFlowConfig(o_cols=4, gu_cols=2, down_cols=8, chunk=32, num_warps=4),
    "program-id": MlpFlowConfig(4, 2, 8, 32, 4, ticket=False),
    "one-chunk": MlpFlowConfig(2, 4, 4, 128, 4),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_one_launch_equals_o_proj_norm_gate_up_down_and_leaves_counters_zero(config) -> None:  # noqa: ANN001
    args = _case(48, 40, 88, torch.float32)
    counters = mlp_flow_counters(40, 88, "cpu", config)
    ref = mlp_flow_torch(*args[:3], args[3], EPS, *args[4:])
    for _ in range(2):  # the second launch checks that every counter was reset
        out = mlp_flow(*args[:3], args[3], EPS, *args[4:], counters, config, use_triton_kernel=True)
        torch.testing.assert_close(out, ref, atol=3e-5, rtol=3e-5)
        assert not counters.any(), counters


def test_half_precision_rounds_where_the_three_launches_do() -> None:
    # fp16 (the interpreter truncates bf16): the rounding points of o_proj + residual,
    # the norm, silu, the product and down + residual are those of the reference.
    args = _case(64, 48, 96, torch.float16, seed=3)
    config = MlpFlowConfig(2, 2, 4, 32, 4)
    counters = mlp_flow_counters(48, 96, "cpu", config)
    out = mlp_flow(*args[:3], args[3], EPS, *args[4:], counters, config, use_triton_kernel=True)
    ref = mlp_flow_torch(*args[:3], args[3], EPS, *args[4:])
    ulp = torch.finfo(torch.float16).eps
    assert ((out.float() - ref.float()).abs() <= 4 * ulp * (ref.float().abs() + 1)).all()


def test_bad_shapes_and_task_sizes_are_refused() -> None:
    args = _case(48, 40, 88, torch.float32)
    config = MlpFlowConfig(4, 2, 8, 32, 4)
    counters = mlp_flow_counters(40, 88, "cpu", config)
    with pytest.raises(ValueError, match="one token"):
        mlp_flow(args[0].repeat(2, 1), *args[1:3], args[3], EPS, *args[4:], counters, config,
                 use_triton_kernel=True)  # fmt: skip
    with pytest.raises(ValueError, match="powers of two"):
        mlp_flow(*args[:3], args[3], EPS, *args[4:], counters, MlpFlowConfig(3, 2, 8, 32, 4),
                 use_triton_kernel=True)  # fmt: skip
    with pytest.raises(ValueError, match="counters"):
        other = mlp_flow_counters(40, 88, "cpu", MlpFlowConfig(4, 2, 8, 64, 4))
        mlp_flow(*args[:3], args[3], EPS, *args[4:], other, config, use_triton_kernel=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ticket", [True, False])
def test_gpu_qwen_shapes_bf16_in_graph_replays(ticket: bool) -> None:
    # Qwen2.5-3B (hidden 2048, intermediate 11008), the default tasks; eager, then CUDA
    # graph replays (the counters must come back to zero each time).
    args = [t.cuda() for t in _case(2048, 2048, 11008, torch.bfloat16, seed=1)]
    config = MlpFlowConfig(ticket=ticket)
    counters = mlp_flow_counters(2048, 11008, "cuda", config)
    ref = mlp_flow_torch(*args[:3], args[3], EPS, *args[4:]).float()
    ulp = torch.finfo(torch.bfloat16).eps

    def check(out: torch.Tensor) -> None:
        # Same roundings, other summation orders: rare flips, carried to the residual sum.
        assert ((out.float() - ref).abs() <= 8 * ulp * (ref.abs() + 1)).all()
        assert not counters.any()

    check(mlp_flow(*args[:3], args[3], EPS, *args[4:], counters, config))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mlp_flow(*args[:3], args[3], EPS, *args[4:], counters, config)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        check(out)
