"""Per-row sampling extras of the OpenAI API: presence/frequency penalties and logprobs.

Both act on one request's logits row, in the model thread, before its token is sampled,
so a row's result never depends on its batch neighbours. Penalties follow OpenAI's
definition: ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``
over the tokens this completion has produced so far. Logprobs are ``log_softmax`` of the
logits the token is sampled from after the penalties, before temperature and top_p (for
greedy decoding: ``log_softmax`` of ``generate``'s scores).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingExtras:
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    top_logprobs: int | None = None  # None: no logprobs; 0..20: the chosen token and this many more

    @property
    def penalised(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def apply_penalties(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        """(V,) logits with OpenAI's penalties for the tokens in ``generated``."""
        if not self.penalised or not generated:
            return logits
        ids = torch.tensor(generated, device=logits.device)
        counts = torch.zeros_like(logits).scatter_add_(0, ids, torch.ones_like(ids, dtype=logits.dtype))
        return (
            logits - counts * self.frequency_penalty - (counts > 0).to(logits.dtype) * self.presence_penalty
        )

    def entry(self, logits: torch.Tensor, token: int, text_of: Callable[[int], str]) -> dict[str, Any]:
        """OpenAI's ``logprobs.content`` item for ``token`` sampled from ``logits`` (V,)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top: list[dict[str, Any]] = []
        if self.top_logprobs:
            values, ids = torch.topk(logprobs, self.top_logprobs)
            top = [
                _token(text_of(int(i)), float(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True)
            ]
        return {**_token(text_of(token), float(logprobs[token])), "top_logprobs": top}


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
