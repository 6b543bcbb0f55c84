"""Every setting and bound of the service, in one place.

Each field is a CLI option (``--max-batch-size``) and an environment variable
(``PROMPTSWAP_MAX_BATCH_SIZE``); the CLI wins over the environment, which wins over
the default. The field descriptions are the ``--help`` text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_adapter_dir() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "promptswap" / "adapters"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROMPTSWAP_", extra="ignore")

    # Backbone
    clip_model: str | None = Field(
        "openai/clip-vit-base-patch16",
        description="CLIP checkpoint: a model-hub id or a local directory ('' to run without CLIP).",
    )
    llava_model: str | None = Field(
        None,
        description="LLaVA checkpoint for /v1/chat: a hub id (e.g. llava-hf/llava-1.5-7b-hf) or a "
        "local directory; unset runs without chat.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the backbone runs.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Backbone weights' dtype; auto is float16 on CUDA, float32 on CPU."
    )

    # Server
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    # Scheduler
    max_batch_size: int = Field(32, ge=1, le=4096, description="Rows per model batch.")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="How long a batch waits to fill.")
    max_queue: int = Field(256, ge=1, description="Requests waiting for the model; past it: 429.")
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of a request from admission; past it: 504."
    )
    # All cores but one: torch's OpenMP team spins while it waits, and a team member preempted
    # by the decode threads or the event loop stalls the batch (bench/RESULTS.md, host cost).
    torch_threads: int | None = Field(
        max(1, (os.cpu_count() or 1) - 1),
        ge=1,
        le=256,
        description="torch intra-op threads for the model (default: cores - 1, leaving one to "
        "image decoding and HTTP).",
    )
    decode_threads: int = Field(
        min(4, os.cpu_count() or 1), ge=1, le=64, description="Threads decoding images."
    )
    jpeg_draft: bool = Field(
        False,
        description="Decode JPEGs at libjpeg's smallest DCT scale (1/2, 1/4, 1/8) that keeps the "
        "model's input size: faster for large photos, but changes pixels and so logits slightly "
        "(README: reduced-size JPEG decode). Off: logits equal transformers'.",
    )

    chat_max_batch_size: int = Field(
        16, ge=1, le=1024, description="Chat requests decoded together (joining between steps)."
    )
    chat_max_queue: int = Field(64, ge=1, description="Chat requests waiting to start; past it: 429.")
    kv_cache_bytes: int | None = Field(
        None,
        ge=1,
        description="Chat KV cache, preallocated (default: half the free memory on CUDA, 1 GiB on CPU).",
    )
    max_prefill_tokens: int = Field(
        512, ge=1, le=1_000_000, description="Prompt tokens read per chat step (longer prompts span steps)."
    )
    chat_timeout_s: float = Field(
        300.0, gt=0, description="Deadline of a chat request from admission; past it: 504."
    )

    # Request bounds
    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="Largest request body (413).")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest decoded image, width x height (413)."
    )
    max_labels: int = Field(1000, ge=1, description="Most labels per classify request (422).")
    max_label_chars: int = Field(200, ge=1, description="Longest label in characters (422).")
    max_new_tokens: int = Field(512, ge=1, description="Largest max_tokens a chat request may ask for (422).")
    max_prompt_chars: int = Field(
        32_000, ge=1, description="Largest chat text (all messages) in characters (422)."
    )
    max_template_chars: int = Field(300, ge=3, description="Longest prompt template (422).")
    max_images: int = Field(
        32, ge=1, description="Most images in one /v1/classify request's images (422); each is a queue row."
    )

    # Caches
    text_cache_entries: int = Field(
        100_000, ge=0, description="Text embeddings kept (LRU) keyed by model, adapter, template, label."
    )

    # Adapters
    adapter_dir: Path = Field(default_factory=default_adapter_dir, description="Adapter store directory.")
    adapter_cache_bytes: int = Field(
        256 * 2**20, ge=0, description="Device memory for loaded adapters (LRU beyond it)."
    )
    max_adapter_bytes: int = Field(64 * 2**20, ge=1024, description="Largest adapter file (413).")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for /v1/admin; admin routes are off without one."
    )

    # Public-route API keys (appended: keep new fields at the end)
    api_keys_file: Path | None = Field(
        None,
        description="File of API keys for the public routes, one per line ('#' starts a comment "
        "line), read once at start-up; sent as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'. "
        "A key may carry scopes after it: use=GLOBS upload=GLOBS alias=GLOBS delete=GLOBS "
        "admin=GLOBS (adapter-name globs, comma-separated); without scopes it uses every adapter "
        "and administers none. /healthz, /readyz and /metrics stay open. Off when unset.",
    )

    replica_id: str | None = Field(
        None,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="This replica's name, sent as the X-Promptswap-Replica response header (which "
        "replica answered, behind a load balancer). Unset: hostname-pid.",
    )

    # Chat request bounds
    default_max_tokens: int = Field(
        256, ge=1, description="max_tokens of a chat request that names none (capped by max_new_tokens)."
    )
    max_stops: int = Field(4, ge=0, le=64, description="Most stop strings per chat request (422).")
    max_stop_chars: int = Field(64, ge=1, le=4096, description="Longest stop string in characters (422).")

    # Retry-After: what a refused client is told to wait, in seconds
    retry_after_busy_s: int = Field(1, ge=1, description="Retry-After of a classify 429 (queue full).")
    chat_retry_after_busy_s: int = Field(
        2, ge=1, description="Retry-After of a chat 429 (queue full; chat requests last longer)."
    )
    retry_after_unavailable_s: int = Field(
        5, ge=1, description="Retry-After of a 503 while models load or the service shuts down."
    )
    retry_after_adapter_memory_s: int = Field(
        2,
        ge=1,
        description="Retry-After of a 503 when the device has no memory left for an adapter and "
        "every loaded one is in use.",
    )
    retry_after_not_served_s: int = Field(
        3600,
        ge=1,
        description="Retry-After of a 503 for a capability this replica does not run (no CLIP or "
        "no LLaVA backbone): other replicas may.",
    )

    # Embeddings
    max_embedding_inputs: int = Field(
        256, ge=1, description="Most strings in one /v1/embeddings input (422); each is a queue row."
    )
    max_embedding_text_chars: int = Field(
        4000, ge=1, description="Longest /v1/embeddings text in characters (422), before tokenizing."
    )

    ui: Literal["on", "off"] = Field(
        "on",
        description="The playground page at / (classify, chat, adapters in a browser); 'off' removes it.",
    )

    metrics_adapter_labels: int = Field(
        50,
        ge=0,
        le=10_000,
        description="Adapters with their own per-adapter metric series: the ones with the most "
        'requests; the rest are counted under adapter="other".',
    )

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # PROMPTSWAP_API_KEYS_FILE= means off, not "."

    @field_validator("admin_token", mode="before")
    @classmethod
    def _blank_token_is_unset(cls, value: object) -> object:
        # PROMPTSWAP_ADMIN_TOKEN= (e.g. compose's ${VAR} of an unset variable) turns the admin
        # API off; as an empty token, "Authorization: Bearer " alone would pass.
        if isinstance(value, str) and not value.strip():
            return None
        return value
