"""Start-up runs of the kernel variants a step can reach, so that nothing compiles mid-run.

Triton compiles a kernel variant the first time a launch needs it: each distinct set of
compile-time constants (tile shape, split count, PDL, ...). Compiling one takes 0.4-9 s on
an H200, and the engine loop waits for it, so every request in flight stalls. Before this
warm-up a fresh engine compiled the attention kernel when a step first had a few-token
chunk, a decode batch above the CUDA-graph sizes or a new split count (~1.5-1.9 s each),
and the sampling kernel when a request first asked for top-k (9 s) (session 13,
`benchmarks/mid_run_compiles.py`, which lists what a run compiled after start-up).

What varies per step is the attention launch (`mmengine.attention._attend` picks the tile
shape from the chunk lengths, the split count from the batch size and context, PDL from
the token count) and the sampler's top-k variant. `attention_shapes` lists batches that
reach every combination the engine's choices allow for one model and configuration; the
runner runs attention alone on each (one launch, K/V reads from a scratch block table, no
writes), then the sampler's variants and two vision batches. The first start on a machine compiles them (Triton
keeps them on disk: later starts load them in well under a second).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mmengine.kv_memory import dummy_encoder_items
from mmengine.sampler import warm_up_sampling

if TYPE_CHECKING:
    from mmengine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmupBatch:
    """One attention batch: each sequence's query length, all at the same context."""

    query_lens: tuple[int, ...]
    context_len: int  # KV positions before each sequence's queries

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def max_seq_len(self) -> int:
        return self.context_len + max(self.query_lens)


def _powers_of_two(lo: int, hi: int) -> list[int]:
    out, n = [], 1
    while n <= hi:
        if n >= lo:
            out.append(n)
        n *= 2
    return out


def attention_shapes(
    *,
    queries_per_kv: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
    decodes_in_graphs: bool,
) -> list[WarmupBatch]:
    """Batches that together reach each attention launch variant the engine can choose.

    - Pure decode steps, unless CUDA graphs (captured at start-up, which compiles their
      variants) run all of them: every power-of-two batch size at every power-of-two
      context (these set the split count and whether PDL is on).
    - Few-token steps (chunks of at most 8 tokens; never split, see
      `mmengine.attention.decode_kv_splits`): the longest chunk at each tile boundary (16
      and 64 query rows, 8 tokens), with and without decodes beside it (PDL is on up to
      16 tokens).
    - Longer chunks (no split): each tile-shape boundary (128 and 256 rows), one sequence
      per tile or several, alone or with decodes riding along (the mean chunk length
      picks the tile height), and the longest chunk the budget allows.
    """
    budget, max_len = max_num_batched_tokens, max_model_len
    q_rows = [16, 64, 128, 256]
    few = sorted(
        {2, 8}
        | {r // queries_per_kv for r in q_rows[:2]}
        | {r // queries_per_kv + 1 for r in q_rows[:2]}
    )
    few = [q for q in few if 2 <= q <= 8 and q < max_len]  # 1 token: the decodes above
    contexts = sorted(set(_powers_of_two(1, max_len)) | {max_len - 1})
    sizes = sorted(set(_powers_of_two(1, max_num_seqs)) | {max_num_seqs})
    out: list[WarmupBatch] = []
    if not decodes_in_graphs:
        for b in sizes:
            out += [WarmupBatch((1,) * b, ctx) for ctx in contexts if ctx < max_len and b <= budget]
    for q in few:
        for b in sizes:
            if q + b - 1 <= budget:
                out.append(WarmupBatch((q,) + (1,) * (b - 1), 1))
    longer = {9, 17, budget, max_len - 1}
    for rows in q_rows:
        q = rows // queries_per_kv
        longer |= {q, q + 1, 2 * q + 1}
    for q in sorted(x for x in longer if 9 <= x <= min(budget, max_len - 1)):
        out.append(WarmupBatch((q,), 0))
        out.append(WarmupBatch((q, q), 0) if 2 * q <= budget else WarmupBatch((q,), 1))
        # Many decodes beside one chunk: the mean query length drops under the tall tile.
        riders = min(max_num_seqs - 1, budget - q)
        if riders > 0:
            out.append(WarmupBatch((q,) + (1,) * riders, 1))
    return out


def run_attention_warmup(
    batches: list[WarmupBatch],
    *,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    num_q_heads: int,
    scale: float,
    dtype: torch.dtype,
) -> None:
    """Runs `mmengine.attention._attend` (what the attention ops call) on each batch.

    Every sequence's block table points at block 0 (the null block) throughout, so the
    launches read whatever is there and write nothing but their outputs."""
    from mmengine.attention import AttentionMetadata, _attend

    device = key_cache.device
    block_size, _, head_size = key_cache.shape[1:]
    for batch in batches:
        lens = list(batch.query_lens)
        t = sum(lens)
        qsl = [0]
        for n in lens:
            qsl.append(qsl[-1] + n)
        seq_lens = [batch.context_len + n for n in lens]
        # Padded to a multiple of 16 columns, as the engine pads its block tables: Triton
        # specializes on the row stride's divisibility by 16 (another variant otherwise).
        nb = -(-max(seq_lens) // block_size)
        nb = -(-nb // 16) * 16
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.zeros(len(lens), nb, dtype=torch.int32, device=device),
            slot_mapping=torch.full((t,), -1, dtype=torch.int64, device=device),
            max_query_len=max(lens),
            max_seq_len=max(seq_lens),
        )
        q = torch.zeros(t, num_q_heads, head_size, dtype=dtype, device=device)
        _attend(q, key_cache, value_cache, scale, meta)


def _log_done(what: str, count: int, t0: float) -> None:
    """One log line: `count` is the number of attention batches, `what` the rest."""
    logger.info(
        "warm-up: %d %s in %.1fs (compiled or loaded from Triton's cache)",
        count,
        what,
        time.perf_counter() - t0,
    )


@torch.inference_mode()
def warm_up(runner: ModelRunner, max_num_batched_tokens: int, max_num_seqs: int) -> None:
    """GPU: run every attention and sampling kernel variant a step can reach, and a small
    and a middle vision batch (see the module docstring), after the KV cache exists and
    before serving. `extra={"kernel_warmup": 0}` skips it."""
    if runner.device.type != "cuda" or not runner.config.extra_option("kernel_warmup"):
        return
    t0 = time.perf_counter()
    spec = runner.spec
    batches = attention_shapes(
        queries_per_kv=spec.num_heads // spec.num_kv_heads,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        max_model_len=runner.max_model_len,
        decodes_in_graphs=runner.graphs is not None and max_num_seqs <= runner.graphs.max_bs,
    )
    key_cache, value_cache = runner.kv_caches[0]
    run_attention_warmup(
        batches,
        key_cache=key_cache,
        value_cache=value_cache,
        num_q_heads=spec.num_heads,
        scale=spec.head_dim**-0.5,
        dtype=runner.dtype,
    )
    n = warm_up_sampling(spec.vocab_size, runner.device)
    encodes = 0
    if runner.encoder_runner is not None:
        # The profiling step encoded the largest batch; the compiled vision blocks guard
        # their graph on a length range from it, and the first small image compiled
        # them again mid-run (1.4 s, Qwen2.5-VL-3B on an H200). A small and a middle
        # batch compile the other ranges now.
        for tokens in (16, 1024):
            if tokens < runner.config.max_num_encoder_tokens:
                runner.encoder_runner.encoder.encode(dummy_encoder_items(runner, tokens))
                encodes += 1
    torch.cuda.synchronize()
    what = f"attention batch shapes, {n} sampling variants and {encodes} encoder batches"
    _log_done(what, len(batches), t0)
