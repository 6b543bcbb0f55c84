"""``promptswap serve-ray``'s own options, as one typed model: the CLI's ``--options`` are
generated from its fields (as ``serve``'s are from ``Settings``), and it turns itself into
the Serve deployment options. Importing it needs no Ray."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import BaseModel, Field

from service.settings import Settings


class RayOptions(BaseModel):
    replicas: int = Field(1, description="Replicas, each with its own models.")
    min_replicas: int = Field(1, description="Fewest replicas when autoscaling.")
    max_replicas: int | None = Field(
        None,
        description="Autoscale between --min-replicas and this many instead of running --replicas. "
        "Unset: no autoscaling.",
    )
    target_ongoing_requests: float | None = Field(
        None,
        description="Autoscaling target: requests in progress per replica. Unset: --max-batch-size "
        "(one full batch each).",
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join ('auto', 'HOST:6379', 'ray://HOST:10001'). Unset: "
        "$RAY_ADDRESS, else a new local Ray instance, stopped on exit.",
    )
    num_cpus_per_replica: float = Field(1.0, description="CPUs Ray reserves per replica.")
    num_gpus_per_replica: float = Field(
        0.0,
        description="GPUs Ray reserves per replica; 1 on a GPU cluster (each replica holds its own "
        "backbone).",
    )
    max_adapters_per_replica: int | None = Field(
        None,
        description="Adapter ids one replica advertises to Serve's router (LRU). Unset: "
        "--adapter-cache-bytes / --max-adapter-bytes, within 1..64.",
    )
    max_ongoing_requests: int | None = Field(
        None,
        description="Requests Serve lets one replica hold at once. Unset: 2 x --max-batch-size, "
        "at most --max-queue.",
    )

    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        """One ``--option`` per field (none is a Settings field)."""
        for name, field in cls.model_fields.items():
            text = str(field.annotation)
            kind = float if "float" in text else int if "int" in text else str
            shown = "" if field.default is None else f" Default: {field.default:g}."
            group.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                type=kind,
                default=field.default,
                help=f"{field.description}{shown}",
            )

    @classmethod
    def pop_from(cls, args: dict[str, Any]) -> RayOptions:
        """The options out of the parsed arguments; what is left are Settings fields."""
        return cls(**{name: args.pop(name) for name in cls.model_fields})

    def deployment_options(self, settings: Settings) -> dict[str, Any]:
        """``serve.deployment(...).options`` for these options (ValueError when inconsistent)."""
        if self.max_replicas is not None:
            if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
                raise ValueError("need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1")
            scaling = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or settings.max_batch_size,
            }
            options: dict[str, Any] = {"autoscaling_config": scaling}
        elif self.replicas < 1:
            raise ValueError("--replicas must be at least 1")
        else:
            options = {"num_replicas": self.replicas}
        options["ray_actor_options"] = {
            "num_cpus": self.num_cpus_per_replica,
            "num_gpus": self.num_gpus_per_replica,
        }
        if self.max_ongoing_requests is not None:
            options["max_ongoing_requests"] = self.max_ongoing_requests
        # The replicas log at --log-level too (Serve's own replica logger).
        options["logging_config"] = {"log_level": settings.log_level.upper()}
        return options
