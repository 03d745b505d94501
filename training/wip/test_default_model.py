"""The embedded default model: it really captions (held-out items through the Python API
and the server, checked against the scene parameters), HF transformers agrees with the
engine, `make demo` prints right captions, and the example notebooks run headless."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors import safe_open

from mmengine import LLM
from mmengine.cli import make_parser
from mmengine.default_model import default_model_path
from tests.server.harness import ServerProcess
from training import shapes
from training.evaluate import accuracy, group_of, run_engine, run_hf

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
# Not the training seed (0), nor the training monitor's or training/evaluate.py's.
TEST_SEED = 31_337
NUM_IMAGES, NUM_VIDEOS, NUM_QA = 20, 10, 20


@pytest.fixture(scope="module")
def held_out() -> list[shapes.Example]:
    return shapes.held_out_examples(TEST_SEED, NUM_IMAGES, NUM_VIDEOS, NUM_QA)


@pytest.fixture(scope="module")
def engine_texts(held_out: list[shapes.Example]) -> list[str]:
    with LLM(default_model_path(), device="cpu", max_model_len=512, multiprocess=False) as llm:
        return run_engine(llm, held_out)


# ---- the shipped folder ----------------------------------------------------------------


def test_default_model_folder_is_a_small_qwen2_vl_in_hub_layout() -> None:
    folder = Path(default_model_path())
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "README.md",
    ):
        assert (folder / name).is_file(), name
    assert (folder / "model.safetensors").stat().st_size <= 20 * 2**20
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2VLForConditionalGeneration"]
    # The flat hub layout: text fields at the top, M-RoPE as rope_scaling.
    assert "text_config" not in cfg and cfg["rope_scaling"]["type"] == "mrope"
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        prefixes = {name.split(".")[0] for name in f.keys()}  # noqa: SIM118 - not a dict
    assert prefixes == {"visual", "model", "lm_head"}


def test_mmengine_serve_without_a_model_serves_the_default() -> None:
    args = make_parser().parse_args(["serve"])
    assert args.model == default_model_path()


# ---- accuracy and the oracle -----------------------------------------------------------


def test_held_out_captions_and_answers_match_the_generating_parameters(
    held_out: list[shapes.Example], engine_texts: list[str]
) -> None:
    acc = accuracy(held_out, engine_texts)
    wrong = [
        (ex.turns[0].prompt, ex.turns[0].answer, text)
        for ex, text in zip(held_out, engine_texts)
        if text != ex.turns[0].answer
    ]
    # The targets: >= 90% image captions, >= 80% video captions, >= 90% answers.
    assert acc["image"][0] >= 0.9 * NUM_IMAGES, wrong
    assert acc["video"][0] >= 0.8 * NUM_VIDEOS, wrong
    assert acc["qa"][0] >= 0.9 * NUM_QA, wrong


def test_hf_transformers_generates_the_same_text_as_the_engine(
    held_out: list[shapes.Example], engine_texts: list[str]
) -> None:
    # Two items of each group (image caption, video caption, question).
    picked = []
    for group in ("image", "video", "qa"):
        picked += [i for i, ex in enumerate(held_out) if group_of(ex) == group][:2]
    hf = run_hf(default_model_path(), [held_out[i] for i in picked])
    assert hf == [engine_texts[i] for i in picked]


# ---- make demo ---------------------------------------------------------------------------


def _load_demo() -> ModuleType:
    """examples/demo.py as a module (registered first: its dataclass needs that)."""
    spec = importlib.util.spec_from_file_location("mmengine_demo", EXAMPLES / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_demo_prints_the_right_caption_beside_each_sample_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = _load_demo()
    demo.main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    samples = demo.write_samples(tmp_path / "again")  # same seed: the same scenes
    assert {s.kind for s in samples} == {"image", "video"}
    lines = {line.split()[0]: line for line in printed.splitlines() if line.startswith("  ")}
    for s in samples:
        caption = lines[s.path.name].strip()[len(s.path.name) :].strip()
        assert caption == s.expected, s.path.name
    assert "req/s" in printed and "output tok/s" in printed


# ---- the server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # No model argument: `mmengine serve` must pick the embedded default.
    argv = ["--device", "cpu", "--max-model-len", "512", "--log-stats-interval-s", "3600"]
    proc = ServerProcess(argv, log)
    try:
        proc.wait_ready(timeout=120)
        yield proc
    finally:
        proc.close()


def _data_url(ex: shapes.Example, tmp: Path) -> str:
    """The example's media as a base64 data: URL (PNG for images, lossless; MP4 for video)."""
    if ex.kind == "image":
        buf = io.BytesIO()
        shapes.render(ex).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "clip.mp4"
    shapes.write_mp4(path, shapes.render(ex))
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def test_server_answers_the_held_out_sample_through_the_openai_client(
    default_server: ServerProcess,
    held_out: list[shapes.Example],
    engine_texts: list[str],
    tmp_path: Path,
) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id

    def ask(i: int) -> str:
        ex = held_out[i]
        part = "image_url" if ex.kind == "image" else "video_url"
        content = [
            {"type": part, part: {"url": _data_url(ex, tmp_path / str(i))}},
            {"type": "text", "text": ex.turns[0].prompt},
        ]
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            temperature=0,
            max_tokens=48,
        )
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:  # concurrent requests: batched by the engine
        replies = list(pool.map(ask, range(len(held_out))))
    # Images travel as lossless PNG: the server sees the Python API's pixels and must say
    # the same. Videos travel as H.264 (lossy), so they are only held to the ground truth.
    images = [i for i, ex in enumerate(held_out) if ex.kind == "image"]
    assert [replies[i] for i in images] == [engine_texts[i] for i in images]
    acc = accuracy(held_out, replies)
    assert acc["image"][0] >= 0.9 * NUM_IMAGES
    assert acc["video"][0] >= 0.8 * NUM_VIDEOS
    assert acc["qa"][0] >= 0.9 * NUM_QA


# ---- notebooks ---------------------------------------------------------------------------

NOTEBOOKS = [
    "caption_images.ipynb",
    "chat_with_server.ipynb",
    "caption_video.ipynb",
]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_headless_against_the_default_model(name: str) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(EXAMPLES / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "strip outputs"
    # Run from examples/, as a user would; the kernel is this venv's Python (ipykernel).
    client = NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()  # raises CellExecutionError at the first failing cell
