"""The embedded default model (issue 6): it really captions. A held-out sample through the
Python API meets the issue's accuracy targets, `mmengine serve` (started with no model)
gives the same text through the OpenAI client, HF transformers gives the same text as the
engine, and `make demo`'s script prints the right caption beside each sample file.

Every expected caption and answer is computed from the scene parameters that drew the
picture or clip (``training/shapes.py``), never read from the model.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from mmengine import LLM, SamplingParams, cli
from mmengine.default_model import default_model_path
from tests.server.harness import ServerProcess
from training import shapes
from training.evaluate import MAX_TOKENS, accuracy, group_of, run_engine, run_hf

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo.py"
# Not the training seeds (0, 1, 2), nor the monitor's or training/evaluate.py's (20240601).
TEST_SEED = 31_337
NUM_IMAGES, NUM_VIDEOS, NUM_QA = 20, 10, 20  # 50 items
# The targets: exact match >= 90% image captions, >= 80% video captions, >= 90% QA.
THRESHOLDS = {"image": 0.9, "video": 0.8, "qa": 0.9}


@pytest.fixture(scope="module")
def held_out() -> list[shapes.Example]:
    return shapes.held_out_examples(TEST_SEED, NUM_IMAGES, NUM_VIDEOS, NUM_QA)


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    with LLM(default_model_path(), device="cpu", max_model_len=512, multiprocess=False) as llm:
        yield llm


@pytest.fixture(scope="module")
def engine_texts(llm: LLM, held_out: list[shapes.Example]) -> list[str]:
    """The model card's method (training/evaluate.py): chat-template prompts with the
    rendered pixels (PIL images, raw frame arrays)."""
    return run_engine(llm, held_out)


def _data_url(ex: shapes.Example, folder: Path) -> str:
    """The example's media as a base64 data: URL: lossless PNG for a picture, H.264 MP4
    (as a camera writes it) for a clip."""
    if ex.kind == "image":
        buf = io.BytesIO()
        shapes.render(ex).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "clip.mp4"
    shapes.write_mp4(path, shapes.render(ex))
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def conversations(
    held_out: list[shapes.Example], tmp_path_factory: pytest.TempPathFactory
) -> list[list[dict[str, Any]]]:
    """One OpenAI-style chat per held-out item, its media as a data: URL: what both the
    Python API (``LLM.chat``) and the server receive, byte for byte."""
    tmp = tmp_path_factory.mktemp("media")
    out = []
    for i, ex in enumerate(held_out):
        part = f"{ex.kind}_url"
        content = [
            {"type": part, part: {"url": _data_url(ex, tmp / str(i))}},
            {"type": "text", "text": ex.turns[0].prompt},
        ]
        out.append([{"role": "user", "content": content}])
    return out


@pytest.fixture(scope="module")
def chat_texts(llm: LLM, conversations: list[list[dict[str, Any]]]) -> list[str]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return [o.outputs[0].text for o in llm.chat(conversations, params, use_tqdm=False)]


def _report(held_out: list[shapes.Example], texts: list[str]) -> str:
    acc = accuracy(held_out, texts)
    lines = [f"{g}: {ok}/{n} = {ok / n:.0%}" for g, (ok, n) in sorted(acc.items())]
    lines += [
        f"  [{group_of(ex)}] {ex.turns[0].prompt!r}: got {text!r}, drawn {ex.turns[0].answer!r}"
        for ex, text in zip(held_out, texts)
        if text != ex.turns[0].answer
    ]
    return "\n".join(lines)


# ---- the shipped folder and the CLI default ----------------------------------------------


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


def test_mmengine_serve_defaults_to_the_embedded_model_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert default_model_path() == cli.DEFAULT_MODEL
    assert cli.make_parser().parse_args(["serve"]).model == default_model_path()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "Default: the embedded default model" in help_text
    assert default_model_path() in help_text and cli.DEFAULT_SERVED_NAME in help_text


def test_mmengine_serve_without_a_model_names_it_and_runs_it_on_one_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mmengine.server.api_server as api_server

    seen = []
    monkeypatch.setattr(api_server, "run_server", lambda args: seen.append(args) or 0)
    assert cli.main(["serve"]) == 0
    assert seen[-1].model == default_model_path()
    assert seen[-1].served_model_name == [cli.DEFAULT_SERVED_NAME]
    assert seen[-1].cpu_threads == 1  # a tiny model: more threads only add overhead
    # Named explicitly, the flags win.
    cli.main(["serve", "--served-model-name", "shapes", "--cpu-threads", "2"])
    assert (seen[-1].served_model_name, seen[-1].cpu_threads) == (["shapes"], 2)


# ---- accuracy through the Python API, and the HF oracle ----------------------------------


@pytest.mark.parametrize("group", ["image", "video", "qa"])
def test_held_out_accuracy_through_the_python_api(
    group: str, held_out: list[shapes.Example], engine_texts: list[str]
) -> None:
    ok, n = accuracy(held_out, engine_texts)[group]
    assert ok / n >= THRESHOLDS[group], _report(held_out, engine_texts)


def test_hf_transformers_generates_the_same_text_as_the_engine(
    held_out: list[shapes.Example], engine_texts: list[str]
) -> None:
    picked = []  # two items of each group (image caption, video caption, question)
    for group in ("image", "video", "qa"):
        picked += [i for i, ex in enumerate(held_out) if group_of(ex) == group][:2]
    hf = run_hf(default_model_path(), [held_out[i] for i in picked])
    assert hf == [engine_texts[i] for i in picked]


def test_chat_with_data_urls_gives_the_same_captions_as_pixels(
    held_out: list[shapes.Example], engine_texts: list[str], chat_texts: list[str]
) -> None:
    # Pictures travel as lossless PNG, so LLM.chat sees the pixels run_engine passed and
    # must say the same. (Clips travel as H.264, which is lossy: compared with the server.)
    images = [i for i, ex in enumerate(held_out) if ex.kind == "image"]
    assert [chat_texts[i] for i in images] == [engine_texts[i] for i in images]


# ---- `mmengine serve` with no model, through the OpenAI client ------------------------------


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # No MODEL argument: `mmengine serve` must pick the embedded default. --port 0 (added by
    # ServerProcess) takes a free loopback port; the log names it.
    argv = ["--device", "cpu", "--max-model-len", "512", "--log-stats-interval-s", "3600"]
    proc = ServerProcess(argv, log)
    try:
        proc.wait_ready(timeout=120)
        yield proc
    finally:
        # SIGTERM: the server stops its engine and worker processes (a SIGKILL would
        # orphan them); close() kills it only if it is still up after that.
        proc.signal(signal.SIGTERM)
        try:
            proc.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        proc.close()


def test_mmengine_serve_without_a_model_serves_the_default(
    default_server: ServerProcess,
) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [cli.DEFAULT_SERVED_NAME]
    assert default_model_path() in default_server.log()


def test_server_gives_the_python_api_text_on_the_held_out_sample(
    default_server: ServerProcess,
    held_out: list[shapes.Example],
    conversations: list[list[dict[str, Any]]],
    chat_texts: list[str],
) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0)

    def ask(messages: list[dict[str, Any]]) -> str:
        reply = client.chat.completions.create(
            model=cli.DEFAULT_SERVED_NAME,
            messages=messages,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=MAX_TOKENS,
        )
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:  # concurrent requests: batched by the engine
        replies = list(pool.map(ask, conversations))
    assert replies == chat_texts, _report(held_out, replies)


# ---- make demo -----------------------------------------------------------------------------


def _load_demo() -> ModuleType:
    """examples/demo.py as a module (registered first: its dataclass needs that)."""
    spec = importlib.util.spec_from_file_location("mmengine_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_demo_prints_the_right_caption_beside_each_sample_file(tmp_path: Path) -> None:
    """What `make demo` runs, run the same way (a process of the project's Python)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(DEMO), "--out", str(tmp_path), "--device", "cpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    printed = done.stdout

    scenes = _load_demo().sample_scenes()
    assert {kind for _, kind, _ in scenes} == {"image", "video"}
    for name, kind, scene in scenes:
        # The file holds the scene (pictures: pixel for pixel) ...
        path = tmp_path / name
        assert path.is_file(), name
        if kind == "image":
            drawn = np.asarray(shapes.render_image(scene))
            assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), drawn), name
        # ... and the line beside its name carries the caption computed from the scene.
        line = re.search(rf"^{re.escape(name)} +(\S+) +(.+)$", printed, re.MULTILINE)
        assert line is not None, f"no caption line for {name}:\n{printed}"
        assert line.group(2) == shapes.caption(scene), f"{name}:\n{printed}"
        assert line.group(1) == "yes", f"{name}:\n{printed}"
    assert f"{len(scenes)}/{len(scenes)} captions match" in printed
    assert re.search(r"[\d.]+ items/s, \d+ output tok/s", printed), printed
