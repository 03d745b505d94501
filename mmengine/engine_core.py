"""The engine core: owns the model and the scheduler; ``step()`` = schedule -> run -> update.

With async scheduling (the default on GPUs) a step is: schedule and launch step N+1, then
wait for step N's tokens and update from them. The host plans, prepares and launches one
step while the GPU still computes the previous one, instead of leaving the GPU idle
during every step's Python work. Outputs reach the caller one step later; a request that
stops (EOS) at step N has one wasted token computed at N+1, which is dropped.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import torch

from mmengine.config import EngineConfig
from mmengine.kv_memory import default_num_kv_blocks, kv_bytes_per_block, profile_num_kv_blocks
from mmengine.messages import (
    EngineCoreOutput,
    EngineCoreRequest,
    EngineInfo,
    EngineStats,
    MMItemMsg,
    msg_to_params,
    msg_to_tensor,
    payload_names,
)
from mmengine.model_loader import load_model_spec, resolve_dtype, resolve_model_path
from mmengine.model_runner import ModelRunner, PendingStep
from mmengine.request import MMPosition, Request
from mmengine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from mmengine.shm_payloads import discard_payloads
from mmengine.step_trace import StepRecord, StepTrace
from mmengine.warmup import warm_up

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but no CUDA GPU is available")
    return dev


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        path = resolve_model_path(config.model, config.revision)
        self.spec = load_model_spec(path)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.spec, self.device)
        max_len = config.max_model_len or self.spec.max_position_embeddings
        if max_len > self.spec.max_position_embeddings:
            logger.warning(
                "max_model_len=%d exceeds the model's max_position_embeddings=%d",
                max_len,
                self.spec.max_position_embeddings,
            )
        window = self.spec.sliding_window
        if window is not None and max_len > window:
            logger.warning(
                "this model uses sliding-window attention (window %d), which mmengine does "
                "not implement: max_model_len capped %d -> %d, where it equals full attention",
                window,
                max_len,
                window,
            )
            max_len = window
        self.max_model_len = max_len
        self.runner = ModelRunner(config, self.spec, path, self.device, self.dtype, max_len)
        default_tokens = 2048 if self.device.type == "cpu" else 8192
        max_batched = config.max_num_batched_tokens or default_tokens
        if config.num_kv_blocks:
            num_blocks = config.num_kv_blocks
        elif self.device.type == "cuda":
            num_blocks = profile_num_kv_blocks(self.runner, max_batched, config.max_num_seqs)
        else:
            num_blocks = default_num_kv_blocks(self.runner, config.max_num_seqs)
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.capture_cuda_graphs(config.max_num_seqs, max_batched)
        warm_up(self.runner, max_batched, config.max_num_seqs)
        per_block = kv_bytes_per_block(self.spec, config.block_size, self.dtype)
        logger.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB), max_model_len=%d",
            num_blocks,
            config.block_size,
            num_blocks * per_block / 2**20,
            max_len,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=max_batched,
                max_model_len=max_len,
                block_size=config.block_size,
                num_kv_blocks=num_blocks,
                enable_prefix_caching=config.enable_prefix_caching,
                max_num_encoder_tokens=config.max_num_encoder_tokens,
                encoder_store_tokens=self._store_tokens(),
            )
        )
        self._timing = dict.fromkeys(
            ("schedule", "update", "prefill", "decode", "prefill_steps", "decode_steps"), 0.0
        )
        self._last_log = time.monotonic()
        # Payload name -> pixels, for the n > 1 completions of one prompt: each child
        # request names the same payload file, which only the first read finds.
        self._recent_payloads: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._last_gen_tokens = 0
        self._last_prompt_tokens = 0
        self._last_encoder_items = 0
        self._last_steps = self._last_graph_steps = self._last_graph_prompt_steps = 0
        self.async_scheduling = (
            config.async_scheduling
            if config.async_scheduling is not None
            else self.device.type == "cuda"
        )
        self._in_flight: tuple[SchedulerOutput, PendingStep, float] | None = None
        logger.info("async scheduling: %s", "on" if self.async_scheduling else "off")
        self.trace = StepTrace.from_env(self.device)  # MMENGINE_STEP_TRACE (step_trace.py)

        self._profiler: tuple[torch.profiler.profile, str] | None = None

    def close(self) -> None:
        """Writes the step trace, if one is being recorded, and an unfinished profile."""
        if self._profiler is not None:
            self.stop_profile()
        if self.trace is not None:
            self.trace.dump()

    # ---- torch.profiler of the engine core (LLM.start_profile) ------------------------------
    def start_profile(self, path: str) -> None:
        """Starts torch.profiler (host ranges and, on a GPU, every kernel) in this process;
        `stop_profile` writes a Chrome trace to `path` (gzipped if it ends in .gz)."""
        if self._profiler is not None:
            raise RuntimeError("a profile is already being recorded")
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=acts)
        prof.start()
        self._profiler = (prof, path)
        logger.info("profiling the engine core into %s", path)

    def stop_profile(self) -> str:
        """Stops the profiler started by `start_profile`; returns the trace's path."""
        if self._profiler is None:
            raise RuntimeError("no profile is being recorded (call start_profile first)")
        prof, path = self._profiler
        self._profiler = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        prof.stop()
        prof.export_chrome_trace(path)
        logger.info("profile written to %s", path)
        return path

    def _store_tokens(self) -> int:
        row_bytes = self.spec.hidden_size * torch.empty((), dtype=self.dtype).element_size()
        return max(1, self.config.encoder_store_mib * (1 << 20) // row_bytes)

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, msg: EngineCoreRequest) -> EngineCoreOutput | None:
        """Queue a request; a bad one is answered with an error output, nothing else."""
        req = self.make_request(msg)
        if isinstance(req, EngineCoreOutput):
            return req
        return self.add_prepared(req)

    def add_prepared(self, req: Request) -> EngineCoreOutput | None:
        """Hands a request built by ``make_request`` to the scheduler."""
        try:
            self.scheduler.add_request(req)
        except ValueError as e:
            return EngineCoreOutput(req.request_id, [], finish_reason="error", error=str(e))
        return None

    def make_request(self, msg: EngineCoreRequest) -> Request | EngineCoreOutput:
        """Validates a request and reads its pixels; a bad one becomes an error output.

        Touches no scheduler state, so the engine-core process runs it on its input thread
        (reading the shared-memory pixel payloads there overlaps the GPU steps); only that
        one thread may call it, since it keeps the recently read payloads.
        """
        try:
            # Pixels first: reading a shared-memory payload deletes its file, so a request
            # refused below leaves nothing behind in /dev/shm.
            items = sorted(msg.mm_items, key=lambda m: m.offset)
            mm_inputs = _mm_items(items, self._recent_payloads)
            params = msg_to_params(msg.params)
            vocab = self.spec.vocab_size
            if not msg.prompt_token_ids:
                raise ValueError("the prompt is empty")
            if any(t < 0 or t >= vocab for t in msg.prompt_token_ids):
                raise ValueError(f"prompt token ids must be in [0, {vocab})")
            if msg.mm_items and self.runner.encoder_runner is None:
                raise ValueError("this model takes no images or videos")
            for m in items:
                if m.offset < 0 or m.offset + m.length > len(msg.prompt_token_ids):
                    raise ValueError("a multimodal item lies outside the prompt")
            req = Request(
                request_id=msg.request_id,
                prompt_token_ids=list(msg.prompt_token_ids),
                sampling_params=params,
                eos_token_ids=self.spec.eos_token_ids,
                share_prompt_with=msg.share_prompt_with,
                mm_positions=[MMPosition(m.content_hash, m.offset, m.length) for m in items],
                mm_inputs=mm_inputs,
                mrope_positions=(
                    msg_to_tensor(msg.mrope_positions) if msg.mrope_positions is not None else None
                ),
                mrope_delta=msg.mrope_delta,
            )
        except ValueError as e:
            return EngineCoreOutput(msg.request_id, [], finish_reason="error", error=str(e))
        return req

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        done = self.scheduler.abort_requests(request_ids)
        return [EngineCoreOutput(rid, [], finish_reason="abort") for rid in done]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[EngineCoreOutput]:
        """Runs one step; returns the outputs of the step whose tokens are now known (this
        one, or with async scheduling the one before)."""
        if self._in_flight is not None and self.scheduler.num_sync_requests:
            # Some request needs exact host state to plan its next step (penalties,
            # prompt logprobs): finish the step in flight first.
            return self._finish_in_flight()
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            outputs = self._finish_in_flight()
            # Requests that finished in the last step before going idle: nothing runs now,
            # but the runner must still forget them.
            self.runner.release(sched.finished_req_ids)
            return outputs
        t1 = time.perf_counter()
        self._timing["schedule"] += t1 - t0
        rec = self.trace.begin(t0, t1 - t0, sched) if self.trace is not None else None
        pending = self.runner.execute(sched)  # launched; no wait for the GPU yet
        if rec is not None:
            self.trace.launched(rec, time.perf_counter() - t1)
        outputs = self._finish_in_flight(rec)
        self._in_flight = (sched, pending, t1)
        if not self.async_scheduling:
            outputs = self._finish_in_flight(rec)
        self._maybe_log()
        return outputs

    def _finish_in_flight(self, rec: StepRecord | None = None) -> list[EngineCoreOutput]:
        """Waits for the step in flight (if any) and updates the scheduler from it.
        ``rec``: the trace record of the step during whose planning this runs."""
        if self._in_flight is None:
            return []
        sched, pending, t1 = self._in_flight
        self._in_flight = None
        tw = time.perf_counter()
        result = pending.result()  # the step's one host sync
        t2 = time.perf_counter()
        outputs = self.scheduler.update_from_output(sched, result)
        # Forget finished requests' sampling state now, not at the next step (there may be
        # none for a while). Aborts arrive through the next schedule's finished_req_ids.
        self.runner.release([o.request_id for o in outputs if o.finish_reason is not None])
        tm = self._timing
        tm["update"] += time.perf_counter() - t2
        if rec is not None:
            rec.wait_s, rec.update_s = t2 - tw, time.perf_counter() - t2
        # Launch to result: with async scheduling this overlaps the next step's planning.
        kind = "decode" if all(s.num_tokens == 1 for s in sched.scheduled) else "prefill"
        tm[kind] += t2 - t1
        tm[kind + "_steps"] += 1
        return outputs

    # ---- introspection ---------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s, kv = self.scheduler.stats, self.scheduler.kv
        graphs = self.runner.graphs
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=kv.pool.num_usable_blocks,
            kv_blocks_used=kv.num_used_blocks(),
            prefix_cache_queried_tokens=kv.stats.queried_tokens,
            prefix_cache_hit_tokens=kv.stats.hit_tokens,
            mm_prefix_cache_hit_tokens=kv.stats.mm_hit_tokens,
            **self._encoder_stats(),
            **self._allocator_stats(),
            time_schedule_s=self._timing["schedule"],
            time_update_s=self._timing["update"],
            time_prefill_steps_s=self._timing["prefill"],
            time_decode_steps_s=self._timing["decode"],
            time_prepare_inputs_s=self.runner.time_prepare_s,
            time_encoder_s=self.runner.encoder_seconds(),
            num_prefill_steps=int(self._timing["prefill_steps"]),
            num_decode_steps=int(self._timing["decode_steps"]),
            num_graph_decode_steps=graphs.decode_replays if graphs is not None else 0,
            num_graph_prompt_steps=graphs.mixed_replays if graphs is not None else 0,
            num_preemptions=s.num_preemptions,
            prompt_tokens_computed=s.prompt_tokens_computed,
            generation_tokens=s.generation_tokens,
            num_steps=s.num_steps,
            requests_finished=s.requests_finished,
        )

    def _allocator_stats(self) -> dict[str, int]:
        if self.device.type != "cuda":
            return {}
        m = torch.cuda.memory_stats(self.device)
        return {
            "cuda_malloc_calls": int(m.get("num_device_alloc", 0)),
            "cuda_alloc_retries": int(m.get("num_alloc_retries", 0)),
        }

    def _encoder_stats(self) -> dict[str, int]:
        er = self.runner.encoder_runner
        if er is None:
            return {}
        st = er.stats
        return {
            "encoder_runs": st.encoder_runs,
            "encoder_items": st.items_encoded,
            "embedding_cache_hits": st.cache_hits,
            "embedding_cache_misses": st.cache_misses,
        }

    def info(self) -> EngineInfo:
        return EngineInfo(
            max_model_len=self.max_model_len,
            vocab_size=self.spec.vocab_size,
            num_kv_blocks=self.runner.num_kv_blocks,
            block_size=self.config.block_size,
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
            kv_cache_bytes=self.runner.num_kv_blocks
            * kv_bytes_per_block(self.spec, self.config.block_size, self.dtype),
        )

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv.reset_prefix_cache()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        dt = now - self._last_log
        if dt < self.config.log_stats_interval_s:
            return
        st = self.stats()
        hit = st.prefix_cache_hit_tokens / max(st.prefix_cache_queried_tokens, 1)
        logger.info(
            "running %d, waiting %d | KV blocks %d/%d (%.0f%%) | prefix-cache hit %.1f%% | "
            "prompt %.1f tok/s, generation %.1f tok/s | preemptions %d",
            st.num_running,
            st.num_waiting,
            st.kv_blocks_used,
            st.kv_blocks_total,
            100 * st.kv_blocks_used / max(st.kv_blocks_total, 1),
            100 * hit,
            (st.prompt_tokens_computed - self._last_prompt_tokens) / dt,
            (st.generation_tokens - self._last_gen_tokens) / dt,
            st.num_preemptions,
        )
        if self.runner.graphs is not None:
            graph_steps = st.num_graph_decode_steps + st.num_graph_prompt_steps
            steps = st.num_steps - self._last_steps
            logger.info(
                "CUDA graphs: %d of %d steps replayed (%d with prompt chunks); the rest were "
                "launched op by op",
                graph_steps - self._last_graph_steps,
                steps,
                st.num_graph_prompt_steps - self._last_graph_prompt_steps,
            )
            self._last_graph_steps = graph_steps
            self._last_graph_prompt_steps = st.num_graph_prompt_steps
        self._last_steps = st.num_steps
        if self.runner.encoder_runner is not None:
            looked_up = st.embedding_cache_hits + st.embedding_cache_misses
            logger.info(
                "vision encoder: %d items encoded (%.1f/s) | embedding-cache hit %.1f%% | "
                "prefix-cache tokens from multimodal blocks %d",
                st.encoder_items,
                (st.encoder_items - self._last_encoder_items) / dt,
                100 * st.embedding_cache_hits / max(looked_up, 1),
                st.mm_prefix_cache_hit_tokens,
            )
            self._last_encoder_items = st.encoder_items
        self._last_log = now
        self._last_gen_tokens = st.generation_tokens
        self._last_prompt_tokens = st.prompt_tokens_computed


_RECENT_PAYLOADS = 8  # children of one prompt arrive right after it


def _mm_items(items: list[MMItemMsg], recent: OrderedDict[str, torch.Tensor]) -> list:
    """Items with their pixels; on any failure, payload files not yet read are deleted."""
    out = []
    try:
        for m in items:
            out.append(_mm_item(m, recent))
    except BaseException:
        discard_payloads([n for n in payload_names(items[len(out) :]) if n not in recent])
        raise
    return out


def _mm_item(m: MMItemMsg, recent: OrderedDict[str, torch.Tensor]):  # noqa: ANN202
    """A processors.types.MultiModalItem from its wire form."""
    from processors.types import MultiModalItem, PixelNorm, PlaceholderRange

    n = m.pixel_norm
    norm = None if n is None else PixelNorm(tuple(n.mean), tuple(n.std), n.channel_axis)
    return MultiModalItem(
        modality=m.modality,
        content_hash=m.content_hash,
        pixel_values=_pixels(m, recent),
        num_tokens=m.length,
        grid_thw=tuple(m.grid_thw) if m.grid_thw else None,  # type: ignore[arg-type]
        second_per_grid_t=m.second_per_grid_t,
        placeholder=PlaceholderRange(m.offset, m.length),
        pixel_norm=norm,
    )


def _pixels(m: MMItemMsg, recent: OrderedDict[str, torch.Tensor]) -> torch.Tensor:
    name = m.pixel_values.shm
    if not name:
        return msg_to_tensor(m.pixel_values)
    if name in recent:
        recent.move_to_end(name)
        return recent[name]
    pixels = msg_to_tensor(m.pixel_values)
    recent[name] = pixels
    while len(recent) > _RECENT_PAYLOADS:
        recent.popitem(last=False)
    return pixels
