"""Executes one scheduled step: builds the packed batch, runs the decoder, samples.

The same code runs on CPU (plain-torch paths) and CUDA (Triton kernels). On CUDA, unless
``enforce_eager``: the forward is ``torch.compile``d (attention as one opaque op) and
decode-only steps replay CUDA graphs captured at start-up (``cuda_graphs.py``). How
many KV blocks the pool gets is ``kv_memory.py``'s (a profiled worst-case step against
``gpu_memory_utilization``); the start-up kernel warm-up is ``warmup.py``'s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.profiler import record_function

from encoders.staging import host_to_device
from mmengine.attention import AttentionMetadata, forward_context
from mmengine.config import EngineConfig, ModelSpec
from mmengine.cuda_graphs import CudaGraphRunner
from mmengine.model_loader import iter_weights, llm_weight_name
from mmengine.models.decoder import DecoderModel, KVCache
from mmengine.models.layers import set_kernel_mode
from mmengine.request import Request
from mmengine.sampler import (
    PendingSample,
    SamplingRow,
    SeedStream,
    prompt_logprobs,
    sample_async,
)
from mmengine.scheduler import RunnerOutput, SchedulerOutput
from mmkernels._dispatch import pdl_supported
from mmkernels.paged_attention import decode_wave_batch_sizes

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """The packed batch of one step, on the model's device."""

    input_ids: torch.Tensor  # int64 [T] (tokens still in flight are filled in on the device)
    positions: torch.Tensor  # int64 [T], or [3, T] for M-RoPE
    # Multimodal rows of this step: inputs_embeds[mm_rows] = cat(mm_slices) (None: none)
    mm_rows: torch.Tensor | None
    meta: AttentionMetadata
    num_tokens: int  # real tokens (T may include CUDA-graph padding rows after them)
    graph_batch: int | None  # replay the decode CUDA graph of this batch size
    mixed_graph: int | None  # replay the mixed-step CUDA graph of this many rows
    logits_rows: list[int]  # rows of the hidden states whose logits we need
    sample_reqs: list[tuple[Request, int]]  # (request, index into logits_rows) that sample
    prompt_lp_reqs: list[tuple[Request, int, int, int]]  # (req, first logits idx, first pos, n)


class PendingStep:
    """A launched step: ``result()`` waits for its sampled tokens to reach the host.

    With async scheduling the engine plans and launches the next step before calling it,
    so the host work of one step overlaps the GPU work of the other.
    """

    def __init__(
        self, output: RunnerOutput, sample_ids: list[str], pending: PendingSample | None
    ) -> None:
        self._output = output
        self._sample_ids = sample_ids
        self._pending = pending

    def result(self) -> RunnerOutput:
        if self._pending is not None:
            out = self._pending.result()
            self._pending = None
            res = self._output
            for rid, tok, lp in zip(self._sample_ids, out.token_ids, out.logprobs):
                res.sampled_token_ids[rid] = tok
                if lp is not None:
                    res.logprobs[rid] = lp
        return self._output


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        spec: ModelSpec,
        model_path: Path,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
    ) -> None:
        self.config = config
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.block_size = config.block_size
        t0 = time.perf_counter()
        self.model = self._load_model(model_path, max_model_len)
        logger.info(
            "loaded %s (%s, %.1fM params) on %s in %.1fs",
            spec.architecture,
            str(dtype).replace("torch.", ""),
            sum(p.numel() for p in self.model.parameters()) / 1e6,
            device,
            time.perf_counter() - t0,
        )
        self.kv_caches: list[KVCache] = []
        self.num_kv_blocks = 0
        self.generators: dict[str, SeedStream] = {}
        # request id -> (request, min_tokens still blocking?, its SamplingRow); the rows
        # refer to the request's live token lists, so penalties see every new token.
        self._rows: dict[str, tuple[Request, bool, SamplingRow]] = {}
        self.graphs: CudaGraphRunner | None = None
        # The last step's sampled tokens, on the device, and each request's row in them:
        # the next step's input for a request whose token the host has not read yet.
        self._last_tokens: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}
        on_gpu = device.type == "cuda" and not config.enforce_eager
        self.compiled = on_gpu and config.extra_option("torch_compile")
        self.use_cuda_graphs = on_gpu and config.extra_option("cuda_graphs")
        # Decode steps of one token run each layer as four fused skinny-matmul launches
        # (mmkernels/gemv.py) around attention; on CUDA in eager mode too, so graphs and
        # eager agree. (The LM head stays on cuBLAS: through the GEMV kernel it read the
        # head faster alone, 198 vs 217 us on an H100, but the engine's batch-1 token time
        # did not move, 2.41 vs 2.39 ms on an H200; session 16.)
        # Set explicitly it applies anywhere (the CPU tests run the path's torch reference);
        # by default only on CUDA.
        gemv = config.extra_option("gemv_max_tokens")
        explicit = "gemv_max_tokens" in config.extra
        self.gemv_max_tokens = gemv if explicit or device.type == "cuda" else 0
        # Rotary + KV write in the QKV projection's epilogue on that path (one launch fewer
        # per layer); `gemv_rope=0` keeps them in their own kernel (A/B benchmarks).
        gemv_rope = config.extra_option("gemv_rope")
        set_kernel_mode(
            self.model,
            self.compiled,
            self.gemv_max_tokens,
            gemv_rope,
            norm_triton_op=config.extra_option("norm_triton_op"),
            gemv_norm_out=config.extra_option("gemv_norm_out"),
            mlp_flow=config.extra_option("mlp_flow"),
        )
        if self.gemv_max_tokens:
            pdl = pdl_supported(next(self.model.parameters()))
            rope_state = "off" if not gemv_rope else "off (q/k norms)" if spec.qk_norm else "on"
            logger.info(
                "steps of <= %d token(s): each decoder layer as fused GEMV launches around "
                "attention (rotary + KV write in the QKV one: %s; post-attention norm in "
                "o_proj's: %s; o_proj..down as one dataflow launch: %s; programmatic "
                "dependent launch: %s)",
                self.gemv_max_tokens,
                rope_state,
                "on" if config.extra_option("gemv_norm_out") else "off",
                "on" if config.extra_option("mlp_flow") else "off",
                "on" if pdl else "off",
            )
        if self.compiled:
            # All decoder layers as one compiled call (default), or each layer as its own
            # (`compile_whole_model=0`: one graph shared by every layer, a shorter compile).
            # A prefill step is launched from the host, not replayed, and each compiled call
            # costs host time: per layer, a 256-token step took 39.5 ms to launch against
            # 18.2 ms whole, the GPU idle meanwhile (H100, session 16,
            # benchmarks/bench_step_host.py); 8192-token steps are GPU-bound either way.
            import torch._dynamo

            # 1-token steps (and, per layer, layer 0 without a residual) get their own
            # graphs; leave room for a few more, and fall back to eager rather than fail.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
            if config.extra_option("compile_whole_model"):
                model = self.model
                model.forward_layers = torch.compile(model.forward_layers, dynamic=True)
            else:
                for layer in self.model.layers:
                    layer.forward = torch.compile(layer.forward, dynamic=True)
        self.forward_embeds = self._forward_embeds
        self.forward_fn = self._forward
        self.encoder_runner = self._load_encoder(model_path) if spec.is_multimodal else None
        self.encoder_outputs: dict[str, torch.Tensor] = {}  # content hash -> [L, H]
        self.time_prepare_s = 0.0  # host time building step inputs
        self.time_encoder_s = 0.0  # vision encoder: host wall on CPU, stream time on GPU
        self._encoder_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def _load_encoder(self, path: Path):  # noqa: ANN202
        from encoders import EmbeddingCache, EncoderRunner, build_vision_encoder
        from mmengine.model_loader import LazyWeights

        t0 = time.perf_counter()
        encoder = build_vision_encoder(
            self.spec.hf_config, LazyWeights(path), self.dtype, self.device
        )
        # On by default with torch.compile (W1 quick on an H100: encoder 8.0 -> 5.0 s,
        # 12.9 -> 16.4 req/s end to end); extra={"compile_encoder": False} turns it off.
        if (
            self.compiled
            and self.config.extra_option("compile_encoder")
            and hasattr(encoder, "compile_blocks")
        ):
            encoder.compile_blocks()
        if self.config.extra_option("vision_segment_kernel") and hasattr(
            encoder, "short_segment_kernel"
        ):
            # Opt-in until measured end to end: short window segments through a Triton
            # kernel instead of the variable-length flash call (mmkernels/segment_attention.py).
            encoder.short_segment_kernel = True
        cache = EmbeddingCache(int(self.config.mm_embedding_cache_gib * (1 << 30)))
        logger.info("loaded the vision encoder in %.1fs", time.perf_counter() - t0)
        return EncoderRunner(encoder, cache)

    def _forward_embeds(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The pure step function that is compiled: embeddings -> hidden [T, H]."""
        return self.model(positions, inputs_embeds, self.kv_caches)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids -> hidden [T, H] (what decode CUDA graphs capture)."""
        return self.forward_embeds(self.model.embed(input_ids), positions)

    def _forward_masked(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mm_embeds: torch.Tensor,  # [T, H]
        mm_mask: torch.Tensor,  # bool [T]: rows that take mm_embeds
    ) -> torch.Tensor:
        """ids -> hidden [T, H] with vision rows taken from `mm_embeds` (what mixed CUDA
        graphs capture with `mixed_graph_multimodal`)."""
        embeds = torch.where(mm_mask.unsqueeze(-1), mm_embeds, self.model.embed(input_ids))
        return self.forward_embeds(embeds, positions)

    def to_device(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return host_to_device(torch.tensor(values, dtype=dtype), self.device)

    def _load_model(self, path: Path, max_model_len: int) -> DecoderModel:
        with torch.device("meta"):
            model = DecoderModel(self.spec, max_position=max(max_model_len, 1))
        model = model.to(self.dtype).to_empty(device=self.device)
        # Buffers (the rotary cache) were lost by to_empty: rebuild them for real.
        with torch.device(self.device):
            fresh_rotary = type(model.layers[0].rotary)(
                self.spec.head_dim,
                max(max_model_len, 1),
                self.spec.rope_theta,
                self.spec.rope_scaling,
                self.spec.mrope_section,
            )
        for layer in model.layers:
            layer.rotary = fresh_rotary
        if self.spec.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        if self.config.extra_option("load_format") == "dummy":
            # Benchmarks: random weights of the right shapes, no checkpoint tensors read.
            gen = torch.Generator(device=self.device).manual_seed(self.config.seed)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, 0.02, generator=gen)
            model.eval()
            return model
        weights = (
            (mapped, tensor)
            for name, tensor in iter_weights(path)
            if (mapped := llm_weight_name(name)) is not None
        )
        model.load_weights(weights)
        model.eval()
        return model

    # ---- KV memory -------------------------------------------------------------------------
    @torch.inference_mode()
    def allocate_kv_cache(self, num_blocks: int) -> None:
        # Inference tensors, as in the profiling step and every step after: torch.compile
        # guards on the kind, and a normal-tensor cache recompiled the layers mid-run.
        shape = (num_blocks, self.block_size, self.spec.num_kv_heads, self.spec.head_dim)

        def allocate() -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [
                (
                    torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.dtype, device=self.device),
                )
                for _ in range(self.spec.num_layers)
            ]

        try:
            self.kv_caches = allocate()
        except torch.OutOfMemoryError:
            # The activation blocks kept cached after profiling (see profile_num_kv_blocks)
            # leave too little unreserved memory at a high gpu_memory_utilization: give
            # them back and try again (the first large steps then allocate afresh).
            self.kv_caches = []
            torch.cuda.empty_cache()
            self.kv_caches = allocate()
        self.num_kv_blocks = num_blocks

    def mixed_graph_max_tokens(self, max_num_batched_tokens: int) -> int:
        """Row count of the largest mixed-step CUDA graph (0: none): the option, capped at
        the step's token budget."""
        if not self.use_cuda_graphs:
            return 0
        return min(self.config.extra_option("mixed_graph_max_tokens"), max_num_batched_tokens)

    def graph_pool_bytes(self, max_num_batched_tokens: int) -> int:
        """GPU memory set aside for the CUDA graphs' pool: 512 MiB for the decode graphs,
        plus the largest mixed graph's activations (its rows x the widest tensors live at
        once in a layer: gate_up's output, SiLU's, a few of hidden size)."""
        if not self.use_cuda_graphs:
            return 0
        rows = self.mixed_graph_max_tokens(max_num_batched_tokens)
        width = 3 * self.spec.intermediate_size + 8 * self.spec.hidden_size
        return (512 << 20) + rows * width * self.dtype.itemsize

    def capture_cuda_graphs(self, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if not self.use_cuda_graphs:
            return
        mm_graphs = self.spec.is_multimodal and self.config.extra_option("mixed_graph_multimodal")
        self.graphs = CudaGraphRunner(
            self.forward_fn,
            max_num_seqs=max_num_seqs,
            # Rounded up to 16 like the eager block tables (see prepare), so both fit.
            max_blocks_per_seq=_round_up(-(-self.max_model_len // self.block_size), 16),
            max_model_len=self.max_model_len,
            mrope=self.spec.mrope_section is not None,
            device=self.device,
            mixed_max_tokens=self.mixed_graph_max_tokens(max_num_batched_tokens),
            mm_forward_fn=self._forward_masked if mm_graphs else None,
            hidden_size=self.spec.hidden_size,
            dtype=self.dtype,
            extra_sizes=tuple(
                decode_wave_batch_sizes(
                    self.spec.num_kv_heads,
                    torch.cuda.get_device_properties(self.device).multi_processor_count,
                    self.spec.head_dim,
                )
            ),
        )
        self.graphs.capture()

    # ---- one step -----------------------------------------------------------------------------
    def _positions(self, req: Request, start: int, n: int) -> list[int] | list[list[int]]:
        """1-D positions, or for M-RoPE models three rows (t, h, w)."""
        if self.spec.mrope_section is None:
            return list(range(start, start + n))
        mp = req.mrope_positions
        if mp is None:
            row = list(range(start, start + n))
            return [row, row, row]
        p_end = min(start + n, req.num_prompt_tokens)
        rows = mp[:, start:p_end].tolist() if start < p_end else [[], [], []]
        if start + n > p_end:  # generated tokens: position + delta on every row
            tail = list(range(max(start, p_end) + req.mrope_delta, start + n + req.mrope_delta))
            rows = [r + tail for r in rows]
        return rows

    def _fill_from_last_step(
        self, req: Request, token: int, row: int, fill_rows: list[int], fill_src: list[int]
    ) -> None:
        """Input row `row` takes the token the previous step sampled for `req` (its ids are
        still on the device: async scheduling planned this step before they landed)."""
        src = self._last_rows.get(req.request_id)
        if src is None:
            raise RuntimeError(
                f"request {req.request_id}: token {token} is neither known nor sampled by "
                "the previous step"
            )
        fill_rows.append(row)
        fill_src.append(src)

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        ids: list[int] = []
        pos: list[int] = []
        pos3: list[list[int]] = [[], [], []]  # M-RoPE rows
        mm_rows: list[int] = []
        mm_slices: list[torch.Tensor] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logits_rows: list[int] = []
        sample_reqs: list[tuple[Request, int]] = []
        plp_reqs: list[tuple[Request, int, int, int]] = []
        fill_rows: list[int] = []  # rows whose token id is still on the device ...
        fill_src: list[int] = []  # ... at this row of the last step's sampled tokens
        bs = self.block_size
        mrope = self.spec.mrope_section is not None
        for item in sched.scheduled:
            req, n, start = item.request, item.num_tokens, item.start
            table = item.block_ids
            tokens = req.all_token_ids
            if n == 1:  # decodes: the common case, kept to a few list appends
                if start < len(tokens):
                    ids.append(tokens[start])
                else:
                    self._fill_from_last_step(req, start, len(ids), fill_rows, fill_src)
                    ids.append(0)
                slots.append(table[start // bs] * bs + start % bs)
                if not mrope:
                    pos.append(start)
                elif start >= req.num_prompt_tokens or req.mrope_positions is None:
                    p1 = start + req.mrope_delta if req.mrope_positions is not None else start
                    pos3[0].append(p1)
                    pos3[1].append(p1)
                    pos3[2].append(p1)
                else:
                    for r, v in enumerate(req.mrope_positions[:, start].tolist()):
                        pos3[r].append(v)
            else:
                known = tokens[start : start + n]
                ids.extend(known)
                if len(known) < n:
                    if n - len(known) != 1:
                        raise RuntimeError(
                            f"request {req.request_id}: tokens {start + len(known)}.. are "
                            "neither known nor sampled by the previous step"
                        )
                    self._fill_from_last_step(
                        req, start + len(known), len(ids), fill_rows, fill_src
                    )
                    ids.append(0)
                p = self._positions(req, start, n)
                if not mrope:
                    pos.extend(p)  # type: ignore[arg-type]
                else:
                    for r in range(3):
                        pos3[r].extend(p[r])  # type: ignore[index]
                offs = np.arange(start, start + n)
                blocks = np.asarray(table, dtype=np.int64)[offs // bs]
                slots.extend((blocks * bs + offs % bs).tolist())
            row0 = qsl[-1]
            if req.mm_positions and start < req.num_prompt_tokens:
                self._gather_mm(req, start, n, row0, mm_rows, mm_slices)
            qsl.append(row0 + n)
            seq_lens.append(start + n)
            tables.append(table)
            if req.wants_prompt_logprobs() and start < req.num_prompt_tokens - 1:
                # Positions start..last predict prompt tokens start+1..; the last prompt
                # position predicts the first output token and is covered by sampling.
                last = min(start + n, req.num_prompt_tokens - 1)
                plp_reqs.append((req, len(logits_rows), start, last - start))
                logits_rows.extend(range(row0, row0 + last - start))
            if item.samples:
                sample_reqs.append((req, len(logits_rows)))
                logits_rows.append(row0 + n - 1)
        num_tokens = len(ids)
        max_query_len = max(b - a for a, b in zip(qsl, qsl[1:]))
        graph_batch = None
        if self.graphs is not None and max_query_len == 1 and not mm_rows:
            graph_batch = self.graphs.bucket(len(tables))
        if graph_batch is not None:
            # Pad to the graph's batch with 1-token sequences that write no K/V.
            pad = graph_batch - len(tables)
            ids.extend([0] * pad)
            pos.extend([0] * pad)
            for r in range(3):
                pos3[r].extend([0] * pad)
            slots.extend([-1] * pad)
            qsl.extend(range(qsl[-1] + 1, qsl[-1] + pad + 1))
            seq_lens.extend([1] * pad)
            tables.extend([[0]] * pad)
        mixed_graph = None
        if (
            self.graphs is not None
            and graph_batch is None
            and (not mm_rows or self.graphs.mixed_multimodal)
        ):
            mixed_graph = self.graphs.mixed_bucket(num_tokens)
        if mixed_graph is not None:
            # Pad the rows (no sequence, no K/V write) and the sequences (no rows).
            assert self.graphs is not None
            pad = mixed_graph - num_tokens
            ids.extend([0] * pad)
            pos.extend([0] * pad)
            for r in range(3):
                pos3[r].extend([0] * pad)
            slots.extend([-1] * pad)
            pad_seqs = self.graphs.mixed_seqs(mixed_graph) - len(tables)
            qsl.extend([qsl[-1]] * pad_seqs)
            seq_lens.extend([1] * pad_seqs)
            tables.extend([[0]] * pad_seqs)
        # A multiple of 16: the attention kernel is specialized on the block-table row
        # stride's 16-divisibility (aligned block-id loads), and a width that changed class
        # from step to step would compile kernel variants mid-run.
        width = _round_up(max(len(t) for t in tables), 16)
        table_arr = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            table_arr[i, : len(t)] = t
        table_t = host_to_device(torch.from_numpy(table_arr), self.device)
        meta = AttentionMetadata(
            query_start_loc=self.to_device(qsl, torch.int32),
            seq_lens=self.to_device(seq_lens, torch.int32),
            block_tables=table_t,
            slot_mapping=self.to_device(slots, torch.int64),
            max_query_len=max_query_len,
            max_seq_len=max(seq_lens),
        )
        if self.spec.mrope_section is not None:
            positions = self.to_device(pos3, torch.long)
        else:
            positions = self.to_device(pos, torch.long)
        self._mm_slices = mm_slices
        input_ids = self.to_device(ids, torch.long)
        if fill_rows:
            assert self._last_tokens is not None
            src_t = self.to_device(fill_src, torch.long)
            input_ids[self.to_device(fill_rows, torch.long)] = self._last_tokens[src_t]
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            mm_rows=self.to_device(mm_rows, torch.long) if mm_rows else None,
            meta=meta,
            num_tokens=num_tokens,
            graph_batch=graph_batch,
            mixed_graph=mixed_graph,
            logits_rows=logits_rows,
            sample_reqs=sample_reqs,
            prompt_lp_reqs=plp_reqs,
        )

    def _gather_mm(
        self,
        req: Request,
        start: int,
        n: int,
        row0: int,
        mm_rows: list[int],
        mm_slices: list[torch.Tensor],
    ) -> None:
        """Rows of this chunk that take vision embeddings, and the slices that fill them."""
        end = start + n
        for p in req.mm_positions:
            lo, hi = max(start, p.offset), min(end, p.offset + p.length)
            if lo >= hi:
                continue
            emb = self.encoder_outputs.get(p.content_hash)
            if emb is None:
                raise RuntimeError(f"embeddings of item {p.content_hash[:12]} are not ready")
            mm_rows.extend(range(row0 + lo - start, row0 + hi - start))
            mm_slices.append(emb[lo - p.offset : hi - p.offset])

    def _encode(self, sched: SchedulerOutput) -> None:
        for h in sched.freed_encoder_hashes:
            self.encoder_outputs.pop(h, None)
        if not sched.encoder_inputs:
            return
        assert self.encoder_runner is not None, "a text-only model got multimodal items"
        items = [req.mm_inputs[i] for req, i in sched.encoder_inputs]
        outs = self.encoder_runner.run(items)
        for (req, i), emb in zip(sched.encoder_inputs, outs):
            self.encoder_outputs[req.mm_positions[i].content_hash] = emb.to(self.dtype)

    def _collect_encoder_time(self, wait: bool) -> None:
        """Adds the GPU-stream time of finished encoder runs to ``time_encoder_s``."""
        pending = []
        for start, end in self._encoder_events:
            if wait or end.query():
                end.synchronize()
                self.time_encoder_s += start.elapsed_time(end) / 1e3
            else:
                pending.append((start, end))
        self._encoder_events = pending

    def encoder_seconds(self) -> float:
        """Total encoder time so far (waits for encoder runs still on the GPU)."""
        self._collect_encoder_time(wait=True)
        return self.time_encoder_s

    def release(self, request_ids: list[str]) -> None:
        """Forgets the per-request sampling state of finished requests."""
        for rid in request_ids:
            self.generators.pop(rid, None)
            self._rows.pop(rid, None)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> PendingStep:
        """Launches the step; its sampled tokens reach the host in ``result()``."""
        self.release(sched.finished_req_ids)
        t0 = time.perf_counter()
        # Named ranges for torch.profiler (benchmarks/profile_w1.py); ~1 us each otherwise.
        with record_function("mm:encoder"):
            self._encode_timed(sched, t0)
        t1 = time.perf_counter()
        with record_function("mm:prepare"):
            inputs = self.prepare(sched)
        self.time_prepare_s += time.perf_counter() - t1
        with record_function("mm:forward"):
            hidden = self._run_model(inputs)
        with record_function("mm:sample"):
            return self._logits_and_sample(inputs, hidden)

    def _encode_timed(self, sched: SchedulerOutput, t0: float) -> None:
        if sched.encoder_inputs and self.device.type == "cuda":
            # Timed with events, not a synchronize: the host prepares this step's LLM
            # forward while the encoder's kernels are still running.
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._encode(sched)
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._encoder_events.append((start, end))
            self._collect_encoder_time(wait=False)
        else:
            self._encode(sched)
            self.time_encoder_s += time.perf_counter() - t0

    def _run_model(self, inputs: StepInputs) -> torch.Tensor:
        if inputs.graph_batch is not None and self.graphs is not None:
            return self.graphs.run(
                inputs.graph_batch, inputs.input_ids, inputs.positions, inputs.meta
            )
        if inputs.mixed_graph is not None and self.graphs is not None:
            mm_values = torch.cat(self._mm_slices) if inputs.mm_rows is not None else None
            return self.graphs.run_mixed(
                inputs.mixed_graph,
                inputs.input_ids,
                inputs.positions,
                inputs.meta,
                mm_rows=inputs.mm_rows,
                mm_values=mm_values,
            )
        embeds = self.model.embed(inputs.input_ids)
        if inputs.mm_rows is not None:
            embeds[inputs.mm_rows] = torch.cat(self._mm_slices).to(embeds.dtype)
        with forward_context(inputs.meta):
            return self.forward_embeds(embeds, inputs.positions)

    def _logits_and_sample(self, inputs: StepInputs, hidden: torch.Tensor) -> PendingStep:
        result = RunnerOutput()
        self._last_tokens, self._last_rows = None, {}
        if not inputs.logits_rows:
            return PendingStep(result, [], None)
        rows = self.to_device(inputs.logits_rows, torch.long)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        for req, first, start, n in inputs.prompt_lp_reqs:
            nxt = req.prompt_token_ids[start + 1 : start + 1 + n]
            lps = prompt_logprobs(
                logits[first : first + n], nxt, req.sampling_params.prompt_logprobs or 0
            )
            chunk: list = [None] if start == 0 else []
            result.prompt_logprobs[req.request_id] = chunk + lps
        if not inputs.sample_reqs:
            return PendingStep(result, [], None)
        idx = self.to_device([i for _, i in inputs.sample_reqs], torch.long)
        rows = [self._row(r) for r, _ in inputs.sample_reqs]
        pending = sample_async(logits.index_select(0, idx), rows)
        ids = [r.request_id for r, _ in inputs.sample_reqs]
        self._last_tokens = pending.token_ids
        self._last_rows = {rid: i for i, rid in enumerate(ids)}
        return PendingStep(result, ids, pending)

    def _row(self, req: Request) -> SamplingRow:
        """The request's sampling row, built once and reused every step until min_tokens
        is reached (the only change): building it took ~13 us per request per step, 2-3 ms
        of host time per decode step at 256 requests on the dev CPU."""
        # The token sampled now is output number num_output_tokens + placeholders - 1
        # (placeholders count it, and any earlier one still in flight).
        index = req.num_output_tokens + req.num_output_placeholders - 1
        blocking = index < req.sampling_params.min_tokens
        cached = self._rows.get(req.request_id)
        if cached is not None and cached[0] is req and cached[1] == blocking:
            return cached[2]
        row = self._build_row(req, blocking)
        self._rows[req.request_id] = (req, blocking, row)
        return row

    def _build_row(self, req: Request, blocking: bool) -> SamplingRow:
        sp = req.sampling_params
        gen = None
        if sp.seed is not None and not sp.greedy:
            gen = self.generators.get(req.request_id)
            if gen is None:
                gen = SeedStream(sp.seed)
                self.generators[req.request_id] = gen
        blocked: list[int] = []
        if blocking:
            blocked = list(sp.stop_token_ids) + ([] if sp.ignore_eos else req.eos_token_ids)
        penal = sp.has_penalties
        return SamplingRow(
            temperature=sp.temperature,
            top_k=sp.top_k,
            top_p=sp.top_p,
            min_p=sp.min_p,
            presence_penalty=sp.presence_penalty,
            frequency_penalty=sp.frequency_penalty,
            repetition_penalty=sp.repetition_penalty,
            generator=gen,
            num_logprobs=sp.logprobs,
            blocked_token_ids=blocked,
            prompt_token_ids=req.prompt_token_ids if penal else [],
            output_token_ids=req.output_token_ids if penal else [],
        )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
