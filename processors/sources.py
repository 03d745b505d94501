"""Media that arrives without a network fetch: data: URLs and allowlisted local files."""

from __future__ import annotations

import binascii
import os
import stat

import pybase64

from processors.config import MediaConfig
from processors.errors import MediaDecodeError, MediaFetchError, MediaLimitError


def content_type_allowed(content_type: str, config: MediaConfig, modality: str | None) -> bool:
    """Whether a MIME type (from a response header or a data: URL) fits `modality`.

    Args:
        content_type: e.g. "image/png; charset=binary"; empty means application/octet-stream.
        config: Supplies the accepted type prefixes.
        modality: "image", "video" or None (either).
    """
    mime = content_type.split(";", 1)[0].strip().lower() or "application/octet-stream"
    if not any(mime.startswith(prefix) for prefix in config.allowed_content_types):
        return False
    if modality in ("image", "video") and mime != "application/octet-stream":
        return mime.startswith(f"{modality}/")
    return True


def too_large(cap: int) -> MediaLimitError:
    """The 413 error for media over a byte cap."""
    return MediaLimitError(
        f"Media is larger than the {max(cap // (1024 * 1024), 1)} MiB limit for this server.",
        status=413,
    )


def read_data_url(url: str, config: MediaConfig, modality: str | None) -> bytes:
    """Decode a `data:<mime>;base64,<payload>` URL within the byte cap.

    Raises:
        MediaFetchError: (400) malformed header, not base64, or a refused MIME type.
        MediaLimitError: (413) the payload decodes to more than the cap.
        MediaDecodeError: (400) the payload is not valid base64.
    """
    # Index, not partition(): the payload is megabytes and is sliced out once, below.
    start = len("data:")
    comma = url.find(",", start)
    if comma < 0:
        raise MediaFetchError("Malformed data: URL (expected data:<type>;base64,<data>).")
    header = url[start:comma]
    params = [p.strip().lower() for p in header.split(";")]
    mime, flags = params[0], params[1:]
    if "base64" not in flags:
        raise MediaFetchError("data: URLs must be base64-encoded (data:<type>;base64,<data>).")
    if not mime or not content_type_allowed(mime, config, modality):
        raise MediaFetchError(f"data: URL type is not an accepted {modality or 'media'} type.")
    cap = config.max_bytes(modality)
    # Refuse before decoding: 4 base64 characters carry 3 bytes.
    if len(url) - comma - 1 > (cap // 3 + 1) * 4:
        raise too_large(cap)
    try:  # SIMD decode, as strict as the standard library's validate=True
        data = pybase64.b64decode(url[comma + 1 :], validate=True)
    except (binascii.Error, ValueError):
        raise MediaDecodeError("data: URL payload is not valid base64.") from None
    if len(data) > cap:
        raise too_large(cap)
    if not data:
        raise MediaDecodeError("data: URL payload is empty.")
    return data


def read_local_file(path: str, config: MediaConfig, modality: str | None) -> bytes:
    """Read a file that lies, after resolving symlinks and `..`, inside an allowed directory.

    Raises:
        MediaFetchError: (400) local files disabled, path outside the allowlist, missing,
            or not a regular file. Messages never repeat the path.
        MediaLimitError: (413) the file is over the byte cap.
    """
    if not config.allowed_local_paths:
        raise MediaFetchError("Local file URLs are disabled on this server.")
    if "\x00" in path or not os.path.isabs(path):
        raise MediaFetchError("Local file URLs must name an absolute path.")
    real = os.path.realpath(path)
    if not any(_inside(real, root) for root in config.allowed_local_paths):
        raise MediaFetchError("Local file is outside the directories this server allows.")
    cap = config.max_bytes(modality)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError:
        raise MediaFetchError("Local file could not be opened.") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise MediaFetchError("Local file is not a regular file.")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > cap:
            raise too_large(cap)
        data = f.read(cap + 1)  # bounded even if the file grows after fstat
    if len(data) > cap:
        raise too_large(cap)
    return data


def _inside(real_path: str, root: str) -> bool:
    real_root = os.path.realpath(root)
    try:
        return os.path.commonpath([real_path, real_root]) == real_root
    except ValueError:
        return False
