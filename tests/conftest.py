"""Suite-wide settings, tiny offline checkpoints, and the no-network guard.

Checkpoint fixtures are session-scoped Paths into a session temp dir, built on first
use (each well under a second). Treat them as read-only: copy a folder before editing
it, since every test in the session shares it.
"""

from __future__ import annotations

import os

# Before transformers / huggingface_hub are imported anywhere: never try a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.fixtures.checkpoints import build_text_checkpoint, build_vlm_checkpoint  # noqa: E402
from tests.fixtures.network_guard import GUARD, NetworkGuard  # noqa: E402

# Tiny models on a 2-core machine shared with others: many threads only add overhead
# (FIXTURES.md pitfall 1: 16-token generate 0.4-0.9 s with default threads, 25 ms with 1).
torch.set_num_threads(1)

GUARD.install()


@pytest.fixture(autouse=True)
def socket_guard() -> Iterator[NetworkGuard]:
    """Fails the test if it connected (or tried to) to a non-loopback address.

    Attempts raise NetworkBlockedError before any packet leaves; since code under test
    may swallow that error, the recorded attempts are checked here too. A test that
    provokes an attempt on purpose calls ``socket_guard.take_violations()``.
    """
    GUARD.take_violations()  # drop anything recorded between tests
    yield GUARD
    found = GUARD.take_violations()
    if found:
        pytest.fail(f"test attempted network access to {found}", pytrace=False)


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_text_checkpoint("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def qwen2_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_text_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def qwen3_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_text_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="session", params=["llama", "qwen2", "qwen3"], ids=lambda f: f)
def text_ckpt(request: pytest.FixtureRequest) -> Path:
    """Each text family in turn: llama (untied), qwen2 (qkv bias), qwen3 (tied, qk-norm)."""
    return request.getfixturevalue(f"{request.param}_ckpt")


@pytest.fixture(scope="session")
def qwen2_vl_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vlm_checkpoint("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))


@pytest.fixture(scope="session")
def qwen2_5_vl_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vlm_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="session")
def llava_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vlm_checkpoint("llava", tmp_path_factory.mktemp("llava"))
