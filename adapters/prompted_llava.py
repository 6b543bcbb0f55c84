"""LLaVA with M²PT prompts as per-row inputs (transformers 5 ``LlavaForConditionalGeneration``).

One implementation for serving, training and the tests. ``adapters.m2pt`` documents
the method and where the reference differs; here is where each prompt enters:

- vision (``image_embeds``): ``vision[:, 0]`` is prepended to the class + patch
  tokens after ``pre_layrnorm``; before vision layer ``i`` (1 <= i < vision_depth)
  the first n_v tokens are replaced by ``vision[:, i]``. The hidden state at
  ``vision_feature_layer`` loses its n_v prompt positions, then the backbone's
  select strategy and the adapter's interaction layer (a linear projector in place
  of the backbone's) apply. With no adapter this is ``get_image_features`` exactly.
- LLM (``explicit_forward``): ``text[0]`` is concatenated before the input
  embeddings (positions 0..n_t-1); before decoder layer ``i`` (1 <= i < text_depth)
  the first n_t hidden states are replaced by ``text[i]``; the logits of the
  prompt positions are dropped.
- LLM as a KV prefix (``prefix_kv`` / ``forward_with_prefix``): the prompt positions
  attend only to each other, so their keys/values depend on the adapter alone;
  computed once, they pre-fill the cache and the input starts at position n_t.

Position ids count attended tokens (``generate``'s rule), so a left-padded row gives
the same logits as the row alone. Llama-family language models (``layers``,
``rotary_emb``, ``norm``) are assumed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from transformers import DynamicCache, LlavaForConditionalGeneration
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import create_causal_mask

from adapters.m2pt import FoldedM2pt, feature_layers
from adapters.transformers_compat import CACHE_KW

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per LLM layer: (1, kv_heads, n_text, head_dim) each


# ---------------------------------------------------------------- vision side


def vision_features(
    model: LlavaForConditionalGeneration,
    pixel_values: torch.Tensor,  # (B, 3, H, W)
    vision_prompts: torch.Tensor | None = None,  # (B, depth, n_v, Dv)
) -> torch.Tensor:
    """Selected vision features before the projector: (B, image_tokens, Dv * n_feature_layers)."""
    config = model.config
    vt = model.model.vision_tower
    layers = vt.encoder.layers
    # hidden_states[k] is the input of layer k (k = len(layers): the last output); only run what is selected.
    wanted = [k % (len(layers) + 1) for k in feature_layers(config)]
    h = vt.pre_layrnorm(
        vt.embeddings(pixel_values.to(vt.embeddings.patch_embedding.weight.dtype))
    )  # (B, 1+P, Dv)
    n = 0
    if vision_prompts is not None:
        vision_prompts = vision_prompts.to(h.dtype)
        depth, n = vision_prompts.shape[1], vision_prompts.shape[2]
        h = torch.cat(
            [vision_prompts[:, 0], h], dim=1
        )  # (B, n_v + 1 + P, Dv): prompts first, as the reference
    hidden = [h]
    for i, layer in enumerate(layers[: max(wanted)]):
        if vision_prompts is not None and 1 <= i < depth:
            h = torch.cat([vision_prompts[:, i], h[:, n:]], dim=1)
        h = layer(h, None)
        hidden.append(h)
    drop = n + (
        1 if config.vision_feature_select_strategy == "default" else 0
    )  # prompts, then the class token
    return torch.cat([hidden[k][:, drop:] for k in wanted], dim=-1)


def image_embeds(
    model: LlavaForConditionalGeneration,
    pixel_values: torch.Tensor,  # (B, 3, H, W)
    adapters: list[FoldedM2pt | None],
) -> torch.Tensor:
    """Projected image tokens (B, image_tokens, D_llm), each row with its own adapter (or none).

    Rows whose prompts have one shape share one vision forward; each distinct
    adapter's interaction layer runs once on its rows.
    """
    if len(adapters) != pixel_values.shape[0]:
        raise ValueError(f"{pixel_values.shape[0]} images but {len(adapters)} adapters")
    by_shape: dict[tuple[int, int] | None, list[int]] = defaultdict(list)
    for row, a in enumerate(adapters):
        by_shape[None if a is None else (a.vision_depth, a.n_vision)].append(row)
    parts: list[tuple[list[int], torch.Tensor]] = []
    for shape, rows in by_shape.items():
        group = [a for r in rows if (a := adapters[r]) is not None]  # empty when shape is None
        prompts = None if shape is None else torch.stack([a.vision for a in group])  # (G, depth, n_v, Dv)
        feats = vision_features(model, pixel_values[rows], prompts)  # (G, T, Din)
        if shape is None:
            parts.append((rows, model.model.multi_modal_projector(feats)))
            continue
        by_adapter: dict[int, list[int]] = defaultdict(list)  # id(adapter) -> positions within this group
        for pos, r in enumerate(rows):
            by_adapter[id(adapters[r])].append(pos)
        for positions in by_adapter.values():
            a = group[positions[0]]
            parts.append(
                ([rows[p] for p in positions], a.project(feats[positions].to(a.projector_weight.dtype)))
            )
    first = parts[0][1]
    out = first.new_empty(len(adapters), *first.shape[1:])  # (B, T, D)
    order = torch.tensor([r for rows, _ in parts for r in rows], device=first.device)
    return out.index_copy(0, order, torch.cat([t.to(first.dtype) for _, t in parts]))


def merge_image_tokens(
    model: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,  # (B, L)
    pixel_values: torch.Tensor | None,  # (B, 3, H, W)
    adapters: list[FoldedM2pt | None],
) -> torch.Tensor:
    """Input embeddings (B, L, D) with each <image> placeholder replaced by its image token, as LLaVA does."""
    embeds = model.get_input_embeddings()(input_ids)
    if pixel_values is None:
        return embeds
    feats = image_embeds(model, pixel_values, adapters).to(embeds.dtype)  # (B, T, D)
    mask = model.model.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=feats)
    return embeds.masked_scatter(mask, feats)


# ---------------------------------------------------------------- language side


def prefix_length(folded: FoldedM2pt | None) -> int:
    return 0 if folded is None else folded.n_text


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) counting attended tokens; padding gets 1, as ``generate`` does."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def prefix_kv(model: LlavaForConditionalGeneration, folded: FoldedM2pt) -> KV:
    """Keys and values of the textual prompts at every LLM layer, at positions 0..n_t-1.

    The prompts alone go through the model's own decoder layers (RoPE, GQA as the
    model does them), with the per-layer replacement; the cache they fill is the prefix.
    Differentiable; serving calls it under ``torch.inference_mode``.
    """
    lm = model.model.language_model
    dtype = lm.embed_tokens.weight.dtype
    text = folded.text.to(lm.embed_tokens.weight.device, dtype)  # (depth, n_t, D)
    h = text[0][None]  # (1, n_t, D)
    pos = torch.arange(h.shape[1], device=h.device)[None]  # (1, n_t)
    cache = DynamicCache(config=lm.config)
    mask = create_causal_mask(
        config=lm.config, inputs_embeds=h, attention_mask=None, position_ids=pos, **{CACHE_KW: cache}
    )
    rope = lm.rotary_emb(h, position_ids=pos)
    for i, layer in enumerate(lm.layers[: lm.config.num_hidden_layers]):
        if 1 <= i < folded.text_depth:
            h = text[i][None]  # replaced, not carried (beyond text_depth the output is carried)
        h = layer(
            h,
            attention_mask=mask,
            position_embeddings=rope,
            position_ids=pos,
            use_cache=True,
            **{CACHE_KW: cache},
        )
    kv: KV = []
    for cached in cache.layers:  # a DynamicCache of a Llama config: DynamicLayers, filled above
        assert isinstance(cached, DynamicLayer) and cached.keys is not None and cached.values is not None
        kv.append((cached.keys, cached.values))
    return kv


def explicit_forward(
    model: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,  # (B, L)
    attention_mask: torch.Tensor,  # (B, L)
    pixel_values: torch.Tensor | None,  # (B, 3, H, W)
    folded: FoldedM2pt | None,
    *,
    inputs_embeds: torch.Tensor | None = None,  # (B, L, D) instead of merging ids and pixels here
) -> torch.Tensor:
    """Reference path: prompts inserted literally before the input and replaced per layer. Logits (B, L, V)."""
    batch = input_ids.shape[0]
    if inputs_embeds is None:
        inputs_embeds = merge_image_tokens(model, input_ids, pixel_values, [folded] * batch)  # (B, L, D)
    embeds = inputs_embeds
    lm = model.model.language_model
    n = prefix_length(folded)
    if folded is not None:
        text = folded.text.to(embeds.device, embeds.dtype)  # (depth, n_t, D)
        embeds = torch.cat([text[0].expand(batch, -1, -1), embeds], dim=1)  # (B, n_t + L, D)
    mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)  # (B, n_t + L)
    pos = positions_from_mask(mask)
    causal = create_causal_mask(
        config=lm.config, inputs_embeds=embeds, attention_mask=mask, position_ids=pos, **{CACHE_KW: None}
    )
    rope = lm.rotary_emb(embeds, position_ids=pos)
    h = embeds
    for i, layer in enumerate(lm.layers[: lm.config.num_hidden_layers]):
        if folded is not None and 1 <= i < folded.text_depth:
            h = torch.cat([text[i].expand(batch, -1, -1), h[:, n:]], dim=1)
        h = layer(h, attention_mask=causal, position_embeddings=rope, position_ids=pos)
    return model.lm_head(lm.norm(h[:, n:]))  # the prompt positions' logits are not the input's


def forward_with_prefix(
    model: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,  # (B, L)
    attention_mask: torch.Tensor,  # (B, L)
    pixel_values: torch.Tensor | None,  # (B, 3, H, W)
    folded: FoldedM2pt | None,
    *,
    prefix: KV | None = None,  # prefix_kv(model, folded), when the caller keeps it
) -> torch.Tensor:
    """Serving path: the input after a cache pre-filled with the adapter's prefix. Logits (B, L, V)."""
    batch = input_ids.shape[0]
    embeds = merge_image_tokens(model, input_ids, pixel_values, [folded] * batch)
    n = prefix_length(folded)
    cache = None
    if folded is not None:
        prefix = prefix_kv(model, folded) if prefix is None else prefix
        cache = DynamicCache(
            ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in prefix]
        )  # (B, kv_heads, n_t, head_dim) per layer
    mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)  # (B, n_t + L)
    hidden = decoder_forward(model, embeds, positions_from_mask(mask)[:, n:], mask, cache)
    return model.lm_head(hidden)


def decoder_forward(
    model: LlavaForConditionalGeneration,
    inputs_embeds: torch.Tensor,  # (B, T, D): merge_image_tokens' output, or token embeddings
    position_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor,  # (B, K) over cache + input, or a prepared (B, 1, T, K) boolean mask
    cache: object | None,  # a transformers Cache, or any object with its ``update`` (the service's slots)
    **attention_kwargs: Any,  # handed to every layer's attention function
) -> torch.Tensor:
    """The language model over input embeddings after a cache: final hidden states (B, T, D).

    The one prefill and decode path: ``forward_with_prefix`` and the service's engine both run it.
    """
    out = model.model.language_model(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=cache is not None,
        **{CACHE_KW: cache},
        **attention_kwargs,
    )
    return out.last_hidden_state
