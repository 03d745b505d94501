"""LLaVA-1.5 image encoder (CLIP ViT + projector) against HF's get_image_features."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from encoders import build_vision_encoder
from encoders.llava import LlavaVisionEncoder
from processors.types import MultiModalItem
from tests.encoders.reference import assert_matches, llava_layouts, pooled, randomize_

torch.set_num_threads(1)

IMAGE, PATCH = 16, 4  # 4 x 4 = 16 patches per image
TEXT_HIDDEN = 24


def hub_config(strategy: str = "default", layer: int | list[int] = -2) -> dict:
    """A hub-style LLaVA config.json: text hidden size and CLIP's act are left implicit."""
    return {
        "model_type": "llava",
        "vision_feature_layer": layer,
        "vision_feature_select_strategy": strategy,
        "projector_hidden_act": "gelu",
        "text_config": {"model_type": "llama", "vocab_size": 100},
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": IMAGE,
            "patch_size": PATCH,
        },
    }


def hf_llava(strategy: str, layer: int | list[int] = -2) -> LlavaForConditionalGeneration:
    vision = {k: v for k, v in hub_config()["vision_config"].items() if k != "model_type"}
    text = LlamaConfig(
        hidden_size=TEXT_HIDDEN,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=100,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
    )
    model = LlavaForConditionalGeneration(config).eval()
    randomize_(model, seed=3)
    return model


@pytest.fixture(scope="module")
def hf_default() -> LlavaForConditionalGeneration:
    return hf_llava("default")


def hf_features(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    config = model.config
    with torch.no_grad():
        out = model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
    out = pooled(out)
    return torch.stack(list(out)) if isinstance(out, list | tuple) else out


def images(n: int, seed: int = 0) -> list[MultiModalItem]:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, IMAGE, IMAGE, generator=gen)
    return [MultiModalItem("image", f"img{i}", pixels[i], 16) for i in range(n)]


def build(config: dict, weights: dict) -> LlavaVisionEncoder:
    enc = build_vision_encoder(config, weights, torch.float32, torch.device("cpu"))
    assert isinstance(enc, LlavaVisionEncoder)
    return enc


@pytest.mark.parametrize(
    "layout", ["hub", "v5_state_dict", "v5_state_dict_vision_model", "v5_saved"]
)
def test_one_image_matches_hf_in_every_weight_layout(hf_default, layout) -> None:
    enc = build(hub_config(), llava_layouts(hf_default.state_dict())[layout])
    (item,) = images(1)
    (out,) = enc.encode([item])
    ref = hf_features(hf_default, item.pixel_values[None])[0]
    assert out.shape == (16, TEXT_HIDDEN)  # CLS dropped: one row per patch
    assert_matches(out, ref)


def test_batched_images_match_hf_and_one_by_one(hf_default) -> None:
    enc = build(hub_config(), llava_layouts(hf_default.state_dict())["hub"])
    items = images(3, seed=1)
    batched = enc.encode(items)
    ref = hf_features(hf_default, torch.stack([item.pixel_values for item in items]))
    for i, item in enumerate(items):
        assert_matches(batched[i], ref[i])
        assert_matches(batched[i], enc.encode([item])[0])


def test_full_strategy_keeps_cls_and_transformers_v5_config_loads() -> None:
    model = hf_llava("full")
    enc = build(model.config.to_dict(), llava_layouts(model.state_dict())["v5_state_dict"])
    item = MultiModalItem("image", "a", images(1)[0].pixel_values, 17)
    (out,) = enc.encode([item])
    assert out.shape == (17, TEXT_HIDDEN)
    assert_matches(out, hf_features(model, item.pixel_values[None])[0])


def test_list_of_feature_layers_concatenates_them_as_hf_does() -> None:
    model = hf_llava("default", layer=[-3, -1])
    enc = build(hub_config(layer=[-3, -1]), llava_layouts(model.state_dict())["hub"])
    (item,) = images(1, seed=2)
    ref = hf_features(model, item.pixel_values[None])[0]
    assert_matches(enc.encode([item])[0], ref)


def test_truncated_tower_skips_later_layers_but_rejects_unknown_ones(hf_default) -> None:
    weights = llava_layouts(hf_default.state_dict())["hub"]
    enc = build(hub_config(), weights)  # layer 2 and post_layernorm exist but are unused
    assert len(enc.vision_tower.encoder.layers) == 2
    weights["vision_tower.vision_model.encoder.layers.3.mlp.fc1.bias"] = torch.zeros(64)
    with pytest.raises(ValueError, match=r"unexpected vision weights: .*layers\.3\.mlp\.fc1"):
        build(hub_config(), weights)


def test_missing_projector_weight_is_named(hf_default) -> None:
    weights = llava_layouts(hf_default.state_dict())["hub"]
    del weights["multi_modal_projector.linear_1.bias"]
    del weights["vision_tower.vision_model.encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError) as err:
        build(hub_config(), weights)
    assert "multi_modal_projector.linear_1.bias" in str(err.value)
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.k_proj.weight" in str(err.value)


def test_image_of_the_wrong_size_is_rejected(hf_default) -> None:
    enc = build(hub_config(), llava_layouts(hf_default.state_dict())["hub"])
    item = MultiModalItem("image", "a", torch.zeros(3, IMAGE, IMAGE + 4), 16)
    with pytest.raises(ValueError, match="pixel_values shape"):
        enc.encode([item])


def test_uint8_image_with_a_pixel_norm_encodes_like_its_float_twin(hf_default) -> None:
    from processors.transforms import fused_norm

    enc = build(hub_config(), llava_layouts(hf_default.state_dict())["hub"])
    norm = fused_norm(1 / 255, [0.5, 0.4, 0.3], [0.2, 0.3, 0.25], channel_axis=0)
    gen = torch.Generator().manual_seed(4)
    raw = torch.randint(0, 256, (3, IMAGE, IMAGE), generator=gen, dtype=torch.uint8)
    item = MultiModalItem("image", "u", raw, 16, pixel_norm=norm)
    twin = MultiModalItem("image", "f", item.normalized_pixels(), 16)
    assert torch.equal(enc.encode([item])[0], enc.encode([twin])[0])
