"""CUDA graphs for decode steps, captured at start-up for bucketed batch sizes.

A decode step launches hundreds of small kernels; replaying a captured graph removes the
launch overhead. Graphs read their inputs from persistent buffers, so a step copies its
(padded) inputs in and replays. All graphs share one memory pool, captured largest first.
Padding rows are valid 1-token sequences whose K/V write is skipped (slot -1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from mmengine.attention import AttentionMetadata, forward_context

logger = logging.getLogger(__name__)

ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, positions) -> hidden


def graph_batch_sizes(max_num_seqs: int, extra: tuple[int, ...] = ()) -> list[int]:
    """The decode batch sizes captured: powers of two to 8, then steps of 16 and 32, plus
    `extra` (decode attention's wave edges, `kernels.paged_attention.decode_wave_batch_sizes`),
    all up to `max_num_seqs`."""
    sizes = {1, 2, 4, 8, *range(16, 257, 16), *range(288, 1025, 32), *extra}
    return sorted(s for s in sizes if 0 < s <= max(max_num_seqs, 1))


class CudaGraphRunner:
    def __init__(
        self,
        forward_fn: ForwardFn,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        max_model_len: int,
        mrope: bool,
        device: torch.device,
        extra_sizes: tuple[int, ...] = (),
    ) -> None:
        self.forward_fn = forward_fn
        self.sizes = graph_batch_sizes(max_num_seqs, extra_sizes)
        self.max_bs = self.sizes[-1]
        self.max_model_len = max_model_len
        n = self.max_bs
        # Inference tensors, like every tensor an eager step makes (steps run under
        # inference_mode): torch.compile guards on that, and mixing both kinds compiled
        # each decoder-layer graph twice, once mid-run (benchmarks/mid_run_compiles.py).
        with torch.inference_mode():
            self._allocate_buffers(n, max_blocks_per_seq, mrope, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _allocate_buffers(
        self, n: int, max_blocks_per_seq: int, mrope: bool, device: torch.device
    ) -> None:
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros((3, n) if mrope else (n,), dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(n + 1, **i32)
        self.seq_lens = torch.ones(n, **i32)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, **i32)

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            slot_mapping=self.slot_mapping[:b],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # fixed: sizes the split-KV grid at capture
        )

    def _positions(self, b: int) -> torch.Tensor:
        return self.positions[..., :b]

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        for b in reversed(self.sizes):
            meta = self._meta(b)
            with forward_context(meta):
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm up (autotuning, lazy init) off the graph
                        self.forward_fn(self.input_ids[:b], self._positions(b))
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self.forward_fn(self.input_ids[:b], self._positions(b))
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = graph
            self.outputs[b] = out
        torch.cuda.synchronize()
        logger.info(
            "captured %d CUDA graphs for decode batches up to %d in %.1fs",
            len(self.graphs),
            self.max_bs,
            time.perf_counter() - t0,
        )

    def bucket(self, num_seqs: int) -> int | None:
        for b in self.sizes:
            if b >= num_seqs:
                return b
        return None

    def run(
        self,
        b: int,
        input_ids: torch.Tensor,  # [b] already padded
        positions: torch.Tensor,  # [b] or [3, b]
        meta: AttentionMetadata,  # padded to b sequences of one token
    ) -> torch.Tensor:  # [b, H]
        self.input_ids[:b].copy_(input_ids, non_blocking=True)
        self.positions[..., :b].copy_(positions, non_blocking=True)
        self.slot_mapping[:b].copy_(meta.slot_mapping, non_blocking=True)
        self.query_start_loc[: b + 1].copy_(meta.query_start_loc, non_blocking=True)
        self.seq_lens[:b].copy_(meta.seq_lens, non_blocking=True)
        w = meta.block_tables.shape[1]
        self.block_tables[:b, :w].copy_(meta.block_tables, non_blocking=True)
        self.graphs[b].replay()
        return self.outputs[b]
