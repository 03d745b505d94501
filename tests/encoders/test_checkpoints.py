"""The factory on whole checkpoint folders (config.json + safetensors with the LLM's
weights) against HF's conditional-generation models loaded from the same folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from encoders import build_vision_encoder
from processors.types import MultiModalItem
from tests.encoders.reference import assert_matches, pooled
from tests.fixtures.checkpoints import build_vlm_checkpoint

torch.set_num_threads(1)


def load_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((folder / "config.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard))
    return config, weights


def hf_model(folder: Path, family: str) -> torch.nn.Module:
    import transformers

    cls = {
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "llava": transformers.LlavaForConditionalGeneration,
    }[family]
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("layout", ["hub", "v5"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_checkpoint_images_and_video_match_hf(tmp_path, family, layout) -> None:
    folder = build_vlm_checkpoint(family, tmp_path, layout=layout)
    config, weights = load_folder(folder)
    encoder = build_vision_encoder(config, weights, torch.float32, torch.device("cpu"))
    vision = config["vision_config"]
    patch_dim = 3 * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    gen = torch.Generator().manual_seed(0)
    grids = {"image": (1, 6, 10), "video": (2, 4, 4)}
    items = [
        MultiModalItem(
            mod, mod, torch.randn(t * h * w, patch_dim, generator=gen), t * h * w // 4, g
        )
        for mod, g in grids.items()
        for t, h, w in [g]
    ]
    outs = encoder.encode(items)
    model = hf_model(folder, family)
    with torch.no_grad():
        image = pooled(
            model.get_image_features(items[0].pixel_values, torch.tensor([grids["image"]]))
        )
        video = pooled(
            model.get_video_features(items[1].pixel_values, torch.tensor([grids["video"]]))
        )
    assert_matches(outs[0], torch.cat(list(image)))
    assert_matches(outs[1], torch.cat(list(video)))


def test_llava_checkpoint_matches_hf(tmp_path) -> None:
    folder = build_vlm_checkpoint("llava", tmp_path)
    config, weights = load_folder(folder)
    encoder = build_vision_encoder(config, weights, torch.float32, torch.device("cpu"))
    vision = config["vision_config"]
    size = vision["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = (size // vision["patch_size"]) ** 2
    items = [MultiModalItem("image", str(i), pixels[i], tokens) for i in range(2)]
    outs = encoder.encode(items)
    model = hf_model(folder, "llava")
    with torch.no_grad():
        ref = pooled(
            model.get_image_features(
                pixel_values=pixels,
                vision_feature_layer=config["vision_feature_layer"],
                vision_feature_select_strategy=config["vision_feature_select_strategy"],
            )
        )
    for out, expected in zip(outs, ref):
        assert_matches(out, expected)
