"""HF reference towers with random weights, checkpoint-name layouts, and item builders
shared by the encoder tests."""

from __future__ import annotations

import torch
from torch import nn

from processors.types import MultiModalItem

# Weights drawn at this scale make attention far from uniform (FIXTURES.md pitfall 2), so
# wrong positions, windows or segment boundaries move the outputs visibly.
WEIGHT_STD = 0.1
TOL = 1e-5  # float32: allowed |ours - HF| is TOL + TOL * |HF| per element

# Tiny Qwen geometry: 4-pixel patches, 2 frames per temporal patch, 2 x 2 merge.
PATCH, TEMPORAL, MERGE = 4, 2, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH


def randomize_(module: nn.Module, seed: int = 0, std: float = WEIGHT_STD) -> None:
    """Redraws every parameter: norm weights around 1, everything else around 0."""
    gen = torch.Generator().manual_seed(seed)
    norm_types = (nn.LayerNorm,)
    with torch.no_grad():
        for mod in module.modules():
            is_norm = isinstance(mod, norm_types) or "RMSNorm" in type(mod).__name__
            for name, param in mod.named_parameters(recurse=False):
                noise = std * torch.randn(param.shape, generator=gen)
                param.copy_(1 + noise if is_norm and name == "weight" else noise)


def assert_matches(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """Float32 agreement within TOL (absolute, plus TOL relative for large activations:
    float32 sums of ~1000 products differ in their last bits with the summation order)."""
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=TOL)


def pooled(output: object) -> object:
    """HF >= 5.x returns a ModelOutput with pooler_output; earlier versions the tensor."""
    return getattr(output, "pooler_output", output)


def qwen_item(
    key: str, grid: tuple[int, int, int], seed: int, modality: str = "image"
) -> MultiModalItem:
    """A Qwen-family item with random pixel values of the shape the processor emits."""
    t, h, w = grid
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(t * h * w, PATCH_DIM, generator=gen)
    return MultiModalItem(modality, key, pixels, t * h * w // MERGE**2, grid)


def qwen_hf_reference(
    tower: nn.Module, items: list[MultiModalItem], one_by_one: bool = False
) -> list[torch.Tensor]:
    """Runs HF's vision tower on the items (packed like get_image_features, or one by one)."""
    groups = [[item] for item in items] if one_by_one else [items]
    outputs: list[torch.Tensor] = []
    with torch.no_grad():
        for group in groups:
            pixels = torch.cat([item.pixel_values for item in group])
            grid = torch.tensor([item.grid_thw for item in group])
            merged = pooled(tower(pixels, grid_thw=grid))
            outputs.extend(merged.split([item.num_tokens for item in group]))
    return outputs


def qwen_hub_weights(tower: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's tensors under hub names (`visual.*`), next to some LLM tensors."""
    weights = {"visual." + k: v for k, v in tower.state_dict().items()}
    weights.update(llm_decoys("model.layers.0.", "lm_head."))
    return weights


def qwen_v5_weights(tower: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's tensors under transformers-5 names (`model.visual.*`)."""
    weights = {"model.visual." + k: v for k, v in tower.state_dict().items()}
    weights.update(llm_decoys("model.language_model.layers.0.", "lm_head."))
    return weights


def llm_decoys(*prefixes: str) -> dict[str, torch.Tensor]:
    """Tensors of the LLM that a vision loader must skip."""
    return {p + "weight": torch.zeros(2, 2) for p in prefixes}


def llava_layouts(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A LlavaForConditionalGeneration state dict renamed to each accepted key layout."""
    tower: dict[str, torch.Tensor] = {}
    projector: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("model.")
        if key.startswith("vision_tower."):
            tower[key.removeprefix("vision_tower.").removeprefix("vision_model.")] = value
        elif key.startswith("multi_modal_projector."):
            projector[key.removeprefix("multi_modal_projector.")] = value

    def layout(tower_prefix: str, projector_prefix: str, llm: str) -> dict[str, torch.Tensor]:
        out = {tower_prefix + k: v for k, v in tower.items()}
        out.update({projector_prefix + k: v for k, v in projector.items()})
        out.update(llm_decoys(llm + "layers.0.", "lm_head."))
        return out

    return {
        "hub": layout("vision_tower.vision_model.", "multi_modal_projector.", "language_model."),
        "v5_state_dict": layout(
            "model.vision_tower.", "model.multi_modal_projector.", "model.language_model."
        ),
        "v5_state_dict_vision_model": layout(
            "model.vision_tower.vision_model.",
            "model.multi_modal_projector.",
            "model.language_model.",
        ),
        "v5_saved": layout("vision_tower.", "multi_modal_projector.", "model.language_model."),
    }
