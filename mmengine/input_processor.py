"""Turns a prompt plus its images/videos into what the engine core needs.

load (fetch / decode) -> per-model preprocessing -> content hash -> placeholder
expansion -> Qwen2-VL 3-D M-RoPE positions. CPU-heavy, so it runs in worker processes
(``InputWorkers``) off the frontend's event loop and the engine-core loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch

from mmengine.bytes_pool import BytesProcessPool
from mmengine.messages import MMItemMsg, PixelNormMsg, TensorMsg, tensor_to_msg
from mmengine.model_loader import text_config
from processors.config import MediaConfig
from processors.errors import MediaError
from processors.types import MultiModalItem

MEDIA_KEYS = {"image": "image", "images": "image", "video": "video", "videos": "video"}


@dataclass
class ProcessedPrompt:
    prompt_token_ids: list[int]  # with every placeholder expanded to its item's length
    items: list[MultiModalItem]  # in prompt order, placeholders set
    mrope_positions: torch.Tensor | None = None  # [3, len(prompt_token_ids)]
    mrope_delta: int = 0
    stats: dict[str, float] = field(default_factory=dict)


class ProcessedMsg(msgspec.Struct):
    """Wire form of ``ProcessedPrompt`` (worker -> frontend), or the error."""

    prompt_token_ids: list[int] = []
    mm_items: list[MMItemMsg] = []
    mrope_positions: TensorMsg | None = None
    mrope_delta: int = 0
    error: str | None = None
    error_status: int = 400


class InputProcessor:
    """Per-model media preprocessing for one checkpoint folder."""

    def __init__(
        self,
        model_path: str | Path,
        hf_config: dict[str, Any],
        media_config: MediaConfig | None = None,
        limit_mm_per_prompt: dict[str, int] | None = None,
        pixel_dtype: torch.dtype = torch.float32,
        payload_prefix: str | None = None,
    ) -> None:
        from processors.hf_config import read_processor_configs

        self.model_type = hf_config.get("model_type", "")
        self.media = media_config or MediaConfig()
        self.limits = dict(limit_mm_per_prompt or {"image": 16, "video": 2})
        self.pixel_dtype = pixel_dtype
        # Pixels go to shared-memory payload files with this name prefix (None: inline).
        self.payload_prefix = payload_prefix
        cfgs = read_processor_configs(model_path)
        tc = text_config(hf_config)
        vc = hf_config.get("vision_config") or {}
        if self.model_type in ("qwen2_vl", "qwen2_5_vl"):
            from processors.qwen2_vl import Qwen2VLPreprocessor

            if cfgs.image is None:
                raise ValueError(f"{model_path} has no image processor config")
            # Pixels stay uint8 until the encoder normalizes them on its device: the
            # worker -> frontend -> engine path moves a quarter of float32's bytes (W1 on
            # an H100: the frontend received ~460 MB/s of bf16 pixels, the GPU waited).
            self.qwen = Qwen2VLPreprocessor.from_config(
                cfgs.image, cfgs.video, defer_normalize=True
            )
            self.token_ids = {
                "image": int(hf_config.get("image_token_id", tc.get("image_token_id", 151655))),
                "video": int(hf_config.get("video_token_id", tc.get("video_token_id", 151656))),
            }
            self.vision_start = int(
                hf_config.get("vision_start_token_id", tc.get("vision_start_token_id", 151652))
            )
            self.merge = int(vc.get("spatial_merge_size", 2))
            self.tokens_per_second = (
                float(vc.get("tokens_per_second", 2)) if self.model_type == "qwen2_5_vl" else None
            )
        elif self.model_type == "llava":
            from processors.clip import ClipPreprocessor, llava_num_image_tokens

            if cfgs.image is None:
                raise ValueError(f"{model_path} has no image processor config")
            self.clip = ClipPreprocessor.from_config(cfgs.image, defer_normalize=True)
            self.clip_tokens = llava_num_image_tokens(
                vc.get("image_size", 336),
                vc.get("patch_size", 14),
                hf_config.get("vision_feature_select_strategy", "default"),
            )
            self.token_ids = {
                "image": int(
                    hf_config.get("image_token_index", hf_config.get("image_token_id", 32000))
                )
            }
        else:
            raise ValueError(f"model_type {self.model_type!r} takes no images or videos")

    # ---- loading ------------------------------------------------------------------------
    def _bytes(self, source: str, modality: str, trusted: bool) -> bytes | str:
        """A URL (http(s), data:, file:) through the guarded fetcher; a plain path from
        the trusted Python API is read as is."""
        from processors.fetch import fetch_media

        if "://" in source or source.startswith("data:"):
            return fetch_media(source, self.media, modality=modality)
        if trusted and os.path.isfile(source):
            return source
        raise MediaError("media must be given as an http(s), data: or file: URL")

    def _load_image(self, src: Any, uuid: str | None, trusted: bool) -> MultiModalItem:
        from processors.image import decode_image

        raw = None
        if isinstance(src, (bytes, bytearray)):
            raw = bytes(src)
        elif isinstance(src, str):
            got = self._bytes(src, "image", trusted)
            raw = got if isinstance(got, bytes) else Path(got).read_bytes()
        image = decode_image(raw, self.media) if raw is not None else src
        if self.model_type == "llava":
            item = self.clip.preprocess_image(image, self.clip_tokens, source_bytes=raw, uuid=uuid)
        else:
            item = self.qwen.preprocess_image(image, source_bytes=raw, uuid=uuid)
        return item

    def _load_video(self, src: Any, uuid: str | None, trusted: bool) -> MultiModalItem:
        from processors.video import decode_video, video_from_frames

        if self.model_type == "llava":
            raise MediaError("this model takes no videos")
        raw = None
        sampling = self.qwen.video_sampling(self.media)
        if isinstance(src, (bytes, bytearray, str)):
            got = self._bytes(src, "video", trusted) if isinstance(src, str) else bytes(src)
            raw = got if isinstance(got, bytes) else None
            video = decode_video(got, self.media, sampling, deadline_s=self.media_deadline())
        else:
            # Frames given directly are taken as they are. Their rate matters to
            # Qwen2.5-VL's temporal positions: {"frames": ..., "fps": x} gives it; else 24
            # frames per second is assumed, as HF processors do without metadata.
            fps = 24.0
            if isinstance(src, dict):
                fps, src = float(src.get("fps", fps)), src["frames"]
            video = video_from_frames(src, fps, self.media)
        return self.qwen.preprocess_video(video.frames, video.fps, source_bytes=raw, uuid=uuid)

    def media_deadline(self) -> float:
        return float(self.media.video_decode_deadline_s)

    # ---- the whole prompt -----------------------------------------------------------------
    def process(
        self,
        prompt_token_ids: list[int],
        mm_data: dict[str, Any],
        mm_uuids: dict[str, Any] | None = None,
        trusted: bool = False,
    ) -> ProcessedPrompt:
        from processors.placeholders import check_limit_mm_per_prompt, expand_placeholders

        by_kind: dict[str, list[tuple[Any, str | None]]] = {"image": [], "video": []}
        for key, value in (mm_data or {}).items():
            kind = MEDIA_KEYS.get(key)
            if kind is None:
                raise MediaError(f"unknown multimodal input kind {key!r} (use 'image' or 'video')")
            values = _as_list(kind, value)
            uuids = list((mm_uuids or {}).get(key) or [])
            for i, v in enumerate(values):
                by_kind[kind].append((v, uuids[i] if i < len(uuids) else None))
        check_limit_mm_per_prompt({k: len(v) for k, v in by_kind.items() if v}, self.limits)
        loaded = {
            "image": [self._load_image(s, u, trusted) for s, u in by_kind["image"]],
            "video": [self._load_video(s, u, trusted) for s, u in by_kind["video"]],
        }
        # Items in the order their placeholders appear in the prompt.
        order = []
        counters = {"image": 0, "video": 0}
        kind_of = {tid: kind for kind, tid in self.token_ids.items()}
        for t in prompt_token_ids:
            kind = kind_of.get(t)
            if kind is None:
                continue
            if counters[kind] >= len(loaded[kind]):
                raise MediaError(f"the prompt has more {kind} placeholders than {kind}s were given")
            order.append(loaded[kind][counters[kind]])
            counters[kind] += 1
        for kind, items in loaded.items():
            if counters[kind] != len(items):
                raise MediaError(
                    f"{len(items)} {kind}(s) given but the prompt has {counters[kind]} {kind} "
                    "placeholder(s)"
                )
        ids = expand_placeholders(prompt_token_ids, order, self.token_ids)
        out = ProcessedPrompt(ids, order)
        if self.model_type in ("qwen2_vl", "qwen2_5_vl"):
            from processors.mrope import mrope_positions

            pos, delta = mrope_positions(
                ids,
                order,
                spatial_merge_size=self.merge,
                image_token_id=self.token_ids["image"],
                video_token_id=self.token_ids["video"],
                vision_start_token_id=self.vision_start,
                tokens_per_second=self.tokens_per_second,
            )
            out.mrope_positions, out.mrope_delta = pos, int(delta)
        return out

    def to_msg(self, p: ProcessedPrompt) -> ProcessedMsg:
        items = []
        for it in p.items:
            assert it.placeholder is not None
            items.append(
                MMItemMsg(
                    modality=it.modality,
                    content_hash=it.content_hash,
                    offset=it.placeholder.offset,
                    length=it.placeholder.length,
                    pixel_values=tensor_to_msg(
                        it.pixel_values
                        if it.pixel_norm is not None
                        else it.pixel_values.to(self.pixel_dtype),
                        self.payload_prefix,
                    ),
                    grid_thw=list(it.grid_thw) if it.grid_thw else None,
                    second_per_grid_t=it.second_per_grid_t,
                    pixel_norm=None
                    if it.pixel_norm is None
                    else PixelNormMsg(
                        list(it.pixel_norm.mean),
                        list(it.pixel_norm.std),
                        it.pixel_norm.channel_axis,
                    ),
                )
            )
        return ProcessedMsg(
            prompt_token_ids=p.prompt_token_ids,
            mm_items=items,
            mrope_positions=tensor_to_msg(p.mrope_positions)
            if p.mrope_positions is not None
            else None,
            mrope_delta=p.mrope_delta,
        )


def _as_list(kind: str, value: Any) -> list[Any]:
    """One item or a list of items. A video is a path/URL/bytes, a [T, ...] array, or a
    list of frames; a list of such videos is a list whose entries are videos."""
    if not isinstance(value, (list, tuple)):
        return [value]
    if kind == "image" or not value:
        return list(value)
    first = value[0]
    if isinstance(first, (str, bytes, list, tuple)) or getattr(first, "ndim", 0) == 4:
        return list(value)  # several videos
    return [value]  # one video given as frames


# ---- worker processes ---------------------------------------------------------------------
_WORKER: InputProcessor | None = None


def _init_worker(args: dict[str, Any]) -> None:
    global _WORKER
    torch.set_num_threads(max(1, int(args.pop("threads", 1))))
    media = MediaConfig(**args.pop("media")) if args.get("media") else None
    args.pop("media", None)
    _WORKER = InputProcessor(media_config=media, **args)


def _worker_pid() -> bytes:
    """A task that proves the worker running it has started (its initializer ran)."""
    import time

    time.sleep(0.01)  # hold the task briefly so the other workers pick up the rest
    return str(os.getpid()).encode()


def _run_in_worker(
    prompt_token_ids: list[int],
    mm_data: dict[str, Any],
    mm_uuids: dict[str, Any] | None,
    trusted: bool,
) -> bytes:
    assert _WORKER is not None
    try:
        msg = _WORKER.to_msg(_WORKER.process(prompt_token_ids, mm_data, mm_uuids, trusted))
    except MediaError as e:
        msg = ProcessedMsg(error=e.message, error_status=e.status)
    except ValueError as e:
        msg = ProcessedMsg(error=str(e), error_status=400)
    return msgspec.msgpack.encode(msg)


class InputWorkers:
    """A pool of input-processing processes (or one frontend thread when ``num_workers``
    is 0). ``submit`` returns a future of msgpack-encoded ``ProcessedMsg`` bytes; the
    processes' results are never unpickled (``BytesProcessPool``)."""

    def __init__(
        self,
        model_path: str | Path,
        hf_config: dict[str, Any],
        media_config: MediaConfig | None,
        limit_mm_per_prompt: dict[str, int] | None,
        pixel_dtype: torch.dtype,
        num_workers: int = 1,
    ) -> None:
        import concurrent.futures as cf
        import dataclasses
        import multiprocessing as mp

        from mmengine.shm_payloads import PayloadSession, shm_enabled

        # Pixels cross to the engine core as shared-memory files, not through the pool's
        # result pipe (see mmengine/shm_payloads.py); inline where /dev/shm is unusable.
        self.payloads = PayloadSession() if shm_enabled() else None
        args = {
            "model_path": str(model_path),
            "hf_config": hf_config,
            "media": dataclasses.asdict(media_config) if media_config else None,
            "limit_mm_per_prompt": limit_mm_per_prompt,
            "pixel_dtype": pixel_dtype,
            "payload_prefix": self.payloads.prefix if self.payloads is not None else None,
        }
        self._decoder = msgspec.msgpack.Decoder(ProcessedMsg)
        self.num_workers = num_workers
        if num_workers <= 0:
            _init_worker(dict(args, threads=torch.get_num_threads()))
            self._pool: Any = cf.ThreadPoolExecutor(1, thread_name_prefix="mm-input")
        else:
            # fork is cheap and needs no __main__ guard in user scripts; after CUDA has been
            # initialized in this process only spawn is safe.
            # Results come back as bytes, never unpickled (mmengine/bytes_pool.py).
            method = "spawn" if torch.cuda.is_initialized() else "fork"
            self._pool = BytesProcessPool(
                num_workers,
                mp_context=mp.get_context(method),
                initializer=_init_worker,
                initargs=(args,),
            )

    def launch(self) -> list[Any]:
        """One task per worker, without waiting (the processes start with the pool); the
        futures' results are the pids of the workers that took them, once initialized."""
        return [self._pool.submit(_worker_pid) for _ in range(max(self.num_workers, 0))]

    def start(self, timeout_s: float = 120.0) -> float:
        """Waits until every worker process has initialized (each a fresh interpreter
        importing torch when spawned: seconds of CPU). Left to the first requests, that
        lands in the middle of serving them; on an H200 a W1 run whose warm-up had started
        4 of 8 workers took 8.2 s, one whose warm-up had started all 8 took 5.9 s (with the
        executor that started processes as tasks arrived). Returns the seconds it took.

        Raises:
            RuntimeError: a worker could not start (its initializer failed) in time.
        """
        import time
        from concurrent.futures import TimeoutError as FutureTimeout
        from concurrent.futures.process import BrokenProcessPool

        t0 = time.monotonic()
        if self.num_workers <= 0:
            return 0.0  # one thread here, initialized in the constructor
        started: set[int] = set()
        try:
            while len(started) < self.num_workers:
                # One task per worker; a worker that is up takes several while the others
                # still import, so repeat until every process has answered.
                futures = self.launch()
                for f in futures:
                    left = timeout_s - (time.monotonic() - t0)
                    started.add(int(f.result(timeout=max(left, 0.0))))
                if len(started) < self.num_workers and time.monotonic() - t0 > timeout_s:
                    # The others answer every task: one worker is stuck in its start.
                    raise FutureTimeout()
        except (BrokenProcessPool, FutureTimeout) as e:
            raise RuntimeError(
                f"the input-processing workers did not start ({len(started)} of "
                f"{self.num_workers} within {timeout_s:.0f} s): {e!r}"
            ) from None
        return time.monotonic() - t0

    def submit(
        self,
        prompt_token_ids: list[int],
        mm_data: dict[str, Any],
        mm_uuids: dict[str, Any] | None = None,
        trusted: bool = False,
    ):  # noqa: ANN201 - concurrent.futures.Future[bytes]
        if self.payloads is not None:
            self.payloads.maybe_sweep()
        return self._pool.submit(_run_in_worker, prompt_token_ids, mm_data, mm_uuids, trusted)

    def decode(self, raw: bytes) -> ProcessedMsg:
        return self._decoder.decode(raw)

    def discard_result(self, future: Any) -> None:
        """Done-callback for a submitted prompt whose result nobody will use (cancelled,
        timed out, refused): deletes its pixel payload files."""
        if future.cancelled() or future.exception() is not None:
            return
        try:
            discard_processed(self.decode(future.result()))
        except Exception:  # a malformed result names no files
            pass

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.payloads is not None:
            self.payloads.close()


def discard_processed(msg: ProcessedMsg | None) -> None:
    """Deletes the payload files of a processed prompt that will not reach the engine."""
    if msg is not None and msg.mm_items:
        from mmengine.messages import payload_names
        from mmengine.shm_payloads import discard_payloads

        discard_payloads(payload_names(msg.mm_items))
