"""Collision-resistant content hashes for multimodal items (prefix and embedding cache keys).

A digest covers a length-prefixed, type-tagged encoding of (modality, preprocessing
parameters, size, bytes or pixels), so no two different inputs share an encoding: a
field boundary can never be shifted into the next field. BLAKE3 with a 256-bit digest
(cryptographic, and ~7x faster than BLAKE2b on a 720p frame: hashing is on the
preprocessing path of every item); the pixel bytes are streamed in, never copied.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import blake3
import torch

_UUID_PREFIX = "uuid-"  # computed digests are bare hex, so a uuid key can never equal one


def _field(tag: bytes, payload: bytes) -> bytes:
    # 1-byte tag + 8-byte big-endian length + payload.
    return tag + struct.pack(">Q", len(payload)) + payload


def _encode(value: Any) -> bytes:
    """Canonical, type-tagged bytes of a parameter value."""
    if value is None:
        return _field(b"N", b"")
    if isinstance(value, bool):
        return _field(b"B", b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return _field(b"I", str(value).encode())
    if isinstance(value, float):
        return _field(b"F", struct.pack(">d", value))
    if isinstance(value, str):
        return _field(b"S", value.encode("utf-8"))
    if isinstance(value, bytes):
        return _field(b"Y", value)
    if isinstance(value, (list, tuple)):
        return _field(b"L", b"".join(_encode(v) for v in value))
    if isinstance(value, Mapping):
        items = sorted((str(k), v) for k, v in value.items())
        return _field(b"M", b"".join(_encode(k) + _encode(v) for k, v in items))
    raise TypeError(f"cannot hash parameter of type {type(value).__name__}")


def _update_data(hasher: blake3.blake3, data: bytes | torch.Tensor) -> None:
    """Feed the encoded media (or pixels, with dtype and shape) without extra copies."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        hasher.update(b"D" + struct.pack(">Q", view.nbytes))
        hasher.update(view)
        return
    if isinstance(data, torch.Tensor):
        tensor = data.detach().to("cpu").contiguous()
        header = _encode(str(tensor.dtype)) + _encode(list(tensor.shape))
        raw = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
        nbytes = len(raw)
        hasher.update(b"P" + struct.pack(">Q", len(header) + 9 + nbytes) + header)
        hasher.update(b"R" + struct.pack(">Q", nbytes))
        hasher.update(memoryview(raw))
        return
    raise TypeError(f"cannot hash media of type {type(data).__name__}")


def content_hash(
    modality: str,
    data: bytes | torch.Tensor,
    params: Mapping[str, Any],
    *,
    uuid: str | None = None,
) -> str:
    """Name one multimodal item by its content and how it was preprocessed.

    Args:
        modality: "image" or "video".
        data: The encoded source bytes when known (cheapest and exact), else the decoded
            pixels (any tensor; dtype and shape are part of the hash).
        params: Preprocessing parameters that change the encoder's input (model family,
            sizes, mean/std, sampling...). Values: None, bool, int, float, str, bytes,
            lists/tuples and mappings of those.
        uuid: A caller-chosen identifier; when given it replaces the content (the caller
            vouches that equal uuids mean equal media) and the result is prefixed "uuid-".

    Returns:
        64 hex characters (256-bit BLAKE3), or "uuid-" followed by 64 hex characters.
    """
    hasher = blake3.blake3()
    hasher.update(_encode(modality))
    hasher.update(_encode(dict(params)))
    if uuid is not None:
        hasher.update(_field(b"U", uuid.encode("utf-8")))
        return _UUID_PREFIX + hasher.hexdigest()
    _update_data(hasher, data)
    return hasher.hexdigest()
