"""Images and video over HTTP (Qwen2-VL fixture): the official `openai` client gets the same
tokens as `LLM.generate` on the same bytes (and as HF transformers for one image), usage
counts the expanded media tokens, a repeated image hits the embedding and prefix caches,
bad media is a 4xx, and a dead input worker fails its request with a 5xx and is replaced.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
from pathlib import Path

import av
import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from mmengine import LLM, SamplingParams
from mmengine.async_llm import AsyncLLM, InputWorkerDiedError, MediaInputError
from mmengine.config import EngineConfig
from mmengine.outputs import RequestOutput
from tests.processors.media_helpers import bomb_png, png_bytes
from tests.server.harness import MODEL_NAME, ServerHarness, metric, pid_alive, scrape, wait_for

torch.set_num_threads(1)

MAX_TOKENS = 10
IMAGE = png_bytes(100, 140, seed=1)  # 112 x 140 after resizing: 20 placeholder tokens
IMAGE_B = png_bytes(60, 90, seed=2)
QUESTION = "what is in the picture?"


def encode_mp4(num_frames: int = 4, height: int = 56, width: int = 84, fps: int = 4) -> bytes:
    """A small MPEG-4 clip of random frames, within the test server's 5-frame cap."""
    frames = np.random.default_rng(6).integers(0, 255, (num_frames, height, width, 3), np.uint8)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return buf.getvalue()


VIDEO = encode_mp4()


def data_url(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def server_messages(parts: list[str | tuple[str, str]]) -> list[dict]:
    """Parts are text, or (kind, url) with kind "image" or "video"."""
    content = []
    for part in parts:
        if isinstance(part, str):
            content.append({"type": "text", "text": part})
        else:
            kind, url = part
            content.append({"type": f"{kind}_url", f"{kind}_url": {"url": url}})
    return [{"role": "user", "content": content}]


def reference(llm: LLM, parts: list[str | tuple[str, bytes]]) -> RequestOutput:
    """``LLM.generate`` on the chat-template text and the same encoded bytes."""
    content: list[dict] = []
    media: dict[str, list[bytes]] = {}
    for part in parts:
        if isinstance(part, str):
            content.append({"type": "text", "text": part})
        else:
            content.append({"type": part[0]})
            media.setdefault(part[0], []).append(part[1])
    text = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0)
    return llm.generate({"prompt": text, "multi_modal_data": media}, params, use_tqdm=False)[0]


def assert_served_like(url: str, messages: list[dict], ref: RequestOutput) -> None:
    """Non-streaming and streaming replies carry the reference's tokens, text and usage."""
    out = ref.outputs[0]
    assert out.token_ids, "an empty reference output proves nothing"
    expected_tokens = [lp[t].decoded_token for lp, t in zip(out.logprobs, out.token_ids)]
    c = client(url)
    got = c.chat.completions.create(
        model=MODEL_NAME, messages=messages, temperature=0, max_tokens=MAX_TOKENS, logprobs=True
    )
    choice = got.choices[0]
    assert [t.token for t in choice.logprobs.content] == expected_tokens
    assert choice.message.content == out.text
    assert choice.finish_reason == out.finish_reason
    assert got.usage.prompt_tokens == len(ref.prompt_token_ids)  # placeholders expanded
    assert got.usage.completion_tokens == len(out.token_ids)
    chunks = list(
        c.chat.completions.create(
            model=MODEL_NAME, messages=messages, temperature=0, max_tokens=MAX_TOKENS,
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == out.text
    assert chunks[-1].usage.prompt_tokens == len(ref.prompt_token_ids)
    assert chunks[-1].usage.completion_tokens == len(out.token_ids)


# ---- the same tokens as LLM.generate (and HF) ----------------------------------------------------
def test_image_by_allowlisted_http_url_matches_llm_generate_and_hf(
    vlm_api_allowlisted: str, vlm_reference_llm: LLM, qwen2_vl_ckpt: Path, serve_media
) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    url = serve_media("/one.png", IMAGE, "image/png")
    ref = reference(vlm_reference_llm, [("image", IMAGE), QUESTION])
    assert_served_like(vlm_api_allowlisted, server_messages([("image", url), QUESTION]), ref)

    proc = AutoProcessor.from_pretrained(qwen2_vl_ckpt)
    model = AutoModelForImageTextToText.from_pretrained(qwen2_vl_ckpt, dtype=torch.float32).eval()
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    image = Image.open(io.BytesIO(IMAGE)).convert("RGB")
    inputs = proc(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        hf = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert ref.prompt_token_ids == inputs["input_ids"][0].tolist()  # what usage counted
    assert ref.outputs[0].token_ids == hf[0, prompt_len:].tolist()


def test_image_by_data_url_matches_llm_generate(vlm_api: str, vlm_reference_llm: LLM) -> None:
    ref = reference(vlm_reference_llm, [QUESTION, ("image", IMAGE_B)])
    messages = server_messages([QUESTION, ("image", data_url("image/png", IMAGE_B))])
    assert_served_like(vlm_api, messages, ref)


def test_several_images_in_one_message_match_llm_generate(
    vlm_api_allowlisted: str, vlm_reference_llm: LLM, serve_media
) -> None:
    url = serve_media("/first.png", IMAGE, "image/png")
    parts = ["compare", ("image", IMAGE), "with", ("image", IMAGE_B)]
    ref = reference(vlm_reference_llm, parts)
    sent = ["compare", ("image", url), "with", ("image", data_url("image/png", IMAGE_B))]
    assert_served_like(vlm_api_allowlisted, server_messages(sent), ref)


def test_video_by_url_matches_llm_generate_given_the_same_bytes(
    vlm_api_allowlisted: str, vlm_reference_llm: LLM, serve_media
) -> None:
    url = serve_media("/clip4.mp4", VIDEO, "video/mp4")
    ref = reference(vlm_reference_llm, [("video", VIDEO), "what moves?"])
    assert_served_like(vlm_api_allowlisted, server_messages([("video", url), "what moves?"]), ref)


def named_image(image: bytes, uuid: str) -> list[dict]:
    """A chat message of one image (a data: URL) whose part carries a client ``uuid``."""
    messages = server_messages([("image", data_url("image/png", image)), QUESTION])
    messages[0]["content"][0]["uuid"] = uuid
    return messages


def served_tokens(url: str, messages: list[dict]) -> list[str]:
    got = client(url).chat.completions.create(
        model=MODEL_NAME, messages=messages, temperature=0, max_tokens=MAX_TOKENS, logprobs=True
    )
    return [t.token for t in got.choices[0].logprobs.content]


def test_a_client_uuid_cannot_pull_another_images_cached_embeddings_unless_trusted(
    vlm_api: str, vlm_api_trusting_uuids: str, vlm_reference_llm: LLM
) -> None:
    """A media part's uuid replaces its content hash as the cache key. Untrusted (the
    default), the server drops it: an image sent under another image's uuid still gets
    its own answer. Trusted, the uuid is the key, as the client asked."""
    image_c = png_bytes(100, 140, seed=3)  # IMAGE's size: the same placeholder count
    ref = {}
    for name, image in (("a", IMAGE), ("c", image_c), ("b", IMAGE_B)):
        out = reference(vlm_reference_llm, [("image", image), QUESTION]).outputs[0]
        ref[name] = [lp[t].decoded_token for lp, t in zip(out.logprobs, out.token_ids)]
    assert ref["a"] != ref["c"] and ref["a"] != ref["b"]  # else the test proves nothing

    assert served_tokens(vlm_api, named_image(IMAGE, "victim")) == ref["a"]
    assert served_tokens(vlm_api, named_image(image_c, "victim")) == ref["c"]
    assert served_tokens(vlm_api, named_image(IMAGE_B, "victim")) == ref["b"]

    trusting = vlm_api_trusting_uuids
    assert served_tokens(trusting, named_image(IMAGE, "shared")) == ref["a"]
    assert served_tokens(trusting, named_image(image_c, "shared")) == ref["a"]  # A's, by uuid
    # Another size under the same uuid never takes embeddings of the wrong row count.
    assert served_tokens(trusting, named_image(IMAGE_B, "shared")) == ref["b"]


def test_n_greedy_completions_of_an_image_prompt_all_match_llm_generate(
    vlm_api: str, vlm_reference_llm: LLM
) -> None:
    ref = reference(vlm_reference_llm, [("image", IMAGE_B), QUESTION])
    messages = server_messages([("image", data_url("image/png", IMAGE_B)), QUESTION])
    got = client(vlm_api).chat.completions.create(
        model=MODEL_NAME, messages=messages, temperature=0, max_tokens=MAX_TOKENS, n=2
    )
    assert [c.message.content for c in got.choices] == [ref.outputs[0].text] * 2
    assert got.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_max_tokens_must_fit_beside_the_expanded_prompt(
    vlm_api: str, vlm_reference_llm: LLM
) -> None:
    expanded = len(reference(vlm_reference_llm, [("image", IMAGE_B), QUESTION]).prompt_token_ids)
    messages = server_messages([("image", data_url("image/png", IMAGE_B)), QUESTION])
    # Fits beside the prompt as typed (one placeholder), not beside the expanded one.
    too_many = 4096 - expanded + 1
    with pytest.raises(openai.BadRequestError) as info:
        client(vlm_api).chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=too_many
        )
    assert info.value.body["code"] == "context_length_exceeded"
    assert info.value.body["param"] == "max_tokens"


# ---- caches --------------------------------------------------------------------------------------
def test_second_turn_with_the_same_image_hits_embedding_and_prefix_caches_in_metrics(
    vlm_api_allowlisted: str, serve_media
) -> None:
    url = serve_media("/turns.png", png_bytes(100, 140, seed=21), "image/png")
    c = client(vlm_api_allowlisted)
    turn1 = server_messages([("image", url), QUESTION])
    first = c.chat.completions.create(
        model=MODEL_NAME, messages=turn1, temperature=0, max_tokens=MAX_TOKENS
    )
    before = scrape(vlm_api_allowlisted)
    turn2 = [
        *turn1,
        {"role": "assistant", "content": first.choices[0].message.content},
        *server_messages([("image", url), "and what is in this one?"]),
    ]
    second = c.chat.completions.create(
        model=MODEL_NAME, messages=turn2, temperature=0, max_tokens=MAX_TOKENS
    )
    after = scrape(vlm_api_allowlisted)

    def grew(name: str) -> float:
        return metric(after, name) - metric(before, name)

    assert second.choices[0].finish_reason
    assert grew("mmengine:embedding_cache_hits_total") >= 1  # the image sent again
    assert grew("mmengine:embedding_cache_misses_total") == 0
    assert grew("mmengine:encoder_runs_total") == 0
    assert grew("mmengine:prefix_cache_hits_total") > 0  # turn 1's prompt
    assert grew("mmengine:mm_prefix_cache_hits_total") > 0  # ... including its image
    assert 0 < metric(after, "mmengine:embedding_cache_hit_rate") <= 1


# ---- bad media and dead workers ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("mime", "payload", "status"),
    [("image/png", IMAGE[:80], 400), ("image/png", bomb_png(), 413),
     ("video/mp4", VIDEO[:40] + b"\x00" * 300, 400)],
    ids=["truncated-image", "bomb-image", "corrupt-video"],
)  # fmt: skip
def test_bad_media_is_4xx_and_the_next_image_request_gets_the_right_tokens(
    vlm_api: str, vlm_reference_llm: LLM, mime: str, payload: bytes, status: int
) -> None:
    kind = mime.split("/")[0]
    resp = httpx.post(
        f"{vlm_api}/v1/chat/completions",
        json={"model": MODEL_NAME, "max_tokens": 2,
              "messages": server_messages([(kind, data_url(mime, payload)), QUESTION])},
        timeout=30,
    )  # fmt: skip
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == "messages" and "Traceback" not in error["message"]
    ref = reference(vlm_reference_llm, [("image", IMAGE_B), QUESTION])
    messages = server_messages([("image", data_url("image/png", IMAGE_B)), QUESTION])
    assert_served_like(vlm_api, messages, ref)


def image_prompt(engine_tokenizer: object, media: list) -> dict:
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    text = engine_tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return {"prompt": text, "multi_modal_data": {"image": media}}


async def drain(agen) -> object:  # noqa: ANN001 - an AsyncLLM.generate iterator
    return [out async for out in agen][-1]


def test_media_refused_by_the_workers_raises_a_client_safe_error_with_its_status(
    vlm_harness: ServerHarness,
) -> None:
    engine = vlm_harness.engine
    greedy = SamplingParams(temperature=0, max_tokens=2)
    for media, status in (([b"not an image at all" * 5], 400), ([bomb_png()], 413)):
        prompt = image_prompt(engine.tokenizer, media)
        with pytest.raises(MediaInputError) as info:
            vlm_harness.call(drain(engine.generate(prompt, greedy, f"refused-{status}")))
        assert info.value.status == status and "Traceback" not in info.value.message
    assert engine.num_unfinished == 0


def test_a_dead_input_worker_fails_its_in_flight_request_and_the_pool_is_replaced(
    vlm_harness: ServerHarness, vlm_api: str, vlm_reference_llm: LLM, media_url: str,
    media_hits: list[str],
) -> None:  # fmt: skip
    engine = vlm_harness.engine
    restarts = metric(scrape(vlm_api), "mmengine:input_worker_restarts_total")
    (worker,) = engine.input_worker_pids
    before = len(media_hits)
    # A URL the workers fetch themselves: the media server never answers it, so the
    # worker is provably inside this request when it is killed.
    prompt = image_prompt(engine.tokenizer, [f"{media_url}/slow.png"])
    greedy = SamplingParams(temperature=0, max_tokens=2)
    pending = asyncio.run_coroutine_threadsafe(
        drain(engine.generate(prompt, greedy, "doomed")), vlm_harness.loop
    )
    wait_for(lambda: "/slow.png" in media_hits[before:], timeout=10)
    os.kill(worker, signal.SIGKILL)
    with pytest.raises(InputWorkerDiedError):
        pending.result(timeout=5)
    (replacement,) = engine.input_worker_pids
    assert replacement != worker
    ref = reference(vlm_reference_llm, [("image", IMAGE_B), QUESTION])
    messages = server_messages([("image", data_url("image/png", IMAGE_B)), QUESTION])
    assert_served_like(vlm_api, messages, ref)
    # Dying while idle costs no request: the next one goes to a fresh pool.
    os.kill(replacement, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{replacement}").exists(), timeout=5)  # reaped by its pool
    assert_served_like(vlm_api, messages, ref)
    assert metric(scrape(vlm_api), "mmengine:input_worker_restarts_total") == restarts + 2
    assert engine.num_unfinished == 0 and engine.is_healthy()


def test_a_worker_death_reaches_http_clients_as_500_in_openai_shape(
    vlm_harness: ServerHarness, vlm_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def died(prompt: object) -> None:
        raise InputWorkerDiedError("An input-processing worker died while handling this request.")

    monkeypatch.setattr(vlm_harness.engine, "preprocess", died)
    messages = server_messages([("image", data_url("image/png", IMAGE_B)), QUESTION])
    for stream in (False, True):
        resp = httpx.post(
            f"{vlm_api}/v1/chat/completions",
            json={"model": MODEL_NAME, "messages": messages, "max_tokens": 2, "stream": stream},
            timeout=30,
        )
        assert resp.status_code == 500
        error = resp.json()["error"]
        assert error["code"] == "input_worker_died" and error["type"] == "server_error"
    monkeypatch.undo()
    ok = client(vlm_api).chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2)
    assert ok.choices[0].finish_reason


def test_engine_shutdown_stops_its_input_workers_and_core(
    qwen2_vl_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the engine-core child
    config = EngineConfig(
        model=str(qwen2_vl_ckpt), dtype="float32", device="cpu", max_model_len=512,
        num_kv_blocks=64, num_input_workers=2,
    )  # fmt: skip

    async def run() -> tuple[list[int], int | None]:
        engine = AsyncLLM(config)
        await engine.start()
        try:
            pids = engine.input_worker_pids
            assert len(pids) == 2 and all(pid_alive(p) for p in pids)  # started with the engine
        finally:
            engine.shutdown()
        return pids, engine.core_pid

    workers, core = asyncio.run(run())
    # Gone as soon as shutdown() returns: not left for interpreter exit to clean up.
    assert not any(pid_alive(p) for p in [*workers, core])
