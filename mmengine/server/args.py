"""Command-line flags of ``mmengine serve``: the server's own and one per engine option.

Engine flags are generated from ``EngineConfig``'s fields so that a new engine option
becomes a flag without touching this file; its ``--help`` line comes from
``ENGINE_FLAG_HELP`` (a test checks that every field has one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable
from typing import Any

from mmengine.config import EXTRA_OPTIONS, EngineConfig, parse_extra_value
from processors.config import MediaConfig

# EngineConfig fields that are not flags: the model is the positional argument; the server
# always runs the engine core in its own process; `extra` has its own repeatable --extra.
NOT_FLAGS = frozenset({"model", "multiprocess", "extra"})
# EngineConfig fields set by a server flag of the same name (which also sets the media path).
SERVER_OWNED = frozenset({"limit_mm_per_prompt"})

ENGINE_FLAG_HELP: dict[str, str] = {
    "tokenizer": "Tokenizer folder or hub id, if not the model's own.",
    "dtype": "Weight and activation dtype: auto (the checkpoint's), float32, bfloat16, float16.",
    "device": "auto (CUDA if available, else CPU), cpu, cuda or cuda:N.",
    "max_model_len": "Context length (prompt + output tokens). Default: the model's.",
    "block_size": "Tokens per KV-cache block (a power of two).",
    "num_kv_blocks": "KV-cache size in blocks. Default: sized from free memory.",
    "gpu_memory_utilization": "Fraction of GPU memory the engine may use (weights + KV cache).",
    "cpu_kv_cache_gib": "KV-cache budget in GiB when running on CPU and --num-kv-blocks is unset.",
    "cpu_threads": "torch CPU threads of the engine-core process. Default: 4 on a GPU (more "
    "only competed with the input workers for the cores), this process's setting on the CPU.",
    "max_num_seqs": "Most requests processed together in one engine step.",
    "max_num_batched_tokens": "Most tokens per step; longer prefills are chunked to fit. "
    "Default: 8192 on a GPU, 2048 on the CPU.",
    "enable_prefix_caching": "Reuse the KV cache of identical prompt prefixes across requests.",
    "seed": "Seed for requests that do not set their own.",
    "enforce_eager": "GPU: run eagerly, without CUDA graphs or torch.compile (slower, for debugging).",
    "async_scheduling": "Plan and launch each step while the GPU still runs the previous one "
    "(default: on for GPUs, off on CPU).",
    "revision": "Model revision (branch, tag or commit) when the model is a hub id.",
    "log_stats_interval_s": "Seconds between the engine's periodic status log lines.",
    "max_num_encoder_tokens": "Most vision-encoder output rows computed in one step.",
    "encoder_store_mib": "MiB of vision embeddings the engine holds until their prefill runs.",
    "mm_embedding_cache_gib": "GiB of vision-encoder outputs cached by content hash (LRU).",
    "num_input_workers": "Input-processing (media) processes; 0 runs it in a frontend thread.",
}

_MIB = 1024 * 1024


def parse_limit_mm(text: str) -> dict[str, int]:
    """``image=4,video=1`` or ``{"image": 4, "video": 1}`` -> {"image": 4, "video": 1}."""
    try:
        if text.strip().startswith("{"):
            raw = json.loads(text)
        else:
            raw = dict(item.split("=", 1) for item in text.split(",") if item.strip())
        limits = {str(k).strip(): int(v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError):
        raise argparse.ArgumentTypeError(
            f"expected image=N,video=M or a JSON object, got {text!r}"
        ) from None
    unknown = set(limits) - {"image", "video"}
    if unknown or any(v < 0 for v in limits.values()):
        raise argparse.ArgumentTypeError("limits are non-negative counts for image and video")
    return limits


def _default_mm_limits() -> dict[str, int]:
    """The engine's default per-prompt limits (the media path's if the engine has none)."""
    for f in dataclasses.fields(EngineConfig):
        if f.name == "limit_mm_per_prompt" and f.default_factory is not dataclasses.MISSING:
            return dict(f.default_factory())
    return dict(MediaConfig().limit_mm_per_prompt)


def mm_limits_from_args(args: argparse.Namespace) -> dict[str, int]:
    """--limit-mm-per-prompt over the defaults: a modality it does not name keeps its default."""
    return {**_default_mm_limits(), **getattr(args, "limit_mm_per_prompt", {})}


def split_list(values: list[str] | None) -> tuple[str, ...]:
    """Flags given several times, space- or comma-separated, as one tuple."""
    return tuple(v.strip() for raw in values or [] for v in raw.split(",") if v.strip())


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def _float_checked(text: str, ok: Callable[[float], bool], what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _float_checked(text, lambda v: v > 0, "a positive number of seconds")


def _non_negative_float(text: str) -> float:
    return _float_checked(text, lambda v: v >= 0, "a number of seconds >= 0")


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address to listen on; 0.0.0.0 for all interfaces (default: %(default)s).",
    )
    p.add_argument(
        "--port",
        type=_int_at_least(0, 65535),
        default=8000,
        help="Port to listen on; 0 picks a free one (default: %(default)s).",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="Require 'Authorization: Bearer KEY' on every /v1 route. "
        "Default: the MMENGINE_API_KEY environment variable, if set.",
    )
    # Lists are repeatable flags or comma-separated values, never nargs="+": that would
    # swallow a MODEL given after them ("--allowed-media-domains a.com /models/x").
    p.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        metavar="NAME",
        help="Model name clients use in requests; repeatable or comma-separated, the first "
        "is the one reported. Default: the MODEL argument.",
    )
    p.add_argument(
        "--allowed-media-domains",
        action="append",
        default=None,
        metavar="HOST",
        help="Only fetch image/video URLs from these hosts ('example.com', '.example.com' for "
        "subdomains too); repeatable or comma-separated. Listed hosts may be private or "
        "loopback addresses. Default: any public host; private, loopback and link-local "
        "addresses are refused.",
    )
    p.add_argument(
        "--allowed-local-media-path",
        action="append",
        default=None,
        help="Directory whose files may be sent as file:// URLs (repeatable). Default: none, "
        "file:// URLs are refused.",
    )
    p.add_argument(
        "--limit-mm-per-prompt",
        type=parse_limit_mm,
        default=argparse.SUPPRESS,
        help="Most images/videos per prompt, e.g. 'image=4,video=1' or '{\"image\": 4}'; "
        f"more are refused with 400. Default: {_default_mm_limits()}.",
    )
    p.add_argument(
        "--media-fetch-timeout",
        type=_positive_float,
        default=30.0,
        help="Seconds allowed to download one image or video, redirects included "
        "(default: %(default)s).",
    )
    p.add_argument(
        "--media-workers",
        type=_int_at_least(1),
        default=4,
        help="Threads of this server process that download image/video URLs (default: "
        "%(default)s). Decoding happens in the input workers (--num-input-workers).",
    )
    p.add_argument(
        "--trust-media-uuids",
        action="store_true",
        help="Use the 'uuid' of image/video content parts as their cache key instead of "
        "hashing their bytes. Only for clients that may share a cache: a client could "
        "otherwise name its image after another's and be served the other's cached "
        "embeddings. Default: uuids are ignored.",
    )
    p.add_argument(
        "--max-request-body-bytes",
        type=_int_at_least(1),
        default=32 * _MIB,
        help="Larger request bodies are refused with 413 (default: %(default)s).",
    )
    p.add_argument(
        "--request-body-timeout",
        type=_positive_float,
        default=30.0,
        help="Seconds a client has to send a whole request body; slower bodies get 408 and "
        "hold no admission slot meanwhile (default: %(default)s).",
    )
    p.add_argument(
        "--max-concurrent-requests",
        type=_int_at_least(1),
        default=1024,
        help="Inference requests served at once; more are refused at once with 503 "
        "(clients retry) instead of queueing without bound (default: %(default)s).",
    )
    p.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="Accept 'chat_template' in requests (refused by default).",
    )
    p.add_argument(
        "--chat-template-timeout",
        type=_positive_float,
        default=5.0,
        help="Seconds a chat template may take to render before the request is refused "
        "(default: %(default)s).",
    )
    p.add_argument(
        "--request-template-processes",
        type=_int_at_least(1),
        default=2,
        help="With --trust-request-chat-template: sandbox processes that render "
        "request-supplied templates, each killed and replaced at the time limit; more "
        "such requests at once wait, then get 503 (default: %(default)s).",
    )
    p.add_argument(
        "--shutdown-grace-period",
        type=_non_negative_float,
        default=30.0,
        help="On SIGTERM/SIGINT: seconds in-flight requests get to finish while new ones get 503 "
        "(default: %(default)s).",
    )
    p.add_argument(
        "--startup-timeout",
        type=_positive_float,
        default=900.0,
        help="Seconds loading the model may take (default: %(default)s).",
    )
    p.add_argument(
        "--profiler-dir",
        default=None,
        metavar="DIR",
        help="Enable POST /start_profile and /stop_profile: torch.profiler of the engine "
        "core (host ranges and every GPU kernel), each trace written to DIR as "
        "mmengine-core-<time>.json.gz. Off by default: profiling slows serving. With "
        "--api-key these routes need the key too.",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="Log verbosity of the server and the engine (default: %(default)s).",
    )


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field (``max_model_len`` -> ``--max-model-len``).

    Flags left out are absent from the namespace, so EngineConfig's own defaults apply.
    """
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        if f.name in NOT_FLAGS or f.name in SERVER_OWNED:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = ENGINE_FLAG_HELP.get(f.name, "Engine option (see EngineConfig).")
        if default is not None:  # None: the help text says what the default is
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")
        base = _base_type(hints[f.name])
        if base is bool:
            action: Any = argparse.BooleanOptionalAction
            p.add_argument(flag, action=action, default=argparse.SUPPRESS, help=help_text)
        else:
            kind = _json_value if base in (dict, list) else base
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)
    known = "; ".join(
        f"{k}: {o.help} (default {str(o.default).lower() if o.kind is bool else o.default})"
        for k, o in EXTRA_OPTIONS.items()
    )
    p.add_argument(
        "--extra",
        type=_extra_item,
        action="append",
        default=argparse.SUPPRESS,
        metavar="KEY=VALUE",
        help=f"A switch of the GPU path, repeatable (e.g. --extra gemv_max_tokens=0). {known}.".replace(
            "%", "%%"
        ),
    )


def _extra_item(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of --extra, VALUE checked and converted to the option's kind."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or key not in EXTRA_OPTIONS:
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY one of {', '.join(sorted(EXTRA_OPTIONS))}; got {text!r}"
        )
    try:
        return key, parse_extra_value(key, value.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``dict[str, int]`` -> dict; ``str`` -> str."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected JSON, got {text!r}") from None


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in dataclasses.fields(EngineConfig)} - NOT_FLAGS
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if "limit_mm_per_prompt" in given:
        given["limit_mm_per_prompt"] = mm_limits_from_args(args)
    extra = dict(getattr(args, "extra", None) or [])
    return EngineConfig(model=args.model, multiprocess=True, extra=extra, **given)


def media_config_from_args(args: argparse.Namespace) -> MediaConfig:
    kwargs: dict[str, Any] = {
        "allowed_domains": split_list(args.allowed_media_domains),
        "allowed_local_paths": tuple(
            os.path.abspath(p) for p in split_list(args.allowed_local_media_path)
        ),
        "fetch_deadline_s": args.media_fetch_timeout,
        "connect_timeout_s": min(MediaConfig.connect_timeout_s, args.media_fetch_timeout),
        "read_timeout_s": min(MediaConfig.read_timeout_s, args.media_fetch_timeout),
    }
    kwargs["limit_mm_per_prompt"] = mm_limits_from_args(args)
    return MediaConfig(**kwargs)
