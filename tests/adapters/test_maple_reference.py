"""prompted_clip against an independent MaPLe forward written after the reference code.

``reference_image_features`` / ``reference_text_features`` follow
muzairkhattak/multimodal-prompt-learning (clip/model.py ``VisionTransformer_MaPLe``,
``ResidualAttentionBlock_MaPLe``; trainers/maple.py ``TextEncoder``,
``MultiModalPromptLearner.forward``) step by step: sequence-first (LND) layout,
prefix/suffix concatenation, a counter over the deep prompts, CLIP's own causal
mask. They run one adapter at batch 1, read the learner's *parameters* (not
``prompts()`` or the folded form) and reuse only the HF layers' sub-modules.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from adapters.maple import MapleConfig, MaplePromptLearner, fold
from adapters.prompted_clip import encode_image, encode_text
from tests.adapters.conftest import random_pixels, random_text_ids

ATOL = 1e-5


def reference_learner_outputs(learner: MaplePromptLearner | None):
    """As MultiModalPromptLearner.forward: ctx, proj(ctx), deep text prompts, their projections."""
    if learner is None:
        return None
    visual_deep = [
        layer(p)
        for layer, p in zip(learner.compound_prompt_projections, learner.compound_prompts_text, strict=True)
    ]
    return learner.ctx, learner.proj(learner.ctx), list(learner.compound_prompts_text), visual_deep


def residual_block(layer, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """ResidualAttentionBlock on x (L, N, D); HF attention wants (N, L, D), so permute around it."""
    h = layer.layer_norm1(x).permute(1, 0, 2)  # (N, L, D)
    mask = None if attn_mask is None else attn_mask[None, None]  # (1, 1, L, L) additive
    attn, _ = layer.self_attn(h, attention_mask=mask)
    x = x + attn.permute(1, 0, 2)
    x = x + layer.mlp(layer.layer_norm2(x))
    return x


def reference_text_features(model: CLIPModel, tokenized: torch.Tensor, learner: MaplePromptLearner | None):
    """TextEncoder.forward for one prompt, tokenized (1, L)."""
    tm = model.text_model
    embedding = tm.embeddings.token_embedding(tokenized)  # (1, L, D)
    outs = reference_learner_outputs(learner)
    if outs is None:
        prompts, deeper, n_ctx = embedding, [], 0
    else:
        ctx, _, deeper, _ = outs
        n_ctx = ctx.shape[0]
        # construct_prompts: [token_prefix (SOS), ctx, token_suffix]
        prompts = torch.cat([embedding[:, :1], ctx.unsqueeze(0), embedding[:, 1 + n_ctx :]], dim=1)
    L = prompts.shape[1]
    x = prompts + tm.embeddings.position_embedding.weight[:L]
    x = x.permute(1, 0, 2)  # NLD -> LND
    attn_mask = torch.full((L, L), float("-inf")).triu_(1)  # CLIP.build_attention_mask
    counter = 0
    for i, layer in enumerate(tm.encoder.layers):
        if i > 0 and len(deeper) > 0 and not counter > len(deeper) - 1:
            prefix = x[:1, :, :]
            suffix = x[1 + n_ctx :, :, :]
            textual_context = deeper[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2)
            x = torch.cat([prefix, textual_context, suffix], dim=0)
            counter += 1
        x = residual_block(layer, x, attn_mask)
    x = x.permute(1, 0, 2)  # LND -> NLD
    x = tm.final_layer_norm(x)
    # the EOT token has the highest id in each sequence
    x = x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)]
    return model.text_projection(x)


def reference_image_features(model: CLIPModel, image: torch.Tensor, learner: MaplePromptLearner | None):
    """VisionTransformer_MaPLe.forward for one image (1, 3, H, W)."""
    vm = model.vision_model
    emb = vm.embeddings
    x = emb.patch_embedding(image)  # (1, width, grid, grid)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (1, grid**2, width)
    cls = emb.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1)  # (1, grid**2 + 1, width)
    x = x + emb.position_embedding.weight
    outs = reference_learner_outputs(learner)
    deeper, n_ctx = [], 0
    if outs is not None:
        ctx, shared_ctx, _, deeper = outs
        n_ctx = ctx.shape[0]
        x = torch.cat([x, shared_ctx.expand(x.shape[0], -1, -1)], dim=1)
    x = vm.pre_layrnorm(x)
    x = x.permute(1, 0, 2)  # NLD -> LND
    counter = 0
    for i, layer in enumerate(vm.encoder.layers):
        if i > 0 and len(deeper) > 0 and not counter > len(deeper) - 1:
            prefix = x[0 : x.shape[0] - n_ctx, :, :]
            visual_context = deeper[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2)
            x = torch.cat([prefix, visual_context], dim=0)
            counter += 1
        x = residual_block(layer, x, None)
    x = x.permute(1, 0, 2)  # LND -> NLD
    x = vm.post_layernorm(x[:, 0, :])
    return model.visual_projection(x)


def logits(model: CLIPModel, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    return model.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T


@pytest.mark.parametrize("depth", [1, 3, 4])
def test_prompted_clip_matches_reference(tiny_clip: CLIPModel, depth: int) -> None:
    torch.manual_seed(depth)
    learner = MaplePromptLearner(MapleConfig(n_ctx=2, depth=depth, text_width=64, vision_width=96))
    # Larger prompts than the 0.02 init so a mistake in where they enter cannot hide.
    with torch.no_grad():
        for p in [learner.ctx, *learner.compound_prompts_text]:
            p.normal_(std=1.0)
    folded = fold(learner)
    images = random_pixels(2, seed=1)
    ids = random_text_ids(3, 12, seed=2)

    with torch.no_grad():
        ref_img = torch.cat(
            [reference_image_features(tiny_clip, images[i : i + 1], learner) for i in range(2)]
        )
        ref_txt = torch.cat([reference_text_features(tiny_clip, ids[i : i + 1], learner) for i in range(3)])
        img = encode_image(tiny_clip, images, folded.vision.expand(2, -1, -1, -1))
        txt = encode_text(tiny_clip, ids, torch.ones_like(ids), folded.text.expand(3, -1, -1, -1))
        plain_img = encode_image(tiny_clip, images)

    torch.testing.assert_close(img, ref_img, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(
        logits(tiny_clip, img, txt), logits(tiny_clip, ref_img, ref_txt), atol=ATOL, rtol=0
    )
    assert (img - plain_img).abs().max() > 1e-2  # the prompts really act


def test_no_prompts_match_transformers(tiny_clip: CLIPModel) -> None:
    images = random_pixels(2, seed=3)
    ids = random_text_ids(3, 10, seed=4)
    with torch.no_grad():
        hf_img = tiny_clip.get_image_features(pixel_values=images).pooler_output
        hf_txt = tiny_clip.get_text_features(input_ids=ids).pooler_output
        ref_img = torch.cat([reference_image_features(tiny_clip, images[i : i + 1], None) for i in range(2)])
        ref_txt = torch.cat([reference_text_features(tiny_clip, ids[i : i + 1], None) for i in range(3)])
        img, txt = encode_image(tiny_clip, images), encode_text(tiny_clip, ids)
    torch.testing.assert_close(img, hf_img, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(txt, hf_txt, atol=ATOL, rtol=1e-5)
    # the independent forward itself agrees with transformers, so it is a fair referee
    torch.testing.assert_close(ref_img, hf_img, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ref_txt, hf_txt, atol=ATOL, rtol=1e-5)
