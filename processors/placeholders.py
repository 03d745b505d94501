"""Prompt placeholder expansion and per-prompt item limits.

The chat template leaves one placeholder token per multimodal item (`<|image_pad|>` /
`<|video_pad|>` for Qwen2-VL, `<image>` for LLaVA); each becomes `num_tokens` copies, one
per embedding row the encoder will produce, and the item learns where its run sits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from processors.errors import MediaLimitError, PlaceholderMismatchError
from processors.types import MultiModalItem, PlaceholderRange


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def expand_placeholders(
    token_ids: Sequence[int],
    items: Sequence[MultiModalItem],
    placeholder_token_ids: Mapping[str, int],
) -> list[int]:
    """Repeat each item's placeholder token `num_tokens` times and record its range.

    Items are matched to placeholders per modality, in order: the k-th image placeholder
    takes the k-th image item (items may be listed in prompt order or grouped by kind).
    Sets `item.placeholder` on every item.

    Args:
        token_ids: Prompt token ids with exactly one placeholder per item.
        items: Preprocessed items; `num_tokens` must be positive.
        placeholder_token_ids: Placeholder id per modality, e.g.
            {"image": image_pad_id, "video": video_pad_id} or {"image": image_token_id}.

    Returns:
        The expanded token ids.

    Raises:
        PlaceholderMismatchError: (400) placeholder and item counts differ for a modality,
            or an item's modality has no placeholder token.
    """
    queues: dict[str, list[MultiModalItem]] = {}
    for item in items:
        if item.modality not in placeholder_token_ids:
            raise PlaceholderMismatchError(f"This model does not accept {item.modality} inputs.")
        if item.num_tokens <= 0:
            raise PlaceholderMismatchError(f"A {item.modality} item produced no tokens.")
        queues.setdefault(item.modality, []).append(item)

    modality_of = {token: modality for modality, token in placeholder_token_ids.items()}
    found = Counter(modality_of[t] for t in token_ids if t in modality_of)
    for modality in placeholder_token_ids:
        given = len(queues.get(modality, []))
        if found[modality] != given:
            raise PlaceholderMismatchError(
                f"The prompt has {_plural(found[modality], modality + ' placeholder')} but "
                f"{_plural(given, modality)} {'was' if given == 1 else 'were'} given."
            )

    expanded: list[int] = []
    taken = dict.fromkeys(queues, 0)
    for token in token_ids:
        modality = modality_of.get(token)
        if modality is None:
            expanded.append(token)
            continue
        item = queues[modality][taken[modality]]
        taken[modality] += 1
        item.placeholder = PlaceholderRange(offset=len(expanded), length=item.num_tokens)
        expanded.extend([token] * item.num_tokens)
    return expanded


def count_items(items: Sequence[MultiModalItem]) -> dict[str, int]:
    """Number of items per modality."""
    return dict(Counter(item.modality for item in items))


def check_limit_mm_per_prompt(counts: Mapping[str, int], limits: Mapping[str, int]) -> None:
    """Refuse a prompt with more items of a modality than allowed.

    Args:
        counts: Items per modality in one prompt, e.g. {"image": 3}.
        limits: `limit_mm_per_prompt`, e.g. {"image": 4, "video": 1}; a modality missing
            from it is not accepted at all.

    Raises:
        MediaLimitError: (400) naming the modality and its limit.
    """
    for modality, count in counts.items():
        if count <= 0:
            continue
        limit = limits.get(modality, 0)
        if limit <= 0:
            raise MediaLimitError(
                f"{modality.capitalize()} inputs are not accepted by this server."
            )
        if count > limit:
            raise MediaLimitError(
                f"At most {_plural(limit, modality)} per prompt "
                f"{'is' if limit == 1 else 'are'} allowed; got {count}."
            )
