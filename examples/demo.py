"""`make demo`: caption a folder of pictures and a video clip with the embedded default model.

The default model is a small Qwen2-VL trained in this repository (``training/``) to
describe pictures of coloured shapes. The demo draws eight such pictures and one short
clip into a folder (seeded: every run draws the same scenes), captions them all in one
batch of chat requests through the Python API (``mmengine.LLM``), prints each caption
beside its file name with whether it matches the scene that was drawn, then the
throughput, then a short multi-turn chat about one picture. Nothing is downloaded.

    .venv/bin/python examples/demo.py [--out DIR] [--model MODEL] [--device DEVICE]

With ``--model`` naming a real VLM (a Qwen2-VL checkpoint folder, or a hub id such as
``Qwen/Qwen2-VL-2B-Instruct`` in the local HF cache) the same code captions the same
files with that model; the "matches" column then only says whether it used the shapes
model's exact wording. ``MMENGINE_LOG_LEVEL=INFO`` shows the engine's start-up log.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Quiet engine start-up (the engine-core process reads this too); set it to INFO to see it.
os.environ.setdefault("MMENGINE_LOG_LEVEL", "WARNING")

from mmengine import LLM, SamplingParams  # noqa: E402
from mmengine.default_model import default_model_path  # noqa: E402
from training import shapes  # noqa: E402

SAMPLES_SEED = 2024
NUM_IMAGES = 8
VIDEO_FPS = 2  # the engine samples video files at 2 frames per second: all 4 frames
MAX_TOKENS = 64
CAPTION_PROMPT = {"image": "Describe the image.", "video": "Describe the video."}
QUESTIONS = ("How many shapes are there?", "What color is the background?")


@dataclass(frozen=True)
class Sample:
    path: Path  # the file written
    kind: str  # "image" or "video"
    scene: shapes.Scene  # what was drawn

    @property
    def expected(self) -> str:
        """The caption generated from the scene's parameters."""
        return shapes.caption(self.scene)


def sample_scenes(seed: int = SAMPLES_SEED) -> list[tuple[str, str, shapes.Scene]]:
    """(file name, kind, scene): NUM_IMAGES pictures (1, 2 and 3 shapes in turn), one clip."""
    rng = random.Random(seed)
    out: list[tuple[str, str, shapes.Scene]] = []
    for i in range(NUM_IMAGES):
        scene = shapes.sample_image_scene(rng, num_shapes=i % 3 + 1)
        out.append((f"shapes_{i:02d}.png", "image", scene))
    out.append(("moving_shape.mp4", "video", shapes.sample_video_scene(rng)))
    return out


def write_samples(folder: Path, seed: int = SAMPLES_SEED) -> list[Sample]:
    """Draws the sample scenes into ``folder``: PNG pictures and an H.264 MP4 clip."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for name, kind, scene in sample_scenes(seed):
        path = folder / name
        if isinstance(scene, shapes.VideoScene):
            shapes.write_mp4(path, shapes.render_video(scene), fps=VIDEO_FPS)
        else:
            shapes.render_image(scene).save(path)
        samples.append(Sample(path, kind, scene))
    return samples


def user_turn(text: str, sample: Sample | None = None) -> dict[str, Any]:
    """An OpenAI-style user message; a local file path works as the media URL in the
    Python API (the server takes http(s)/data: URLs)."""
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if sample is not None:
        part = f"{sample.kind}_url"
        content.insert(0, {"type": part, part: {"url": str(sample.path)}})
    return {"role": "user", "content": content}


def run(
    folder: Path, model: str, device: str, cpu_threads: int | None = None
) -> list[tuple[Sample, str]]:
    samples = write_samples(folder)
    name = "the embedded default model" if model == default_model_path() else model
    n_img = sum(s.kind == "image" for s in samples)
    print(f"mmengine demo: captioning with {name}")
    print(f"{len(samples)} files ({n_img} pictures, {len(samples) - n_img} clip) in {folder}")

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    start = time.perf_counter()
    if cpu_threads is None and model == default_model_path():
        # Its matrices are 192 wide: more threads only add overhead (one is ~10x faster
        # than two on a busy 2-core machine). A real model keeps torch's default.
        cpu_threads = 1
    with LLM(model, device=device, max_model_len=2048, cpu_threads=cpu_threads) as llm:
        print(f"model loaded in {time.perf_counter() - start:.1f}s\n")
        conversations = [[user_turn(CAPTION_PROMPT[s.kind], s)] for s in samples]
        start = time.perf_counter()
        outputs = llm.chat(conversations, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        captions = [o.outputs[0].text for o in outputs]

        width = max(len(s.path.name) for s in samples)
        print(f"{'file':<{width}}  match  caption")
        for s, text in zip(samples, captions):
            ok = text == s.expected
            print(f"{s.path.name:<{width}}  {'yes' if ok else 'NO':<5}  {text}")
            if not ok:
                print(f"{'':<{width}}  {'':<5}  (drawn: {s.expected})")
        n_ok = sum(text == s.expected for s, text in zip(samples, captions))
        n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
        n_in = sum(len(o.prompt_token_ids) for o in outputs)
        print(f"\n{n_ok}/{len(samples)} captions match the scenes that were drawn")
        print(
            f"throughput: {len(samples)} items in {elapsed:.2f}s = "
            f"{len(samples) / elapsed:.1f} items/s, {n_out / elapsed:.0f} output tok/s "
            f"({n_in} prompt tokens incl. image/video tokens, {n_out} output tokens, one batch)"
        )

        # A multi-turn chat about the first picture: the picture is sent once, and each
        # turn's prompt (picture included) is found in the prefix cache.
        first = samples[0]
        answers = dict(shapes.questions(first.scene))
        conversation = [user_turn(CAPTION_PROMPT["image"], first)]
        conversation.append({"role": "assistant", "content": captions[0]})
        print(f"\nchat about {first.path.name}:")
        for question in QUESTIONS:
            conversation.append(user_turn(question))
            reply = llm.chat(conversation, params, use_tqdm=False)[0].outputs[0].text
            conversation.append({"role": "assistant", "content": reply})
            mark = "yes" if reply == answers.get(question) else "NO"
            print(f"  {question} -> {reply}   (match: {mark})")
        stats = llm.stats()
    print(
        f"prefix cache: {stats['prefix_cache_hit_tokens']}/"
        f"{stats['prefix_cache_queried_tokens']} prompt tokens reused"
    )
    return list(zip(samples, captions))


def main(argv: list[str] | None = None) -> list[tuple[Sample, str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="keep the sample files in this folder")
    p.add_argument(
        "--model",
        default=default_model_path(),
        help="checkpoint folder or hub id in the HF cache (default: the embedded model)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch CPU threads of the engine (default: 1 for the embedded model, else torch's)",
    )
    args = p.parse_args(argv)
    if args.out is not None:
        return run(args.out, args.model, args.device, args.cpu_threads)
    with tempfile.TemporaryDirectory(prefix="mmengine-demo-") as tmp:
        return run(Path(tmp), args.model, args.device, args.cpu_threads)


if __name__ == "__main__":
    main()
