"""The encoder stage step: serve items from the embedding cache, encode the rest at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from encoders.base import VisionEncoder
from encoders.cache import EmbeddingCache
from processors.types import MultiModalItem


@dataclass
class RunnerStats:
    """Counters of an EncoderRunner since it was created. Lookups are counted once per
    distinct content hash in a `run` call: duplicates ride on their first occurrence."""

    encoder_runs: int = 0  # encoder forward calls (one per run() that had misses)
    items_encoded: int = 0  # distinct items encoded
    cache_hits: int = 0  # distinct hashes served from the cache
    cache_misses: int = 0  # distinct hashes that had to be encoded


class EncoderRunner:
    """Runs a vision encoder behind an embedding cache."""

    def __init__(self, encoder: VisionEncoder, cache: EmbeddingCache) -> None:
        self.encoder = encoder
        self.cache = cache
        self._stats = RunnerStats()

    def run(self, items: Sequence[MultiModalItem]) -> list[torch.Tensor]:
        """Returns the embeddings of each item, encoding only what the cache lacks.

        Cache misses, deduplicated by content hash, are encoded in one packed forward, and
        their outputs are cached. Items sharing a hash get the same tensor.

        Args:
            items: items from any number of requests.

        Returns:
            Per item, in order, [item.num_tokens, encoder.text_hidden_size].
        """
        found: dict[str, torch.Tensor] = {}
        to_encode: dict[str, MultiModalItem] = {}  # first item of each missing hash
        for item in items:
            key = item.content_hash
            if key in found or key in to_encode:
                continue
            cached = self.cache.get(key)
            if cached is None:
                to_encode[key] = item
            else:
                found[key] = cached
        self._stats.cache_hits += len(found)
        self._stats.cache_misses += len(to_encode)
        if to_encode:
            outputs = self.encoder.encode(list(to_encode.values()))
            self._stats.encoder_runs += 1
            self._stats.items_encoded += len(to_encode)
            for key, output in zip(to_encode, outputs, strict=True):
                if output.untyped_storage().nbytes() > output.numel() * output.element_size():
                    # A view into the whole batch's output: cache a compact copy so the
                    # entry does not pin the other items' memory.
                    output = output.clone()
                found[key] = output
                self.cache.put(key, output)
        return [found[item.content_hash] for item in items]

    @property
    def stats(self) -> RunnerStats:
        """A snapshot of the counters."""
        return replace(self._stats)
