"""OpenAI-style chat messages: pull images/videos out of content parts, in order."""

from __future__ import annotations

from typing import Any


def split_media(
    messages: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, list[Any]], dict[str, list[str | None]]]:
    """Return (messages for the chat template, media by kind, uuids by kind).

    Content parts ``image_url`` / ``image`` / ``input_image`` and ``video_url`` / ``video``
    become ``{"type": "image"}`` / ``{"type": "video"}`` (what HF chat templates expect);
    their sources (URL strings, or objects given directly) are collected in order.
    """
    media: dict[str, list[Any]] = {"image": [], "video": []}
    uuids: dict[str, list[str | None]] = {"image": [], "video": []}
    out = []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind in ("image_url", "image", "input_image"):
                media["image"].append(_source(part, "image"))
                uuids["image"].append(part.get("uuid"))
                parts.append({"type": "image"})
            elif kind in ("video_url", "video"):
                media["video"].append(_source(part, "video"))
                uuids["video"].append(part.get("uuid"))
                parts.append({"type": "video"})
            else:
                parts.append(part)
        out.append({**msg, "content": parts})
    media = {k: v for k, v in media.items() if v}
    uuids = {k: v for k, v in uuids.items() if k in media}
    return out, media, uuids


def _source(part: dict[str, Any], kind: str) -> Any:
    for key in (f"{kind}_url", kind, "url"):
        value = part.get(key)
        if value is None:
            continue
        if isinstance(value, dict):
            return value.get("url")
        return value
    raise ValueError(f"a {kind} content part has no {kind}_url")
