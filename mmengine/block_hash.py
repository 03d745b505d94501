"""Chained, collision-resistant hashes of full KV blocks.

A block's hash covers (parent block hash, the block's token ids, extra keys). Extra keys
name what the token ids alone do not: for every multimodal item overlapping the block,
``(item content hash, item offset relative to the block start)`` — so two images whose
placeholder token ids are identical never share KV.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from mmengine.request import MMPosition

BlockHash = bytes
ExtraKeys = tuple[tuple[str, int], ...]
# Everything a block hash is computed from; kept on cached blocks to confirm hits.
HashKey = tuple[BlockHash | None, tuple[int, ...], ExtraKeys]


def _encode_ints(values: Sequence[int]) -> bytes:
    # Length-prefixed, fixed-width little-endian: no two token lists encode alike.
    return struct.pack(f"<Q{len(values)}q", len(values), *values)


def _encode_str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def hash_block(key: HashKey) -> BlockHash:
    """128-bit BLAKE2b digest of a type-tagged, length-prefixed encoding of one block."""
    parent, token_ids, extra = key
    h = hashlib.blake2b(digest_size=16)
    h.update(b"P" + (parent if parent is not None else b"\x00" * 16))
    h.update(b"T" + _encode_ints(token_ids))
    h.update(b"X" + struct.pack("<Q", len(extra)))
    for content_hash, offset in extra:
        h.update(b"M" + _encode_str(content_hash) + struct.pack("<q", offset))
    return h.digest()


def mm_extra_keys(mm_positions: Sequence[MMPosition], start: int, end: int) -> ExtraKeys:
    """(item hash, item offset - block start) for every item overlapping [start, end)."""
    return tuple(
        (p.content_hash, p.offset - start)
        for p in mm_positions
        if p.offset < end and p.offset + p.length > start
    )


def extend_block_hashes(
    hashes: list[BlockHash],
    keys: list[HashKey],
    token_ids: Sequence[int],
    block_size: int,
    mm_positions: Sequence[MMPosition] = (),
) -> None:
    """Append the key and hash of every newly full block of ``token_ids``."""
    while (len(hashes) + 1) * block_size <= len(token_ids):
        start = len(hashes) * block_size
        tokens = tuple(token_ids[start : start + block_size])
        extra = mm_extra_keys(mm_positions, start, start + block_size)
        key: HashKey = (hashes[-1] if hashes else None, tokens, extra)
        keys.append(key)
        hashes.append(hash_block(key))
