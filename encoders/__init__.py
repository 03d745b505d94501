"""Vision towers and projectors, the embedding cache and the encoder stage loop."""

from encoders.base import VisionEncoder
from encoders.cache import CacheStats, EmbeddingCache
from encoders.factory import build_vision_encoder
from encoders.runner import EncoderRunner, RunnerStats

__all__ = [
    "CacheStats",
    "EmbeddingCache",
    "EncoderRunner",
    "RunnerStats",
    "VisionEncoder",
    "build_vision_encoder",
]
