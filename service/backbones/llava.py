"""The frozen LLaVA backbone: loading, prompt preparation, prefill and batched decode.

Generation state lives outside the model as per-request key/value tensors, so requests
can join and leave a running batch between decode steps (iteration-level batching):
each decode step pads the active requests' caches to a common length on the left,
masks the padding, and gives every row its own position ids. With one request and no
adapter, prefill and decode are exactly what ``model.generate`` does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import DynamicCache, LlavaForConditionalGeneration

from adapters.prompted_llava import merge_image_tokens
from service.backbones.loading import BackboneLoadError, load_frozen

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, kv_heads, length, head_dim) each


@dataclass
class PreparedPrompt:
    """A chat prompt ready for the model (made in the decode threads)."""

    input_ids: torch.Tensor  # (1, L)
    pixel_values: torch.Tensor  # (1, 3, H, W)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


@dataclass
class LlavaBackbone:
    model_id: str
    model: LlavaForConditionalGeneration
    processor: object  # LlavaProcessor: tokenizer, image processor, chat template
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        self._processor_lock = threading.Lock()  # the Rust tokenizer is not re-entrant
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        ids.append(self.processor.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(i for i in ids if i is not None)

    @classmethod
    def load(cls, source: str, device: str = "auto", dtype: str = "auto") -> LlavaBackbone:
        model, processor, dev, torch_dtype = load_frozen(
            source, "llava", LlavaForConditionalGeneration, device, dtype
        )
        if getattr(processor, "chat_template", None) is None:
            raise BackboneLoadError(f"{source!r} has no chat template in its processor")
        return cls(source, model, processor, dev, torch_dtype)

    @property
    def context_length(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def prepare(self, image: Image.Image, conversation: list[dict]) -> PreparedPrompt:
        """Chat template + image processing; ``conversation`` holds exactly one image part."""
        with self._processor_lock:
            text = self.processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
            inputs = self.processor(images=image, text=text, return_tensors="pt")
        return PreparedPrompt(inputs["input_ids"], inputs["pixel_values"])

    def decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ model thread

    @torch.inference_mode()
    def prefill(self, prompt: PreparedPrompt, adapter: object = None) -> tuple[torch.Tensor, KV, int]:
        """Logits of the next token (V,), the cache, and the next position.

        Without an adapter this is exactly ``generate``'s prefill. With an M2PT adapter
        (``adapter.folded``, ``adapter.extras["prefix"]``) the image goes through its
        visual prompts and interaction layer, and the text starts after its KV prefix.
        """
        ids = prompt.input_ids.to(self.device)
        pixels = prompt.pixel_values.to(self.device, self.dtype)
        if adapter is None:
            out = self.model(
                input_ids=ids,
                pixel_values=pixels,
                attention_mask=torch.ones_like(ids),
                use_cache=True,
                logits_to_keep=1,
            )
            cache, start = out.past_key_values, 0
            hidden_logits = out.logits[0, -1]
        else:
            prefix: KV = adapter.extras["prefix"]  # type: ignore[attr-defined]
            start = prefix[0][0].shape[2]  # n_text: the input's positions begin after it
            embeds = merge_image_tokens(self.model, ids, pixels, [adapter.folded])  # type: ignore[attr-defined]
            cache = DynamicCache(ddp_cache_data=prefix)  # copied on update: the prefix stays intact
            length = ids.shape[1]
            out = self.model.model.language_model(
                inputs_embeds=embeds,
                attention_mask=torch.ones(1, start + length, dtype=torch.long, device=self.device),
                position_ids=torch.arange(start, start + length, device=self.device)[None],
                past_key_values=cache,
                use_cache=True,
            )
            hidden_logits = self.model.lm_head(out.last_hidden_state[0, -1])
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return hidden_logits.float(), kv, start + prompt.length

    @torch.inference_mode()
    def decode(
        self, tokens: list[int], caches: list[KV], positions: list[int]
    ) -> tuple[torch.Tensor, list[KV]]:
        """One decode step for B requests with caches of different lengths.

        Returns logits (B, V) and each request's cache grown by one token.
        """
        lengths = [kv[0][0].shape[2] for kv in caches]
        longest = max(lengths)
        batch = len(caches)
        padded = []
        for layer in range(len(caches[0])):
            k0, v0 = caches[0][layer]
            keys = k0.new_zeros(batch, k0.shape[1], longest, k0.shape[3])  # (B, Hkv, Lmax, d)
            values = v0.new_zeros(batch, v0.shape[1], longest, v0.shape[3])
            for row, kv in enumerate(caches):
                keys[row, :, longest - lengths[row] :] = kv[layer][0][0]
                values[row, :, longest - lengths[row] :] = kv[layer][1][0]
            padded.append((keys, values))
        mask = torch.zeros(batch, longest + 1, dtype=torch.long, device=self.device)
        for row, length in enumerate(lengths):
            mask[row, longest - length :] = 1  # left padding is masked out
        cache = DynamicCache(ddp_cache_data=padded)
        out = self.model.model.language_model(
            input_ids=torch.tensor(tokens, device=self.device)[:, None],  # (B, 1)
            attention_mask=mask,
            position_ids=torch.tensor(positions, device=self.device)[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        logits = self.model.lm_head(out.last_hidden_state[:, -1]).float()  # (B, V)
        grown: list[KV] = []
        for row, length in enumerate(lengths):
            start = longest - length
            grown.append(
                [
                    (
                        layer.keys[row : row + 1, :, start:].clone(),
                        layer.values[row : row + 1, :, start:].clone(),
                    )
                    for layer in cache.layers
                ]
            )
        return logits, grown
