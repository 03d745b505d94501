"""Video decoding with PyAV: caps before decoding, sampling, deadline, closing, HF parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from processors.config import MediaConfig
from processors.errors import MediaDecodeError, MediaLimitError
from processors.qwen2_vl import Qwen2VLPreprocessor
from processors.video import VideoSampling, decode_video, frames_to_tensor, video_from_frames
from tests.processors.media_helpers import mp4_bytes

torch.set_num_threads(1)
av = pytest.importorskip("av")

CFG = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16, "patch_size": 14, "merge_size": 2}


@pytest.fixture(scope="module")
def clip() -> bytes:
    return mp4_bytes(num_frames=9, fps=4, height=32, width=48)


def all_frames(data: bytes) -> torch.Tensor:
    everything = VideoSampling(fps=None, num_frames=100, frame_factor=1, max_frames=100)
    return decode_video(data, MediaConfig(), everything).frames


def test_decode_returns_sampled_rgb_frames_and_timing(clip):
    video = decode_video(clip, MediaConfig())  # 2 fps of a 9-frame 4 fps clip
    assert video.frames.dtype == torch.uint8 and video.frames.shape[1:] == (3, 32, 48)
    assert video.total_frames == 9 and video.source_fps == pytest.approx(4.0)
    assert video.duration_s == pytest.approx(2.25, abs=0.3)
    assert video.frame_indices == [0, 2, 4, 6]  # HF: 9/4*2=4.5 -> 4 frames
    assert video.fps == pytest.approx(4 / 9 * 4.0)  # HF's VideoMetadata.sampled_fps
    full = all_frames(clip)
    assert torch.equal(video.frames, full[video.frame_indices])


def test_decoded_video_preprocesses_like_hf_sampling_the_same_decoded_frames(clip):
    full = all_frames(clip)  # [9, 3, H, W]
    hf = Qwen2VLVideoProcessor(**CFG)
    expected = hf(
        videos=[full],
        video_metadata=[{"total_num_frames": 9, "fps": 4.0}],
        do_sample_frames=True,
        fps=2,
        return_tensors="pt",
        cap_pixels_per_frame=False,
    )
    video = decode_video(clip, MediaConfig())
    item = Qwen2VLPreprocessor.from_config(CFG, CFG).preprocess_video(video.frames, video.fps)
    assert list(item.grid_thw) == expected["video_grid_thw"][0].tolist()
    torch.testing.assert_close(
        item.pixel_values, expected["pixel_values_videos"], atol=1e-5, rtol=0
    )


def test_decode_from_a_path_equals_decode_from_bytes(clip, tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip)
    assert torch.equal(
        decode_video(path, MediaConfig()).frames, decode_video(clip, MediaConfig()).frames
    )


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (MediaConfig(video_max_duration_s=1.0), "longer than"),
        (MediaConfig(video_max_frame_pixels=32 * 47), "pixel limit"),
        (MediaConfig(video_max_source_frames=8), "frame limit"),
        # 4 frames sampled from the clip (768 frames of 4K used to pass every cap)
        (MediaConfig(video_max_total_pixels=32 * 48 * 3), "pixel limit for a whole video"),
    ],
)
def test_caps_are_checked_from_the_header_before_any_frame_is_decoded(
    clip, monkeypatch, config, fragment
):
    real_open = av.open

    class NoDecode:
        """Forwards to the real container but fails the test if a frame is decoded."""

        def __init__(self, container):
            self._container = container

        def __getattr__(self, name):
            if name == "decode":
                pytest.fail("decoded before checking caps")
            return getattr(self._container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._container.close()

    def no_decode_open(*args, **kwargs):
        return NoDecode(real_open(*args, **kwargs))

    monkeypatch.setattr(av, "open", no_decode_open)
    with pytest.raises(MediaLimitError) as info:
        decode_video(clip, config)
    assert info.value.status == 413 and fragment in info.value.message


def test_container_is_closed_on_success_and_on_error(clip, monkeypatch):
    opened = []
    real_open = av.open

    def tracking_open(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(av, "open", tracking_open)
    decode_video(clip, MediaConfig())
    with pytest.raises(MediaLimitError):
        decode_video(clip, MediaConfig(video_max_duration_s=0.5))
    assert len(opened) == 2
    for container in opened:
        with pytest.raises(Exception):  # noqa: B017 - PyAV raises on a closed container
            container.streams.video[0].frames  # noqa: B018


def test_decode_deadline_between_frames_fails_the_request_not_the_worker(clip):
    with pytest.raises(MediaDecodeError, match="too long"):
        decode_video(clip, MediaConfig(), deadline_s=1e-9)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" * 100,
        b"RIFF\x00\x00\x00\x00WAVEfmt ",
        b"#EXTM3U\n#EXT-X-VERSION:3\nfile:///etc/passwd\n",
    ],
    ids=["zeros", "wav-not-avi", "hls-playlist"],
)
def test_unsupported_or_unreadable_containers_are_decode_errors(data):
    with pytest.raises(MediaDecodeError) as info:
        decode_video(data, MediaConfig())
    assert info.value.status == 400
    assert "/" not in info.value.message.replace("MP4/MOV", "").replace("MKV/WebM", "")


def test_truncated_mp4_is_a_decode_error(clip):
    with pytest.raises(MediaDecodeError):
        decode_video(clip[: len(clip) // 3], MediaConfig())


def test_frame_arrays_are_accepted_and_capped():
    frames = np.zeros((3, 10, 12, 3), dtype=np.uint8)
    video = video_from_frames(frames, fps=2.0)
    assert video.frames.shape == (3, 3, 10, 12) and video.fps == 2.0
    gray = torch.zeros(2, 1, 10, 12, dtype=torch.uint8)
    assert frames_to_tensor(gray).shape == (2, 3, 10, 12)
    with pytest.raises(MediaLimitError):
        frames_to_tensor(np.zeros((9, 4, 4, 3), dtype=np.uint8), MediaConfig(video_max_frames=8))
    with pytest.raises(MediaDecodeError):
        frames_to_tensor(np.zeros((4, 4, 3), dtype=np.uint8))


def _fork_from_another_thread() -> int | None:
    """Forks a child that exits at once, from a thread other than the main one; returns
    its exit code (None: it hung and was killed)."""
    import multiprocessing
    import threading

    result: list[int | None] = []

    def fork_and_wait() -> None:
        child = multiprocessing.get_context("fork").Process(target=int)
        child.start()
        child.join(timeout=20)
        if child.is_alive():
            child.kill()
            child.join()
            result.append(None)
        else:
            result.append(child.exitcode)

    thread = threading.Thread(target=fork_and_wait)
    thread.start()
    thread.join()
    return result[0]


def test_a_process_forked_from_another_thread_after_a_decode_does_not_hang():
    # PyAV >= 17 caches an RGB converter per thread; with FFmpeg 8 its swscale context
    # keeps slice threads. Left cached on this (main) thread, a child forked from another
    # thread freed it and hung joining threads it does not have: an input-worker pool
    # started from a helper thread never came up. decode_video uses a converter of its own.
    decode_video(mp4_bytes(num_frames=4, fps=4, height=360, width=640), MediaConfig())
    assert _fork_from_another_thread() == 0
