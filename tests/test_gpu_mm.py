"""GPU checks of the multimodal engine (``pytest -m gpu``): bf16 prompt logprobs close to
HF bf16 for Qwen2-VL, Qwen2.5-VL and LLaVA on an image prompt, and float32 greedy tokens
identical to HF on the GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmengine import LLM, SamplingParams
from tests.test_mm_parity import FAMILIES, MAX_NEW, _messages, cases, hf_refs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _gpu_llm(ckpt: Path, dtype: str, **kw: object) -> LLM:
    """The engine of these tests: a fixed small KV pool, so several fit on one card."""
    return LLM(
        str(ckpt),
        dtype=dtype,
        device="cuda",
        max_model_len=1024,
        max_num_seqs=16,
        num_kv_blocks=2048,
        **kw,
    )


@pytest.fixture(params=FAMILIES)
def family_ckpt(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(f"{request.param}_ckpt")


def test_mm_bf16_prompt_logprobs_close_to_hf(family_ckpt: tuple[str, Path]) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family, ckpt = family_ckpt
    proc = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    c = cases(family)[1]  # three images in one prompt
    text = proc.apply_chat_template(_messages(c["parts"]), add_generation_prompt=True)
    inputs = proc(text=[text], images=c["images"], return_tensors="pt").to("cuda")
    with torch.no_grad():
        ref = model(**inputs).logits[0].float().log_softmax(-1)
    ids = inputs["input_ids"][0].tolist()
    with _gpu_llm(ckpt, "bfloat16") as llm:
        out = llm.generate(
            {"prompt": text, "multi_modal_data": {"image": c["images"]}},
            SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
            use_tqdm=False,
        )[0]
    assert out.prompt_token_ids == ids
    worst = max(
        abs(out.prompt_logprobs[i][ids[i]].logprob - ref[i - 1, ids[i]].item())
        for i in range(1, len(ids))
    )
    assert worst < 0.15, f"max |logprob diff| {worst:.3f}"


def test_mm_fp32_greedy_identical_to_hf_on_gpu(family_ckpt: tuple[str, Path]) -> None:
    family, ckpt = family_ckpt
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        texts, _, refs = hf_refs(ckpt, family)  # CPU float32 oracle
        reqs = []
        for text, c in zip(texts, cases(family)):
            mm = {k: v for k, v in (("image", c["images"]), ("video", c["videos"])) if v}
            reqs.append({"prompt": text, "multi_modal_data": mm} if mm else text)
        with _gpu_llm(ckpt, "float32") as llm:
            outs = llm.generate(
                reqs, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_vision_steps_replay_mixed_graphs_and_keep_hf_tokens(
    family_ckpt: tuple[str, Path],
) -> None:
    # `mixed_graph_multimodal`: steps with image or video rows replay the mixed-step CUDA
    # graphs (compiled forward, embeddings selected by a row mask inside the graph). A
    # 96-token budget makes every prompt step small enough and cuts chunks through the
    # images; float32 greedy tokens must stay HF's (CPU oracle, as above).
    family, ckpt = family_ckpt
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        texts, _, refs = hf_refs(ckpt, family)
        reqs = []
        for text, c in zip(texts, cases(family)):
            mm = {k: v for k, v in (("image", c["images"]), ("video", c["videos"])) if v}
            reqs.append({"prompt": text, "multi_modal_data": mm} if mm else text)
        with _gpu_llm(
            ckpt, "float32", max_num_batched_tokens=96, multiprocess=False,
            extra={"mixed_graph_multimodal": True},
        ) as llm:  # fmt: skip
            outs = llm.generate(
                reqs, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False
            )
            graphs = llm._client.core.runner.graphs
            assert graphs.mixed_sizes[-1] == 96 and graphs.vision_replays > 0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert [o.outputs[0].token_ids for o in outs] == refs


def _mm_requests(ckpt: Path, family: str, invert: bool) -> list:
    """The parity cases as engine requests; `invert` gives the same shapes with other
    pixels (so the embedding and prefix caches miss and nothing compiles anew)."""
    from PIL import ImageOps
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(ckpt)
    reqs = []
    for c in cases(family):
        text = proc.apply_chat_template(_messages(c["parts"]), add_generation_prompt=True)
        images = [ImageOps.invert(i) if invert else i for i in c["images"]]
        videos = [255 - v if invert else v for v in c["videos"]]
        mm = {k: v for k, v in (("image", images), ("video", videos)) if v}
        reqs.append({"prompt": text, "multi_modal_data": mm} if mm else text)
    return reqs


def test_engine_steps_never_make_the_host_wait_for_the_gpu(
    family_ckpt: tuple[str, Path],
) -> None:
    """With async scheduling the host plans and launches step N+1 while the GPU runs step
    N. Any pageable host-to-device copy in a step (encoder inputs, index tensors, pixel
    normalization constants) or a `.item()` would stall the host until the GPU drains,
    and the pipeline with it. torch's sync debug mode turns each of them into an error;
    the one wait per step the engine means to make (the sampled tokens' event) is not
    one of them. Requests take turns among greedy, filtered random sampling with logprobs,
    and seeded sampling: random sampling once waited for the GPU on every step (the
    sampler indexed a CUDA tensor with a Python list of rows)."""
    family, ckpt = family_ckpt
    # min_tokens = max_tokens: EOS stays blocked every step (the sampler's masking path).
    kinds = [
        SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW),
        SamplingParams(
            temperature=0.8,
            top_p=0.9,
            top_k=20,
            min_p=0.05,
            logprobs=2,
            max_tokens=MAX_NEW,
            min_tokens=MAX_NEW,
        ),
        SamplingParams(temperature=1.0, seed=1234, max_tokens=MAX_NEW, min_tokens=MAX_NEW),
    ]
    params = [kinds[i % len(kinds)] for i in range(len(cases(family)))]
    # In-process: the checked steps must run in this process.
    with _gpu_llm(ckpt, "bfloat16", multiprocess=False, async_scheduling=True) as llm:
        # Compiles, autotunes and captures outside the checked region (those may wait).
        llm.generate(_mm_requests(ckpt, family, invert=False), params, use_tqdm=False)
        checked = _mm_requests(ckpt, family, invert=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs = llm.generate(checked, params, use_tqdm=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert llm.stats()["encoder_runs"] >= 2  # the checked run encoded its own images
    assert [len(o.outputs[0].token_ids) for o in outs] == [MAX_NEW] * len(checked)


def test_no_image_size_compiles_anything_after_start_up(family_ckpt: tuple[str, Path]) -> None:
    # The compiled vision blocks guard their graph on a length range taken from the
    # start-up profile's largest batch; the first small image compiled them again mid-run
    # (1.4 s on Qwen2.5-VL-3B, session 13) until start-up encoded a small and a middle
    # batch too. Images of many sizes (and videos) now compile nothing after start-up.
    from transformers import AutoProcessor

    from benchmarks.mid_run_compiles import CompileLog
    from tests.test_mm_parity import _img, _video

    family, ckpt = family_ckpt
    proc = AutoProcessor.from_pretrained(ckpt)
    sizes = [(28, 28), (100, 140), (57, 333), (211, 97), (300, 300), (64, 500)]
    reqs = []
    for i, (h, w) in enumerate(sizes):
        parts, images = ["image", "image", "what differs?"], [_img(i, h, w), _img(i + 9, w, h)]
        text = proc.apply_chat_template(_messages(parts), add_generation_prompt=True)
        reqs.append({"prompt": text, "multi_modal_data": {"image": images}})
    if family != "llava":
        text = proc.apply_chat_template(
            _messages(["video", "what moves?"]), add_generation_prompt=True
        )
        reqs += [
            {"prompt": text, "multi_modal_data": {"video": [_video(20 + t, t)]}} for t in (2, 5, 8)
        ]
    log = CompileLog()
    with _gpu_llm(ckpt, "bfloat16", multiprocess=False) as llm:
        log.install()
        frames = log.dynamo_frames()
        p = SamplingParams(temperature=0, max_tokens=3)
        for r in reqs:  # one at a time: each its own encoder batch shape
            llm.generate(r, p, use_tqdm=False)
        llm.generate(reqs, p, use_tqdm=False)
    assert log.dynamo_frames() == frames and not log.triton, log.triton
