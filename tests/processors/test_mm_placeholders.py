"""Placeholder expansion and per-prompt item limits."""

from __future__ import annotations

import pytest
import torch

from processors.errors import MediaError, MediaLimitError, PlaceholderMismatchError
from processors.placeholders import (
    check_limit_mm_per_prompt,
    count_items,
    expand_placeholders,
)
from processors.types import MultiModalItem, PlaceholderRange

IMG, VID = 900, 901
TOKENS = {"image": IMG, "video": VID}


def item(modality: str, num_tokens: int, name: str = "") -> MultiModalItem:
    return MultiModalItem(modality, name or modality, torch.empty(0), num_tokens)


def test_each_placeholder_repeats_num_tokens_times_and_items_learn_their_range():
    a, v, b = item("image", 3, "a"), item("video", 2), item("image", 1, "b")
    ids = [1, IMG, 2, VID, 3, IMG, 4]
    out = expand_placeholders(ids, [a, v, b], TOKENS)
    assert out == [1, IMG, IMG, IMG, 2, VID, VID, 3, IMG, 4]
    assert a.placeholder == PlaceholderRange(offset=1, length=3)
    assert v.placeholder == PlaceholderRange(offset=5, length=2)
    assert b.placeholder == PlaceholderRange(offset=8, length=1)


def test_items_grouped_by_modality_are_matched_in_prompt_order_per_modality():
    a, b, v = item("image", 2, "a"), item("image", 2, "b"), item("video", 1)
    expand_placeholders([IMG, VID, IMG], [a, b, v], TOKENS)
    assert (a.placeholder.offset, v.placeholder.offset, b.placeholder.offset) == (0, 2, 3)


def test_llava_single_image_token():
    image = item("image", 4)
    assert expand_placeholders([5, 32000, 6], [image], {"image": 32000}) == [5] + [32000] * 4 + [6]


@pytest.mark.parametrize(
    ("ids", "items", "fragment"),
    [
        ([1, IMG, IMG], [item("image", 2)], "2 image placeholders but 1 image was given"),
        ([1, 2], [item("image", 2)], "0 image placeholders but 1 image was given"),
        ([IMG], [], "1 image placeholder but 0 images were given"),
        ([VID], [item("image", 1)], "image"),
    ],
)
def test_placeholder_item_count_mismatch_is_a_clear_400(ids, items, fragment):
    with pytest.raises(PlaceholderMismatchError) as info:
        expand_placeholders(ids, items, TOKENS)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MediaError)
    assert info.value.status == 400
    assert fragment in info.value.message


def test_modality_the_model_does_not_take_is_refused():
    with pytest.raises(PlaceholderMismatchError, match="does not accept video"):
        expand_placeholders([32000], [item("video", 1)], {"image": 32000})


def test_limit_mm_per_prompt_refuses_extra_items_with_400():
    check_limit_mm_per_prompt({"image": 2, "video": 1}, {"image": 2, "video": 1})
    with pytest.raises(MediaLimitError) as info:
        check_limit_mm_per_prompt({"image": 3}, {"image": 2, "video": 1})
    assert info.value.status == 400
    assert info.value.message == "At most 2 images per prompt are allowed; got 3."
    with pytest.raises(MediaLimitError, match="Video inputs are not accepted"):
        check_limit_mm_per_prompt({"video": 1}, {"image": 4})


def test_count_items_counts_per_modality():
    assert count_items([item("image", 1), item("video", 1), item("image", 1)]) == {
        "image": 2,
        "video": 1,
    }
