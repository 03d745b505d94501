"""The attention custom ops that torch.compile sees as opaque: their schemas (declared
mutations), fake implementations and results under compilation, on CPU tensors."""

from __future__ import annotations

import pytest
import torch

import mmengine.attention  # noqa: F401 - registers the ops
from mmengine.attention import AttentionMetadata, forward_context
from mmkernels.rotary import build_cos_sin_cache

torch.set_num_threads(1)

HQ, HK, D = 4, 2, 64


def _step(mrope: bool):
    """A 5-token chunk continuing 3 cached tokens of one sequence (blocks 1, then 0), and
    the op arguments for it."""
    gen = torch.Generator().manual_seed(0)
    t = 5
    qkv = torch.randn(t, (HQ + 2 * HK) * D, generator=gen)
    pos = torch.arange(3, 3 + t)
    positions = torch.stack([pos, pos + 1, pos + 2]) if mrope else pos
    section = [8, 12, 12] if mrope else None
    key_cache = torch.randn(4, 16, HK, D, generator=gen)
    value_cache = torch.randn(4, 16, HK, D, generator=gen)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, t], dtype=torch.int32),
        seq_lens=torch.tensor([3 + t], dtype=torch.int32),
        block_tables=torch.tensor([[1, 0]], dtype=torch.int32),
        slot_mapping=torch.arange(16 + 3, 16 + 3 + t),
        max_query_len=t,
        max_seq_len=3 + t,
    )
    cos_sin = build_cos_sin_cache(D, 64, 1e4)
    args = (qkv, positions, cos_sin, key_cache, value_cache, D**-0.5, HQ, section)
    return meta, args


@pytest.mark.parametrize("mrope", [False, True], ids=["1d", "mrope"])
def test_rotary_paged_attention_op_passes_opcheck(mrope: bool) -> None:
    meta, args = _step(mrope)
    with forward_context(meta):
        torch.library.opcheck(torch.ops.mmengine.rotary_paged_attention.default, args)


def test_paged_attention_op_passes_opcheck() -> None:
    meta, (qkv, _, _, key_cache, value_cache, scale, _, _) = _step(False)
    q, k, v = qkv.split([HQ * D, HK * D, HK * D], -1)
    args = (q.reshape(5, HQ, D), k.reshape(5, HK, D), v.reshape(5, HK, D))
    with forward_context(meta):
        torch.library.opcheck(
            torch.ops.mmengine.paged_attention.default, (*args, key_cache, value_cache, scale)
        )


@pytest.mark.parametrize("mrope", [False, True], ids=["1d", "mrope"])
def test_rotary_paged_attention_compiled_equals_eager_and_fills_the_same_slots(
    mrope: bool,
) -> None:
    meta, args = _step(mrope)
    qkv, positions, cos_sin, key_cache, value_cache, scale, heads, section = args
    caches = [(key_cache.clone(), value_cache.clone()) for _ in range(2)]

    def call(kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        return torch.ops.mmengine.rotary_paged_attention(
            qkv, positions, cos_sin, kc, vc, scale, heads, section
        )

    with forward_context(meta):
        eager = call(*caches[0])
        compiled = torch.compile(call, backend="aot_eager", dynamic=True)(*caches[1])
    assert compiled.shape == (5, HQ, D)
    assert torch.equal(eager, compiled)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    # The step's five slots (block 1, offsets 3..7) were written, nothing else.
    assert not torch.equal(caches[0][0][1, 3:8], key_cache[1, 3:8])
    assert torch.equal(caches[0][0][1, 8:], key_cache[1, 8:])
    assert torch.equal(caches[0][0][[0, 2, 3]], key_cache[[0, 2, 3]])


def _gemv_step(mrope: bool):
    """`_step`'s chunk, from the residual stream: (x, QKV weight, bias, norm weight) in
    front of the rotary op's arguments."""
    meta, (qkv, positions, cos_sin, kc, vc, scale, heads, section) = _step(mrope)
    gen = torch.Generator().manual_seed(1)
    hidden = 48
    x = torch.randn(qkv.shape[0], hidden, generator=gen)
    weight = torch.randn(qkv.shape[1], hidden, generator=gen) / hidden**0.5
    bias = torch.randn(qkv.shape[1], generator=gen)
    norm_w = 1 + 0.1 * torch.randn(hidden, generator=gen)
    args = (x, weight, bias, norm_w, 1e-6, positions, cos_sin, kc, vc, scale, heads, section)
    return meta, args


@pytest.mark.parametrize("mrope", [False, True], ids=["1d", "mrope"])
def test_gemv_rope_paged_attention_op_passes_opcheck(mrope: bool) -> None:
    meta, args = _gemv_step(mrope)
    with forward_context(meta):
        torch.library.opcheck(torch.ops.mmengine.gemv_rope_paged_attention.default, args)


@pytest.mark.parametrize("mrope", [False, True], ids=["1d", "mrope"])
def test_gemv_rope_paged_attention_equals_projection_then_rotary_op_and_compiles(
    mrope: bool,
) -> None:
    from mmkernels.rms_norm import rms_norm_torch

    meta, args = _gemv_step(mrope)
    x, weight, bias, norm_w, eps, positions, cos_sin, kc, vc, scale, heads, section = args
    caches = [(kc.clone(), vc.clone()) for _ in range(3)]
    qkv = torch.nn.functional.linear(rms_norm_torch(x, norm_w, eps), weight, bias)

    def fused(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.mmengine.gemv_rope_paged_attention(
            x, weight, bias, norm_w, eps, positions, cos_sin, k, v, scale, heads, section
        )

    with forward_context(meta):
        unfused = torch.ops.mmengine.rotary_paged_attention(
            qkv, positions, cos_sin, *caches[0], scale, heads, section
        )
        eager = fused(*caches[1])
        compiled = torch.compile(fused, backend="aot_eager", dynamic=True)(*caches[2])
    assert torch.equal(eager, unfused) and torch.equal(compiled, eager)
    for cache in caches[1:]:
        assert torch.equal(cache[0], caches[0][0]) and torch.equal(cache[1], caches[0][1])
    assert not torch.equal(caches[1][0][1, 3:8], kc[1, 3:8])
