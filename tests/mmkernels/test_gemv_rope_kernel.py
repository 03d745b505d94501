"""gemv_qkv_rope: the QKV projection with rotary and the KV-cache write in its epilogue,
against its reference (`gemv_torch`, then `rotary_write_kv_torch`).

Checked: q rotated, k rotated into the cache, v copied into the cache, slots < 0 left
alone, every other cache slot untouched; 1-D rope and Qwen2-VL's M-RoPE; head sizes whose
half is not a power of two (pairs of one program span two heads); one row (the row loop)
and several (tensor-core tiles); norm and bias on and off.
"""

import pytest
import torch

from mmkernels.gemv import GemvConfig, gemv, gemv_qkv_rope, gemv_qkv_rope_torch, launch_config
from mmkernels.rotary import build_cos_sin_cache
from mmkernels.rotary_kv import rotary_write_kv

torch.set_num_threads(1)

EPS = 1e-6
NUM_BLOCKS, BLOCK_SIZE = 9, 4


def _case(rows, hq, hk, d, hidden, dtype, mrope, seed=0):  # noqa: ANN001, ANN202
    gen = torch.Generator().manual_seed(seed)
    n = (hq + 2 * hk) * d
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    w = (torch.randn(n, hidden, generator=gen) / hidden**0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    norm_w = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(dtype)
    cos_sin = build_cos_sin_cache(d, 64, 10000.0)
    if mrope:
        positions = torch.randint(0, 64, (3, rows), generator=gen)
        half = d // 2
        section = [half // 4, half // 4, half - 2 * (half // 4)]
    else:
        positions = torch.randint(0, 64, (rows,), generator=gen)
        section = None
    # Distinct random slots over shuffled blocks; the last row is CUDA-graph padding.
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:rows].to(torch.int64)
    if rows > 1:
        slots[-1] = -1
    # A cache whose head dim is padded in memory (non-contiguous blocks, like a pool view).
    store = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, hk, d + 8, generator=gen).to(dtype)
    key_cache, value_cache = store[0, ..., :d], store[1, ..., :d]
    return x, w, bias, norm_w, positions, section, cos_sin, slots, key_cache, value_cache


def _run(fn, case, hq, norm, bias, **kw):  # noqa: ANN001, ANN202
    x, w, b, nw, positions, section, cos_sin, slots, kc, vc = case
    kc, vc = kc.clone(), vc.clone()
    q = fn(
        x,
        w,
        b if bias else None,
        norm_weight=nw if norm else None,
        eps=EPS,
        positions=positions,
        cos_sin_cache=cos_sin,
        key_cache=kc,
        value_cache=vc,
        slot_mapping=slots,
        num_q_heads=hq,
        mrope_section=section,
        **kw,
    )
    return q, kc, vc


SHAPES = {  # (hq, hk, d, hidden)
    "gqa-2-head64": (4, 2, 64, 96),
    "mha-head80": (3, 3, 80, 64),  # half 40: pairs of a program straddle heads
}
CONFIGS = {
    "row-loop": GemvConfig(2, 64, 4),
    "dot": GemvConfig(16, 64, 4, 2, dot=True),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("mrope", [False, True], ids=["rope", "mrope"])
@pytest.mark.parametrize(("norm", "bias"), [(True, True), (True, False), (False, False)])
def test_fused_qkv_rope_matches_projection_then_rotary_kv_write(
    config,
    shape,
    mrope,
    norm,
    bias,  # noqa: ANN001
) -> None:
    hq, hk, d, hidden = shape
    rows = 1 if not config.dot else 3
    case = _case(rows, hq, hk, d, hidden, torch.float32, mrope, seed=rows + d)
    q, kc, vc = _run(gemv_qkv_rope, case, hq, norm, bias, use_triton_kernel=True, config=config)
    q_ref, kc_ref, vc_ref = _run(gemv_qkv_rope_torch, case, hq, norm, bias)
    assert q.shape == (rows, hq, d)
    torch.testing.assert_close(q, q_ref, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(kc, kc_ref, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(vc, vc_ref, atol=3e-5, rtol=3e-5)
    # The reference wrote the real rows' slots; every other slot must keep its old value.
    _, _, _, _, _, _, _, slots, kc0, vc0 = case
    untouched = torch.ones(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    flat = lambda c: c.reshape(NUM_BLOCKS * BLOCK_SIZE, hk, d)  # noqa: E731
    assert torch.equal(flat(kc)[untouched], flat(kc0)[untouched])
    assert torch.equal(flat(vc)[untouched], flat(vc0)[untouched])
    assert not torch.equal(flat(kc)[~untouched], flat(kc0)[~untouched])


def _unfused_kernels(x, w, b, *, num_q_heads, key_cache, value_cache, **kw):  # noqa: ANN001, ANN003, ANN202
    """The engine's unfused path in kernels: `gemv` (norm, bias), then `rotary_write_kv`."""
    qkv = gemv(x, w, b, norm_weight=kw["norm_weight"], eps=kw["eps"], use_triton_kernel=True)
    t, d, hk = x.shape[0], key_cache.shape[-1], key_cache.shape[2]
    q, k, v = qkv.split([num_q_heads * d, hk * d, hk * d], -1)
    return rotary_write_kv(
        q.view(t, num_q_heads, d),
        k.view(t, hk, d),
        v.view(t, hk, d),
        kw["positions"],
        kw["cos_sin_cache"],
        key_cache,
        value_cache,
        kw["slot_mapping"],
        mrope_section=kw["mrope_section"],
        use_triton_kernel=True,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mrope", [False, True], ids=["rope", "mrope"])
def test_half_types_one_row_bit_equal_to_the_unfused_kernels(dtype, mrope) -> None:  # noqa: ANN001
    # The rotation rounds each product and the sum to the activation dtype, so it is the
    # unfused rotary kernel's arithmetic exactly; against torch's matmul only the
    # projection's summation order differs (an ulp of q, amplified where x1 cos and x2 sin
    # nearly cancel), which the fp32 test above covers.
    hq, hk, d, hidden = 4, 2, 64, 128
    case = _case(1, hq, hk, d, hidden, dtype, mrope=mrope, seed=3)
    q, kc, vc = _run(gemv_qkv_rope, case, hq, True, True, use_triton_kernel=True)
    q_ref, kc_ref, vc_ref = _run(_unfused_kernels, case, hq, True, True)
    assert torch.equal(q, q_ref)
    assert torch.equal(kc, kc_ref)
    assert torch.equal(vc, vc_ref)


def test_mismatched_weight_or_positions_raise() -> None:
    hq, hk, d, hidden = 4, 2, 64, 96
    x, w, b, nw, positions, _, cos_sin, slots, kc, vc = _case(
        1, hq, hk, d, hidden, torch.float32, False
    )
    kw = dict(norm_weight=nw, eps=EPS, cos_sin_cache=cos_sin, key_cache=kc, value_cache=vc)
    kw.update(slot_mapping=slots, use_triton_kernel=True)
    with pytest.raises(ValueError, match="does not fit"):
        gemv_qkv_rope(x, w[:-d], b, positions=positions, num_q_heads=hq, **kw)
    with pytest.raises(ValueError, match="M-RoPE"):
        gemv_qkv_rope(x, w, b, positions=positions, num_q_heads=hq, mrope_section=[8, 8, 16], **kw)


def test_default_launch_config_pairs_rows() -> None:
    assert not launch_config(1, 1280, 2048, rope=True).dot
    cfg = launch_config(4, 1280, 2048, rope=True)
    assert cfg.dot and cfg.block_n >= 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 4, 8])
@pytest.mark.parametrize("mrope", [False, True], ids=["rope", "mrope"])
def test_gpu_qwen_shapes_bf16_match_the_unfused_kernels(rows: int, mrope: bool) -> None:
    # Qwen2.5-3B: 16 q / 2 kv heads of 128, hidden 2048, bias and the input norm. The
    # fused launch sums K in other tiles than the unfused GEMV, so q / k can differ by an
    # ulp before the rotation, which carries it (more where x1 cos and x2 sin nearly cancel).
    hq, hk, d, hidden = 16, 2, 128, 2048
    case = _case(rows, hq, hk, d, hidden, torch.bfloat16, mrope, seed=rows)
    case = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in case)
    q, kc, vc = _run(gemv_qkv_rope, case, hq, True, True)
    ulp = torch.finfo(torch.bfloat16).eps
    for ref_fn in (_unfused_kernels, gemv_qkv_rope_torch):
        q_ref, kc_ref, vc_ref = _run(ref_fn, case, hq, True, True)
        for got, ref in ((q, q_ref), (kc, kc_ref), (vc, vc_ref)):
            tol = 8 * ulp * (ref.float().abs() + 1)
            assert ((got.float() - ref.float()).abs() <= tol).all(), ref_fn.__name__
