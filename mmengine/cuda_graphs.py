"""CUDA graphs for decode steps and small prefill / mixed steps, captured at start-up.

A step launches hundreds of small kernels; replaying a captured graph removes the launch
overhead. Graphs read their inputs from persistent buffers, so a step copies its (padded)
inputs in and replays. All graphs share one memory pool, captured largest first.

- Decode graphs, at bucketed batch sizes: padding rows are valid 1-token sequences whose
  K/V write is skipped (slot -1).
- Mixed graphs (steps that carry prompt chunks, up to `mixed_max_tokens` tokens in all),
  at bucketed token counts T: the step's sequences come first, padding sequences are
  empty (their query range has no rows), and the padding rows after the real tokens
  belong to no sequence and write no K/V. The graph's attention is launched for at most
  T query rows a sequence and min(T, max_num_seqs) sequences, so any step that fits the
  bucket replays it. Steps with vision rows replay them too when the runner was given a
  masked forward (`mixed_graph_multimodal`): the rows' embeddings go into a persistent
  buffer and a row mask selects them over the token embeddings inside the graph. Without
  the graphs such a step costs its host launch time, ~14 ms for a
  Qwen2.5-3B step of 256 or 1024 tokens on an H100, whose GPU needs a few ms of it
  (benchmarks/bench_step_host.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from mmengine.attention import AttentionMetadata, forward_context

logger = logging.getLogger(__name__)

ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, positions) -> hidden
# (ids, positions, mm_embeds, mm_mask) -> hidden: rows where mm_mask is set take their
# embedding from mm_embeds (vision rows) instead of the token embedding.
MaskedForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


MIXED_TOKEN_SIZES = (16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048)


def mixed_token_sizes(max_tokens: int) -> list[int]:
    """The token counts of the mixed-step graphs: `MIXED_TOKEN_SIZES` up to `max_tokens`
    (and `max_tokens` itself when it is not one of them)."""
    if max_tokens <= 1:
        return []
    sizes = {s for s in MIXED_TOKEN_SIZES if s <= max_tokens}
    return sorted(sizes | {max_tokens})


def graph_batch_sizes(max_num_seqs: int, extra: tuple[int, ...] = ()) -> list[int]:
    """The decode batch sizes captured: powers of two to 8, then steps of 16 and 32, plus
    `extra` (decode attention's wave edges, `mmkernels.paged_attention.decode_wave_batch_sizes`),
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
        mixed_max_tokens: int = 0,
        mm_forward_fn: MaskedForwardFn | None = None,
        hidden_size: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """`mm_forward_fn` (with the model's `hidden_size` and `dtype`): the mixed graphs
        also take steps with vision rows, whose embeddings are copied into a persistent
        buffer and selected by a row mask inside the graph."""
        self.forward_fn = forward_fn
        self.mm_forward_fn = mm_forward_fn
        self.mixed_multimodal = mm_forward_fn is not None
        self.sizes = graph_batch_sizes(max_num_seqs, extra_sizes)
        self.max_bs = self.sizes[-1]
        self.max_model_len = max_model_len
        self.max_num_seqs = max(max_num_seqs, 1)
        self.mixed_sizes = mixed_token_sizes(mixed_max_tokens)
        n_tok = max(self.max_bs, *self.mixed_sizes, 1)
        n_seq = max(self.max_bs, *(self.mixed_seqs(t) for t in self.mixed_sizes), 1)
        # Inference tensors, like every tensor an eager step makes (steps run under
        # inference_mode): torch.compile guards on that, and mixing both kinds compiled
        # each decoder-layer graph twice, once mid-run (benchmarks/mid_run_compiles.py).
        with torch.inference_mode():
            self._allocate_buffers(n_tok, n_seq, max_blocks_per_seq, mrope, device)
            self.mm_embeds = torch.zeros(
                (n_tok if self.mixed_multimodal else 0, hidden_size), dtype=dtype, device=device
            )
            self.mm_mask = torch.zeros(self.mm_embeds.shape[0], dtype=torch.bool, device=device)
        self._mm_mask_set = False  # some mask rows are set (cleared before a text step)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.mixed_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.mixed_outputs: dict[int, torch.Tensor] = {}
        self.decode_replays = 0  # steps that replayed a decode graph (stats, logs)
        self.mixed_replays = 0  # steps that replayed a mixed graph
        self.vision_replays = 0  # of those, steps with image or video rows
        self.pool = None

    def mixed_seqs(self, tokens: int) -> int:
        """Sequences a mixed graph of `tokens` rows has room for."""
        return min(tokens, self.max_num_seqs)

    def _allocate_buffers(
        self, n_tok: int, n_seq: int, max_blocks_per_seq: int, mrope: bool, device: torch.device
    ) -> None:
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n_tok, dtype=torch.long, device=device)
        self.positions = torch.zeros(
            (3, n_tok) if mrope else (n_tok,), dtype=torch.long, device=device
        )
        self.slot_mapping = torch.full((n_tok,), -1, dtype=torch.long, device=device)
        # 1-token sequences: valid inputs for every graph's warm-up runs at capture.
        self.query_start_loc = torch.arange(n_seq + 1, **i32)
        self.seq_lens = torch.ones(n_seq, **i32)
        self.block_tables = torch.zeros(n_seq, max_blocks_per_seq, **i32)

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            slot_mapping=self.slot_mapping[:b],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # fixed: sizes the split-KV grid at capture
        )

    def _mixed_meta(self, t: int) -> AttentionMetadata:
        s = self.mixed_seqs(t)
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: s + 1],
            seq_lens=self.seq_lens[:s],
            block_tables=self.block_tables[:s],
            slot_mapping=self.slot_mapping[:t],
            # Upper bounds, fixed at capture: any chunk fits in t rows. The attention grid
            # is sized from the row count and the sequence count; `max_query_len` > 1 also
            # keeps the KV unsplit (mmengine.attention.decode_kv_splits).
            max_query_len=t,
            max_seq_len=self.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        # Largest first (the pool's blocks are then reused by the smaller graphs): the
        # mixed graphs' activations outgrow every decode batch's.
        shapes = [(True, t) for t in reversed(self.mixed_sizes)]
        shapes += [(False, b) for b in reversed(self.sizes)]
        for mixed, n in shapes:
            meta = self._mixed_meta(n) if mixed else self._meta(n)
            with forward_context(meta):
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm up (autotuning, lazy init) off the graph
                        self._forward(mixed, n)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self._forward(mixed, n)
            if self.pool is None:
                self.pool = graph.pool()
            (self.mixed_graphs if mixed else self.graphs)[n] = graph
            (self.mixed_outputs if mixed else self.outputs)[n] = out
        torch.cuda.synchronize()
        mixed_note = (
            f" and {len(self.mixed_graphs)} for steps with prompt chunks of up to "
            f"{self.mixed_sizes[-1]} tokens"
            if self.mixed_sizes
            else ""
        )
        logger.info(
            "captured %d CUDA graphs for decode batches up to %d%s in %.1fs",
            len(self.graphs),
            self.max_bs,
            mixed_note,
            time.perf_counter() - t0,
        )

    def _positions(self, n: int) -> torch.Tensor:
        return self.positions[..., :n]

    def _forward(self, mixed: bool, n: int) -> torch.Tensor:
        """What the graph of `n` rows computes, on the persistent buffers."""
        ids, positions = self.input_ids[:n], self._positions(n)
        if mixed and self.mm_forward_fn is not None:
            return self.mm_forward_fn(ids, positions, self.mm_embeds[:n], self.mm_mask[:n])
        return self.forward_fn(ids, positions)

    def bucket(self, num_seqs: int) -> int | None:
        """The decode graph for `num_seqs` one-token sequences (None: none that large)."""
        for b in self.sizes:
            if b >= num_seqs:
                return b
        return None

    def mixed_bucket(self, num_tokens: int) -> int | None:
        """The mixed graph for a step of `num_tokens` rows (None: none that large). Its
        sequence room, `mixed_seqs(T)`, always holds the step's sequences: there are at
        most max_num_seqs of them and at most one a row."""
        for t in self.mixed_sizes:
            if t >= num_tokens:
                return t
        return None

    def run(
        self,
        b: int,
        input_ids: torch.Tensor,  # [b] already padded
        positions: torch.Tensor,  # [b] or [3, b]
        meta: AttentionMetadata,  # padded to b sequences of one token
    ) -> torch.Tensor:  # [b, H]
        self._copy_inputs(b, b, input_ids, positions, meta)
        self.decode_replays += 1
        return self._replay(False, b)

    def run_mixed(
        self,
        t: int,
        input_ids: torch.Tensor,  # [t] already padded
        positions: torch.Tensor,  # [t] or [3, t]
        meta: AttentionMetadata,  # padded to mixed_seqs(t) sequences, the extra ones empty
        mm_rows: torch.Tensor | None = None,  # int64 rows that take vision embeddings
        mm_values: torch.Tensor | None = None,  # [len(mm_rows), H] their embeddings
    ) -> torch.Tensor:  # [t, H]
        self._copy_inputs(t, self.mixed_seqs(t), input_ids, positions, meta)
        if mm_rows is not None:
            if not self.mixed_multimodal or mm_values is None:
                raise ValueError("vision rows given to mixed graphs captured without them")
            self.mm_mask.zero_()
            self.mm_mask[mm_rows] = True
            self.mm_embeds[mm_rows] = mm_values.to(self.mm_embeds.dtype)
            self._mm_mask_set = True
            self.vision_replays += 1
        elif self._mm_mask_set:
            self.mm_mask.zero_()
            self._mm_mask_set = False
        self.mixed_replays += 1
        return self._replay(True, t)

    def _replay(self, mixed: bool, n: int) -> torch.Tensor:
        if mixed:
            self.mixed_graphs[n].replay()
            return self.mixed_outputs[n]
        self.graphs[n].replay()
        return self.outputs[n]

    def _copy_inputs(
        self,
        n: int,
        s: int,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        if input_ids.shape[0] != n or meta.block_tables.shape[0] != s:
            raise ValueError(
                f"graph inputs padded to {input_ids.shape[0]} rows and "
                f"{meta.block_tables.shape[0]} sequences, the graph takes {n} and {s}"
            )
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[..., :n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.query_start_loc[: s + 1].copy_(meta.query_start_loc, non_blocking=True)
        self.seq_lens[:s].copy_(meta.seq_lens, non_blocking=True)
        w = meta.block_tables.shape[1]
        self.block_tables[:s, :w].copy_(meta.block_tables, non_blocking=True)
