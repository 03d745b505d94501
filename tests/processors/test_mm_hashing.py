"""Content hashes: stable for equal content, distinct for any difference, uuid override."""

from __future__ import annotations

import torch

from processors.hashing import content_hash

torch.set_num_threads(1)

PARAMS = {"processor": "qwen2_vl", "max_pixels": 1024, "mean": (0.5, 0.5, 0.5)}


def test_same_bytes_and_params_give_the_same_256_bit_hex_digest():
    first = content_hash("image", b"\x89PNG...", PARAMS)
    assert first == content_hash("image", b"\x89PNG...", dict(PARAMS))
    assert len(first) == 64 and int(first, 16) >= 0


def test_one_changed_byte_pixel_param_or_modality_changes_the_hash():
    base = content_hash("image", b"abc", PARAMS)
    assert content_hash("image", b"abd", PARAMS) != base
    assert content_hash("video", b"abc", PARAMS) != base
    assert content_hash("image", b"abc", {**PARAMS, "max_pixels": 1025}) != base
    pixels = torch.zeros(3, 4, 4, dtype=torch.uint8)
    changed = pixels.clone()
    changed[1, 2, 3] = 1
    assert content_hash("image", pixels, PARAMS) != content_hash("image", changed, PARAMS)
    assert content_hash("image", pixels, PARAMS) == content_hash("image", pixels.clone(), PARAMS)


def test_shape_and_dtype_are_part_of_a_pixel_hash():
    flat = torch.arange(24, dtype=torch.uint8)
    assert content_hash("image", flat.view(2, 3, 4), {}) != content_hash(
        "image", flat.view(3, 2, 4), {}
    )
    assert content_hash("image", torch.zeros(4, dtype=torch.int16), {}) != content_hash(
        "image", torch.zeros(8, dtype=torch.uint8), {}
    )


def test_bytes_and_pixels_with_equal_raw_content_do_not_collide():
    pixels = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert content_hash("image", pixels, {}) != content_hash("image", bytes([1, 2, 3]), {})


def test_field_boundaries_cannot_be_shifted_between_keys_and_values():
    assert content_hash("image", b"x", {"a": "bc"}) != content_hash("image", b"x", {"ab": "c"})
    assert content_hash("image", b"x", {"a": 1}) != content_hash("image", b"x", {"a": "1"})
    assert content_hash("image", b"x", {"a": True}) != content_hash("image", b"x", {"a": 1})


def test_uuid_overrides_content_and_is_tagged_apart_from_computed_digests():
    one = content_hash("image", b"first image", PARAMS, uuid="user-key")
    two = content_hash("image", b"other image", PARAMS, uuid="user-key")
    assert one == two
    assert one.startswith("uuid-") and len(one) == 5 + 64
    assert content_hash("image", b"x", PARAMS, uuid="other-key") != one
    assert content_hash("image", b"x", {**PARAMS, "max_pixels": 1}, uuid="user-key") != one
    # A digest computed from content never carries the uuid tag.
    assert not content_hash("image", b"user-key", PARAMS).startswith("uuid-")
