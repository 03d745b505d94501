"""GPU checks of the whole engine (``pytest -m gpu`` on a CUDA machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmengine import LLM, SamplingParams
from tests.test_hf_parity import hf_greedy, make_prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def _exact_fp32():
    # fp32 parity needs true fp32 matmuls on both sides (no TF32).
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _gen(ckpt: Path, prompts, params, **kw):
    # A fixed small pool: GPU test files can then run side by side on one card.
    kw.setdefault("num_kv_blocks", 1024)
    with LLM(str(ckpt), device="cuda", max_model_len=256, max_num_seqs=32, **kw) as llm:
        return llm.generate(prompts, params, use_tqdm=False)


def _hf_greedy_cuda(ckpt: Path, prompts: list[str], dtype: torch.dtype, n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).cuda().eval()
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids.cuda()
        g = model.generate(ids, max_new_tokens=n, do_sample=False)
        out.append(g[0, ids.shape[1] :].tolist())
    return out


def test_fp32_greedy_identical_to_hf_on_gpu(text_ckpt: Path) -> None:
    prompts = make_prompts()
    refs = hf_greedy(text_ckpt, prompts)  # CPU fp32 oracle
    outs = _gen(
        text_ckpt,
        prompts,
        SamplingParams(temperature=0, max_tokens=12),
        dtype="float32",
        enforce_eager=True,  # each compile + graph capture costs ~15 s: once below is enough
    )
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_fp32_greedy_identical_to_hf_with_compile_and_graphs(qwen2_ckpt: Path) -> None:
    prompts = make_prompts()
    refs = hf_greedy(qwen2_ckpt, prompts)
    outs = _gen(qwen2_ckpt, prompts, SamplingParams(temperature=0, max_tokens=12), dtype="float32")
    assert [o.outputs[0].token_ids for o in outs] == refs


@pytest.mark.parametrize("option", ["gemv_norm_out", "mlp_flow"])
def test_fp32_greedy_identical_to_hf_with_batch1_options_and_early_pdl_triggers(
    qwen2_ckpt: Path, option: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The batch-1 A/B options, each with every GEMV and attention launch letting its
    # successor launch before its own wait; compile + graphs. gemv_norm_out: o_proj's last
    # program writes gate_up's normalized input (a counter per layer). mlp_flow: o_proj ->
    # norm -> gate_up -> down as one dataflow launch (one prompt alone as well, so its
    # one-token steps run it).
    monkeypatch.setenv("MMENGINE_PDL_TRIGGER", "plain=early,gated=early,attn=early")
    prompts = make_prompts()
    refs = hf_greedy(qwen2_ckpt, prompts)
    p = SamplingParams(temperature=0, max_tokens=12)
    with LLM(
        str(qwen2_ckpt), device="cuda", max_model_len=256, max_num_seqs=32,
        num_kv_blocks=1024, dtype="float32", extra={option: True},
    ) as llm:  # fmt: skip
        outs = llm.generate(prompts, p, use_tqdm=False)
        alone = llm.generate(prompts[:1], p, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert alone[0].outputs[0].token_ids == refs[0]


def test_cuda_graphs_and_eager_give_the_same_tokens(qwen2_ckpt: Path) -> None:
    # float32: in bf16 a graph replays a decode batch padded to its bucket size, and cuBLAS
    # may pick another GEMM kernel for the padded M than eager does for the true M; the
    # rounding then differs and greedy paths on a random-weight model (many near-ties)
    # drift apart after a few tokens. fp32 keeps those differences far below any tie.
    prompts = make_prompts()
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    eager = _gen(qwen2_ckpt, prompts, p, dtype="float32", enforce_eager=True)
    graphs = _gen(qwen2_ckpt, prompts, p, dtype="float32", extra={"torch_compile": False})
    assert [o.outputs[0].token_ids for o in eager] == [o.outputs[0].token_ids for o in graphs]


def test_mixed_step_graphs_replay_prompt_steps_and_give_the_eager_tokens(
    qwen2_ckpt: Path,
) -> None:
    # Steps that carry prompt chunks (here all of them: a 96-token budget, prompts longer
    # than it chunked, decodes riding along) replay the mixed-step CUDA graphs, padded to
    # their token buckets; float32, as above.
    prompts = make_prompts()
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kw = dict(dtype="float32", max_num_batched_tokens=96, multiprocess=False)
    eager = _gen(qwen2_ckpt, prompts, p, enforce_eager=True, **kw)
    with LLM(
        str(qwen2_ckpt), device="cuda", max_model_len=256, max_num_seqs=32,
        num_kv_blocks=1024, extra={"torch_compile": False}, **kw,
    ) as llm:  # fmt: skip
        graphs = llm.generate(prompts, p, use_tqdm=False)
        runner = llm._client.core.runner
        assert runner.graphs.mixed_sizes[-1] == 96 and runner.graphs.mixed_replays > 0
    assert [o.outputs[0].token_ids for o in eager] == [o.outputs[0].token_ids for o in graphs]


def test_bf16_logprobs_close_to_hf_bf16(text_ckpt: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = make_prompts(6, seed=5)
    tok = AutoTokenizer.from_pretrained(text_ckpt)
    model = AutoModelForCausalLM.from_pretrained(text_ckpt, dtype=torch.bfloat16).cuda().eval()
    outs = _gen(
        text_ckpt,
        prompts,
        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
        dtype="bfloat16",
        enforce_eager=True,
    )
    worst = 0.0
    for p, o in zip(prompts, outs):
        ids = tok(p, return_tensors="pt").input_ids.cuda()
        with torch.no_grad():
            ref = model(ids).logits[0].float().log_softmax(-1)
        for i in range(1, ids.shape[1]):
            t = ids[0, i].item()
            worst = max(worst, abs(o.prompt_logprobs[i][t].logprob - ref[i - 1, t].item()))
    assert worst < 0.1, f"max |logprob diff| {worst}"


def test_nothing_compiles_after_start_up(qwen2_ckpt: Path) -> None:
    # A kernel variant or decoder-layer graph compiled mid-run stalls every request of the
    # step for 0.4-9 s (session 13: attention for a few-token chunk, sampling with top-k,
    # the layers again for KV-cache tensors of another kind). Start-up must compile them
    # all: the steps below (odd lengths, prefix hits, sampling settings) compile nothing.
    import json

    from benchmarks.mid_run_compiles import CompileLog, run_phases

    vocab = json.loads((qwen2_ckpt / "config.json").read_text())["vocab_size"]
    log = CompileLog()
    with LLM(
        str(qwen2_ckpt), device="cuda", dtype="bfloat16", max_model_len=512,
        num_kv_blocks=1024, multiprocess=False,
    ) as llm:  # fmt: skip
        log.install()
        rows = run_phases(llm, log, vocab, 512)
    compiled = [(name, frames, new) for name, _, frames, _, new in rows if frames or new]
    assert not compiled, compiled
