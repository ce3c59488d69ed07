"""NeuronStore service configuration: one frozen dataclass, built from
flags/env in the entry point only (``m2cache serve store``)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from m2cache import envflags
from m2cache.errors import InvalidArgument

ENV_PREFIX = "store"


@dataclass(frozen=True, slots=True)
class StoreConfig:
    root: Path                      # a directory of stores; model name = subdirectory name
    address: str = "127.0.0.1:50061"  # host:port (port 0 = any) or unix:///path
    max_batch_ids: int = 65536      # ids per FetchNeurons; more is RESOURCE_EXHAUSTED
    max_payload_bytes: int = 256 << 20  # bytes per response (gRPC messages are capped at 512 MiB)
    verify: bool = True             # check every record against its crc32 on read
    max_workers: int = 8            # gRPC handler threads
    metrics_port: int = 0           # Prometheus /metrics port, 0 = off
    grace_s: float = 5.0            # graceful-shutdown grace on SIGTERM

    def __post_init__(self):
        if self.max_batch_ids < 1 or self.max_payload_bytes < 1 or self.max_workers < 1:
            raise InvalidArgument("max_batch_ids, max_payload_bytes and max_workers must be positive")
        if not Path(self.root).is_dir():
            raise InvalidArgument(f"store root {self.root} is not a directory")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "StoreConfig":
        if not args.root:
            raise InvalidArgument("--root (or M2CACHE_STORE_ROOT) is required")
        return cls(root=Path(args.root), address=args.address, max_batch_ids=args.max_batch_ids,
                   max_payload_bytes=args.max_payload_bytes, verify=args.verify, max_workers=args.max_workers,
                   metrics_port=args.metrics_port, grace_s=args.grace_s)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = StoreConfig.__dataclass_fields__
    add = lambda flag, kind, help: envflags.add(parser, ENV_PREFIX, flag, d[flag[2:].replace("-", "_")].default,
                                                kind, help)
    envflags.add(parser, ENV_PREFIX, "--root", None, str, "directory holding one converted store per model")
    add("--address", str, "listen address")
    add("--max-batch-ids", int, "most neuron ids per FetchNeurons")
    add("--max-payload-bytes", int, "most bytes per response")
    add("--verify", envflags.parse_bool, "verify record checksums on read")
    add("--max-workers", int, "gRPC handler threads")
    add("--metrics-port", int, "Prometheus port, 0 = off")
    add("--grace-s", float, "shutdown grace seconds")
