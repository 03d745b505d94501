"""Training batches: conversations about rendered scenes -> Qwen2-VL model inputs.

Token ids are assembled piece by piece in the exact layout the chat template renders
(checked against it by :func:`check_against_template`), so the loss mask can cover
precisely each assistant reply and its ``<|im_end|>``; pixels go through the HF image and
video processors of the model folder, the same preprocessing inference uses.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from training import shapes
from training.model_files import SYSTEM_PROMPT

IGNORE = -100  # label of positions that carry no loss
IMAGE_TOKENS = (shapes.IMAGE_SIZE // 28) ** 2  # merged tokens of one image
VIDEO_TOKENS = (shapes.VIDEO_FRAMES // 2) * (shapes.VIDEO_SIZE // 28) ** 2


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], IGNORE outside assistant replies
    media: dict[str, torch.Tensor]  # pixel_values / image_grid_thw / *_videos
    mm_token_type_ids: torch.Tensor  # [B, L] 0 text, 1 image, 2 video (HF's M-RoPE input)
    vision_labels: TokenLabels  # per merged vision token, for the auxiliary loss

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
            **self.media,
        }


# Row-major 3 x 3 cell of each position: the merged vision tokens come in this order.
CELL_OF = {"top": 1, "left": 3, "center": 4, "right": 5, "bottom": 7}
COLOR_NAMES = (*shapes.SHAPE_COLORS, *shapes.BACKGROUNDS)
GRID = shapes.IMAGE_SIZE // 28  # merged tokens per side; one token covers 28 x 28 px


@dataclass
class TokenLabels:
    """What each merged vision token shows, for the auxiliary vision loss of train.py.

    One entry per merged token of the batch, images first, then videos, each in the
    model's token order (frame pair, then row-major cell). Read off the scene parameters,
    like the captions.
    """

    kinds: torch.Tensor  # shape index, len(SHAPES) where no shape is
    colors: torch.Tensor  # index in COLOR_NAMES; the background's where no shape is
    motions: torch.Tensor  # index in DIRECTIONS where a shape moves, len(DIRECTIONS) else


def _image_labels(scene: shapes.ImageScene) -> list[tuple[int, int, int]]:
    still = len(shapes.DIRECTIONS)
    out = [(len(shapes.SHAPES), COLOR_NAMES.index(scene.background), still)] * GRID**2
    for s in scene.shapes:
        out[CELL_OF[s.position]] = (shapes.SHAPES.index(s.kind), COLOR_NAMES.index(s.color), still)
    return out


def _video_labels(scene: shapes.VideoScene) -> list[tuple[int, int, int]]:
    """A token of frame pair g shows the shape if its centre is in that cell in either frame."""
    empty = (len(shapes.SHAPES), COLOR_NAMES.index(scene.background), len(shapes.DIRECTIONS))
    moving = (
        shapes.SHAPES.index(scene.shape.kind),
        COLOR_NAMES.index(scene.shape.color),
        shapes.DIRECTIONS.index(scene.direction),
    )
    track = shapes.video_track(scene)
    out = []
    for g in range(shapes.VIDEO_FRAMES // 2):
        cells = [empty] * GRID**2
        for x, y in track[2 * g : 2 * g + 2]:
            cells[min(y // 28, GRID - 1) * GRID + min(x // 28, GRID - 1)] = moving
        out += cells
    return out


def token_labels(examples: list[shapes.Example]) -> TokenLabels:
    rows = [t for ex in examples if ex.kind == "image" for t in _image_labels(ex.scene)]
    rows += [t for ex in examples if ex.kind == "video" for t in _video_labels(ex.scene)]
    table = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
    return TokenLabels(table[:, 0], table[:, 1], table[:, 2])


class BatchBuilder:
    """Turns examples into a Batch with one tokenizer and the folder's processors."""

    def __init__(self, tok: Tokenizer, processor: Any) -> None:
        self.tok = tok
        self.processor = processor  # transformers Qwen2VLProcessor of the model folder
        self.pad_id = tok.token_to_id("<|endoftext|>")
        self.image_pad = tok.token_to_id("<|image_pad|>")
        self.video_pad = tok.token_to_id("<|video_pad|>")

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one builder per run; texts repeat a lot
    def _ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok.encode(text, add_special_tokens=False).ids)

    def conversation_ids(self, ex: shapes.Example, system: bool) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one conversation, media placeholders expanded."""
        ids: list[int] = []
        labels: list[int] = []

        def add(text: str, train: bool) -> None:
            piece = self._ids(text)
            ids.extend(piece)
            labels.extend(piece if train else [IGNORE] * len(piece))

        if system:
            add(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n", False)
        for i, turn in enumerate(ex.turns):
            add("<|im_start|>user\n", False)
            if i == 0:
                pad, count = (
                    (self.image_pad, IMAGE_TOKENS)
                    if ex.kind == "image"
                    else (self.video_pad, VIDEO_TOKENS)
                )
                add("<|vision_start|>", False)
                ids.extend([pad] * count)
                labels.extend([IGNORE] * count)
                add("<|vision_end|>", False)
            add(f"{turn.prompt}<|im_end|>\n<|im_start|>assistant\n", False)
            add(f"{turn.answer}<|im_end|>", True)
            add("\n", False)
        return ids, labels

    def build(
        self, examples: list[shapes.Example], rng: random.Random, noise_std: float = 0.0
    ) -> Batch:
        """Collate; with ``noise_std`` > 0 half of the media get Gaussian pixel noise
        (robustness to compression artefacts of real image and video files)."""
        rows = [self.conversation_ids(ex, system=rng.random() < 0.15) for ex in examples]
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            mask[r, : len(ids)] = 1
        images, videos = [], []
        for ex in examples:
            pixels = np.asarray(shapes.render(ex))
            if noise_std > 0 and rng.random() < 0.5:
                noise = np.random.default_rng(rng.getrandbits(32)).normal(
                    0, noise_std, pixels.shape
                )
                pixels = np.clip(pixels + noise, 0, 255).astype(np.uint8)
            if ex.kind == "image":
                images.append(Image.fromarray(pixels))
            else:
                videos.append(pixels)
        media: dict[str, torch.Tensor] = {}
        if images:
            media.update(self.processor.image_processor(images=images, return_tensors="pt"))
        if videos:
            out = self.processor.video_processor(
                videos=videos, return_tensors="pt", do_sample_frames=False
            )
            media.update(out)
        types = (input_ids == self.image_pad).long() + 2 * (input_ids == self.video_pad).long()
        return Batch(input_ids, mask, labels, dict(media), types, token_labels(examples))

    def check_against_template(self, hf_tokenizer: Any, ex: shapes.Example) -> None:
        """Asserts that the pieced-together ids equal the chat template's rendering."""
        kind = ex.kind
        messages = []
        for i, turn in enumerate(ex.turns):
            content = [{"type": kind}] if i == 0 else []
            content.append({"type": "text", "text": turn.prompt})
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": turn.answer})
        text = hf_tokenizer.apply_chat_template(messages, tokenize=False)
        want = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        ids, _ = self.conversation_ids(ex, system=False)
        pad = self.image_pad if kind == "image" else self.video_pad
        collapsed = [t for j, t in enumerate(ids) if t != pad or ids[j - 1] != pad]
        assert collapsed == want, "training ids differ from the chat template's"
