"""Media in: fetch, decode, per-model preprocessing, hashing, placeholders, M-RoPE positions.

Modules (import them directly; this package imports nothing heavy on its own, so that
`processors.types` stays cheap for the encoders):

- types: MultiModalItem, PlaceholderRange (the data that leaves this package)
- errors: MediaError and its kinds, each with an HTTP status and a client-safe message
- config: MediaConfig, every limit and allowlist
- netpolicy / fetch / sources: the SSRF guard, http(s) fetching, data: and file: URLs
- image / video: safe decoding to RGB uint8 tensors, frame sampling
- transforms, qwen2_vl, clip: per-model preprocessing matching HF's fast processors
- hf_config: reading processor settings from a checkpoint folder
- hashing: content hashes for prefix and embedding caches
- placeholders: placeholder expansion and per-prompt item limits
- mrope: Qwen2-VL / Qwen2.5-VL 3-D position ids
"""
