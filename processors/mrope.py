"""3-D M-RoPE position ids for Qwen2-VL and Qwen2.5-VL prompts.

Text tokens get the same position on all three axes (temporal, height, width), counting
up by one. A vision item's tokens get (t, h, w) grid coordinates offset by the position
where the item starts; for Qwen2.5-VL videos the temporal coordinate is scaled by
`tokens_per_second * second_per_grid_t` (quantized after scaling). The text after an
item continues from the item's start plus its larger spatial extent, which is what
transformers' `get_rope_index` does from 5.3 on; `continue_after_temporal=True` instead
continues after the item's largest coordinate on any axis, as the original Qwen2-VL
code, transformers < 5.3 and vLLM do. The two differ only when a video's scaled
temporal extent reaches its spatial extent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from processors.errors import PlaceholderMismatchError
from processors.types import MultiModalItem


def _vision_positions(
    item: MultiModalItem,
    start: int,
    spatial_merge_size: int,
    tokens_per_second: float | None,
    truncate_seconds: bool,
) -> torch.Tensor:
    """[3, num_tokens] positions of one item starting at `start`."""
    assert item.grid_thw is not None
    grid_t, grid_h, grid_w = item.grid_thw
    llm_h, llm_w = grid_h // spatial_merge_size, grid_w // spatial_merge_size
    if grid_t * llm_h * llm_w != item.num_tokens:
        raise PlaceholderMismatchError(
            f"A {item.modality} item's grid does not match its token count."
        )
    temporal = torch.arange(grid_t)
    if item.modality == "video" and tokens_per_second is not None:
        seconds = item.second_per_grid_t if item.second_per_grid_t is not None else 1.0
        if truncate_seconds:
            seconds = float(int(seconds))
        # float32 like HF's second_per_grid_ts tensor, so truncation agrees exactly.
        interval = torch.tensor(seconds, dtype=torch.float32) * tokens_per_second
        temporal = (temporal * interval).long()
    t_ids, h_ids, w_ids = torch.meshgrid(
        temporal + start, torch.arange(llm_h) + start, torch.arange(llm_w) + start, indexing="ij"
    )
    return torch.stack([t_ids, h_ids, w_ids]).reshape(3, -1)  # [3, t * h * w]


def mrope_positions(
    token_ids: Sequence[int],
    items: Sequence[MultiModalItem],
    *,
    spatial_merge_size: int,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    tokens_per_second: float | None = None,
    continue_after_temporal: bool = False,
    truncate_second_per_grid_t: bool = False,
) -> tuple[torch.Tensor, int]:
    """M-RoPE position ids for an expanded prompt, as HF's `get_rope_index` computes them.

    Args:
        token_ids: Prompt ids after placeholder expansion (each item's run of
            `num_tokens` image/video tokens in place).
        items: The prompt's items with grid_thw (and second_per_grid_t for Qwen2.5-VL
            video); matched to runs per modality in order; a set `placeholder` is checked.
        spatial_merge_size: vision_config.spatial_merge_size.
        image_token_id: config.image_token_id.
        video_token_id: config.video_token_id.
        vision_start_token_id: config.vision_start_token_id (accepted for signature
            parity with HF; runs are located by the image/video ids themselves).
        tokens_per_second: Qwen2.5-VL's vision_config.tokens_per_second; None for Qwen2-VL.
        continue_after_temporal: See the module docstring.
        truncate_second_per_grid_t: Truncate each video's second_per_grid_t to an int
            before scaling, as some transformers 5.x releases (5.17 among them) do; the
            default scales by the exact value and truncates after, as transformers 5.24,
            the original Qwen2.5-VL code and vLLM do.

    Returns:
        (positions [3, L] int64, mrope_delta) where decode position p uses p + delta.

    Raises:
        PlaceholderMismatchError: (400) runs and items disagree.
    """
    del vision_start_token_id
    modality_of = {image_token_id: "image", video_token_id: "video"}
    queues: dict[str, list[MultiModalItem]] = {"image": [], "video": []}
    for item in items:
        queues[item.modality].append(item)
    taken = {"image": 0, "video": 0}

    length = len(token_ids)
    positions = torch.empty(3, length, dtype=torch.long)
    ids = list(token_ids)
    current = 0
    i = 0
    while i < length:
        modality = modality_of.get(ids[i])
        if modality is None:
            j = i
            while j < length and ids[j] not in modality_of:
                j += 1
            positions[:, i:j] = torch.arange(current, current + j - i)
            current += j - i
            i = j
            continue
        if taken[modality] >= len(queues[modality]):
            raise PlaceholderMismatchError(
                f"The prompt has more {modality} tokens than {modality}s."
            )
        item = queues[modality][taken[modality]]
        taken[modality] += 1
        n = item.num_tokens
        if item.placeholder is not None and item.placeholder.offset != i:
            raise PlaceholderMismatchError(f"A {modality} item is not where its placeholder says.")
        if ids[i : i + n] != [ids[i]] * n:
            raise PlaceholderMismatchError(f"A {modality} run is shorter than its item's tokens.")
        block = _vision_positions(
            item, current, spatial_merge_size, tokens_per_second, truncate_second_per_grid_t
        )
        positions[:, i : i + n] = block
        if continue_after_temporal:
            current = int(block.max()) + 1
        else:
            _, grid_h, grid_w = item.grid_thw  # type: ignore[misc]
            current += max(grid_h, grid_w) // spatial_merge_size
        i += n
    for modality, queue in queues.items():
        if taken[modality] != len(queue):
            raise PlaceholderMismatchError(f"Some {modality} items have no tokens in the prompt.")
    delta = (int(positions.max()) + 1 - length) if length else 0
    return positions, delta


def mrope_decode_positions(delta: int, start: int, length: int) -> torch.Tensor:
    """Positions of tokens at sequence indices [start, start + length) after the prompt.

    Returns:
        [3, length] int64, every row `index + delta`.
    """
    return (torch.arange(start, start + length) + delta).unsqueeze(0).expand(3, -1).contiguous()
