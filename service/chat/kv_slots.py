"""The chat KV cache: preallocated on the device in fixed slots, written in place.

Each layer holds keys and values as ``(slots + 1, kv_heads, slot_tokens, head_dim)``;
a request owns one slot for its life. A decode step over the rows ``[0, hi)`` writes
each row's new key/value at its own position (``index_put_``) and attends over the
view ``[:hi, :, :longest]``: nothing earlier is copied, and a boolean mask limits each
row to its own length. The last slot is trash: padding tokens and rows without a
request write there, so a write never lands on anyone's tokens.

Why slots and not transformers' ``PagedAttentionCache``: its SDPA path flattens the
batch and reads every request's blocks back with ``index_select`` at every layer of
every step (a full copy of the KV), and its copy-free block-table path needs the
flash-attention kernels (CUDA only); its manager also takes token ids only, not the
embeddings and per-adapter KV prefixes this service feeds. Fixed slots keep the
decode step copy-free with plain ``torch`` SDPA on any device.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import torch


def bytes_per_token(text_config: Any, dtype: torch.dtype) -> int:
    """Key + value bytes one token holds over all layers."""
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = (
        getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    )
    return 2 * text_config.num_hidden_layers * heads * head_dim * torch.empty((), dtype=dtype).element_size()


def default_cache_bytes(device: torch.device, fraction: float = 0.5, cpu_bytes: int = 2**30) -> int:
    """``--kv-cache-bytes`` when unset: half the free device memory on CUDA, 1 GiB on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    return cpu_bytes


class KVSlots:
    """Fixed-slot KV storage, sized by a byte budget (see module docstring)."""

    def __init__(
        self,
        text_config: Any,
        *,
        budget_bytes: int,
        context_length: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        per_token = bytes_per_token(text_config, dtype)
        budget_tokens = budget_bytes // per_token
        # one slot holds a whole context; a budget under one context gets one smaller slot
        self.slot_tokens = min(context_length, budget_tokens)
        self.slots = budget_tokens // self.slot_tokens if self.slot_tokens else 0
        if self.slots < 1 or self.slot_tokens < 2:
            raise ValueError(
                f"--kv-cache-bytes {budget_bytes} holds {budget_tokens} tokens at {per_token} bytes per token; "
                "give it at least one request's worth"
            )
        self.bytes_per_token = per_token
        heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        head_dim = (
            getattr(text_config, "head_dim", None)
            or text_config.hidden_size // text_config.num_attention_heads
        )
        shape = (self.slots + 1, heads, self.slot_tokens, head_dim)  # the last slot is trash
        self.keys = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(text_config.num_hidden_layers)
        ]
        self.values = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(text_config.num_hidden_layers)
        ]
        self.trash = self.slots
        self._free = list(range(self.slots))  # a heap: the lowest slot first keeps decode rows dense
        self.device = device

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in [*self.keys, *self.values])

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)


@dataclass
class SlotBatch:
    """One forward's view of the slots, passed to the model as its cache.

    ``write_slots``/``write_positions`` (B, T) say where each input token's key/value
    goes; ``read_slots`` which slots the rows attend over, up to ``read_length``:
    ``None`` (rows are slots ``0..B-1``) or a ``slice`` of consecutive slots read as a
    view, or a tensor of slots gathered (prefill rows in scattered slots only).
    """

    store: KVSlots
    write_slots: torch.Tensor  # (B, T) long
    write_positions: torch.Tensor  # (B, T) long
    read_slots: torch.Tensor | slice | None
    read_length: int

    # the parts of transformers' Cache interface its decoder layers use
    is_compileable = False
    is_sliding = False

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.store.keys[layer_idx], self.store.values[layer_idx]
        # (B, H, T, d) -> (B, T, H, d) written at [slot, :, position]
        keys[self.write_slots, :, self.write_positions] = key_states.transpose(1, 2).to(keys.dtype)
        values[self.write_slots, :, self.write_positions] = value_states.transpose(1, 2).to(values.dtype)
        if self.read_slots is None:
            rows = key_states.shape[0]
            return keys[:rows, :, : self.read_length], values[:rows, :, : self.read_length]
        if isinstance(self.read_slots, slice):
            return keys[self.read_slots, :, : self.read_length], values[
                self.read_slots, :, : self.read_length
            ]
        return (
            keys.index_select(0, self.read_slots)[:, :, : self.read_length],
            values.index_select(0, self.read_slots)[:, :, : self.read_length],
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given explicitly

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0
