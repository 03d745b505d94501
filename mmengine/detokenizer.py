"""Incremental detokenization that never emits a broken UTF-8 character.

Byte-level BPE tokens can end in the middle of a multi-byte character; decoding such a
prefix yields U+FFFD. We decode a short window of recent tokens and hold text back while
it ends in U+FFFD, releasing it once the following token completes the character.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between = spaces_between_special_tokens
        # Start the window a few prompt tokens back so the first output token decodes with
        # its left context (matters for tokenizers that strip a leading space).
        self.token_ids: list[int] = list(prompt_token_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.num_prompt_window = len(self.token_ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between,
        )

    def add_tokens(self, new_ids: list[int]) -> str:
        """Append generated tokens; return the newly complete text (may be "")."""
        out = []
        for tok in new_ids:
            self.token_ids.append(tok)
            prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.token_ids[self.prefix_offset :])
            if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
                out.append(full[len(prefix) :])
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.token_ids)
        delta = "".join(out)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end: release whatever is still held back (even a dangling U+FFFD)."""
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        delta = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self.text += delta
        return delta


def decode_token(tokenizer: Any, token_id: int) -> str | None:
    """Text of one token on its own (for logprob entries)."""
    if tokenizer is None:
        return None
    return tokenizer.decode([token_id], skip_special_tokens=False)
