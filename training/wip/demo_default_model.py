"""`make demo`: caption a folder of pictures and a video clip with the embedded default model.

The default model is a small Qwen2-VL trained in this repository (``training/``) to
describe pictures of coloured shapes. The demo draws a few such pictures and a short
clip into a folder (seeded, so every run is the same), captions them all in one batch
with the Python API, answers two questions about one picture through ``LLM.chat``, and
prints the throughput. Nothing is downloaded.

    .venv/bin/python examples/demo.py [--out DIR] [--model MODEL]

With ``--model`` naming a real VLM (a Qwen2-VL checkpoint folder or a hub id in the
local HF cache) the same code captions the same files with that model.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmengine import LLM, SamplingParams  # noqa: E402
from mmengine.default_model import default_model_path  # noqa: E402
from training import shapes  # noqa: E402

SAMPLES_SEED = 2024
NUM_IMAGES = 8
VIDEO_FPS = 2  # the engine samples video files at 2 frames per second: all 4 frames


@dataclass(frozen=True)
class Sample:
    path: Path  # the file written
    kind: str  # "image" or "video"
    expected: str  # the caption generated from the scene's parameters


def write_samples(folder: Path, seed: int = SAMPLES_SEED) -> list[Sample]:
    """Draws NUM_IMAGES pictures (1, 2 and 3 shapes in turn) and one clip into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples = []
    for i in range(NUM_IMAGES):
        scene = shapes.sample_image_scene(rng, num_shapes=i % 3 + 1)
        path = folder / f"shapes_{i:02d}.png"
        shapes.render_image(scene).save(path)
        samples.append(Sample(path, "image", shapes.caption(scene)))
    clip = shapes.sample_video_scene(rng)
    path = folder / "moving_shape.mp4"
    shapes.write_mp4(path, shapes.render_video(clip), fps=VIDEO_FPS)
    samples.append(Sample(path, "video", shapes.caption(clip)))
    return samples


def caption_request(llm: LLM, sample: Sample) -> dict:
    """A chat-template prompt with the file as its image or video (a local path is fine
    in the Python API; the server takes URLs)."""
    instruction = "Describe the image." if sample.kind == "image" else "Describe the video."
    messages = [
        {
            "role": "user",
            "content": [{"type": sample.kind}, {"type": "text", "text": instruction}],
        }
    ]
    prompt = llm.get_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    return {"prompt": prompt, "multi_modal_data": {sample.kind: str(sample.path)}}


def run(folder: Path, model: str) -> list[tuple[Sample, str]]:
    samples = write_samples(folder)
    print(f"model: {model}")
    print(f"captioning {len(samples)} files in {folder}\n")
    params = SamplingParams(temperature=0.0, max_tokens=48)
    with LLM(model, device="cpu", max_model_len=1024) as llm:
        requests = [caption_request(llm, s) for s in samples]
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        captions = [o.outputs[0].text for o in outputs]
        width = max(len(s.path.name) for s in samples)
        for s, text in zip(samples, captions):
            print(f"  {s.path.name:<{width}}  {text}")

        # Follow-up questions about the first picture, as a chat.
        first = samples[0].path
        print(f"\nquestions about {first.name}:")
        for question in ("How many shapes are there?", "What color is the background?"):
            content = [
                {"type": "image_url", "image_url": {"url": str(first)}},
                {"type": "text", "text": question},
            ]
            reply = llm.chat([{"role": "user", "content": content}], params, use_tqdm=False)
            print(f"  {question}  ->  {reply[0].outputs[0].text}")
        stats = llm.stats()

    n_in = sum(len(o.prompt_token_ids) for o in outputs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(
        f"\n{len(outputs)} requests ({n_in} prompt tokens, images and video included; "
        f"{n_out} output tokens) in {elapsed:.2f}s: {len(outputs) / elapsed:.1f} req/s, "
        f"{n_out / elapsed:.0f} output tok/s on CPU"
    )
    print(
        f"prefix-cache hits: {stats['prefix_cache_hit_tokens']}/"
        f"{stats['prefix_cache_queried_tokens']} prompt tokens"
    )
    return list(zip(samples, captions))


def main(argv: list[str] | None = None) -> list[tuple[Sample, str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="keep the sample files here")
    p.add_argument("--model", default=default_model_path(), help="default: the embedded model")
    args = p.parse_args(argv)
    if args.out is not None:
        return run(args.out, args.model)
    with tempfile.TemporaryDirectory(prefix="mmengine-demo-") as tmp:
        return run(Path(tmp), args.model)


if __name__ == "__main__":
    main()
