"""Building blocks shared by the vision encoders: activations, norms, patch embedding,
rotary helpers and attention over packed variable-length segments."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encoders.staging import host_to_device
from mmkernels import segment_attention as short_segments


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # The GPT-2 formula; differs from torch's tanh GELU in the last bits, so keep it exact.
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


# The activation names HF configs use, mapped to the exact function HF applies for them.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_new,
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Returns the activation function HF names `name`.

    Raises:
        ValueError: if the name is not one the encoders support.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as Qwen2.5-VL does."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class PatchLinear(nn.Module):
    """A convolution whose stride equals its kernel, run as one matmul over flat patches.

    The weight keeps the checkpoint's convolution shape ([out, in, *kernel]) so it loads
    under its checkpoint name without reshaping; the flattening is a free view.
    """

    def __init__(self, out_dim: int, kernel_shape: Sequence[int], bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, *kernel_shape))
        self.bias = nn.Parameter(torch.empty(out_dim)) if bias else None

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # patches: [..., prod(kernel_shape)] flattened in the weight's (in, *kernel) order
        return F.linear(patches, self.weight.flatten(1), self.bias)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (the half-split rotary convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates `x` in float32 (as HF's vision towers do, even in bf16) and casts back.

    Args:
        x: [..., head_dim] queries and/or keys.
        cos, sin: float32 tables broadcastable to `x`.
    """
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


@dataclass
class SegmentPlan:
    """How to run block-diagonal attention over tokens packed from several segments.

    Segments of equal length are attended as one batched SDPA call with no mask, so each
    call can take SDPA's fast (flash / memory-efficient) paths. When lengths differ, the
    tokens are first gathered so each length group is contiguous, and each group's output
    is scattered back to packed order.
    Built once per forward and shared by every layer using the same segmentation.
    """

    num_tokens: int  # total packed tokens N
    # (segment length, number of segments) per group, in the order of the gathered tokens.
    groups: list[tuple[int, int]]
    # [N] packed index of each token in group order; None when packed order already is.
    gather_index: torch.Tensor | None
    # On CUDA: [S + 1] int32 segment boundaries, for one variable-length flash-attention
    # call (fp16/bf16); the grouped SDPA path above serves CPU and float32.
    cu_seqlens: torch.Tensor | None = None
    max_len: int = 0
    # On CUDA, segments of at most mmkernels.segment_attention.MAX_SEGMENT tokens go to that
    # kernel instead of the variable-length flash call (opt-in until measured end to end).
    short_kernel: bool = False

    @classmethod
    def from_lengths(
        cls, lengths: Sequence[int], device: torch.device, short_kernel: bool = False
    ) -> SegmentPlan:
        """Plans attention for consecutive segments of the given lengths (zeros are skipped)."""
        lengths = [int(n) for n in lengths if n > 0]
        num_tokens = sum(lengths)
        cu_seqlens = None
        if device.type == "cuda" and lengths:
            bounds = [0]
            for n in lengths:
                bounds.append(bounds[-1] + n)
            cu_seqlens = host_to_device(torch.tensor(bounds, dtype=torch.int32), device)
        max_len = max(lengths, default=0)
        distinct = sorted(set(lengths))
        if len(distinct) <= 1:
            groups = [(distinct[0], len(lengths))] if distinct else []
            return cls(num_tokens, groups, None, cu_seqlens, max_len, short_kernel)
        sizes = torch.tensor(lengths)  # [S]
        starts = sizes.cumsum(0) - sizes  # [S] first token of each segment
        by_size = torch.argsort(sizes, stable=True)  # segments grouped by length, in order
        sorted_sizes = sizes[by_size]
        # Token t of the k-th segment in group order sits at starts[by_size[k]] + t.
        first = torch.repeat_interleave(starts[by_size], sorted_sizes)  # [N]
        group_start = torch.repeat_interleave(sorted_sizes.cumsum(0) - sorted_sizes, sorted_sizes)
        gather = first + torch.arange(num_tokens) - group_start  # [N]
        counts = torch.unique_consecutive(sorted_sizes, return_counts=True)[1]
        groups = list(zip(distinct, counts.tolist()))
        gather_t = host_to_device(gather, device)
        return cls(num_tokens, groups, gather_t, cu_seqlens, max_len, short_kernel)


def segment_attention(qkv: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """Non-causal attention where each token attends only within its own segment.

    Args:
        qkv: [N, 3, H, D] queries, keys, values of the packed tokens.
        plan: the segmentation of the N tokens.

    Returns:
        [N, H * D] attention output in packed token order.
    """
    num_tokens, _, num_heads, head_dim = qkv.shape
    if plan.cu_seqlens is not None and _varlen_ok(qkv):
        if plan.short_kernel and short_segments.supports(plan.max_len, head_dim):
            return short_segments.segment_attention(qkv, plan.cu_seqlens, plan.max_len)
        return _varlen_attention(qkv, plan)
    gather = plan.gather_index
    if gather is None:
        out = None  # the groups' outputs are already in packed order: concatenate them
    else:
        qkv = qkv.index_select(0, gather)
        out = qkv.new_empty(num_tokens, num_heads * head_dim)
    pieces = []
    start = 0
    for size, count in plan.groups:
        # chunk: [count, size, 3, H, D] -> q, k, v: [count, H, size, D]
        chunk = qkv[start : start + size * count].view(count, size, 3, num_heads, head_dim)
        q, k, v = (chunk[:, :, i].transpose(1, 2) for i in range(3))
        attn = F.scaled_dot_product_attention(q, k, v)  # [count, H, size, D]
        attn = attn.transpose(1, 2).reshape(size * count, num_heads * head_dim)
        if out is None:
            pieces.append(attn)
        else:
            out.index_copy_(0, gather[start : start + size * count], attn)
        start += size * count
    if out is not None:
        return out
    if not pieces:
        return qkv.new_zeros(0, num_heads * head_dim)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _varlen_ok(qkv: torch.Tensor) -> bool:
    head_dim = qkv.shape[-1]
    return (
        qkv.is_cuda
        and qkv.dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
    )


def _varlen_attention(qkv: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """All segments in one flash-attention call over the packed tokens (cu_seqlens).

    Replaces, per block, a gather of q/k/v into length groups, one SDPA call per group (for
    which cuDNN builds an execution plan for every new shape: 0.3-0.5 s host stalls on an
    H100 when a batch brings new window sizes) and a scatter back.
    """
    num_tokens, _, num_heads, head_dim = qkv.shape
    q, k, v = qkv.unbind(1)  # [N, H, D] each, last dim contiguous
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_len, plan.max_len, 0.0, False, False
    )[0]
    return out.reshape(num_tokens, num_heads * head_dim)
