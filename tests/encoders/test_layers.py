"""Shared encoder layers against slow, obviously right references."""

from __future__ import annotations

import pytest
import torch

from encoders.layers import SegmentPlan, segment_attention
from encoders.qwen_vision import patch_positions

torch.set_num_threads(1)


def block_diagonal_reference(qkv: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Dense softmax attention with a block-diagonal mask, one einsum for everything."""
    q, k, v = qkv.unbind(1)  # [N, H, D] each
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    scores = torch.einsum("nhd,mhd->hnm", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(segment[:, None] != segment[None, :], float("-inf"))
    out = torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v)
    return out.flatten(1)


@pytest.mark.parametrize(
    "lengths",
    [[7], [4, 4, 4], [5, 3, 5, 1, 3, 5], [1, 9]],
    ids=["one", "equal", "mixed", "tiny_and_long"],
)
def test_segment_attention_equals_block_diagonal_dense_attention(lengths) -> None:
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(lengths), 3, 2, 8, generator=gen)
    plan = SegmentPlan.from_lengths(lengths, torch.device("cpu"))
    out = segment_attention(qkv, plan)
    torch.testing.assert_close(out, block_diagonal_reference(qkv, lengths), atol=1e-6, rtol=1e-5)


def test_equal_segments_need_no_gather_and_zero_lengths_are_dropped() -> None:
    plan = SegmentPlan.from_lengths([4, 0, 4], torch.device("cpu"))
    assert plan.groups == [(4, 2)]
    assert plan.gather_index is None
    mixed = SegmentPlan.from_lengths([3, 2, 3], torch.device("cpu"))
    assert mixed.groups == [(2, 1), (3, 2)]
    assert mixed.gather_index.tolist() == [3, 4, 0, 1, 2, 5, 6, 7]


def test_patch_positions_follow_merge_blocks_and_repeat_per_frame() -> None:
    # A 2 x 4 grid, merge 2: block (0,0) then block (0,1), each in raster order.
    pos = patch_positions([(2, 2, 4)], merge=2)
    frame = [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert pos.tolist() == frame + frame


def test_staging_on_cpu_is_a_plain_concatenation_in_the_requested_dtype() -> None:
    from encoders.staging import PinnedStaging

    parts = [torch.randn(n, 6) for n in (2, 3)]
    out = PinnedStaging().to_device(parts, torch.device("cpu"), torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.cat(parts).to(torch.bfloat16))
