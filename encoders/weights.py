"""Strict loading of an encoder's weights from a mapping of checkpoint tensor names."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

_MAX_NAMES_IN_ERROR = 20

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class WeightLayout:
    """How one encoder's parameters map onto checkpoint tensor names."""

    # Checkpoint key -> the module's local parameter name, or None when the key belongs to
    # someone else (the LLM, another tower). Absorbs every accepted prefix layout.
    to_local: Callable[[str], str | None]
    # Local parameter suffix fused at load -> the checkpoint suffixes concatenated on dim 0
    # to build it (e.g. "qkv_proj.weight" <- q_proj, k_proj, v_proj).
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Local names that are the encoder's own but unused (e.g. CLIP's post-layernorm, layers
    # past the selected feature layer): skipped instead of reported as unexpected.
    ignored: Callable[[str], bool] = lambda name: False
    # Local name -> the hub-layout checkpoint key, used to name missing tensors in errors.
    to_hub: Callable[[str], str] = lambda name: name


def _sources(param_name: str, fused: Mapping[str, tuple[str, ...]]) -> list[str]:
    for suffix, parts in fused.items():
        if param_name == suffix or param_name.endswith("." + suffix):
            stem = param_name[: len(param_name) - len(suffix)]
            return [stem + part for part in parts]
    return [param_name]


def _names(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:_MAX_NAMES_IN_ERROR])
    more = len(names) - _MAX_NAMES_IN_ERROR
    return shown + (f" (and {more} more)" if more > 0 else "")


@torch.no_grad()
def load_weights(
    module: nn.Module, weights: Mapping[str, torch.Tensor], layout: WeightLayout
) -> None:
    """Copies checkpoint tensors into every parameter of `module`, converting dtype/device.

    Only the keys `layout.to_local` claims are read, so `weights` may be a lazy mapping
    holding the whole checkpoint (LLM included).

    Raises:
        ValueError: naming the missing checkpoint tensors, the unexpected ones (claimed by
            this encoder's prefix but matching no parameter), or a shape mismatch.
    """
    local_to_key: dict[str, str] = {}
    for key in weights:
        name = layout.to_local(key)
        if name is not None:
            local_to_key[name] = key

    claimed: set[str] = set()
    missing: list[str] = []
    for param_name, param in module.named_parameters():
        sources = _sources(param_name, layout.fused)
        claimed.update(sources)
        absent = [s for s in sources if s not in local_to_key]
        if absent:
            missing.extend(absent)
            continue
        parts = [weights[local_to_key[s]] for s in sources]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tensor.shape != param.shape:
            raise ValueError(
                f"vision weight {', '.join(local_to_key[s] for s in sources)} has shape "
                f"{tuple(tensor.shape)}, expected {tuple(param.shape)} for {param_name}"
            )
        param.copy_(tensor)

    unexpected = [
        key
        for name, key in local_to_key.items()
        if name not in claimed and not layout.ignored(name)
    ]
    errors = []
    if missing:
        errors.append(f"missing vision weights: {_names([layout.to_hub(m) for m in missing])}")
    if unexpected:
        errors.append(f"unexpected vision weights: {_names(unexpected)}")
    if errors:
        raise ValueError("; ".join(errors))


def build_on_device(
    factory: Callable[[], ModuleT], dtype: torch.dtype, device: torch.device
) -> ModuleT:
    """Constructs a module without initializing its weights, then allocates it on `device`.

    Random init of a 600M-parameter tower costs seconds and is overwritten by the load.
    Parameters come back uninitialized: load every one of them afterwards.
    """
    with torch.device("meta"):
        module = factory()
    return module.to(dtype=dtype).to_empty(device=device)
