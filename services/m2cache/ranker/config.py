"""Ranker service configuration: one frozen dataclass, built from flags/env in
the entry point only (``m2cache serve ranker``)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from m2cache import envflags
from m2cache.errors import InvalidArgument

ENV_PREFIX = "ranker"


@dataclass(frozen=True, slots=True)
class RankerConfig:
    root: Path                         # a directory of stores; model name = subdirectory name
    address: str = "127.0.0.1:50063"   # host:port (port 0 = any) or unix:///path
    device: str = "cpu"                # where predictors score and train ("cuda" when present)
    max_rows: int = 65536              # hidden-state rows per Rank call
    max_train_tokens: int = 1 << 20    # cap on TrainRequest.max_tokens
    max_workers: int = 8               # gRPC handler threads
    metrics_port: int = 0              # Prometheus /metrics port, 0 = off
    grace_s: float = 5.0               # graceful-shutdown grace on SIGTERM

    def __post_init__(self):
        if self.max_rows < 1 or self.max_train_tokens < 1 or self.max_workers < 1:
            raise InvalidArgument("max_rows, max_train_tokens and max_workers must be positive")
        if not Path(self.root).is_dir():
            raise InvalidArgument(f"store root {self.root} is not a directory")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RankerConfig":
        return envflags.config_from_args(cls, args, ENV_PREFIX)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, default from ``M2CACHE_RANKER_<FIELD>`` or the dataclass."""
    envflags.add_config_arguments(parser, RankerConfig, ENV_PREFIX)
