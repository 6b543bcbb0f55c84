"""Every setting and bound of the service, in one place.

Each field is a CLI option (``--max-batch-size``) and an environment variable
(``PROMPTSWAP_MAX_BATCH_SIZE``); the CLI wins over the environment, which wins over
the default. The field descriptions are the ``--help`` text.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "PROMPTSWAP_"
DEFAULT_CLIP = "openai/clip-vit-base-patch16"
# PROMPTSWAP_* names that are not settings: compose's published ports (read by
# docker-compose.yml on the host), the tests' switch for cluster tools, and the test suite's
# own PROMPTSWAP_TEST_* variables (artifact folder, device).
NOT_SETTINGS = frozenset(
    {"PROMPTSWAP_HTTP_PORT", "PROMPTSWAP_PROMETHEUS_PORT", "PROMPTSWAP_REQUIRE_CLUSTER_TOOLS"}
)
TEST_PREFIX = "PROMPTSWAP_TEST_"


def default_adapter_dir() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "promptswap" / "adapters"


def default_torch_threads(cores: int) -> int:
    """All cores but one from 8 cores on, else every core.

    torch's OpenMP team spins while it waits, so a team member preempted by the decode
    threads or the event loop stalls the batch: leaving a core to them pays when the model
    is cheap. When the model is the cost it takes 1/cores of the compute away: little
    from 8 cores, half of it on 2 (bench/RESULTS.md, host cost: on 2 cores one thread gave
    the tiny CLIP 1.27x, and the B/32 encoder 0.63x in float32 and 0.54x in bfloat16).
    """
    return cores - 1 if cores >= 8 else cores


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    # Backbone
    clip_model: str | None = Field(
        None,
        description="CLIP checkpoint for /v1/classify: a model-hub id or a local directory ('' turns "
        "CLIP off).",
        json_schema_extra={"shown_default": f"{DEFAULT_CLIP}, unless --llava-model is given (then no CLIP)"},
    )
    llava_model: str | None = Field(
        None,
        description="LLaVA checkpoint for /v1/chat: a hub id (e.g. llava-hf/llava-1.5-7b-hf) or a "
        "local directory; unset runs without chat.",
        json_schema_extra={"shown_default": "unset (no chat)"},
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
    max_queue: int = Field(
        256,
        ge=1,
        description="Requests queued for the model plus those still arriving (reading their body, "
        "decoding); past it: 429 before the body is read.",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of a request from admission; past it: 504."
    )
    torch_threads: int | None = Field(
        default_torch_threads(os.cpu_count() or 1),
        ge=1,
        le=256,
        description="torch intra-op threads for the model; from 8 cores the default leaves one core "
        "to image decoding and HTTP.",
        json_schema_extra={"shown_default": "cores - 1 from 8 cores, else cores"},
    )
    decode_threads: int = Field(
        min(4, os.cpu_count() or 1),
        ge=1,
        le=64,
        description="Threads decoding images.",
        json_schema_extra={"shown_default": "min(4, cores)"},
    )
    jpeg_draft: bool = Field(
        False,
        description="Decode JPEGs at libjpeg's smallest DCT scale (1/2, 1/4, 1/8) that keeps the "
        "model's input size: faster for large photos, but changes pixels and so logits slightly "
        "(README: reduced-size JPEG decode). Off: logits equal transformers'.",
    )
    device_preprocess: bool = Field(
        False,
        description="Resize, crop and normalise images on the model's device (8-bit images handed over "
        "in pinned memory on CUDA): less host CPU per image, but torch's resize is not Pillow's, so "
        "logits change slightly (README: host cost). Off: logits equal transformers'.",
    )

    chat_max_batch_size: int = Field(
        16, ge=1, le=1024, description="Chat requests decoded together (joining between steps)."
    )
    chat_max_queue: int = Field(
        64,
        ge=1,
        description="Chat requests waiting to start plus those still arriving; past it: 429 before "
        "the body is read.",
    )
    kv_cache_bytes: int | None = Field(
        None,
        ge=1,
        description="Chat KV cache, preallocated at start.",
        json_schema_extra={"shown_default": "half the free GPU memory; 1 GiB on CPU"},
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
    adapter_dir: Path = Field(
        default_factory=default_adapter_dir,
        description="Adapter store directory.",
        json_schema_extra={"shown_default": "$XDG_DATA_HOME/promptswap/adapters"},
    )
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
        json_schema_extra={"shown_default": "hostname-pid"},
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

    # Where adapters live past one machine (appended: keep new fields at the end)
    adapter_store: str | None = Field(
        None,
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
        description="s3://BUCKET/PREFIX: keep adapters in an S3-compatible bucket instead of "
        "--adapter-dir; endpoint and credentials from the AWS chain (AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_PROFILE, roles). Unset: the "
        "directory store.",
    )
    store_refresh_s: float = Field(
        2.0,
        ge=0,
        le=3600,
        description="Bucket store: how long a listing is reused, so a version uploaded or deleted "
        "through another replica is seen here within this many seconds (this replica's own at once).",
    )
    store_timeout_s: float = Field(
        5.0, gt=0, le=300, description="Bucket store: connect and read timeout of each S3 request."
    )
    store_attempts: int = Field(
        3, ge=1, le=10, description="Bucket store: tries per S3 request (with backoff) before a 503."
    )
    store_cache_bytes: int = Field(
        256 * 2**20, ge=0, description="Bucket store: downloaded adapter bytes kept in memory (LRU)."
    )

    @field_validator("adapter_store", mode="before")
    @classmethod
    def _empty_store_is_unset(cls, value: object) -> object:
        return None if value == "" else value

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

    # First run and model names (appended: keep new fields at the end)
    clip_served_model_name: str | None = Field(
        None,
        max_length=256,
        description="The CLIP backbone's name in answers' 'model', in /v1/models and in requests.",
        json_schema_extra={"shown_default": "the hub id, or a local directory's name"},
    )
    llava_served_model_name: str | None = Field(
        None,
        max_length=256,
        description="The LLaVA backbone's name in answers' 'model', in /v1/models and as the "
        "OpenAI 'model' field.",
        json_schema_extra={"shown_default": "the hub id, or a local directory's name"},
    )
    wait_for_models: bool = Field(
        False,
        description="Load the models before listening (the port opens only when they are ready); "
        "otherwise listen at once and answer /readyz 503 while they load.",
    )

    # Past one process (appended: keep new fields at the end)
    frontends: int = Field(
        0,
        ge=0,
        le=64,
        description="Front-end processes that read, parse and decode classify requests in front of "
        "the model's process (which then listens on a private Unix socket only); other routes pass "
        "through them. 0: one process does everything (README: front-end processes).",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_environment(cls, data: Any) -> Any:
        unknown = unknown_environment(os.environ)
        if unknown:
            raise ValueError(unknown[0])
        return data

    @model_validator(mode="after")
    def _default_backbone(self) -> Settings:
        # The default CLIP only when nothing is named: --llava-model X alone serves chat only.
        if self.clip_model is None and not self.llava_model:
            self.clip_model = DEFAULT_CLIP
        if self.clip_model is None:
            for name in ("jpeg_draft", "device_preprocess"):
                if getattr(self, name):
                    flag = "--" + name.replace("_", "-")
                    raise ValueError(
                        f"{flag} changes how CLIP reads images (classify, embeddings), and this server "
                        "loads no CLIP model: drop it or add --clip-model"
                    )
        if self.frontends and not self.clip_model:
            raise ValueError(
                "--frontends takes classify's image work off the model's process, and this server "
                "loads no CLIP model: drop it or add --clip-model"
            )
        if self.frontends and self.device_preprocess:
            raise ValueError(
                "--frontends with --device-preprocess would send each whole decoded image between "
                "processes; use one of them"
            )
        return self

    def describe(self, masked: bool = True) -> list[str]:
        """``name = value`` for every setting, secrets as set/unset (the start-up log)."""
        lines = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                shown = "set (hidden)" if masked else value.get_secret_value()
            elif value is None:
                shown = "unset"
            else:
                shown = str(value)
            lines.append(f"{name} = {shown}")
        return lines


def closest_setting(name: str) -> str | None:
    known = [ENV_PREFIX + field.upper() for field in Settings.model_fields]
    close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """A message per PROMPTSWAP_* variable that names no setting."""
    known = {ENV_PREFIX + field.upper() for field in Settings.model_fields}
    messages = []
    for name in sorted(environ):
        if (
            name.upper().startswith(ENV_PREFIX)
            and name.upper() not in known | NOT_SETTINGS
            and not name.upper().startswith(TEST_PREFIX)
        ):
            close = closest_setting(name)
            hint = f"did you mean {close}?" if close else "see promptswap serve --help"
            messages.append(f"unknown setting {name} in the environment; {hint}")
    return messages


class SettingsError(ValueError):
    """Settings that cannot start the service; the message names each culprit."""


def load_settings(overrides: Mapping[str, Any]) -> Settings:
    """Settings from CLI ``overrides`` over the environment; SettingsError says what is wrong
    as the user typed it (``--max-batch-size`` or ``PROMPTSWAP_MAX_BATCH_SIZE``)."""
    unknown = unknown_environment(os.environ)
    if unknown:
        raise SettingsError("\n".join(unknown))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError("\n".join(_explain(e, overrides) for e in exc.errors())) from None


def _explain(error: Mapping[str, Any], overrides: Mapping[str, Any]) -> str:
    loc = error.get("loc") or ()
    field = str(loc[0]) if loc else ""
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if field not in Settings.model_fields:
        return message
    env = ENV_PREFIX + field.upper()
    if field in overrides:
        source = f"--{field.replace('_', '-')} {overrides[field]!r}"
    elif env in os.environ:
        source = f"{env}={os.environ[env]!r}"
    else:
        source = f"--{field.replace('_', '-')}"
    if Settings.model_fields[field].annotation is SecretStr or "token" in field:
        source = source.split("=")[0].split(" ")[0]  # never echo a secret
    return f"{source}: {message}"
