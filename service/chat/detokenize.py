"""Incremental detokenization: constant work per new token, the same text as decoding
the whole answer at once.

Decoding token by token loses what a token means in context (Llama-style tokenizers
drop a leading space on a lone token; a multi-byte character can span tokens), and
decoding the whole answer at every step is quadratic. So each step decodes a short
window: the tokens since ``prefix`` with and without the new ones, and hands out the
difference. A window that ends inside a character (U+FFFD) waits for the next token.
The window restarts after each emitted piece, so its length stays a few tokens.
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._prefix = 0  # window start: context so the next piece decodes as in the whole text
        self._read = 0  # tokens already turned into text

    def _decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The text ``token`` adds to the answer ("" while a character is incomplete)."""
        self._tokens.append(token)
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing visible yet, or a character split across tokens: wait
        self._prefix, self._read = self._read, len(self._tokens)
        return after[len(before) :]

    def flush(self) -> str:
        """What the held-back tokens decode to at the end (a character left incomplete)."""
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        self._prefix = self._read = len(self._tokens)
        return after[len(before) :]
