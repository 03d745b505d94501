"""When kernels launch as programmatic dependents (PDL): sm_90+ CUDA only, small launches only."""

import pytest
import torch

from mmkernels import _dispatch


class _FakeCudaTensor:
    is_cuda = True
    device = torch.device("cuda", 0)


def test_pdl_only_for_launches_up_to_the_token_limit_on_sm90(monkeypatch) -> None:
    monkeypatch.delenv(_dispatch.DISABLE_PDL_ENV, raising=False)
    monkeypatch.setattr(_dispatch, "_capability_major", lambda index: 9)
    t = _FakeCudaTensor()
    assert _dispatch.pdl_supported(t)
    assert _dispatch.pdl_supported(t, 1)
    assert _dispatch.pdl_supported(t, _dispatch.PDL_MAX_TOKENS)
    assert not _dispatch.pdl_supported(t, _dispatch.PDL_MAX_TOKENS + 1)


def test_pdl_off_before_sm90_on_cpu_and_when_disabled(monkeypatch) -> None:
    monkeypatch.delenv(_dispatch.DISABLE_PDL_ENV, raising=False)
    monkeypatch.setattr(_dispatch, "_capability_major", lambda index: 8)
    assert not _dispatch.pdl_supported(_FakeCudaTensor(), 1)
    assert not _dispatch.pdl_supported(torch.zeros(1), 1)
    monkeypatch.setattr(_dispatch, "_capability_major", lambda index: 9)
    monkeypatch.setenv(_dispatch.DISABLE_PDL_ENV, "1")
    assert not _dispatch.pdl_supported(_FakeCudaTensor(), 1)


def test_trigger_places_default_per_kind_and_follow_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(_dispatch.PDL_TRIGGER_ENV, raising=False)
    assert _dispatch.pdl_trigger("rope") == 2  # the QKV GEMV lets attention in late
    assert _dispatch.pdl_trigger("plain") == 1
    assert _dispatch.pdl_trigger("gated") == 1
    assert _dispatch.pdl_trigger("attn") == 1
    monkeypatch.setenv(_dispatch.PDL_TRIGGER_ENV, "plain=early, attn=late")
    assert _dispatch.pdl_trigger("plain") == 0
    assert _dispatch.pdl_trigger("attn") == 2
    assert _dispatch.pdl_trigger("rope") == 2  # unnamed kinds keep their default


def test_a_bad_trigger_setting_names_the_kinds_and_places(monkeypatch) -> None:
    for bad in ("plain=soon", "qkv=early", "plain"):
        monkeypatch.setenv(_dispatch.PDL_TRIGGER_ENV, bad)
        with pytest.raises(ValueError, match="KIND=PLACE.*early, start, late"):
            _dispatch.pdl_trigger("plain")
