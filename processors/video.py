"""Decode videos with PyAV under hard caps, sample frames, and accept pre-decoded frames.

Duration, resolution and frame count are read from the container header and checked
before any frame is decoded; decoding stops after the last frame the sampling needs, is
checked against a deadline between frames, and the container is always closed. The
container format is sniffed from magic bytes and passed to FFmpeg explicitly, so FFmpeg
never probes its way into playlist or concat demuxers that open other files or URLs.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from processors.config import MediaConfig
from processors.errors import MediaDecodeError, MediaLimitError
from processors.image import rgb_from_channels, to_rgb_pil

VideoFrames = np.ndarray | torch.Tensor | Sequence[Image.Image]


@dataclass(frozen=True)
class VideoSampling:
    """How many frames to keep (HF Qwen2-VL `sample_frames` semantics)."""

    fps: float | None = 2.0  # frames to keep per second of video
    num_frames: int | None = None  # or exactly this many frames (exclusive with fps)
    min_frames: int = 4
    max_frames: int = 768
    frame_factor: int = 2  # sampled counts are multiples of this (temporal_patch_size)

    @classmethod
    def from_config(cls, config: MediaConfig, frame_factor: int = 2) -> VideoSampling:
        """Sampling defaults from the server's media config."""
        return cls(
            fps=config.video_fps,
            num_frames=config.video_num_frames,
            min_frames=config.video_min_frames,
            max_frames=config.video_max_frames,
            frame_factor=frame_factor,
        )


@dataclass
class DecodedVideo:
    """Sampled RGB frames plus the timing the preprocessors need."""

    frames: torch.Tensor  # [T, 3, H, W] uint8
    fps: float  # rate of the sampled frames (HF's `VideoMetadata.sampled_fps`)
    source_fps: float  # frame rate of the container's video stream
    duration_s: float  # duration of the source video
    total_frames: int  # frames in the source (header value or estimate)
    frame_indices: list[int] = field(default_factory=list)  # source index of each frame


def sample_frame_indices(
    total_frames: int, source_fps: float, sampling: VideoSampling
) -> list[int]:
    """Pick source frame indices, as HF's Qwen2-VL video processor `sample_frames` does.

    With `fps`: `total / source_fps * fps` frames, clamped to [min_frames, max_frames] and
    to the video length, floored to a multiple of `frame_factor`. With `num_frames`: that
    count rounded to a multiple of `frame_factor`. Indices are `arange(0, total,
    total / n)` truncated to int. Unlike HF, counts above the video length are clamped
    rather than raising, and a video shorter than `frame_factor` keeps all its frames.

    Args:
        total_frames: Frames in the source video.
        source_fps: Frame rate of the source video.
        sampling: Target rate or count and bounds.

    Returns:
        Increasing frame indices.
    """
    if total_frames <= 0:
        raise MediaDecodeError("Video has no frames.")
    factor = max(sampling.frame_factor, 1)
    if sampling.num_frames is not None:
        count = round(sampling.num_frames / factor) * factor
        count = min(count, sampling.max_frames, total_frames)
        count = (count // factor) * factor
    else:
        if sampling.fps is None or source_fps <= 0:
            raise MediaDecodeError("Video frame rate is unknown; cannot sample by fps.")
        max_frames = math.floor(min(sampling.max_frames, total_frames) / factor) * factor
        count = total_frames / source_fps * sampling.fps
        count = min(max(count, sampling.min_frames), max_frames, total_frames)
        count = math.floor(count / factor) * factor
    if count <= 0:
        return list(range(total_frames))
    indices = torch.arange(0, total_frames, total_frames / count).int().tolist()
    return indices[:count]  # float steps can add one index past `count`


def _sniff_format(head: bytes) -> str:
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    raise MediaDecodeError("Video data is not a supported container (MP4/MOV, MKV/WebM, AVI).")


def decode_video(
    source: bytes | str | os.PathLike[str],
    config: MediaConfig,
    sampling: VideoSampling | None = None,
    *,
    deadline_s: float | None = None,
) -> DecodedVideo:
    """Decode and sample a video from encoded bytes or a local path.

    Args:
        source: Encoded video bytes, or a path the caller already allowed.
        config: Duration / resolution / frame caps and the decode deadline.
        sampling: Frame sampling; defaults to `VideoSampling.from_config(config)`.
        deadline_s: Seconds allowed for decoding; defaults to config.video_decode_deadline_s.

    Returns:
        The sampled frames and timing metadata.

    Raises:
        MediaDecodeError: (400) unreadable, unsupported, no video stream, or too slow.
        MediaLimitError: (413) over the duration, resolution or frame-count caps.
    """
    import av  # deferred: only decoding needs PyAV, frame tensors and sampling do not

    sampling = sampling or VideoSampling.from_config(config)
    budget = config.video_decode_deadline_s if deadline_s is None else deadline_s
    deadline = time.monotonic() + budget
    if isinstance(source, (bytes, bytearray, memoryview)):
        file: io.IOBase = io.BytesIO(bytes(source))
    else:
        try:
            file = open(source, "rb")  # noqa: SIM115 - closed in the finally below
        except OSError:
            raise MediaDecodeError("Video file could not be opened.") from None
    try:
        fmt = _sniff_format(file.read(16))
        file.seek(0)
        with av.open(file, mode="r", format=fmt) as container:
            return _decode_container(container, config, sampling, deadline)
    except av.error.FFmpegError:
        raise MediaDecodeError("Video data is corrupt or cannot be decoded.") from None
    except (ValueError, IndexError, OSError, EOFError):
        raise MediaDecodeError("Video data is corrupt or cannot be decoded.") from None
    finally:
        file.close()


def _decode_container(
    container: Any,  # av.container.InputContainer
    config: MediaConfig,
    sampling: VideoSampling,
    deadline: float,
) -> DecodedVideo:
    if not container.streams.video:
        raise MediaDecodeError("Video data has no video stream.")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise MediaDecodeError("Video stream has no frame size.")
    _check_frame_size(width, height, config)

    import av
    from av.video.reformatter import VideoReformatter

    rate = stream.average_rate or stream.guessed_rate
    source_fps = float(rate) if rate else 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    if duration > config.video_max_duration_s:
        raise MediaLimitError(
            f"Video is longer than the {config.video_max_duration_s:g} s limit.", status=413
        )
    total = stream.frames or round(duration * source_fps)
    if total <= 0:
        raise MediaDecodeError("Video frame count is unknown.")
    if total > config.video_max_source_frames:
        raise MediaLimitError(
            f"Video has more than the {config.video_max_source_frames} frame limit.", status=413
        )
    if duration <= 0 and source_fps > 0:
        duration = total / source_fps

    indices = sample_frame_indices(total, source_fps, sampling)
    if len(indices) * width * height > config.video_max_total_pixels:
        raise MediaLimitError(
            f"Video would decode to {len(indices)} frames of {width}x{height}, above the "
            f"{config.video_max_total_pixels} pixel limit for a whole video.",
            status=413,
        )
    wanted, last = set(indices), indices[-1]
    # This call's own RGB converter, single-threaded. `frame.to_ndarray(format=...)` would
    # use PyAV's converter cached per thread (PyAV >= 17), whose FFmpeg 8 swscale context
    # keeps slice threads alive after the call: a process forked from another thread
    # later frees that context in the child and hangs joining threads the child does not
    # have (seen with PyAV 18.1: an input-worker pool forked after a video decode). The
    # input workers are processes already, so one scaling thread each is also what we want.
    reformatter = VideoReformatter()
    # The frames go straight into their place in the clip: no list of frames to stack and
    # then transpose (each a second and third copy of up to video_max_total_pixels * 3 B).
    # The clip is [T, 3, H, W] over [T, H, W, 3] memory: each frame is a plain copy, and
    # the CPU resize takes that layout natively (see image_to_tensor).
    video = torch.empty((len(indices), height, width, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    kept: list[int] = []
    for index, frame in enumerate(container.decode(stream)):
        if time.monotonic() > deadline:
            raise MediaDecodeError("Video took too long to decode.")
        if index >= config.video_max_source_frames:
            raise MediaLimitError("Video has more frames than its header declares.", status=413)
        _check_frame_size(frame.width, frame.height, config)  # size may change mid-stream
        if index in wanted:
            if (frame.width, frame.height) != (width, height):
                raise MediaDecodeError("Video frames change size mid-stream.")
            rgb_frame = reformatter.reformat(frame, format="rgb24", threads=1)
            rgb = torch.from_numpy(rgb_frame.to_ndarray())  # [H, W, 3] uint8
            video[len(kept)].copy_(rgb.permute(2, 0, 1))
            kept.append(index)
        if index >= last:
            break
    if not kept:
        raise MediaDecodeError("Video data contains no decodable frames.")
    video = video[: len(kept)]  # a stream may end before its header's frame count
    return DecodedVideo(
        frames=video,
        fps=len(kept) / total * source_fps if source_fps > 0 else float(sampling.fps or 2.0),
        source_fps=source_fps,
        duration_s=duration,
        total_frames=total,
        frame_indices=kept,
    )


def _check_frame_size(width: int, height: int, config: MediaConfig) -> None:
    if width * height > config.video_max_frame_pixels:
        raise MediaLimitError(
            f"Video frames of {width}x{height} are above the "
            f"{config.video_max_frame_pixels} pixel limit.",
            status=413,
        )


def frames_to_tensor(frames: VideoFrames, config: MediaConfig | None = None) -> torch.Tensor:
    """Bring pre-decoded frames to an RGB uint8 tensor.

    Args:
        frames: numpy [T, H, W, C] uint8, torch [T, C, H, W] uint8 (C in 1, 3, 4), or a
            list of PIL images of one size.
        config: When given, frame count (video_max_frames) and frame size caps apply.

    Returns:
        torch.Tensor [T, 3, H, W] uint8, dense: arrays and PIL frames as a view of their
        [T, H, W, 3] memory (the CPU resize's native layout), tensors as given.
    """
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise MediaDecodeError("Video arrays must be [T, H, W, C].")
        # A [T, C, H, W] view of the [T, H, W, C] memory: the resize's fast layout.
        tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    elif isinstance(frames, torch.Tensor):
        tensor = frames
    elif (
        isinstance(frames, Sequence) and frames and all(isinstance(f, Image.Image) for f in frames)
    ):
        if len({f.size for f in frames}) != 1:
            raise MediaDecodeError("Video frames must all have the same size.")
        if config is not None:
            _check_count(len(frames), config)
            _check_frame_size(frames[0].width, frames[0].height, config)
        on_white = config.composite_alpha_on_white if config is not None else True
        arrays = [np.asarray(to_rgb_pil(f, on_white)) for f in frames]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # HWC memory
    else:
        raise MediaDecodeError(
            "Video input must be bytes, a frame array/tensor or a list of images."
        )
    if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[1] not in (1, 3, 4):
        raise MediaDecodeError("Video frames must be uint8 with 1, 3 or 4 channels.")
    if tensor.shape[0] == 0:
        raise MediaDecodeError("Video has no frames.")
    if config is not None:
        _check_count(int(tensor.shape[0]), config)
        _check_frame_size(int(tensor.shape[3]), int(tensor.shape[2]), config)
    on_white = config.composite_alpha_on_white if config is not None else True
    rgb = rgb_from_channels(tensor, on_white)
    # Dense either way is fine (a decoded clip is [T, H, W, 3] memory); gray's broadcast
    # channel or a sliced alpha is made dense.
    dense = rgb.is_contiguous() or rgb.is_contiguous(memory_format=torch.channels_last)
    return rgb if dense else rgb.contiguous()


def _check_count(count: int, config: MediaConfig) -> None:
    if count > config.video_max_frames:
        raise MediaLimitError(
            f"Video has {count} frames, above the {config.video_max_frames} frame limit.",
            status=413,
        )


def video_from_frames(
    frames: VideoFrames, fps: float = 2.0, config: MediaConfig | None = None
) -> DecodedVideo:
    """Wrap pre-decoded, already-sampled frames as a `DecodedVideo` at rate `fps`."""
    tensor = frames_to_tensor(frames, config)
    count = int(tensor.shape[0])
    return DecodedVideo(
        frames=tensor,
        fps=float(fps),
        source_fps=float(fps),
        duration_s=count / fps,
        total_frames=count,
        frame_indices=list(range(count)),
    )
