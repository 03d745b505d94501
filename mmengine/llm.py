"""The offline Python API, in vLLM's conventions: ``LLM(...).generate(prompts, params)``."""

from __future__ import annotations

import itertools
import logging
import os
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from tqdm.auto import tqdm

from mmengine.config import EngineConfig
from mmengine.core_client import EngineDeadError, make_client
from mmengine.gc_heap import freeze_startup_heap, release_startup_heap
from mmengine.messages import EngineCoreRequest, completion_ids, core_requests, payload_names
from mmengine.model_loader import resolve_model_path
from mmengine.output_processor import OutputProcessor
from mmengine.outputs import RequestOutput
from mmengine.sampling_params import SamplingParams
from mmengine.shm_payloads import discard_payloads

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any]


def load_tokenizer(name: str, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(name, revision)
    return AutoTokenizer.from_pretrained(str(path))


def validate_prompt(
    ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int
) -> None:
    """Raises ValueError for a prompt the engine would refuse.

    Shared by ``LLM`` and ``AsyncLLM``; run on the prompt the engine will see (media
    placeholders expanded). The messages name counts and ids only, never paths, so the
    server returns them to clients as they are.
    """
    if not ids:
        raise ValueError("the prompt is empty")
    if len(ids) >= max_model_len:
        raise ValueError(
            f"the prompt has {len(ids)} tokens, but max_model_len is {max_model_len} "
            "(room for at least one output token is needed)"
        )
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    for t in params.stop_token_ids:
        if t >= vocab_size:
            raise ValueError(f"stop token id {t} is outside the vocabulary")


class LLM:
    """Generate text for batches of prompts with a continuously batched engine.

    Args:
        model: checkpoint folder or HF hub id (found in the local HF cache).
        tokenizer: tokenizer folder or id; defaults to ``model``.
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        device: "auto", "cpu" or "cuda".
        max_model_len: context length (prompt + output); defaults to the model's.
        max_num_seqs: requests processed together in one step.
        max_num_batched_tokens: tokens processed in one step (prefill is chunked to fit).
        enable_prefix_caching: reuse the KV of identical prompt prefixes.
        multiprocess: run the engine core in its own process (default); False runs it
            in this process, which is easier to debug. None: the environment variable
            MMENGINE_MULTIPROCESS decides (0/false/no: in this process).
        skip_tokenizer_init: no tokenizer: prompts must be token ids, outputs have no text.
        **kwargs: any other ``EngineConfig`` field (block_size, num_kv_blocks, seed, ...).
    """

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        multiprocess: bool | None = None,
        skip_tokenizer_init: bool = False,
        **kwargs: Any,
    ) -> None:
        self.config = EngineConfig(
            model=model,
            tokenizer=tokenizer,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            multiprocess=multiprocess,
            **kwargs,
        )
        self.tokenizer = (
            None
            if skip_tokenizer_init
            else load_tokenizer(tokenizer or model, self.config.revision)
        )
        self._client = make_client(self.config)
        # Shut the engine down even if the user forgets to: at garbage collection or exit.
        self._finalizer = weakref.finalize(self, self._client.shutdown)
        self._ids = itertools.count()
        self.max_model_len = self._client.max_model_len
        self.vocab_size = self._client.vocab_size
        self._inputs = self._start_input_workers()
        # Seconds from handing media to the workers until the last prompt reached the engine.
        self.last_media_time_s = 0.0
        self._media_t0: float | None = None
        if self._inputs is not None:
            weakref.finalize(self, self._inputs.shutdown)
        # The start-up heap out of the GC's full passes until shutdown (mmengine/gc_heap.py).
        freeze_startup_heap()
        self._unfreeze = weakref.finalize(self, release_startup_heap)

    def _start_input_workers(self) -> Any:
        import torch

        from mmengine.input_processor import InputWorkers
        from mmengine.model_loader import read_config

        path = resolve_model_path(self.config.model, self.config.revision)
        cfg = read_config(path)
        if "vision_config" not in cfg:
            return None
        workers = InputWorkers(
            path,
            cfg,
            None,
            self.config.limit_mm_per_prompt,
            getattr(torch, self._client.info.dtype),
            self.config.num_input_workers,
        )
        try:
            seconds = workers.start()
        except BaseException:
            workers.shutdown()
            raise
        logger.info(
            "input processing: %d worker process(es) ready in %.1f s",
            workers.num_workers,
            seconds,
        )
        return workers

    # ---- public API --------------------------------------------------------------------------
    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate completions for each prompt; returns outputs in prompt order.

        A prompt is a string, ``{"prompt": str}`` or ``{"prompt_token_ids": [...]}``.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        encoded = []
        for p in prompts:
            text, ids = self._encode(p)
            mm = None
            if isinstance(p, dict) and p.get("multi_modal_data"):
                mm = (p["multi_modal_data"], p.get("multi_modal_uuids"))
            encoded.append((text, ids, mm))
        return self._run(self._process_media(encoded), params, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them (OpenAI message dicts)."""
        from mmengine.chat_utils import split_media

        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in convs:
            conv, media, uuids = split_media(conv)
            text = self.tokenizer.apply_chat_template(
                conv,
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompts.append((text, ids, (media, uuids) if media else None))
        params = self._params_list(sampling_params, len(prompts))
        return self._run(self._process_media(prompts), params, use_tqdm)

    def stats(self) -> dict[str, Any]:
        """Engine counters: KV blocks, prefix-cache tokens, preemptions, tokens generated..."""
        return msgspec.structs.asdict(self._client.stats())

    def reset_prefix_cache(self) -> bool:
        return self._client.reset_prefix_cache()

    def start_profile(self, path: str | os.PathLike) -> None:
        """Starts torch.profiler inside the engine core (host ranges and every GPU kernel);
        `stop_profile()` writes a Chrome/Perfetto trace to `path` (gzipped if it ends in
        .gz). `benchmarks/profile_w1.py --analyse` summarizes one."""
        self._client.start_profile(str(Path(path).resolve()))

    def stop_profile(self) -> None:
        """Stops the profile started by `start_profile` and writes its trace."""
        self._client.stop_profile()

    def shutdown(self) -> None:
        """Stop the engine core (also done automatically at exit)."""
        self._finalizer()
        if hasattr(self, "_unfreeze"):
            self._unfreeze()

    close = shutdown

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- internals ---------------------------------------------------------------------------
    @staticmethod
    def _params_list(
        sp: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if sp is None:
            return [SamplingParams()] * n
        if isinstance(sp, SamplingParams):
            return [sp] * n
        sp = list(sp)
        if len(sp) != n:
            raise ValueError(f"got {len(sp)} sampling params for {n} prompts")
        return sp

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if self.tokenizer is None and not (
            isinstance(prompt, dict) and "prompt_token_ids" in prompt
        ):
            raise ValueError("without a tokenizer (skip_tokenizer_init) prompts must be token ids")
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                    raise ValueError("prompt_token_ids must be a list of integers")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer(prompt["prompt"])["input_ids"]
        raise ValueError("a prompt is a string, {'prompt': str} or {'prompt_token_ids': [...]}")

    def _process_media(self, prompts: list[tuple[str | None, list[int], Any]]) -> list[tuple]:
        """Hand every prompt's images/videos to the input workers (in parallel); each
        such prompt's third element becomes a future of the processed prompt."""
        self._media_t0 = time.perf_counter()
        out = []
        for text, ids, mm in prompts:
            if mm is None:
                out.append((text, ids, None))
                continue
            if self._inputs is None:
                raise ValueError("this model takes no images or videos")
            out.append((text, ids, self._inputs.submit(ids, mm[0], mm[1], trusted=True)))
        return out

    def _resolve_media(self, index: int, fut: Any) -> tuple[list[int], Any]:
        msg = self._inputs.decode(fut.result())
        if msg.error is not None:
            raise ValueError(f"prompt {index}: {msg.error}")
        return list(msg.prompt_token_ids), msg

    def _run(
        self,
        prompts: list[tuple[str | None, list[int], Any]],
        params: list[SamplingParams],
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        for (_, ids, mm), p in zip(prompts, params):
            if mm is None:  # media prompts are checked once expanded
                validate_prompt(ids, p, self.max_model_len, self.vocab_size)
        processor = OutputProcessor(self.tokenizer)
        order = [str(next(self._ids)) for _ in prompts]
        index_of = {rid: i for i, rid in enumerate(order)}
        # Prompts go to the engine as soon as their media is ready, in order, so the GPU
        # starts on the first ones while the workers still preprocess the rest.
        to_add = list(zip(order, prompts, params))
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc="Processed prompts", disable=not use_tqdm, unit="req")
        start, out_tokens = time.perf_counter(), 0
        batch: list[EngineCoreRequest] = []  # built, not yet sent to the engine
        try:
            while to_add or processor.has_unfinished():
                batch = []
                while to_add:
                    rid, (text, ids, mm), p = to_add[0]
                    if mm is not None and not isinstance(mm, msgspec.Struct):
                        if not mm.done() and (batch or processor.has_unfinished()):
                            break  # not ready: serve what we have meanwhile
                        ids, mm = self._resolve_media(index_of[rid], mm)
                        # A refusal here leaves this prompt's future in to_add: the
                        # except path below deletes its payload files.
                        validate_prompt(ids, p, self.max_model_len, self.vocab_size)
                    core_ids = completion_ids(rid, p.n)
                    reqs = core_requests(ids, mm, p, core_ids)
                    processor.add_request(rid, text, ids, p, core_ids)
                    batch.extend(reqs)
                    to_add.pop(0)
                if batch:
                    self._client.add_requests(batch)
                    batch = []
                if not to_add and getattr(self, "_media_t0", None) is not None:
                    # When the last prompt went to the engine: its media was all ready.
                    self.last_media_time_s = time.perf_counter() - self._media_t0
                    self._media_t0 = None
                outs = self._client.get_outputs(0.02 if to_add else 1.0)
                if not outs:
                    continue
                res = processor.process(outs)
                if res.abort_core_ids:
                    self._client.abort(res.abort_core_ids)
                for ro in res.updated:
                    if not ro.finished:
                        continue
                    errors = [c for c in ro.outputs if c.finish_reason == "error"]
                    if errors:
                        raise ValueError(f"request {ro.request_id} failed in the engine")
                    results[ro.request_id] = ro
                    out_tokens += sum(len(c.token_ids) for c in ro.outputs)
                    bar.update(1)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"output {out_tokens / elapsed:.1f} tok/s", refresh=False)
        except BaseException:
            # Interrupted or failed: leave nothing running in the engine for this batch,
            # and no pixel payloads of prompts that never reached it.
            discard_payloads([n for r in batch for n in payload_names(r.mm_items)])
            pending = [
                c for rid in order if rid not in results for c in processor.abort_request(rid)
            ]
            for _, (_, _, mm), _ in to_add:
                if mm is not None and hasattr(mm, "cancel"):
                    mm.cancel()
                    # A result that comes anyway (or came already) is deleted unread.
                    mm.add_done_callback(self._inputs.discard_result)
            try:
                self._client.abort(pending)
            except EngineDeadError:
                pass
            raise
        finally:
            bar.close()
        return [results[rid] for rid in order]
