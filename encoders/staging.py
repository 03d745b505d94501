"""Host-to-GPU transfer of packed encoder inputs through reused pinned buffers.

Pixel values arrive as separate CPU tensors, one per item (~22 MB as float32 for a 1280x720
image; the engine's input workers send uint8, a quarter of that). Concatenating
them into a fresh pageable tensor and copying that to the GPU cost the CPU ~200 ms per
62k-patch batch on an H100 host (page faults on the new allocation, then a staged pageable
copy) while the GPU did 232 ms of work: the transfer took as long as the tower. Packing into
one of two pinned byte buffers that live as long as the encoder (used in turn, see
PinnedStaging), then one asynchronous copy, removes both costs; uint8 pixels are normalized
on the device (stage_pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from processors.types import MultiModalItem


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Moves a small host tensor to `device` without making the host wait for the GPU.

    A plain `.to("cuda")` of pageable memory synchronizes with the stream: the host stalls
    until every kernel queued before the copy has run. With async scheduling the host
    should be preparing the next step meanwhile, so index tensors and the like go through
    pinned memory and an asynchronous copy. Non-CUDA devices get a plain `.to`.
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class PinnedStaging:
    """Packs CPU tensors into pinned buffers and moves them to the GPU in one copy each.

    Two buffers are used in turn, each with an event marking the end of its last copy: a
    call refills the buffer the call before last used, whose copy the GPU has long done
    when the host runs at most a step ahead (async scheduling), so the host never waits
    for the step in flight. (One buffer made every encoder step wait for the previous
    step's copy: 10% of the engine loop's samples in a W1 run on an H200.) A buffer that
    must grow grows both, so a start-up pass at the largest size (the memory profile)
    pins all the memory a run needs and no step pins memory (slow: page locking) mid-run.
    """

    SLOTS = 2

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | None] = [None] * self.SLOTS  # pinned uint8
        self._done: list[torch.cuda.Event | None] = [None] * self.SLOTS  # last copy out
        self._next = 0

    def _grow(self, nbytes: int) -> None:
        size = 1 << max(nbytes - 1, 1).bit_length()
        for i in range(self.SLOTS):
            if self._done[i] is not None:
                self._done[i].synchronize()  # never free a buffer a copy still reads
            self._buffers[i] = None  # free the old pinned block before pinning a larger one
            self._buffers[i] = torch.empty(size, dtype=torch.uint8, pin_memory=True)

    def to_device(
        self, parts: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Concatenates `parts` along dim 0 and returns them on `device` as `dtype`.

        Args:
            parts: CPU tensors with equal trailing shapes and equal dtypes.
            device: a CUDA device (CPU devices get a plain concatenation).
            dtype: the dtype of the result (the cast runs on the device).
        """
        if device.type != "cuda":
            return torch.cat(list(parts)).to(dtype=dtype)
        src_dtype = parts[0].dtype
        rows = sum(p.shape[0] for p in parts)
        shape = (rows, *parts[0].shape[1:])
        nbytes = rows * parts[0][:1].numel() * parts[0].element_size()
        slot = self._next
        self._next = (slot + 1) % self.SLOTS
        buf = self._buffers[slot]
        if buf is None or buf.numel() < nbytes:
            self._grow(nbytes)
            buf = self._buffers[slot]
        elif self._done[slot] is not None:
            self._done[slot].synchronize()  # the copy of the call before last: done
        assert buf is not None
        staged = buf[:nbytes].view(src_dtype).view(shape)
        torch.cat(list(parts), out=staged)
        on_device = staged.to(device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._done[slot] = done
        return on_device.to(dtype)


def stage_pixels(
    staging: PinnedStaging,
    items: Sequence[MultiModalItem],
    device: torch.device,
    dtype: torch.dtype,
    stack: bool = False,
) -> torch.Tensor:
    """The items' pixels on `device` as normalized `dtype`: concatenated along dim 0
    (Qwen patches, [sum N, patch_dim]), or with `stack` stacked along a new dim 0 (equal
    shapes, CLIP images: [B, C, H, W]).

    uint8 items sharing one PixelNorm (what the engine's input workers send) travel as
    uint8 and are normalized on the device: a quarter of float32's bytes through the
    pinned buffer and the host-to-device copy. Anything else is normalized per item on
    the host first. Nothing here waits for the GPU.
    """
    shape = (len(items), *items[0].pixel_values.shape) if stack else None
    norms = {item.pixel_norm for item in items}
    if (
        len(norms) == 1
        and None not in norms
        and all(item.pixel_values.dtype == torch.uint8 for item in items)
    ):
        (norm,) = norms
        raw = staging.to_device([item.pixel_values for item in items], device, torch.uint8)
        if shape is not None:
            raw = raw.view(shape)
            norm = replace(norm, channel_axis=norm.channel_axis + 1)  # the new batch dim
        return norm.apply(raw).to(dtype)
    out = staging.to_device([item.normalized_pixels() for item in items], device, dtype)
    return out if shape is None else out.view(shape)
