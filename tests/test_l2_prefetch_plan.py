"""The few-token path's L2 prefetch plan: which weight bytes each launch of a decoder layer
asks L2 to fetch (DecoderLayer._l2_prefetch_plan, set_kernel_mode), and the checks
`kernels.gemv` applies to prefetch regions before a launch."""

import pytest
import torch

from kernels.gemv import MAX_PREFETCH_REGIONS, _prefetch_args
from mmengine.config import ModelSpec, parse_extra_value
from mmengine.models.decoder import DecoderModel
from mmengine.models.layers import set_kernel_mode

torch.set_num_threads(1)
MIB = 2**20


def _spec(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, head_dim: int):  # noqa: ANN202
    return ModelSpec(
        architecture="Qwen2ForCausalLM", model_type="qwen2", text_model_type="qwen2",
        hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, intermediate_size=inter, vocab_size=64, rms_norm_eps=1e-6,
        rope_theta=1e4, max_position_embeddings=64, tie_word_embeddings=False, qkv_bias=True,
        qk_norm=False, mrope_section=None, rope_scaling=None, eos_token_ids=[0],
        dtype="bfloat16", hf_config={},
    )  # fmt: skip


def _nbytes(regions: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in regions)


def _qwen3b_layers(layers: int = 2) -> DecoderModel:
    # Qwen2.5-3B's layer shapes on the meta device (no memory): gate_up 2 x 11008 rows of
    # 2048, o_proj 2048 x 2048 (8 MiB in bf16).
    with torch.device("meta"):
        return DecoderModel(_spec(2048, 11008, layers, 16, 2, 128), 64).to(torch.bfloat16)


def test_qkv_launch_prefetches_o_proj_then_paired_gate_up_rows_within_budget() -> None:
    model = _qwen3b_layers()
    set_kernel_mode(model, compiled=True, gemv_max_tokens=1, l2_prefetch=(24, 8, False))
    layer = model.layers[0]
    qkv, o, down = layer._l2_prefetch_plan()
    gate_up, inter = layer.gate_up_proj.weight, 11008
    row = 2048 * 2
    first = (24 * MIB - 8 * MIB) // (2 * row)  # rows of gate and of up after o_proj's 8 MiB
    assert qkv[0] is layer.o_proj.weight
    assert [tuple(t.shape) for t in qkv[1:]] == [(first, 2048)] * 2
    # The gate rows and the up rows gate_up's first programs read: i and inter + i.
    assert qkv[1].storage_offset() == 0 and qkv[2].storage_offset() == inter * 2048
    assert 24 * MIB - 2 * row < _nbytes(qkv) <= 24 * MIB
    # o_proj's launch continues where the QKV launch stopped, for its own 8 MiB.
    more = 8 * MIB // (2 * row)
    assert [t.storage_offset() for t in o] == [first * 2048, (inter + first) * 2048]
    assert [t.shape[0] for t in o] == [more, more] and _nbytes(o) <= 8 * MIB
    assert down == []
    assert all(t.is_contiguous() and t.untyped_storage() is not None for t in qkv + o)
    assert gate_up.shape[0] == 2 * inter


def test_budgets_past_gate_up_stop_at_its_rows() -> None:
    model = _qwen3b_layers()
    set_kernel_mode(model, compiled=False, gemv_max_tokens=1, l2_prefetch=(64, 64, False))
    qkv, o, _ = model.layers[0]._l2_prefetch_plan()
    # 64 MiB: o_proj + 7 MiB... of gate + up rows; then o_proj's launch up to 64 MiB more,
    # never past gate_up's 11008 rows.
    end = qkv[1].shape[0] + o[0].shape[0]
    assert end <= 11008 and _nbytes(qkv) <= 64 * MIB and _nbytes(o) <= 64 * MIB
    small = DecoderModel(_spec(32, 64, 2, 4, 2, 8), 64)
    set_kernel_mode(small, compiled=False, gemv_max_tokens=1, l2_prefetch=(1, 1, False))
    qkv, o, _ = small.layers[0]._l2_prefetch_plan()
    assert [t.shape[0] for t in qkv[1:]] == [64, 64] and o == []  # all of gate_up, once


def test_down_launch_prefetches_the_next_layers_qkv_weight_and_the_last_none() -> None:
    model = _qwen3b_layers(3)
    set_kernel_mode(model, compiled=True, gemv_max_tokens=1, l2_prefetch=(0, 0, True))
    plans = [layer._l2_prefetch_plan() for layer in model.layers]
    assert plans[0][2][0] is model.layers[1].qkv_proj.weight
    assert plans[1][2][0] is model.layers[2].qkv_proj.weight
    assert plans[2][2] == []
    assert all(p[0] == [] and p[1] == [] for p in plans)  # budgets 0: nothing else
    # Not registered as the layer's own parameter.
    assert sum(1 for _ in model.layers[0].parameters()) == sum(
        1 for _ in model.layers[2].parameters()
    )
    set_kernel_mode(model, compiled=True, gemv_max_tokens=1)  # default: every plan empty
    assert all(layer._l2_prefetch_plan() == ([], [], []) for layer in model.layers)


def test_prefetch_regions_must_be_aligned_contiguous_and_few() -> None:
    x = torch.zeros(1, 8)
    w = torch.zeros(64, 8, dtype=torch.bfloat16)
    # On CPU (and before sm_90) regions are checked, then dropped: a hint only.
    assert _prefetch_args([w[:4], w[8:16]], x) == ([x] * 3, [0] * 3, 0)
    with pytest.raises(ValueError, match="16-byte aligned"):
        _prefetch_args([w.view(-1)[1:9]], x)  # 2 bytes in
    with pytest.raises(ValueError, match="16-byte aligned"):
        _prefetch_args([w[:, :4]], x)  # not contiguous
    with pytest.raises(ValueError, match="16-byte aligned"):
        _prefetch_args([w.view(-1)[:4]], x)  # 8 bytes long
    with pytest.raises(ValueError, match="at most"):
        _prefetch_args([w[:1]] * (MAX_PREFETCH_REGIONS + 1), x)


def test_prefetch_options_take_mib_from_0_to_64() -> None:
    assert parse_extra_value("l2_prefetch_mb", "32") == 32
    assert parse_extra_value("l2_prefetch_next_qkv", "on") is True
    for bad in ("-1", "65", "x"):
        with pytest.raises(ValueError, match="l2_prefetch_o_mb"):
            parse_extra_value("l2_prefetch_o_mb", bad)
