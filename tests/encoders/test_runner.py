"""EncoderRunner: cache lookups, one packed forward for the misses, deduplication."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from encoders.base import VisionEncoder
from encoders.cache import EmbeddingCache
from encoders.runner import EncoderRunner
from processors.types import MultiModalItem

torch.set_num_threads(1)

HIDDEN = 4


class RecordingEncoder(VisionEncoder):
    """Returns rows derived from each item's pixels; records every encode() batch."""

    def __init__(self) -> None:
        super().__init__()
        self.text_hidden_size = HIDDEN
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.batches: list[list[str]] = []

    def encode(self, items: Sequence[MultiModalItem]) -> list[torch.Tensor]:
        self.batches.append([item.content_hash for item in items])
        packed = torch.cat([item.pixel_values for item in items]) * self.weight
        return list(packed.split([item.num_tokens for item in items]))


def item(key: str, rows: int = 2) -> MultiModalItem:
    value = float(sum(map(ord, key)))
    return MultiModalItem("image", key, torch.full((rows, HIDDEN), value), rows)


def make_runner(max_bytes: int = 1 << 20) -> tuple[EncoderRunner, RecordingEncoder]:
    encoder = RecordingEncoder()
    return EncoderRunner(encoder, EmbeddingCache(max_bytes)), encoder


def test_misses_are_encoded_in_one_batch_and_hits_skip_the_encoder() -> None:
    runner, encoder = make_runner()
    first = runner.run([item("a"), item("b")])
    second = runner.run([item("b"), item("c"), item("a")])
    assert encoder.batches == [["a", "b"], ["c"]]
    assert torch.equal(second[0], first[1]) and torch.equal(second[2], first[0])
    assert torch.equal(second[1], item("c").pixel_values)
    stats = runner.stats
    assert (stats.encoder_runs, stats.items_encoded) == (2, 3)
    assert (stats.cache_hits, stats.cache_misses) == (2, 3)


def test_all_hits_run_no_forward() -> None:
    runner, encoder = make_runner()
    runner.run([item("a")])
    runner.run([item("a"), item("a")])
    assert encoder.batches == [["a"]]
    assert runner.stats.encoder_runs == 1


def test_duplicate_items_in_one_call_are_encoded_once() -> None:
    runner, encoder = make_runner()
    outs = runner.run([item("a"), item("b"), item("a")])
    assert encoder.batches == [["a", "b"]]
    assert outs[0] is outs[2]
    assert runner.stats.items_encoded == 2
    assert runner.stats.cache_misses == 2


def test_item_too_large_for_the_cache_is_still_returned_and_reencoded_later() -> None:
    runner, encoder = make_runner(max_bytes=64)  # a 5-row item needs 80 bytes
    (out,) = runner.run([item("big", rows=5)])
    assert out.shape == (5, HIDDEN)
    runner.run([item("big", rows=5)])
    assert encoder.batches == [["big"], ["big"]]
    assert runner.cache.stats.rejected == 2


def test_cached_entries_are_compact_copies_of_the_batch_output() -> None:
    runner, _ = make_runner()
    runner.run([item("a"), item("b", rows=3)])
    cached = runner.cache.get("b")
    assert cached.untyped_storage().nbytes() == 3 * HIDDEN * 4
