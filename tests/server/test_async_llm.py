"""AsyncLLM on its own: prompt forms, validation before sending, abort, cumulative outputs,
and the same with async scheduling in the engine core."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from mmengine import LLM, SamplingParams
from tests.server.harness import ServerHarness
from tests.test_hf_parity import MAX_NEW, hf_greedy, make_prompts

torch.set_num_threads(1)

GREEDY = SamplingParams(temperature=0, max_tokens=8)


async def last(agen) -> object:  # noqa: ANN001 - any async iterator
    outs = [out async for out in agen]
    return outs[-1] if outs else None


def test_prompt_forms_agree_with_llm_generate(harness: ServerHarness, reference_llm: LLM) -> None:
    engine = harness.engine
    text = "a blue square on the right"
    ids = engine.tokenizer(text)["input_ids"]
    ref = reference_llm.generate(text, GREEDY, use_tqdm=False)[0].outputs[0]

    async def run() -> list:
        return await asyncio.gather(
            last(engine.generate(text, GREEDY, "forms-a")),
            last(engine.generate({"prompt": text}, GREEDY, "forms-b")),
            last(engine.generate({"prompt_token_ids": ids}, GREEDY, "forms-c")),
        )

    outs = harness.call(run())
    for out in outs:
        assert out.finished and out.outputs[0].token_ids == ref.token_ids
    assert outs[0].prompt == text and outs[0].prompt_token_ids == ids


def test_outputs_are_cumulative_and_n_completions_arrive_together(harness: ServerHarness) -> None:
    params = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=6, ignore_eos=True)

    async def run() -> list:
        return [o async for o in harness.engine.generate("the cat", params, "cumulative")]

    outs = harness.call(run())
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths) and lengths[-1] == 6
    assert [c.index for c in outs[-1].outputs] == [0, 1, 2] and outs[-1].finished


@pytest.mark.parametrize(
    ("prompt", "says"),
    [("", "empty"), ({"prompt_token_ids": [1, 10**6]}, "outside the vocabulary"),
     ({"prompt_token_ids": [1] * 5000}, "max_model_len"), ({"nope": 1}, "a prompt is")],
)  # fmt: skip
def test_invalid_prompts_raise_value_error_before_reaching_the_engine(
    harness: ServerHarness, prompt: object, says: str
) -> None:
    async def run() -> None:
        await last(harness.engine.generate(prompt, GREEDY, "invalid"))  # type: ignore[arg-type]

    with pytest.raises(ValueError, match=says):
        harness.call(run())
    assert harness.engine.num_unfinished == 0


def test_abort_ends_the_iterator_and_frees_the_engine(harness: ServerHarness) -> None:
    engine = harness.engine
    params = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)

    async def run() -> tuple[int, dict]:
        seen = 0
        async for out in engine.generate("go on forever", params, "to-abort"):
            seen = len(out.outputs[0].token_ids)
            if seen >= 3:
                await engine.abort("to-abort")
        await asyncio.sleep(0.2)
        return seen, await engine.stats()

    seen, stats = harness.call(run())
    assert 3 <= seen < 3000
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0
    assert engine.num_unfinished == 0 and engine.is_healthy()


def test_streams_aborts_and_stop_strings_with_async_scheduling(
    async_harness: ServerHarness, qwen2_ckpt: Path
) -> None:
    prompts = make_prompts(6)
    refs = hf_greedy(qwen2_ckpt, prompts)
    engine = async_harness.engine
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)

    async def final(prompt: str, params: SamplingParams, rid: str):  # noqa: ANN202
        outs = [o async for o in engine.generate(prompt, params, rid)]
        return outs[-1]

    async def run() -> tuple[list, int, dict]:
        outs = await asyncio.gather(*(final(p, greedy, f"g{i}") for i, p in enumerate(prompts)))
        # An abort mid-stream.
        forever = SamplingParams(temperature=0.0, max_tokens=3000, ignore_eos=True)
        seen = 0
        async for out in engine.generate("go on forever", forever, "to-abort"):
            seen = len(out.outputs[0].token_ids)
            if seen >= 3:
                await engine.abort("to-abort")
        await asyncio.sleep(0.2)
        return outs, seen, await engine.stats()

    outs, seen, stats = async_harness.call(run(), timeout=120)
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert 3 <= seen < 3000
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0
    assert engine.num_unfinished == 0 and engine.is_healthy()
    # A stop string ends the request in the frontend (an abort to the core) while the core
    # already runs the next step for it.
    text = outs[0].outputs[0].text
    stop = text[len(text) // 2 :][:3]
    if stop.strip():
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, stop=[stop])
        cut = async_harness.call(final(prompts[0], params, "s"))
        assert cut.outputs[0].finish_reason == "stop"
        assert text.startswith(cut.outputs[0].text) and stop not in cut.outputs[0].text
    assert async_harness.call(engine.stats())["kv_blocks_used"] == 0
