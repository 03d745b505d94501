"""Building blocks shared by the decoder models.

Each layer calls the matching function in ``mmkernels/``, which runs a Triton kernel on
CUDA tensors and the plain-torch reference elsewhere. Under ``torch.compile`` the runner
switches the element-wise layers to their torch form (``use_triton = False``) so the
compiler can fuse them, and attention becomes one opaque custom op.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mmengine.attention import (
    gemv_rope_attention_forward,
    paged_attention_forward,
    rotary_paged_attention_forward,
)
from mmengine.models import custom_ops  # noqa: F401  (registers mmengine::add_rms_norm)
from mmkernels.activation import silu_and_mul
from mmkernels.mlp_flow import mlp_flow_counters
from mmkernels.rms_norm import rms_norm
from mmkernels.rotary import apply_rotary


class RMSNorm(nn.Module):
    use_triton: bool | None = None  # None: Triton on CUDA tensors
    residual_as_custom_op = False  # under torch.compile: the add + norm as one opaque op
    residual_as_triton_op = False  # ... as a triton_op instead, on CUDA (`norm_triton_op`)
    # True for a norm that runs outside the compiled layers (the model's final norm): it
    # keeps the Triton kernel under torch.compile too, where its torch form would run as
    # ~7 uncompiled elementwise / reduction kernels.
    outside_compiled_region = False

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is not None and self.residual_as_custom_op:
            if self.residual_as_triton_op and x.is_cuda:
                return torch.ops.mmengine.add_rms_norm_triton(x, residual, self.weight, self.eps)
            return torch.ops.mmengine.add_rms_norm(x, residual, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps, residual, use_triton_kernel=self.use_triton)


class SiluAndMul(nn.Module):
    use_triton: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, 2I] -> [T, I]
        return silu_and_mul(x, use_triton_kernel=self.use_triton)


def _inv_freq(rotary_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    # Computed exactly as transformers does, so float32 cos/sin agree bit for bit.
    inv = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind in ("default", "mrope", None):
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])  # type: ignore[index]
    if kind == "llama3":
        assert scaling is not None
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding; 3-D M-RoPE when ``mrope_section`` is given."""

    use_triton: bool | None = None

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        scaling: dict[str, Any] | None = None,
        mrope_section: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.rotary_dim = head_dim
        self.mrope_section = mrope_section
        inv = _inv_freq(head_dim, base, scaling)
        # [max_position, D]: cos of every frequency, then sin (HF: position * inv_freq).
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv[None, :]
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] or [3, T] (M-RoPE); q: [T, Hq, D]; k: [T, Hk, D]
        return apply_rotary(q, k, positions, self.cos_sin_cache, mrope_section=self.mrope_section)


class PagedAttention(nn.Module):
    """Attention of this step's queries over the paged KV cache of one layer."""

    as_custom_op = False  # True under torch.compile: the compiler sees one opaque op

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hk, D]
        v: torch.Tensor,  # [T, Hk, D]
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:  # [T, Hq * D]
        if self.as_custom_op:
            out = torch.ops.mmengine.paged_attention(q, k, v, kv_cache[0], kv_cache[1], self.scale)
        else:
            out = paged_attention_forward(q, k, v, kv_cache[0], kv_cache[1], self.scale)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def forward_qkv(
        self,
        qkv: torch.Tensor,  # [T, (Hq + 2 Hk) D], the fused QKV projection's output
        positions: torch.Tensor,  # [T] or [3, T] (M-RoPE)
        rotary: RotaryEmbedding,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:  # [T, Hq * D]
        """Rotary, KV-cache write and attention from the un-split QKV output (one fused
        kernel before attention). Needs full-width rotary (rotary_dim == head_dim)."""
        args = (
            qkv,
            positions,
            rotary.cos_sin_cache,
            kv_cache[0],
            kv_cache[1],
            self.scale,
            self.num_heads,
            rotary.mrope_section,
        )
        if self.as_custom_op:
            out = torch.ops.mmengine.rotary_paged_attention(*args)
        else:
            out = rotary_paged_attention_forward(*args)
        return out.reshape(qkv.shape[0], self.num_heads * self.head_dim)

    def forward_gemv_qkv(
        self,
        x: torch.Tensor,  # [T, hidden]: the residual stream, T few
        qkv_proj: nn.Linear,
        norm: RMSNorm,  # the RMSNorm in front of the projection
        positions: torch.Tensor,  # [T] or [3, T] (M-RoPE)
        rotary: RotaryEmbedding,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:  # [T, Hq * D]
        """`forward_qkv` with the norm and the QKV projection fused in too: one GEMV launch
        (rotary and the KV-cache write in its epilogue) before attention."""
        args = (
            x,
            qkv_proj.weight,
            qkv_proj.bias,
            norm.weight,
            norm.eps,
            positions,
            rotary.cos_sin_cache,
            kv_cache[0],
            kv_cache[1],
            self.scale,
            self.num_heads,
            rotary.mrope_section,
        )
        if self.as_custom_op:
            out = torch.ops.mmengine.gemv_rope_paged_attention(*args)
        else:
            out = gemv_rope_attention_forward(*args)
        return out.reshape(x.shape[0], self.num_heads * self.head_dim)


def set_kernel_mode(
    model: nn.Module,
    compiled: bool,
    gemv_max_tokens: int = 0,
    gemv_rope: bool = True,
    norm_triton_op: bool = False,
    gemv_norm_out: bool = False,
    mlp_flow: bool = False,
) -> None:
    """Eager: Triton kernels for every layer. Compiled: torch forms the compiler fuses;
    attention, the residual add + norm and the few-token projections as custom ops (the
    add + norm as a triton_op when `norm_triton_op`). Steps of at most `gemv_max_tokens`
    tokens run the decoder layers' few-token path (0: off), with rotary and the KV write in
    the QKV projection's epilogue when `gemv_rope` and the post-attention norm in o_proj's
    launch when `gemv_norm_out` (each layer gets its int32 counter), and one-token steps
    run o_proj -> norm -> gate_up -> down as one launch when `mlp_flow` (counters too)."""
    for m in model.modules():
        if hasattr(m, "gemv_max_tokens"):
            m.gemv_max_tokens = gemv_max_tokens
            m.gemv_rope = gemv_rope
            m.gemv_as_custom_op = compiled
            m.gemv_norm_out = gemv_norm_out
            device = next(m.parameters()).device
            if gemv_norm_out and m.norm_out_counter is None:
                m.norm_out_counter = torch.zeros(1, dtype=torch.int32, device=device)
            m.mlp_flow = mlp_flow
            if mlp_flow and m.mlp_flow_counters is None:
                hidden, inter = m.down_proj.weight.shape
                m.mlp_flow_counters = mlp_flow_counters(hidden, inter, device)
        if isinstance(m, RMSNorm):
            m.residual_as_custom_op = compiled
            m.residual_as_triton_op = compiled and norm_triton_op
        if isinstance(m, RMSNorm) and m.outside_compiled_region:
            m.use_triton = None
        elif isinstance(m, (RMSNorm, SiluAndMul, RotaryEmbedding)):
            m.use_triton = False if compiled else None
        elif isinstance(m, PagedAttention):
            m.as_custom_op = compiled
