"""Gateway configuration: one frozen dataclass, built from flags/env in the entry point."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from m2cache import envflags
from m2cache.errors import InvalidArgument

ENV_PREFIX = "gateway"


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    workers: str = "127.0.0.1:50070"  # comma-separated worker targets, or one dns:///name:port
    model: str = ""                   # the model name the workers serve (reported by /v1/models)
    address: str = "127.0.0.1:8000"   # HTTP listen host:port (port 0 = any)
    timeout_s: float = 300.0          # deadline of one completion
    default_max_tokens: int = 16      # OpenAI's default for /v1/completions

    def __post_init__(self) -> None:
        if not self.worker_targets():
            raise InvalidArgument("gateway needs --workers")
        if not self.model:
            raise InvalidArgument("gateway needs --model")

    def worker_targets(self) -> list[str]:
        return [t.strip() for t in self.workers.split(",") if t.strip()]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "GatewayConfig":
        return envflags.config_from_args(cls, args, ENV_PREFIX)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    envflags.add_config_arguments(parser, GatewayConfig, ENV_PREFIX)
