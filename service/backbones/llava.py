"""The frozen LLaVA backbone: loading, prompt preparation, and the forward the chat
engine drives (input embeddings after a cache it owns; see ``service.chat.kv_slots``).

Prefill and decode are one path (``adapters.prompted_llava.decoder_forward``): the
engine hands each row's positions and a mask over its own cached tokens, so a row's
logits are what ``model.generate`` computes for it alone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from adapters.prompted_llava import decoder_forward, merge_image_tokens
from service.backbones.loading import BackboneLoadError, load_frozen


@dataclass
class PreparedPrompt:
    """A chat prompt ready for the model (made in the decode threads)."""

    input_ids: torch.Tensor  # (1, L)
    pixel_values: torch.Tensor | None  # (1, 3, H, W); None for a text-only prompt

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


@dataclass
class LlavaBackbone:
    model_id: str
    model: LlavaForConditionalGeneration
    processor: Any  # LlavaProcessor: tokenizer, image processor, chat template
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
        return cls(source, model, processor, dev, torch_dtype)  # type: ignore[arg-type]

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)  # type: ignore[union-attr]

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def prepare(self, image: Image.Image | None, conversation: list[dict]) -> PreparedPrompt:
        """Chat template + image processing; ``conversation`` holds one image part, or none
        (then ``image`` is None: the language model answers alone)."""
        with self._processor_lock:
            text = self.processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
            inputs = self.processor(images=image, text=text, return_tensors="pt")
        return PreparedPrompt(inputs["input_ids"], inputs.get("pixel_values"))

    def decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ model thread

    @torch.inference_mode()
    def prompt_embeds(self, prompt: PreparedPrompt, adapter: object = None) -> torch.Tensor:
        """The prompt's input embeddings (L, D), the image merged in (through an M2PT adapter's
        visual prompts and interaction layer when one is given)."""
        ids = prompt.input_ids.to(self.device)
        pixels = None if prompt.pixel_values is None else prompt.pixel_values.to(self.device, self.dtype)
        folded = None if adapter is None else adapter.folded  # type: ignore[attr-defined]
        return merge_image_tokens(self.model, ids, pixels, [folded])[0]

    @torch.inference_mode()
    def token_embeds(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D)."""
        return self.model.get_input_embeddings()(tokens.to(self.device))

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,  # (B, T, D)
        positions: torch.Tensor,  # (B, T)
        mask: torch.Tensor,  # (B, 1, T, K) boolean: which cached keys each input token sees
        cache: object,  # where keys/values are written and read (the engine's slots)
        last: torch.Tensor,  # (B,) the input index whose next-token logits each row wants
        prefix_reads: object = None,  # the adapter prefixes rows attend over (service.chat.prefix_attention)
    ) -> torch.Tensor:
        """Next-token logits (B, V), float32."""
        extra = {} if prefix_reads is None else {"prefix_reads": prefix_reads}
        hidden = decoder_forward(
            self.model, embeds, positions.to(self.device), mask.to(self.device), cache, **extra
        )
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.model.lm_head(hidden[rows, last.to(self.device)]).float()
