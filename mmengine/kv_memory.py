"""How many KV blocks the pool gets, and the synthetic inputs start-up runs.

On a GPU the pool takes what ``gpu_memory_utilization`` leaves after the weights, the
activations of a worst-case step (profiled here on a scratch cache, with the vision
encoder's largest batch) and other processes; on the CPU a fixed budget in GiB. The start-up
warm-up (`mmengine/warmup.py`) encodes `dummy_encoder_items` too.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from mmengine.attention import AttentionMetadata, forward_context
from mmengine.config import ModelSpec

if TYPE_CHECKING:
    from mmengine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def kv_bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem


@torch.inference_mode()
def profile_num_kv_blocks(
    runner: ModelRunner, max_num_batched_tokens: int, max_num_seqs: int
) -> int:
    """GPU: run a worst-case step on a scratch KV cache, then give the KV pool what
    ``gpu_memory_utilization`` leaves after weights, activations and other processes."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    bs = runner.block_size
    seq_len = min(runner.max_model_len, max_num_batched_tokens)
    num_seqs = -(-max_num_batched_tokens // seq_len)
    tokens = [seq_len] * (num_seqs - 1) + [max_num_batched_tokens - seq_len * (num_seqs - 1)]
    blocks_per_seq = -(-seq_len // bs)
    scratch_blocks = num_seqs * blocks_per_seq + 1
    runner.allocate_kv_cache(scratch_blocks)
    tables = [[1 + i * blocks_per_seq + j for j in range(blocks_per_seq)] for i in range(num_seqs)]
    slots, qsl = [], [0]
    for i, n in enumerate(tokens):
        slots.extend(tables[i][p // bs] * bs + p % bs for p in range(n))
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        query_start_loc=runner.to_device(qsl, torch.int32),
        seq_lens=runner.to_device(tokens, torch.int32),
        block_tables=runner.to_device(tables, torch.int32),
        slot_mapping=runner.to_device(slots, torch.int64),
        max_query_len=max(tokens),
        max_seq_len=max(tokens),
    )
    total = sum(tokens)
    ids = torch.randint(0, runner.spec.vocab_size, (total,), device=runner.device)
    pos = torch.cat([torch.arange(n, device=runner.device) for n in tokens])
    if runner.spec.mrope_section is not None:
        pos = pos.expand(3, -1).contiguous()
    with forward_context(meta):
        hidden = runner.forward_fn(ids, pos)
    if runner.encoder_runner is not None:
        # The largest vision-encoder batch a step may run, so its activations are
        # counted before the KV pool takes the rest.
        try:
            runner.encoder_runner.encoder.encode(
                dummy_encoder_items(runner, runner.config.max_num_encoder_tokens)
            )
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # a profiling problem must not block start-up
            logger.warning("could not profile the vision encoder's memory: %s", e)
    rows = min(max_num_seqs, total)
    logits = runner.model.compute_logits(hidden[:rows])
    logits.log_softmax(-1).sort(-1)  # the sampler's biggest temporaries
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    scratch_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in runner.kv_caches)
    runner.kv_caches = []
    del hidden, logits
    # The worst-case step's activation blocks stay in the caching allocator (no
    # empty_cache): the first large steps of a run reuse them instead of calling
    # cudaMalloc mid-run. They count in memory_reserved(), so `others` stays right.
    free, total_mem = torch.cuda.mem_get_info()
    others = total_mem - free - torch.cuda.memory_reserved()  # CUDA context, other processes
    graph_reserve = runner.graph_pool_bytes(max_num_batched_tokens)
    budget = (
        total_mem * runner.config.gpu_memory_utilization
        - others
        - (peak - scratch_bytes)
        - graph_reserve
    )
    per_block = kv_bytes_per_block(runner.spec, bs, runner.dtype)
    num_blocks = int(budget // per_block)
    logger.info(
        "GPU memory: %.1f GiB total, weights+activations peak %.1f GiB, other %.1f GiB; "
        "KV budget %.1f GiB -> %d blocks",
        total_mem / 2**30,
        (peak - scratch_bytes) / 2**30,
        others / 2**30,
        max(budget, 0) / 2**30,
        num_blocks,
    )
    if num_blocks < 2:
        raise RuntimeError(
            "no GPU memory left for the KV cache: raise gpu_memory_utilization or lower "
            "max_num_batched_tokens / max_model_len"
        )
    return num_blocks


def default_num_kv_blocks(runner: ModelRunner, max_num_seqs: int) -> int:
    """CPU: the configured GiB budget, capped by what max_num_seqs full requests need."""
    per_block = kv_bytes_per_block(runner.spec, runner.block_size, runner.dtype)
    budget = int(runner.config.cpu_kv_cache_gib * (1 << 30)) // per_block
    need = max_num_seqs * -(-runner.max_model_len // runner.block_size) + 1
    return max(2, min(budget, need))


def dummy_encoder_items(runner: ModelRunner, max_tokens: int) -> list:
    """Synthetic items worth ``max_tokens`` embedding rows: the biggest encoder batch
    one step may run (for memory profiling)."""
    from processors.types import MultiModalItem, PixelNorm

    enc = runner.encoder_runner.encoder if runner.encoder_runner is not None else None
    if enc is None or max_tokens < 1:
        return []
    # uint8 pixels with a deferred normalization, as the input workers send them: the
    # profile then stages and normalizes exactly as a real step does.
    if hasattr(enc, "patch"):  # Qwen2-VL family: one image of ~max_tokens tokens
        m = enc.patch.spatial_merge_size
        a = max(1, int(max_tokens**0.5))
        b = max(1, max_tokens // a)
        grid = (1, a * m, b * m)
        pixels = torch.randint(0, 256, (a * b * m * m, enc.patch.patch_dim), dtype=torch.uint8)
        norm = PixelNorm((127.5,) * enc.patch.in_channels, (127.5,) * enc.patch.in_channels, 1)
        return [MultiModalItem("image", "profile", pixels, a * b, grid_thw=grid, pixel_norm=norm)]
    per = enc.tokens_per_image  # LLaVA: fixed-size images
    v = enc.cfg.vision
    n = max(1, min(64, max_tokens // per))
    size = (v.num_channels, v.image_size, v.image_size)
    norm = PixelNorm((127.5,) * v.num_channels, (127.5,) * v.num_channels, 0)
    return [
        MultiModalItem(
            "image",
            f"profile-{i}",
            torch.randint(0, 256, size, dtype=torch.uint8),
            per,
            pixel_norm=norm,
        )
        for i in range(n)
    ]
