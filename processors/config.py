"""Limits and allowlists for fetching and decoding media (one object per server)."""

from __future__ import annotations

from dataclasses import dataclass, field

# A redirect chain longer than this is refused whatever the configuration asks for.
REDIRECT_HARD_CAP = 5

MIB = 1024 * 1024


@dataclass(frozen=True)
class MediaConfig:
    """Every limit the media path enforces; defaults are safe to expose to the internet."""

    # --- where media may come from ---
    # Host names allowed for http(s) URLs. Empty: any host that resolves to a public
    # address. Non-empty: only these hosts ("example.com" exactly; ".example.com" or
    # "*.example.com" for the domain and its subdomains). A listed host may resolve to a
    # private address (that is how an operator opts a local server in).
    allowed_domains: tuple[str, ...] = ()
    # Directories under which file: URLs may read. Empty: file: URLs are refused.
    allowed_local_paths: tuple[str, ...] = ()
    # Let any host resolve to loopback/private/link-local addresses (tests, closed networks).
    allow_private_networks: bool = False
    # Response content types accepted from http(s) servers and in data: URLs (prefixes).
    allowed_content_types: tuple[str, ...] = ("image/", "video/", "application/octet-stream")

    # --- fetch limits ---
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0  # longest wait for any single read
    fetch_deadline_s: float = 30.0  # whole fetch, redirects included
    max_redirects: int = 0  # 0: redirects are refused; each followed hop is re-checked
    max_image_bytes: int = 20 * MIB
    max_video_bytes: int = 100 * MIB

    # --- image decoding ---
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
    image_max_pixels: int = 32 * MIB  # width * height, checked before pixels are decoded
    # Transparent pixels become white, as transformers 5.24's `convert_to_rgb` does; False
    # drops alpha instead, as transformers 5.17 and older do. Match the HF you compare to.
    composite_alpha_on_white: bool = True

    # --- video decoding ---
    video_max_duration_s: float = 600.0
    video_max_frame_pixels: int = 3840 * 2160  # width * height of one frame
    video_max_source_frames: int = 36_000  # frames in the container, before sampling
    video_decode_deadline_s: float = 60.0  # checked between decoded frames
    # Sampling defaults (Qwen2-VL style): `fps` frames per second, or exactly `num_frames`.
    video_fps: float | None = 2.0
    video_num_frames: int | None = None
    video_min_frames: int = 4
    video_max_frames: int = 768  # sampled frames kept per video
    # Pixels of all sampled frames together, checked before decoding: the decoded clip is
    # 3 bytes a pixel (1 Gi pixels: 3 GiB; 768 frames of 720p fit, of 4K only 129).
    video_max_total_pixels: int = 1024 * MIB

    # --- per prompt ---
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: {"image": 8, "video": 1})

    def __post_init__(self) -> None:
        if not 0 <= self.max_redirects <= REDIRECT_HARD_CAP:
            raise ValueError(f"max_redirects must be within [0, {REDIRECT_HARD_CAP}]")
        positive = {
            "connect_timeout_s": self.connect_timeout_s,
            "read_timeout_s": self.read_timeout_s,
            "fetch_deadline_s": self.fetch_deadline_s,
            "max_image_bytes": self.max_image_bytes,
            "max_video_bytes": self.max_video_bytes,
            "image_max_pixels": self.image_max_pixels,
            "video_max_duration_s": self.video_max_duration_s,
            "video_max_frame_pixels": self.video_max_frame_pixels,
            "video_max_source_frames": self.video_max_source_frames,
            "video_decode_deadline_s": self.video_decode_deadline_s,
            "video_max_frames": self.video_max_frames,
            "video_max_total_pixels": self.video_max_total_pixels,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive")
        if self.video_fps is not None and self.video_num_frames is not None:
            raise ValueError("video_fps and video_num_frames are mutually exclusive")
        if self.video_fps is None and self.video_num_frames is None:
            raise ValueError("one of video_fps or video_num_frames must be set")

    def max_bytes(self, modality: str | None) -> int:
        """Byte cap for a fetch of `modality` ("image", "video" or None for either)."""
        if modality == "image":
            return self.max_image_bytes
        if modality == "video":
            return self.max_video_bytes
        return max(self.max_image_bytes, self.max_video_bytes)
