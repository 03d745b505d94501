"""M-RoPE positions equal HF's get_rope_index on tiny Qwen2-VL / Qwen2.5-VL models."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from processors.errors import PlaceholderMismatchError
from processors.mrope import mrope_decode_positions, mrope_positions
from processors.placeholders import expand_placeholders
from processors.types import MultiModalItem

torch.set_num_threads(1)

IMAGE, VIDEO, START, END = 60, 61, 62, 63
TEXT = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
)
IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START)


@pytest.fixture(scope="module")
def qwen2_vl() -> Qwen2VLModel:
    vision = dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, spatial_merge_size=2)
    return Qwen2VLModel(Qwen2VLConfig(text_config=TEXT, vision_config=vision, **IDS)).eval()


@pytest.fixture(scope="module")
def qwen2_5_vl() -> Qwen2_5_VLModel:
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=16,
        spatial_merge_size=2,
        tokens_per_second=2,
        fullatt_block_indexes=[0],
    )
    return Qwen2_5_VLModel(Qwen2_5_VLConfig(text_config=TEXT, vision_config=vision, **IDS)).eval()


def item(modality: str, grid: tuple[int, int, int], second_per_grid_t: float | None = None):
    return MultiModalItem(
        modality=modality,
        content_hash=f"{modality}{grid}",
        pixel_values=torch.empty(0),
        num_tokens=grid[0] * grid[1] * grid[2] // 4,
        grid_thw=grid,
        second_per_grid_t=second_per_grid_t,
    )


def prompt(*parts) -> tuple[list[int], list[MultiModalItem]]:
    """Parts: ints are text tokens, items are wrapped in vision start/end around one pad."""
    ids, items = [], []
    for part in parts:
        if isinstance(part, MultiModalItem):
            ids += [START, IMAGE if part.modality == "image" else VIDEO, END]
            items.append(part)
        else:
            ids += list(range(1, part + 1))
    expanded = expand_placeholders(ids, items, {"image": IMAGE, "video": VIDEO})
    return expanded, items


def hf_positions(model, ids, items, with_seconds: bool):
    input_ids = torch.tensor([ids])
    token_type = torch.zeros_like(input_ids, dtype=torch.int32)
    token_type[input_ids == IMAGE] = 1
    token_type[input_ids == VIDEO] = 2
    grids = {m: [list(i.grid_thw) for i in items if i.modality == m] for m in ("image", "video")}
    kwargs = dict(
        mm_token_type_ids=token_type,
        image_grid_thw=torch.tensor(grids["image"]) if grids["image"] else None,
        video_grid_thw=torch.tensor(grids["video"]) if grids["video"] else None,
    )
    if with_seconds and grids["video"]:
        seconds = [i.second_per_grid_t for i in items if i.modality == "video"]
        kwargs["second_per_grid_ts"] = torch.tensor(seconds)  # float32, as the processor returns
    positions, deltas = model.get_rope_index(input_ids, **kwargs)
    return positions[:, 0, :], int(deltas.item())


QWEN2_CASES = {
    "image_then_video": (5, item("image", (1, 4, 6)), 3, item("video", (3, 4, 4)), 4),
    "starts_with_image_ends_with_video": (item("image", (1, 6, 2)), 2, item("video", (2, 2, 4))),
    "long_video_small_frames": (2, item("video", (12, 2, 2)), 3),
    "two_images_back_to_back": (1, item("image", (1, 2, 2)), item("image", (1, 4, 2)), 2),
}


@pytest.mark.parametrize("case", list(QWEN2_CASES))
def test_qwen2_vl_positions_and_delta_equal_hf_get_rope_index(qwen2_vl, case):
    ids, items = prompt(*QWEN2_CASES[case])
    expected, expected_delta = hf_positions(qwen2_vl, ids, items, with_seconds=False)
    positions, delta = mrope_positions(ids, items, spatial_merge_size=2, **IDS)
    assert positions.shape == (3, len(ids)) and positions.dtype == torch.long
    assert torch.equal(positions, expected)
    assert delta == expected_delta


QWEN2_5_CASES = {
    "fps3_fractional_interval": (4, item("video", (4, 4, 6), 2 / 3), 2),
    "fps2_and_image": (item("image", (1, 4, 4)), 3, item("video", (3, 2, 2), 1.0), 1),
    "two_videos_different_rates": (
        2,
        item("video", (2, 2, 2), 0.5),
        2,
        item("video", (5, 4, 2), 2 / 7),
        3,
    ),
}


def hf_truncates_seconds(model) -> bool:
    """Whether the installed transformers truncates second_per_grid_t to an int before
    scaling (some 5.x releases, e.g. 5.17) rather than after (5.24, original Qwen)."""
    ids, items = prompt(item("video", (3, 2, 2), 0.5))
    positions, _ = hf_positions(model, ids, items, with_seconds=True)
    return positions[0, 1].item() == positions[0, 2].item()


@pytest.mark.parametrize("case", list(QWEN2_5_CASES))
def test_qwen2_5_vl_video_time_scaling_equals_hf_get_rope_index(qwen2_5_vl, case):
    ids, items = prompt(*QWEN2_5_CASES[case])
    expected, expected_delta = hf_positions(qwen2_5_vl, ids, items, with_seconds=True)
    positions, delta = mrope_positions(
        ids,
        items,
        spatial_merge_size=2,
        tokens_per_second=2,
        truncate_second_per_grid_t=hf_truncates_seconds(qwen2_5_vl),
        **IDS,
    )
    assert torch.equal(positions, expected)
    assert delta == expected_delta


def test_continue_after_temporal_starts_text_after_the_largest_vision_position():
    ids, items = prompt(2, item("video", (3, 2, 2)), 2)
    hf_style, _ = mrope_positions(ids, items, spatial_merge_size=2, **IDS)
    legacy, delta = mrope_positions(
        ids, items, spatial_merge_size=2, continue_after_temporal=True, **IDS
    )
    # ids: 1 2 <start> v v v <end> 1 2; the video's (t, h, w) = (3..5, 3, 3)
    assert legacy[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert legacy[1].tolist() == [0, 1, 2, 3, 3, 3, 6, 7, 8]
    assert delta == 0
    # transformers >= 5.3 continues after the spatial extent (1 merged row) instead.
    assert hf_style[0].tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6]
    assert hf_style[1].tolist() == [0, 1, 2, 3, 3, 3, 4, 5, 6]


def test_fractional_seconds_scale_before_truncation_by_default():
    ids, items = prompt(1, item("video", (4, 2, 2), 2 / 3))  # 2/3 s per grid step, 2 tok/s
    exact, _ = mrope_positions(ids, items, spatial_merge_size=2, tokens_per_second=2, **IDS)
    assert exact[0, 2:6].tolist() == [2, 3, 4, 6]  # 2 + floor(k * 4/3)
    truncated, _ = mrope_positions(
        ids,
        items,
        spatial_merge_size=2,
        tokens_per_second=2,
        truncate_second_per_grid_t=True,
        **IDS,
    )
    assert truncated[0, 2:6].tolist() == [2, 2, 2, 2]  # int(2/3) = 0


def test_text_only_prompt_has_1d_positions_and_zero_delta():
    positions, delta = mrope_positions(list(range(1, 8)), [], spatial_merge_size=2, **IDS)
    assert torch.equal(positions, torch.arange(7).expand(3, -1))
    assert delta == 0


def test_decode_positions_are_index_plus_delta_on_all_rows():
    positions = mrope_decode_positions(delta=-5, start=20, length=3)
    assert positions.tolist() == [[15, 16, 17]] * 3


def test_decode_positions_continue_hf_prompt_positions(qwen2_vl):
    ids, items = prompt(3, item("image", (1, 8, 8)), 2)
    _, delta = mrope_positions(ids, items, spatial_merge_size=2, **IDS)
    # HF's decode step: cache_position + rope_deltas on every axis.
    _, hf_delta = hf_positions(qwen2_vl, ids, items, with_seconds=False)
    next_pos = mrope_decode_positions(delta, start=len(ids), length=1)
    assert next_pos[:, 0].tolist() == [len(ids) + hf_delta] * 3


def test_runs_not_matching_items_raise_a_400():
    ids, items = prompt(2, item("image", (1, 4, 4)), 2)
    with pytest.raises(PlaceholderMismatchError) as info:
        mrope_positions(ids[:-4], items[:0], spatial_merge_size=2, **IDS)
    assert info.value.status == 400
    short = [t for i, t in enumerate(ids) if not (t == IMAGE and i == 4)]
    with pytest.raises(PlaceholderMismatchError):
        mrope_positions(short, items, spatial_merge_size=2, **IDS)
