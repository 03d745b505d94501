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
    with LLM(
        str(ckpt),
        dtype="bfloat16",
        device="cuda",
        max_model_len=1024,
        max_num_seqs=16,
        num_kv_blocks=2048,
    ) as llm:
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
        with LLM(
            str(ckpt),
            dtype="float32",
            device="cuda",
            max_model_len=1024,
            max_num_seqs=16,
            num_kv_blocks=2048,
        ) as llm:
            outs = llm.generate(
                reqs, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert [o.outputs[0].token_ids for o in outs] == refs
