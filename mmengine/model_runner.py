"""Executes one scheduled step: builds the packed batch, runs the decoder, samples.

The same code runs on CPU (plain-torch attention) and CUDA (Triton kernels); the GPU
additions (CUDA graphs, torch.compile, memory profiling) live in ``gpu_runner.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mmengine.attention import AttentionMetadata, forward_context
from mmengine.config import EngineConfig, ModelSpec
from mmengine.model_loader import iter_weights, llm_weight_name
from mmengine.models.decoder import DecoderModel, KVCache
from mmengine.request import Request
from mmengine.sampler import SamplingRow, prompt_logprobs, sample
from mmengine.scheduler import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """The packed batch of one step, on the model's device."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T], or [3, T] for M-RoPE
    meta: AttentionMetadata
    logits_rows: list[int]  # rows of the hidden states whose logits we need
    sample_reqs: list[tuple[Request, int]]  # (request, index into logits_rows) that sample
    prompt_lp_reqs: list[tuple[Request, int, int, int]]  # (req, first logits idx, first pos, n)


def kv_bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem


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
        self.generators: dict[str, torch.Generator] = {}

    def _load_model(self, path: Path, max_model_len: int) -> DecoderModel:
        with torch.device("meta"):
            model = DecoderModel(self.spec, max_position=max(max_model_len, 1))
        model = model.to_empty(device=self.device)
        model = model.to(self.dtype)
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
        weights = (
            (mapped, tensor)
            for name, tensor in iter_weights(path)
            if (mapped := llm_weight_name(name)) is not None
        )
        model.load_weights(weights)
        model.eval()
        return model

    # ---- KV memory -------------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (num_blocks, self.block_size, self.spec.num_kv_heads, self.spec.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.spec.num_layers)
        ]
        self.num_kv_blocks = num_blocks

    def default_num_kv_blocks(self, max_num_seqs: int) -> int:
        """CPU: the configured GiB budget, capped by what max_num_seqs full requests need."""
        per_block = kv_bytes_per_block(self.spec, self.block_size, self.dtype)
        budget = int(self.config.cpu_kv_cache_gib * (1 << 30)) // per_block
        need = max_num_seqs * -(-self.max_model_len // self.block_size) + 1
        return max(2, min(budget, need))

    # ---- one step -----------------------------------------------------------------------------
    def _positions(self, req: Request, start: int, n: int) -> list[int]:
        return list(range(start, start + n))

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logits_rows: list[int] = []
        sample_reqs: list[tuple[Request, int]] = []
        plp_reqs: list[tuple[Request, int, int, int]] = []
        bs = self.block_size
        for item in sched.scheduled:
            req, n = item.request, item.num_tokens
            start = req.num_computed_tokens
            ids.extend(req.all_token_ids[start : start + n])
            p = self._positions(req, start, n)
            pos.extend(p)
            table = item.block_ids
            slots.extend(table[i // bs] * bs + i % bs for i in range(start, start + n))
            row0 = qsl[-1]
            qsl.append(row0 + n)
            seq_lens.append(start + n)
            tables.append(table)
            if req.wants_prompt_logprobs() and start < req.num_prompt_tokens - 1:
                # Positions start..last predict prompt tokens start+1..; the last prompt
                # position predicts the first output token and is covered by sampling.
                last = min(start + n, req.num_prompt_tokens - 1)
                plp_reqs.append((req, len(logits_rows), start, last - start))
                logits_rows.extend(range(row0, row0 + last - start))
            if start + n == req.num_tokens:
                sample_reqs.append((req, len(logits_rows)))
                logits_rows.append(row0 + n - 1)
        width = max(len(t) for t in tables)
        table_tensor = torch.zeros(len(tables), width, dtype=torch.int32)
        for i, t in enumerate(tables):
            table_tensor[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=table_tensor.to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(seq_lens),
        )
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            meta=meta,
            logits_rows=logits_rows,
            sample_reqs=sample_reqs,
            prompt_lp_reqs=plp_reqs,
        )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        for rid in sched.finished_req_ids:
            self.generators.pop(rid, None)
        inputs = self.prepare(sched)
        with forward_context(inputs.meta):
            embeds = self.model.embed(inputs.input_ids)
            hidden = self.model(inputs.positions, embeds, self.kv_caches)
        result = RunnerOutput()
        if not inputs.logits_rows:
            return result
        rows = torch.tensor(inputs.logits_rows, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        for req, first, start, n in inputs.prompt_lp_reqs:
            nxt = req.prompt_token_ids[start + 1 : start + 1 + n]
            lps = prompt_logprobs(
                logits[first : first + n], nxt, req.sampling_params.prompt_logprobs or 0
            )
            chunk: list = [None] if start == 0 else []
            result.prompt_logprobs[req.request_id] = chunk + lps
        if inputs.sample_reqs:
            idx = torch.tensor([i for _, i in inputs.sample_reqs], device=self.device)
            out = sample(logits.index_select(0, idx), [self._row(r) for r, _ in inputs.sample_reqs])
            for (req, _), tok, lp in zip(inputs.sample_reqs, out.token_ids, out.logprobs):
                result.sampled_token_ids[req.request_id] = tok
                if lp is not None:
                    result.logprobs[req.request_id] = lp
        return result

    def _row(self, req: Request) -> SamplingRow:
        sp = req.sampling_params
        gen = None
        if sp.seed is not None and not sp.greedy:
            gen = self.generators.get(req.request_id)
            if gen is None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(sp.seed)
                self.generators[req.request_id] = gen
        blocked: list[int] = []
        if req.num_output_tokens < sp.min_tokens:
            blocked = list(sp.stop_token_ids) + ([] if sp.ignore_eos else req.eos_token_ids)
        penal = sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1.0
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
