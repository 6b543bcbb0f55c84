"""Attention over an M2PT adapter's KV prefix held once, plus each row's own slot.

An adapter's textual prompts give the same keys and values at positions ``0..P-1`` for
every request (``adapters.prompted_llava.prefix_kv``), so the registry keeps them once on
the device, counted in the adapter's bytes, and no request copies them into its slot: a
slot holds the row's own tokens only. Softmax attention over ``prefix + own`` splits
exactly into two parts merged by their log-sum-exp (as flash-decoding merges its splits):

    out = (Z_own * out_own + Z_prefix * out_prefix) / (Z_own + Z_prefix)

``out_own`` is SDPA's output over the slot view, unchanged; ``Z_own`` comes from one
extra ``q @ K^T`` over the same view (no copy of the cache); the prefix part is small
(``P`` keys) and computed in float32 per adapter. Rows without a prefix keep SDPA's
output bit for bit, so a plain row never depends on its neighbours having adapters.

Installed as a named attention implementation of transformers (``AttentionInterface``)
on the engine's language model; without ``prefix_reads`` in the forward's kwargs it is
plain SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "promptswap_prefix_sdpa"

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, kv_heads, P, head_dim)


@dataclass
class PrefixGroup:
    rows: torch.Tensor  # (n,) long on the device: the batch rows that read this prefix
    prefix: KV


@dataclass
class PrefixReads:
    """The prefixes one forward's rows read; passed to the model as ``prefix_reads``."""

    groups: list[PrefixGroup]

    @classmethod
    def of(cls, adapters: list[Any], device: torch.device) -> PrefixReads | None:
        """``adapters[i]`` is row i's loaded M2PT adapter (or None); None when no row has one."""
        by_adapter: dict[int, tuple[Any, list[int]]] = {}
        for row, adapter in enumerate(adapters):
            if adapter is not None:
                by_adapter.setdefault(id(adapter), (adapter, []))[1].append(row)
        if not by_adapter:
            return None
        return cls(
            [
                PrefixGroup(torch.tensor(rows, device=device), adapter.extras["prefix"])
                for adapter, rows in by_adapter.values()
            ]
        )


def _scores(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 ``scale * q @ k^T`` with grouped heads: q (B, H, T, d), k (B, Hkv, K, d) -> (B, H, T, K).

    The query's heads of one key head are folded into its rows, so ``key`` is read as the
    strided view it is (no repeat of the keys, no copy of the cache).
    """
    b, heads, t, d = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(b * kv_heads, (heads // kv_heads) * t, d)
    k = key.reshape(b * kv_heads, key.shape[2], d).transpose(1, 2)
    if query.dtype == torch.float32:
        s = torch.bmm(q, k)
    elif query.is_cuda:
        s = torch.bmm(q, k, out_dtype=torch.float32)  # half inputs, float32 accumulation kept
    else:
        s = torch.bmm(q.float(), k.float())
    return (s * scale).view(b, heads, t, key.shape[2])


def _own_lse(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float, rows: torch.Tensor
) -> torch.Tensor:
    """Log-sum-exp (n, H, T) of the listed rows' scores over their own cached tokens."""
    if query.shape[2] == 1:  # decode: every row at once over the view, then the rows wanted
        s = _scores(query, key, scale)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.logsumexp(s, dim=-1).index_select(0, rows)
    out = []  # prefill: one row at a time bounds the (H, T, K) scores
    for row in rows.tolist():
        s = _scores(query[row : row + 1], key[row : row + 1], scale)
        if mask is not None:
            s = s.masked_fill(~mask[row : row + 1], float("-inf"))
        out.append(torch.logsumexp(s, dim=-1))
    return torch.cat(out)


def _prefix_part(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (n, H, T, d) over one prefix (1, Hkv, P, d), float32: (out (n, H, T, d), lse (n, H, T))."""
    n, heads, t, d = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    # (n, Hkv, g, T, d) -> (Hkv, n*g*T, d): the rows share the prefix, so they stack as queries
    q = query.float().reshape(n, kv_heads, group * t, d).transpose(0, 1).reshape(kv_heads, -1, d)
    s = torch.bmm(q, keys[0].float().transpose(1, 2)) * scale  # (Hkv, n*g*T, P)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.bmm(torch.softmax(s, dim=-1), values[0].float())  # (Hkv, n*g*T, d)

    def back(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(kv_heads, n, group * t, -1).transpose(0, 1).reshape(n, heads, t, -1)

    return back(out), back(lse[..., None])[..., 0]


def prefix_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, T, d)
    key: torch.Tensor,  # (B, Hkv, K, d): each row's own tokens (the slot view)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # (B, 1, T, K) boolean over the own tokens
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    prefix_reads: PrefixReads | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
    )  # (B, T, H, d)
    if prefix_reads is None:
        return out, None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    for group in prefix_reads.groups:
        keys, values = group.prefix[layer]
        q = query.index_select(0, group.rows)
        out_prefix, lse_prefix = _prefix_part(q, keys, values, scale)
        lse_own = _own_lse(query, key, attention_mask, scale, group.rows)
        top = torch.maximum(lse_own, lse_prefix)
        w_own, w_prefix = torch.exp(lse_own - top), torch.exp(lse_prefix - top)  # (n, H, T)
        own = out.index_select(0, group.rows).transpose(1, 2).float()  # (n, H, T, d)
        merged = (own * w_own[..., None] + out_prefix * w_prefix[..., None]) / (w_own + w_prefix)[..., None]
        out[group.rows] = merged.transpose(1, 2).to(out.dtype)
    return out, None


def install(text_config: Any) -> None:
    """Make the language model of ``text_config`` attend through ``prefix_sdpa_attention``
    (its decoder layers read the implementation from this config at every forward)."""
    AttentionInterface.register(NAME, prefix_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks it builds itself are SDPA's
    text_config._attn_implementation = NAME
