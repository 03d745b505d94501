"""The oracle: float32 greedy tokens identical to HF transformers, in every engine mode."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from mmengine import LLM, SamplingParams

torch.set_num_threads(1)

MAX_NEW = 12
WORDS = [
    "the",
    "red",
    "circle",
    "moves",
    "left",
    "while",
    "a",
    "blue",
    "square",
    "waits",
    "on",
    "the",
    "right",
    "side",
    "of",
    "the",
    "picture",
    "under",
    "a",
    "green",
    "sky",
    "and",
    "nobody",
    "knows",
    "why",
    "résumé",
    "café",
    "naïve",
    "東京",
    "日本語",
]


def make_prompts(n: int = 22, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lengths = [1, 2, 3, 5, 8, 13, 21, 30, 40, 55] + [rng.randint(1, 50) for _ in range(n - 10)]
    return [" ".join(rng.choice(WORDS) for _ in range(k)) for k in lengths[:n]]


def shared_prefix_prompts(n: int = 20) -> list[str]:
    prefix = " ".join(WORDS * 3)  # ~100 tokens, several full KV blocks
    return [f"{prefix} question {i}: {WORDS[i % len(WORDS)]}" for i in range(n)]


_REF_CACHE: dict[tuple[str, tuple[str, ...]], list[list[int]]] = {}


def hf_greedy(ckpt: Path, prompts: list[str], max_new: int = MAX_NEW) -> list[list[int]]:
    """HF generate, one prompt at a time (no padding), float32."""
    key = (str(ckpt), tuple(prompts))
    if key in _REF_CACHE:
        return _REF_CACHE[key]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    refs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new, do_sample=False)
        refs.append(out[0, ids.shape[1] :].tolist())
    _REF_CACHE[key] = refs
    return refs


def engine_greedy(llm: LLM, prompts: list[str], max_new: int = MAX_NEW) -> list[list[int]]:
    outs = llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=max_new), use_tqdm=False
    )
    return [o.outputs[0].token_ids for o in outs]


def test_hf_refs_are_not_degenerate(text_ckpt: Path) -> None:
    refs = hf_greedy(text_ckpt, make_prompts())
    assert len({t for r in refs for t in r}) > 20, "fixture generates too few distinct tokens"
    assert len({tuple(r) for r in refs}) > 15


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    "mode",
    ["multiprocess_default", "in_process_chunked_16", "in_process_tiny_pool_preempts"],
)
def test_greedy_tokens_identical_to_hf(text_ckpt: Path, mode: str, async_scheduling: bool) -> None:
    prompts = make_prompts()
    refs = hf_greedy(text_ckpt, prompts)
    kwargs: dict = {
        "dtype": "float32",
        "device": "cpu",
        "max_model_len": 256,
        "async_scheduling": async_scheduling,  # the GPU default (tests/test_async_scheduling.py)
    }
    if mode == "multiprocess_default":
        kwargs["multiprocess"] = True
    elif mode == "in_process_chunked_16":
        kwargs.update(multiprocess=False, max_num_batched_tokens=16)
    else:  # 17 blocks of 16 = 272 tokens for 22 requests of up to ~130 tokens each
        kwargs.update(multiprocess=False, num_kv_blocks=17, block_size=16)
    with LLM(str(text_ckpt), **kwargs) as llm:
        got = engine_greedy(llm, prompts)
        stats = llm.stats()
    assert got == refs
    assert stats["kv_blocks_used"] == 0
    if mode == "in_process_chunked_16":
        assert stats["num_steps"] > len(prompts)  # many prefill chunks
    if mode == "in_process_tiny_pool_preempts":
        assert stats["num_preemptions"] > 0


@pytest.mark.parametrize(
    ("gemv_rope", "norm_out", "flow"),
    [(1, 0, 0), (0, 0, 0), (1, 1, 0), (1, 0, 1)],
    ids=["rope_in_qkv", "rope_kernel", "norm_in_o_proj", "mlp_flow"],
)
def test_few_token_layer_path_greedy_tokens_identical_to_hf(
    text_ckpt: Path,
    gemv_rope: int,
    norm_out: int,
    flow: int,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Decode steps of <= 8 tokens through DecoderLayer._forward_few_tokens (norms and
    # residual adds moved into the projections, rotary + KV write into the QKV one or not,
    # the post-attention norm in o_proj's launch or gate_up's, or o_proj..down as one
    # dataflow launch at one token; the GPU default): on CPU its torch reference, which
    # must not change a single token.
    from mmengine.models import decoder

    calls: dict[str, int] = {}
    for name in ("fused_linear_norm_out", "fused_mlp_flow"):
        real = getattr(decoder, name)
        counted = lambda *a, _n=name, _f=real, **k: calls.update({_n: 1}) or _f(*a, **k)  # noqa: E731
        monkeypatch.setattr(decoder, name, counted)
    prompts = make_prompts(12)
    refs = hf_greedy(text_ckpt, prompts)
    kwargs = dict(dtype="float32", device="cpu", max_model_len=256, multiprocess=False)
    extra = {"gemv_max_tokens": 8, "gemv_rope": gemv_rope, "gemv_norm_out": norm_out}
    extra["mlp_flow"] = flow
    with (
        caplog.at_level(logging.INFO, logger="mmengine.model_runner"),
        LLM(str(text_ckpt), max_num_seqs=4, extra=extra, **kwargs) as llm,
    ):
        model = llm._client.core.runner.model
        assert all(layer.gemv_max_tokens == 8 for layer in model.layers)
        assert all(layer.gemv_rope == bool(gemv_rope) for layer in model.layers)
        # The start-up log says which decode path runs.
        assert "steps of <= 8 token(s)" in caplog.text
        fused = gemv_rope and model.layers[0].q_norm is None  # Qwen3's q/k norms: unfused
        assert f"in the QKV one: {'on' if fused else 'off'}" in caplog.text
        assert f"norm in o_proj's: {'on' if norm_out else 'off'}" in caplog.text
        assert f"as one dataflow launch: {'on' if flow else 'off'}" in caplog.text
        got = engine_greedy(llm, prompts)
        alone = engine_greedy(llm, prompts[:1])  # one sequence: one-token decode steps
    assert got == refs and alone == refs[:1]
    # Each fused launch ran only when asked for (mlp_flow: the one-token steps).
    assert ("fused_linear_norm_out" in calls) == bool(norm_out)
    assert ("fused_mlp_flow" in calls) == bool(flow)


@pytest.mark.parametrize("multiprocess", [False, True], ids=["in_process", "multiprocess"])
def test_prefix_caching_hits_and_keeps_outputs(text_ckpt: Path, multiprocess: bool) -> None:
    prompts = shared_prefix_prompts()
    refs = hf_greedy(text_ckpt, prompts)
    with LLM(
        str(text_ckpt),
        dtype="float32",
        device="cpu",
        max_model_len=256,
        enable_prefix_caching=True,
        multiprocess=multiprocess,
        max_num_batched_tokens=64,  # first request's prefix is computed over several steps
    ) as llm:
        first = engine_greedy(llm, prompts[:1])
        rest = engine_greedy(llm, prompts[1:])
        stats = llm.stats()
    assert first + rest == refs
    assert stats["prefix_cache_hit_tokens"] >= 16 * (len(prompts) - 1)


def test_prefix_caching_off_counts_no_hits(qwen2_ckpt: Path) -> None:
    prompts = shared_prefix_prompts(4)
    with LLM(
        str(qwen2_ckpt),
        dtype="float32",
        device="cpu",
        max_model_len=256,
        enable_prefix_caching=False,
        multiprocess=False,
    ) as llm:
        got = engine_greedy(llm, prompts)
        assert llm.stats()["prefix_cache_hit_tokens"] == 0
    assert got == hf_greedy(qwen2_ckpt, prompts)


def test_top_logprobs_match_hf(text_ckpt: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = make_prompts(4, seed=3)
    tok = AutoTokenizer.from_pretrained(text_ckpt)
    model = AutoModelForCausalLM.from_pretrained(text_ckpt, dtype=torch.float32).eval()
    k = 5
    with LLM(
        str(text_ckpt), dtype="float32", device="cpu", max_model_len=256, multiprocess=False
    ) as llm:
        outs = llm.generate(
            prompts, SamplingParams(temperature=0.0, max_tokens=6, logprobs=k), use_tqdm=False
        )
    for p, out in zip(prompts, outs):
        ids = tok(p, return_tensors="pt").input_ids
        gen = model.generate(
            ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        comp = out.outputs[0]
        assert comp.token_ids == gen.sequences[0, ids.shape[1] :].tolist()
        assert comp.logprobs is not None and len(comp.logprobs) == len(comp.token_ids)
        for step, (tok_id, pos) in enumerate(zip(comp.token_ids, comp.logprobs)):
            ref = gen.logits[step][0].float().log_softmax(-1)
            top_vals, top_ids = ref.topk(k)
            assert pos[tok_id].rank == 1
            assert abs(pos[tok_id].logprob - ref[tok_id].item()) < 1e-4
            for v, t in zip(top_vals.tolist(), top_ids.tolist()):
                assert t in pos, "a top-k token is missing"
                assert abs(pos[t].logprob - v) < 1e-4


def test_prompt_logprobs_match_hf_forward(qwen2_ckpt: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = make_prompts(12)[9]
    tok = AutoTokenizer.from_pretrained(qwen2_ckpt)
    model = AutoModelForCausalLM.from_pretrained(qwen2_ckpt, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits[0].float().log_softmax(-1)
    with LLM(
        str(qwen2_ckpt),
        dtype="float32",
        device="cpu",
        max_model_len=256,
        multiprocess=False,
        max_num_batched_tokens=16,  # prompt logprobs gathered across chunks
    ) as llm:
        out = llm.generate(
            prompt, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3), use_tqdm=False
        )[0]
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == ids.shape[1] and plp[0] is None
    for i in range(1, ids.shape[1]):
        t = ids[0, i].item()
        assert abs(plp[i][t].logprob - ref[i - 1, t].item()) < 1e-4
