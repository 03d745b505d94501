"""The interface every vision encoder offers the encoder stage."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from processors.types import MultiModalItem


class VisionEncoder(nn.Module, ABC):
    """A vision tower plus projector turning preprocessed items into LLM input embeddings."""

    # Width of the embeddings `encode` returns: the LLM's hidden size.
    text_hidden_size: int

    @abstractmethod
    def encode(self, items: Sequence[MultiModalItem]) -> list[torch.Tensor]:
        """Encodes items, possibly from different requests, in one packed forward.

        Args:
            items: preprocessed images / videos of this encoder's model family.

        Returns:
            One tensor per item, in order, of shape [item.num_tokens, text_hidden_size],
            in the encoder's dtype and on its device.
        """

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
