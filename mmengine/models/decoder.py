"""Llama-style decoder shared by Llama, Mistral, Qwen2, Qwen3 and the Qwen2-VL family's LLM.

Tokens of all requests in a step are packed into one ``[T, hidden]`` batch (no padding);
the paged-attention layer finds each sequence's rows through the step's metadata.
Weights are fused at load time: q/k/v into one matmul, gate/up into another.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mmengine.config import ModelSpec
from mmengine.models.custom_ops import fused_linear, fused_linear_norm_out, fused_mlp_flow
from mmengine.models.layers import PagedAttention, RMSNorm, RotaryEmbedding, SiluAndMul

KVCache = tuple[torch.Tensor, torch.Tensor]  # (key_cache, value_cache) of one layer


class DecoderLayer(nn.Module):
    # Steps of at most this many tokens take `_forward_few_tokens` (0: never); the runner
    # sets it on GPU. `gemv_as_custom_op` is set under torch.compile.
    gemv_max_tokens = 0
    gemv_rope = True  # few-token path: rotary + KV write in the QKV projection's epilogue
    gemv_as_custom_op = False
    # Few-token path: o_proj's launch writes gate_up's normalized input (its int32 counter
    # is set with the mode, on the layer's device: `set_kernel_mode`).
    gemv_norm_out = False
    norm_out_counter: torch.Tensor | None = None
    # One-token steps: o_proj -> norm -> gate_up -> down as one launch (its counters too).
    mlp_flow = False
    mlp_flow_counters: torch.Tensor | None = None

    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding) -> None:
        super().__init__()
        d, hq, hk = spec.head_dim, spec.num_heads, spec.num_kv_heads
        self.q_size, self.kv_size = hq * d, hk * d
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hk, d
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.qkv_proj = nn.Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, spec.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(hq, hk, d)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)
        self.act = SiluAndMul()

    def forward(
        self,
        positions: torch.Tensor,  # [T] or [3, T]
        hidden: torch.Tensor,  # [T, H]
        residual: torch.Tensor | None,  # [T, H]
        kv_cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, residual) in, (hidden, residual) out; the residual stream is
        hidden + residual (residual None: hidden alone)."""
        t = hidden.shape[0]
        if self.gemv_max_tokens and t <= self.gemv_max_tokens:
            return self._forward_few_tokens(positions, hidden, residual, kv_cache)
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.o_proj(self._attention(self.qkv_proj(hidden), positions, kv_cache))
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        hidden = self.down_proj(self.act(self.gate_up_proj(hidden)))
        return hidden, residual

    def _forward_few_tokens(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
    ) -> tuple[torch.Tensor, None]:
        """The same layer in four launches around attention, for steps of a few tokens:
        each norm is fused into the projection after it, each residual add into the
        projection before it, SiLU-and-mul into gate_up, and (`gemv_rope`, no q/k norms)
        rotary and the KV-cache write into the QKV projection. With `gemv_norm_out` the
        post-attention norm moves from gate_up's launch to o_proj's (its last program); with
        `mlp_flow` a one-token step runs o_proj -> norm -> gate_up -> down as one launch.
        Returns the residual stream whole (residual None)."""
        stream = hidden if residual is None else residual + hidden
        op = self.gemv_as_custom_op
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        if self.gemv_rope and self.q_norm is None:
            attn = self.attn.forward_gemv_qkv(
                stream, self.qkv_proj, ln1, positions, self.rotary, kv_cache
            )
        else:
            qkv = fused_linear(
                stream, self.qkv_proj.weight, self.qkv_proj.bias,
                norm_weight=ln1.weight, eps=ln1.eps, as_custom_op=op,
            )  # fmt: skip
            attn = self._attention(qkv, positions, kv_cache)
        if self.mlp_flow and self.mlp_flow_counters is not None and stream.shape[0] == 1:
            args = (attn, self.o_proj.weight, stream, ln2.weight, ln2.eps)
            args += (self.gate_up_proj.weight, self.down_proj.weight, self.mlp_flow_counters)
            return fused_mlp_flow(*args, as_custom_op=op), None
        if self.gemv_norm_out and self.norm_out_counter is not None:
            stream, normed = fused_linear_norm_out(
                attn, self.o_proj.weight, stream, ln2.weight, ln2.eps, self.norm_out_counter,
                as_custom_op=op,
            )  # fmt: skip
            act = fused_linear(normed, self.gate_up_proj.weight, gated=True, as_custom_op=op)
        else:
            stream = fused_linear(attn, self.o_proj.weight, residual=stream, as_custom_op=op)
            act = fused_linear(
                stream, self.gate_up_proj.weight,
                norm_weight=ln2.weight, eps=ln2.eps, gated=True, as_custom_op=op,
            )  # fmt: skip
        return fused_linear(act, self.down_proj.weight, residual=stream, as_custom_op=op), None

    def _attention(
        self, qkv: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache
    ) -> torch.Tensor:  # [T, (Hq + 2 Hk) D] -> [T, Hq D]
        if self.q_norm is None or self.k_norm is None:
            # Rotary + KV write fused in one kernel in front of attention.
            return self.attn.forward_qkv(qkv, positions, self.rotary, kv_cache)
        # Qwen3: per-head norms of q and k come before the rotary.
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], -1)
        q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim))
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.attn(q, k, v, kv_cache)


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head."""

    def __init__(self, spec: ModelSpec, max_position: int) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        rotary = RotaryEmbedding(
            spec.head_dim,
            max_position,
            spec.rope_theta,
            spec.rope_scaling,
            spec.mrope_section,
        )
        self.layers = nn.ModuleList(DecoderLayer(spec, rotary) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.norm.outside_compiled_region = True  # only the decoder layers are compiled
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return self.embed_tokens(input_ids)

    def forward(
        self,
        positions: torch.Tensor,  # [T] or [3, T]
        inputs_embeds: torch.Tensor,  # [T, H]
        kv_caches: list[KVCache],
    ) -> torch.Tensor:  # [T, H]: final hidden states
        hidden, residual = self.forward_layers(positions, inputs_embeds, kv_caches)
        if residual is None:  # the few-token path returns the residual stream whole
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def forward_layers(
        self, positions: torch.Tensor, inputs_embeds: torch.Tensor, kv_caches: list[KVCache]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder layers: (hidden, residual) of the last one (the region that
        ``torch.compile`` covers, whole or layer by layer)."""
        hidden, residual = inputs_embeds, None
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, cache)
        return hidden, residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V] fp32
        return self.lm_head(hidden).float()

    # ---- weights -------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy decoder-named tensors (``layers.0.self_attn.q_proj.weight`` ...) in,
        fusing q/k/v and gate/up. Raises if a parameter was never written."""
        params = dict(self.named_parameters())
        rows_written: dict[str, int] = {}  # parameter name -> rows copied in
        q, kv = self.layers[0].q_size, self.layers[0].kv_size
        inter = self.spec.intermediate_size
        fused = {
            "self_attn.q_proj": ("qkv_proj", 0, q),
            "self_attn.k_proj": ("qkv_proj", q, kv),
            "self_attn.v_proj": ("qkv_proj", q + kv, kv),
            "mlp.gate_proj": ("gate_up_proj", 0, inter),
            "mlp.up_proj": ("gate_up_proj", inter, inter),
        }
        renamed = {
            "self_attn.o_proj": "o_proj",
            "mlp.down_proj": "down_proj",
            "self_attn.q_norm": "q_norm",
            "self_attn.k_norm": "k_norm",
        }
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.spec.tie_word_embeddings:
                continue
            target, start, size = name, 0, None
            for src, (dst, s0, n) in fused.items():
                if f".{src}." in name:
                    target, start, size = name.replace(src, dst), s0, n
                    break
            else:
                for src, dst in renamed.items():
                    if f".{src}." in name:
                        target = name.replace(src, dst)
                        break
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            dest = param if size is None else param.narrow(0, start, size)
            if dest.shape != tensor.shape:
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(dest.shape)}"
                )
            with torch.no_grad():
                dest.copy_(tensor)
            rows_written[target] = rows_written.get(target, 0) + dest.shape[0]
        missing = [n for n, p in params.items() if rows_written.get(n, 0) != p.shape[0]]
        if missing:
            raise ValueError(
                f"checkpoint is missing {len(missing)} tensors, e.g. {', '.join(missing[:5])}"
            )
