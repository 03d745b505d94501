"""Messages between the frontend and the engine core (msgpack via msgspec, never pickle)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
import torch

from mmengine.sampling_params import SamplingParams
from mmengine.shm_payloads import (
    MIN_PAYLOAD_BYTES,
    discard_payloads,
    read_payload,
    write_payload,
)

if TYPE_CHECKING:
    from mmengine.input_processor import ProcessedMsg


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Logprobs at one position: the chosen token first, then the top-k by rank."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]  # rank of each token under the raw distribution (1 = best)


class SamplingParamsMsg(msgspec.Struct, array_like=True):
    """Wire form of ``SamplingParams`` (the fields the engine core needs)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    max_tokens: int | None
    min_tokens: int
    stop_token_ids: list[int]
    ignore_eos: bool
    logprobs: int | None
    prompt_logprobs: int | None


class TensorMsg(msgspec.Struct, array_like=True):
    """A tensor as raw bytes (no pickle): dtype name, shape, contiguous data; or, for big
    tensors, the name of a shared-memory payload file holding them (``shm_payloads``)."""

    dtype: str
    shape: list[int]
    data: bytes
    shm: str = ""  # payload file name; data is empty then


class PixelNormMsg(msgspec.Struct, array_like=True):
    """Wire form of ``processors.types.PixelNorm`` (normalization left to the encoder)."""

    mean: list[float]
    std: list[float]
    channel_axis: int


class MMItemMsg(msgspec.Struct, array_like=True):
    """One preprocessed multimodal item and where its placeholders sit in the prompt."""

    modality: str  # "image" or "video"
    content_hash: str
    offset: int  # first placeholder token in the (expanded) prompt
    length: int  # placeholder tokens == embedding rows
    pixel_values: TensorMsg  # normalized in the engine dtype, or uint8 with pixel_norm
    grid_thw: list[int] | None = None
    second_per_grid_t: float | None = None
    pixel_norm: PixelNormMsg | None = None  # set for uint8 pixels


class EngineCoreRequest(msgspec.Struct):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParamsMsg
    share_prompt_with: str | None = None
    mm_items: list[MMItemMsg] = []
    mrope_positions: TensorMsg | None = None  # int64 [3, num_prompt_tokens]
    mrope_delta: int = 0


def params_to_msg(p: SamplingParams) -> SamplingParamsMsg:
    """The engine core's fields of ``p`` (the message names them as SamplingParams does)."""
    fields = {name: getattr(p, name) for name in SamplingParamsMsg.__struct_fields__}
    fields["stop_token_ids"] = list(p.stop_token_ids)
    return SamplingParamsMsg(**fields)


def msg_to_params(msg: SamplingParamsMsg) -> SamplingParams:
    """Back to ``SamplingParams`` in the engine core; its validation runs again there."""
    return SamplingParams(**msgspec.structs.asdict(msg))


def completion_ids(request_id: str, n: int) -> list[str]:
    """Engine-core request ids of a request's ``n`` completions (the id itself for one)."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


def core_requests(
    ids: list[int], mm: ProcessedMsg | None, params: SamplingParams, core_ids: list[str]
) -> list[EngineCoreRequest]:
    """One engine-core request per completion; completions 2..n share the first's prompt
    (its KV blocks, and its media items, which are sent with each)."""
    return [
        EngineCoreRequest(
            request_id=cid,
            prompt_token_ids=ids,
            params=params_to_msg(params if params.n == 1 else params.for_child(i)),
            share_prompt_with=core_ids[0] if i > 0 else None,
            mm_items=mm.mm_items if mm is not None else [],
            mrope_positions=mm.mrope_positions if mm is not None else None,
            mrope_delta=mm.mrope_delta if mm is not None else 0,
        )
        for i, cid in enumerate(core_ids)
    ]


class EngineCoreOutput(msgspec.Struct, array_like=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # a chunk of prompt positions
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None


class EngineStats(msgspec.Struct):
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    mm_prefix_cache_hit_tokens: int = 0
    num_preemptions: int = 0
    prompt_tokens_computed: int = 0
    generation_tokens: int = 0
    num_steps: int = 0
    requests_finished: int = 0
    # Where the engine-core time went (seconds, since start): schedule / update are host
    # bookkeeping; prefill / decode steps run from a step's launch until its tokens are on
    # the host (input prep + GPU + sampling). With async scheduling consecutive steps
    # overlap, so these sums can exceed the wall time.
    time_schedule_s: float = 0.0
    time_update_s: float = 0.0
    time_prefill_steps_s: float = 0.0
    time_decode_steps_s: float = 0.0
    time_prepare_inputs_s: float = 0.0
    time_encoder_s: float = 0.0
    num_prefill_steps: int = 0
    num_decode_steps: int = 0
    # Steps that replayed a CUDA graph (GPU): decode graphs, and mixed-step graphs (steps
    # with prompt chunks up to `mixed_graph_max_tokens`); the rest were launched op by op.
    num_graph_decode_steps: int = 0
    num_graph_prompt_steps: int = 0
    encoder_runs: int = 0
    encoder_items: int = 0
    embedding_cache_hits: int = 0
    embedding_cache_misses: int = 0
    # CUDA caching allocator since start: cudaMalloc calls and retries (a retry frees
    # every cached block and synchronizes). Growth of either during serving stalls steps.
    cuda_malloc_calls: int = 0
    cuda_alloc_retries: int = 0


class EngineInfo(msgspec.Struct):
    """Sent once by the engine core when it is ready."""

    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    block_size: int
    device: str
    dtype: str
    kv_cache_bytes: int = 0  # memory of the whole KV pool (for the start-up log)


class EngineCoreOutputs(msgspec.Struct):
    outputs: list[EngineCoreOutput] = []
    stats: EngineStats | None = None  # answer to a stats call
    info: EngineInfo | None = None  # the ready message
    ok: bool = True  # answer to a yes/no call (reset_prefix_cache)
    call_id: int | None = None
    dead: str | None = None  # the engine core failed and is exiting: why
    error: str | None = None  # why a call failed (ok=False), for the caller to raise


class ControlMsg(msgspec.Struct):
    """Frontend -> core: one of add / abort / stats / reset_prefix_cache / start_profile /
    stop_profile / shutdown."""

    kind: str
    requests: list[EngineCoreRequest] = []
    abort_ids: list[str] = []
    call_id: int | None = None
    path: str | None = None  # start_profile: where the trace goes


def tensor_to_msg(t: torch.Tensor, payload_prefix: str | None = None) -> TensorMsg:
    """Wire form of `t`; with a payload prefix, a big tensor goes to a shared-memory file
    (falling back to inline bytes when that fails)."""
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    dtype, shape = str(t.dtype).replace("torch.", ""), list(t.shape)
    if payload_prefix is not None and raw.numel() >= MIN_PAYLOAD_BYTES:
        name = write_payload(payload_prefix, memoryview(raw.numpy()))
        if name is not None:
            return TensorMsg(dtype, shape, b"", name)
    return TensorMsg(dtype, shape, raw.numpy().tobytes())


def msg_to_tensor(m: TensorMsg) -> torch.Tensor:
    """The tensor of a TensorMsg; a payload file is read once and deleted.

    Raises:
        ValueError: an unknown dtype, or a payload file that is missing or of the wrong size.
    """
    dtype = getattr(torch, m.dtype, None)
    if not isinstance(dtype, torch.dtype):
        if m.shm:
            discard_payloads([m.shm])
        raise ValueError(f"bad tensor dtype {m.dtype!r}")
    if m.shm:
        count = 1
        for n in m.shape:
            count *= int(n)
        data = read_payload(m.shm, count * torch.empty((), dtype=dtype).element_size())
    else:
        data = bytearray(m.data)
    flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(m.shape)


def payload_names(items: list[MMItemMsg]) -> list[str]:
    """The shared-memory payload files that multimodal items refer to."""
    return [m.pixel_values.shm for m in items if m.pixel_values.shm]
