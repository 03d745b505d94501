"""Triton kernels, each beside a plain-torch reference (`<name>_torch`) in the same file.

- `paged_attention`: causal attention of packed query chunks over a paged KV cache
  (decode and prefill in one launch, optional split-KV for long decodes).
- `kv_cache`: `write_kv_cache`, scatter of this step's K/V into cache slots.
- `rms_norm`: HF-exact RMSNorm with an optional fused residual add.
- `activation`: `silu_and_mul` of a fused gate/up projection.
- `rotary`: neox rotary embedding (1-D and Qwen2-VL M-RoPE) and its cos/sin table.
- `rotary_kv`: rotary of q/k fused with the KV-cache write (the decoder's attention input).
- `gemv`: skinny matmul for one-token decode steps with the decoder's RMSNorm, bias,
  SiLU-and-mul and residual add fused in.
- `sampling`: one random token per row after temperature, min-p, top-k and top-p, with no
  sort of the vocabulary (the torch reference sorts).

Each public function takes Triton on CUDA tensors (or when forced with
`use_triton_kernel=True` / `MMENGINE_FORCE_TRITON=1`, which on CPU needs
`TRITON_INTERPRET=1` before triton is imported) and the torch reference otherwise. This
package imports only torch and triton; import the functions from their modules.
"""
