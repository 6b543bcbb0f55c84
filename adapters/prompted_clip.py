"""CLIP's two encoders with MaPLe prompts as per-row inputs.

One implementation for serving and training. With ``prompts=None`` each function
computes exactly what transformers' ``CLIPModel.get_image_features`` /
``get_text_features`` compute (the tests hold it to that). With prompts, every row
carries its own per-layer prompt tensors, so rows of different adapters share one
forward pass; rows of one call must agree on ``(depth, n_ctx)``.

Where the prompts enter (MaPLe, Khattak et al. 2023, reference ``clip/model.py``):
- text: the ``n_ctx`` token embeddings after the start token are replaced by
  ``text[:, 0]`` before the position embedding is added; before text layer ``i``
  (1 <= i < depth) the hidden states at those positions are replaced by ``text[:, i]``.
- vision: ``vision[:, 0]`` is appended after the position-embedded patch tokens,
  before the pre-LayerNorm; before vision layer ``i`` (1 <= i < depth) the last
  ``n_ctx`` tokens are replaced by ``vision[:, i]``.
"""

from __future__ import annotations

import torch
from transformers import CLIPModel
from transformers.masking_utils import create_causal_mask

from adapters.transformers_compat import CACHE_KW


def encode_image(
    model: CLIPModel,
    pixel_values: torch.Tensor,  # (B, 3, H, W)
    vision_prompts: torch.Tensor | None = None,  # (B, depth, n_ctx, Dv)
) -> torch.Tensor:
    """Projected image embeddings (B, P), not normalised."""
    vm = model.vision_model
    h = vm.embeddings(pixel_values)  # (B, 1 + patches, Dv), position-embedded
    if vision_prompts is not None:
        vision_prompts = vision_prompts.to(h.dtype)
        depth, n_ctx = vision_prompts.shape[1], vision_prompts.shape[2]
        h = torch.cat([h, vision_prompts[:, 0]], dim=1)  # (B, 1 + patches + n_ctx, Dv)
    h = vm.pre_layrnorm(h)
    for i, layer in enumerate(vm.encoder.layers):
        if vision_prompts is not None and 1 <= i < depth:
            h = torch.cat([h[:, :-n_ctx], vision_prompts[:, i]], dim=1)
        h = layer(h, None)
    pooled = vm.post_layernorm(h[:, 0])  # (B, Dv): the class token
    return model.visual_projection(pooled)


def eos_positions(model: CLIPModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Index of the pooled token per row, by transformers' own rule for this config."""
    eos_id = model.text_model.eos_token_id
    if eos_id == 2:  # legacy configs: the end token has the highest id
        return input_ids.to(torch.int).argmax(dim=-1)
    return (input_ids == eos_id).int().argmax(dim=-1)


def encode_text(
    model: CLIPModel,
    input_ids: torch.Tensor,  # (N, L)
    attention_mask: torch.Tensor | None = None,  # (N, L)
    text_prompts: torch.Tensor | None = None,  # (N, depth, n_ctx, Dt)
) -> torch.Tensor:
    """Projected text embeddings (N, P), not normalised."""
    tm = model.text_model
    emb = tm.embeddings
    h = emb.token_embedding(input_ids)  # (N, L, Dt)
    if text_prompts is not None:
        text_prompts = text_prompts.to(h.dtype)
        depth, n_ctx = text_prompts.shape[1], text_prompts.shape[2]
        h = torch.cat([h[:, :1], text_prompts[:, 0], h[:, 1 + n_ctx :]], dim=1)
    h = h + emb.position_embedding(emb.position_ids[:, : h.shape[1]])
    mask = create_causal_mask(
        config=tm.config, inputs_embeds=h, attention_mask=attention_mask, **{CACHE_KW: None}
    )
    for i, layer in enumerate(tm.encoder.layers):
        if text_prompts is not None and 1 <= i < depth:
            h = torch.cat([h[:, :1], text_prompts[:, i], h[:, 1 + n_ctx :]], dim=1)
        h = layer(h, mask, is_causal=True)
    h = tm.final_layer_norm(h)
    rows = torch.arange(h.shape[0], device=h.device)
    pooled = h[rows, eos_positions(model, input_ids).to(h.device)]  # (N, Dt)
    return model.text_projection(pooled)
