"""When kernels launch as programmatic dependents (PDL): sm_90+ CUDA only, small launches only."""

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
