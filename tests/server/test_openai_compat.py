"""The official `openai` client against the server: same tokens as `LLM`, OpenAI's shapes."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import torch

from mmengine import LLM, SamplingParams
from tests.server.harness import MODEL_NAME, metric, scrape

torch.set_num_threads(1)

MESSAGES = [
    {"role": "system", "content": "answer in one word"},
    {"role": "user", "content": "what color is the red circle?"},
]


def client(url: str, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, **kw)


def reference_chat(llm: LLM, messages: list[dict], **kw: object):
    return llm.chat(messages, SamplingParams(temperature=0, **kw), use_tqdm=False)[0]


def test_chat_non_streaming_matches_llm_tokens_text_and_usage(api: str, reference_llm: LLM) -> None:
    ref = reference_chat(reference_llm, MESSAGES, max_tokens=12, logprobs=0)
    got = client(api).chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=12, logprobs=True
    )
    choice = got.choices[0]
    ref_tokens = [
        lp[t].decoded_token for lp, t in zip(ref.outputs[0].logprobs, ref.outputs[0].token_ids)
    ]
    assert [c.token for c in choice.logprobs.content] == ref_tokens
    assert choice.message.content == ref.outputs[0].text
    assert choice.message.role == "assistant"
    assert choice.finish_reason == ref.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert got.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert got.object == "chat.completion" and got.model == MODEL_NAME


def test_chat_streaming_deltas_rebuild_the_llm_text_and_end_with_usage(
    api: str, reference_llm: LLM
) -> None:
    ref = reference_chat(reference_llm, MESSAGES, max_tokens=20)
    stream = client(api).chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert text == ref.outputs[0].text
    assert finish == [ref.outputs[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        ref.outputs[0].token_ids
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completions_string_and_token_id_prompts_match_llm_generate(
    api: str, reference_llm: LLM
) -> None:
    prompt = "the red circle moves"
    ids = reference_llm.get_tokenizer()(prompt)["input_ids"]
    ref = reference_llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False
    )[0]
    c = client(api)
    by_text = c.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=10)
    by_ids = c.completions.create(model=MODEL_NAME, prompt=ids, temperature=0, max_tokens=10)
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=10, stream=True
        )
    )
    assert by_text.choices[0].text == by_ids.choices[0].text == streamed == ref.outputs[0].text
    assert by_text.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert by_text.usage.prompt_tokens == len(ids)


def test_completions_batch_n_echo_and_logprobs_have_openai_shapes(api: str) -> None:
    c = client(api)
    out = c.completions.create(
        model=MODEL_NAME, prompt=["a cat", "a dog"], n=2, max_tokens=4, temperature=1.0, seed=7,
        logprobs=3,
    )  # fmt: skip
    assert sorted(ch.index for ch in out.choices) == [0, 1, 2, 3]
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    echoed = c.completions.create(model=MODEL_NAME, prompt="a cat", max_tokens=2, echo=True)
    assert echoed.choices[0].text.startswith("a cat")


def test_sampling_controls_stop_seed_and_max_completion_tokens_are_honoured(api: str) -> None:
    c = client(api)
    free = c.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=16
    )
    text = free.choices[0].message.content
    stop = text[3:6]
    cut = c.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=16, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    seeded = [
        c.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            temperature=1.0,
            seed=11,
            max_completion_tokens=8,
            extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True},
        )  # fmt: skip
        for _ in range(2)
    ]
    assert seeded[0].choices[0].message.content == seeded[1].choices[0].message.content
    assert seeded[0].usage.completion_tokens == 8 and seeded[0].choices[0].finish_reason == "length"


def test_streamed_text_with_stop_strings_never_retracts_what_was_sent(api: str) -> None:
    c = client(api)
    full = c.completions.create(model=MODEL_NAME, prompt="the cat", temperature=0, max_tokens=24)
    text = full.choices[0].text
    stop = text[8:12]
    chunks = c.completions.create(
        model=MODEL_NAME, prompt="the cat", temperature=0, max_tokens=24, stop=stop, stream=True
    )
    assert "".join(ch.choices[0].text for ch in chunks) == text[: text.index(stop)]


def test_models_version_and_health_endpoints(api: str) -> None:
    models = client(api).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert httpx.get(f"{api}/version").json()["version"]
    assert httpx.get(f"{api}/health").status_code == 200


def test_unknown_model_is_404_in_openai_shape(api: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(api).chat.completions.create(model="gpt-nope", messages=MESSAGES, max_tokens=2)
    assert info.value.body["param"] == "model"


def test_32_concurrent_streams_complete_correctly_and_metrics_count_them(
    api: str, reference_llm: LLM
) -> None:
    convs = [
        [{"role": "user", "content": f"story number {i} about a blue square"}] for i in range(32)
    ]
    refs = [
        reference_chat(reference_llm, conv, max_tokens=16)  # one at a time, as the server may
        for conv in convs
    ]
    before = scrape(api)
    health_latency: list[float] = []

    async def one(aclient: openai.AsyncOpenAI, conv: list[dict]) -> tuple[str, str, int]:
        stream = await aclient.chat.completions.create(
            model=MODEL_NAME, messages=conv, temperature=0, max_tokens=16, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        text, finish, usage = "", "", 0
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage.completion_tokens
            for ch in chunk.choices:
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
        return text, finish, usage

    async def probe_health(http: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():  # SECURITY.md 12: the loop stays responsive under load
            start = time.monotonic()
            assert (await http.get(f"{api}/health")).status_code == 200
            health_latency.append(time.monotonic() - start)
            await asyncio.sleep(0.05)

    async def run() -> list[tuple[str, str, int]]:
        aclient = openai.AsyncOpenAI(base_url=f"{api}/v1", api_key="none", max_retries=0)
        async with httpx.AsyncClient() as http:
            stop = asyncio.Event()
            prober = asyncio.create_task(probe_health(http, stop))
            results = await asyncio.gather(*(one(aclient, conv) for conv in convs))
            stop.set()
            await prober
        return results

    results = asyncio.run(run())
    for (text, finish, usage), ref in zip(results, refs):
        assert text == ref.outputs[0].text
        assert finish == ref.outputs[0].finish_reason
        assert usage == len(ref.outputs[0].token_ids)
    after = scrape(api)
    route = {"route": "/v1/chat/completions", "status": "200"}
    delta = metric(after, "mmengine:http_requests_total", **route) - metric(
        before, "mmengine:http_requests_total", **route
    )
    gen_delta = metric(after, "mmengine:generation_tokens_total") - metric(
        before, "mmengine:generation_tokens_total"
    )
    e2e_delta = metric(after, "mmengine:e2e_request_latency_seconds_count") - metric(
        before, "mmengine:e2e_request_latency_seconds_count"
    )
    assert delta == 32 and e2e_delta == 32
    assert gen_delta == sum(len(r.outputs[0].token_ids) for r in refs)
    assert metric(after, "mmengine:time_to_first_token_seconds_count") >= 32
    assert metric(after, "mmengine:num_requests_running") == 0
    assert max(health_latency) < 1.0
