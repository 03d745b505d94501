"""The encoders in bfloat16 on a GPU against HF's float32 towers (run with -m gpu)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from encoders import build_vision_encoder
from encoders.layers import SegmentPlan
from tests.encoders.reference import qwen_hf_reference, qwen_hub_weights, qwen_item, randomize_

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

QWEN2_VL = {"depth": 2, "embed_dim": 64, "num_heads": 4, "hidden_size": 48, "mlp_ratio": 2}
QWEN2_5_VL = {
    "depth": 4,
    "hidden_size": 64,
    "num_heads": 4,
    "intermediate_size": 96,
    "out_hidden_size": 48,
    "window_size": 16,
    "fullatt_block_indexes": [1, 3],
}
GEOMETRY = {"patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2}


@pytest.mark.parametrize(
    "model_type,segment_kernel",
    [("qwen2_vl", False), ("qwen2_5_vl", False), ("qwen2_5_vl", True)],
)
def test_bf16_packed_encode_on_gpu_is_close_to_hf_float32(model_type, segment_kernel) -> None:
    if model_type == "qwen2_vl":
        vision = {**QWEN2_VL, **GEOMETRY}
        tower = Qwen2VisionTransformerPretrainedModel(
            Qwen2VLConfig(vision_config=vision).vision_config
        )
    else:
        vision = {**QWEN2_5_VL, **GEOMETRY}
        config = Qwen2_5_VLConfig(vision_config=vision).vision_config
        tower = Qwen2_5_VisionTransformerPretrainedModel(config)
    tower.eval()
    randomize_(tower, seed=4)
    encoder = build_vision_encoder(
        {"model_type": model_type, "vision_config": vision},
        qwen_hub_weights(tower),
        torch.bfloat16,
        torch.device("cuda"),
    )
    # The window blocks through mmkernels/segment_attention.py instead of the flash call.
    encoder.short_segment_kernel = segment_kernel
    grids = [(1, 10, 6), (2, 8, 8), (1, 2, 2), (1, 16, 12)]
    items = [qwen_item(f"i{n}", g, seed=n) for n, g in enumerate(grids)]
    outs = encoder.encode(items)
    refs = qwen_hf_reference(tower, items, one_by_one=True)
    for out, ref in zip(outs, refs):
        assert out.dtype == torch.bfloat16 and out.device.type == "cuda"
        err = (out.float().cpu() - ref).norm() / ref.norm()
        assert err < 2e-2, err


def test_pinned_staging_packs_like_cat_and_a_reused_buffer_leaves_earlier_results_intact() -> None:
    from encoders.staging import PinnedStaging

    staging = PinnedStaging()
    dev = torch.device("cuda")
    first_parts = [torch.randn(n, 12) for n in (5, 1, 9)]
    first = staging.to_device(first_parts, dev, torch.bfloat16)
    # The second batch overwrites the pinned buffer; the first result must not change.
    second_parts = [torch.randn(n, 12) for n in (30, 2)]  # larger: the buffer grows
    second = staging.to_device(second_parts, dev, torch.float32)
    third = staging.to_device([torch.ones(3, 12)], dev, torch.float32)
    torch.cuda.synchronize()
    assert torch.equal(first.cpu(), torch.cat(first_parts).to(torch.bfloat16))
    assert torch.equal(second.cpu(), torch.cat(second_parts))
    assert torch.equal(third.cpu(), torch.ones(3, 12))


def test_pinned_staging_never_waits_for_the_gpu_work_queued_before_it() -> None:
    """With async scheduling an encoder step stages its pixels while the previous step still
    runs: staging must not wait for that step (the old single buffer waited for its copy)."""
    import time

    from encoders.staging import PinnedStaging

    staging = PinnedStaging()
    dev = torch.device("cuda")
    staging.to_device([torch.zeros(64, 12)], dev, torch.float32)  # pins both buffers
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU work queued ahead of the next copies
    t0 = time.perf_counter()
    outs = [
        staging.to_device([torch.full((8, 12), float(i))], dev, torch.float32) for i in range(2)
    ]
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    assert host_s < 0.1, f"staging waited {host_s:.3f} s for the GPU"
    for i, out in enumerate(outs):
        assert torch.equal(out.cpu(), torch.full((8, 12), float(i)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_flash_path_equals_block_diagonal_attention(dtype) -> None:
    from encoders.layers import segment_attention
    from tests.encoders.test_layers import block_diagonal_reference

    # Window-like sizes (64 and ragged edges), a long frame and a 1-token segment; head 80
    # as in the Qwen2.5-VL tower.
    lengths = [64, 64, 40, 64, 16, 1, 1300, 64, 24]
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(lengths), 3, 4, 80, generator=gen)
    plan = SegmentPlan.from_lengths(lengths, torch.device("cuda"))
    assert plan.cu_seqlens is not None and plan.max_len == 1300
    out = segment_attention(qkv.to("cuda", dtype), plan)
    want = block_diagonal_reference(qkv.double(), lengths).float()
    torch.testing.assert_close(out.float().cpu(), want, atol=2e-2, rtol=2e-2)
    # float32 takes the grouped SDPA path with the same plan, tightly.
    out32 = segment_attention(qkv.to("cuda"), plan)
    torch.testing.assert_close(out32.cpu(), want, atol=1e-4, rtol=1e-4)
