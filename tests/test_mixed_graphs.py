"""CUDA graphs for steps that carry prompt chunks (mixed graphs), checked on the CPU.

The GPU suite replays real graphs (tests/test_gpu_engine.py). Here a stand-in replays a
graph by running the same forward eagerly on the graph runner's persistent buffers with
the graph's fixed metadata: what a captured graph computes. The runner's padding (rows
that belong to no sequence, sequences with no rows, skipped K/V writes) must then leave
every real token's result as an unpadded step computes it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mmengine import SamplingParams
from mmengine.attention import forward_context
from mmengine.cuda_graphs import CudaGraphRunner, mixed_token_sizes


def _runner(**kw) -> CudaGraphRunner:  # noqa: ANN003
    args = dict(max_num_seqs=8, max_blocks_per_seq=4, max_model_len=64, mrope=False)
    args.update(kw)
    return CudaGraphRunner(lambda ids, pos: ids, device=torch.device("cpu"), **args)


def test_mixed_graph_sizes_reach_the_cap_and_hold_every_step_that_fits() -> None:
    assert mixed_token_sizes(0) == [] and mixed_token_sizes(1) == []
    assert mixed_token_sizes(1024)[-1] == 1024 and mixed_token_sizes(1024)[0] == 16
    assert mixed_token_sizes(600)[-2:] == [512, 600]  # a cap between buckets is one too
    graphs = _runner(mixed_max_tokens=100)
    assert graphs.mixed_bucket(2) == 16 and graphs.mixed_bucket(17) == 32
    assert graphs.mixed_bucket(100) == 100 and graphs.mixed_bucket(101) is None
    # Room for every sequence a step of that size can hold: one a row, max_num_seqs at most.
    assert graphs.mixed_seqs(16) == 8 and graphs.mixed_seqs(100) == 8
    assert _runner(max_num_seqs=256, mixed_max_tokens=64).mixed_seqs(32) == 32
    # The buffers hold the largest graph's rows and sequences.
    assert graphs.input_ids.shape[0] >= 100 and graphs.query_start_loc.shape[0] >= 9
    assert _runner().mixed_sizes == []  # off unless asked for


class EagerGraphs(CudaGraphRunner):
    """Replays a "graph" by running its forward eagerly on the persistent buffers, with the
    metadata the graph was captured with (what the GPU graph computes)."""

    def __init__(self, runner, max_num_seqs: int, mixed_max_tokens: int, mm: bool = False) -> None:  # noqa: ANN001
        super().__init__(
            runner.forward_fn, max_num_seqs=max_num_seqs, max_blocks_per_seq=64,
            max_model_len=runner.max_model_len, mrope=runner.spec.mrope_section is not None,
            device=runner.device, mixed_max_tokens=mixed_max_tokens,
            mm_forward_fn=runner._forward_masked if mm else None,
            hidden_size=runner.spec.hidden_size, dtype=runner.dtype,
        )  # fmt: skip
        self.masked_replays = 0  # replays whose mask selected vision rows

    def _replay(self, mixed: bool, n: int) -> torch.Tensor:
        if mixed and self.mixed_multimodal and bool(self.mm_mask.any()):
            self.masked_replays += 1
        with forward_context(self._mixed_meta(n) if mixed else self._meta(n)):
            return self._forward(mixed, n)


def _generate(ckpt: Path, graphs: bool) -> tuple[list[list[int]], list[float], EagerGraphs | None]:
    from mmengine import LLM

    torch.set_num_threads(1)
    llm = LLM(
        str(ckpt), dtype="float32", device="cpu", skip_tokenizer_init=True,
        multiprocess=False, max_model_len=160, max_num_batched_tokens=48, max_num_seqs=8,
        log_stats_interval_s=0.0,
    )  # fmt: skip
    try:
        core = llm._client.core
        fake = None
        if graphs:
            fake = EagerGraphs(core.runner, max_num_seqs=8, mixed_max_tokens=48)
            core.runner.graphs = fake
        gen = torch.Generator().manual_seed(3)
        # Prompts of 5-70 tokens under a 48-token budget: chunked prompts, prompt chunks
        # with decodes riding along, and decode-only steps.
        prompts = [
            torch.randint(10, 200, (int(n),), generator=gen).tolist()
            for n in (5, 70, 13, 40, 9, 27)
        ]
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens = [o.outputs[0].token_ids for o in outs]
        lps = [
            lp[t].logprob
            for o in outs
            for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)
        ]
        st = core.stats()
        assert st.kv_blocks_used == 0
        if fake is not None:  # the engine's stats count the replays
            assert st.num_graph_prompt_steps == fake.mixed_replays
            assert st.num_graph_decode_steps == fake.decode_replays
            assert st.num_graph_prompt_steps + st.num_graph_decode_steps <= st.num_steps
        return tokens, lps, fake
    finally:
        llm.shutdown()


def test_padded_graph_steps_give_every_request_the_tokens_of_unpadded_steps(
    qwen2_ckpt: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref_tokens, ref_lps, _ = _generate(qwen2_ckpt, graphs=False)
    with caplog.at_level(logging.INFO, logger="mmengine"):
        tokens, lps, fake = _generate(qwen2_ckpt, graphs=True)
    # The periodic log says how many steps replayed graphs.
    assert any(r.getMessage().startswith("CUDA graphs: ") for r in caplog.records)
    assert fake is not None and fake.mixed_replays > 0 and fake.decode_replays > 0
    assert tokens == ref_tokens
    assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-4


def test_vision_rows_replay_the_mixed_graphs_and_keep_hf_tokens(qwen2_vl_ckpt: Path) -> None:
    # `mixed_graph_multimodal`: steps with image rows replay the mixed graphs, the rows'
    # embeddings selected by a mask inside the graph. Chunks of 24 tokens cut through the
    # images; greedy tokens must stay HF's (fp32 CPU oracle, as tests/test_mm_parity.py).
    from mmengine import LLM
    from tests.test_mm_parity import MAX_NEW, cases, hf_refs

    texts, _, refs = hf_refs(qwen2_vl_ckpt, "qwen2_vl")
    reqs = []
    for text, c in zip(texts, cases("qwen2_vl")):
        mm = {k: v for k, v in (("image", c["images"]), ("video", c["videos"])) if v}
        reqs.append({"prompt": text, "multi_modal_data": mm} if mm else text)
    torch.set_num_threads(1)
    with LLM(
        str(qwen2_vl_ckpt), dtype="float32", device="cpu", max_model_len=1024,
        multiprocess=False, max_num_batched_tokens=24, max_num_seqs=8,
    ) as llm:  # fmt: skip
        core = llm._client.core
        fake = EagerGraphs(core.runner, max_num_seqs=8, mixed_max_tokens=24, mm=True)
        core.runner.graphs = fake
        p = SamplingParams(temperature=0, max_tokens=MAX_NEW)
        text = {"prompt_token_ids": list(range(300, 360))}  # 60 tokens: 3 text-only chunks
        before = llm.generate(text, p, use_tqdm=False)[0].outputs[0].token_ids
        outs = llm.generate(reqs, p, use_tqdm=False)
        vision = fake.vision_replays
        # A text step after vision steps must not see their rows (the mask is cleared).
        after = llm.generate(text, p, use_tqdm=False)[0].outputs[0].token_ids
    assert [o.outputs[0].token_ids for o in outs] == refs
    # Every vision step set the mask; the text step after them cleared it.
    assert vision > 0 and fake.masked_replays == vision == fake.vision_replays
    assert before == after
