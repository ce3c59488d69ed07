"""NeuronStore service configuration: one frozen dataclass, built from
flags/env in the entry point only (``m2cache serve store``)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from m2cache import envflags
from m2cache.errors import InvalidArgument
from m2cache.store.reader import DEFAULT_IO_THREADS
from m2cache.store.shared import SHM_DIR

ENV_PREFIX = "store"


@dataclass(frozen=True, slots=True)
class StoreConfig:
    root: Path                      # a directory of stores; model name = subdirectory name
    address: str = "127.0.0.1:50061"  # host:port (port 0 = any) or unix:///path
    max_batch_ids: int = 65536      # ids per FetchNeurons; more is RESOURCE_EXHAUSTED
    max_payload_bytes: int = 256 << 20  # bytes per unary response (gRPC messages are capped at 512 MiB)
    stream_chunk_bytes: int = 1 << 20   # bytes per streamed message (StreamNeurons/StreamDense): 4 MiB held
    # the worker 10 MiB higher at its peak (gRPC buffers per message) for no speed (docs/BENCHMARKS.md)
    io_threads: int = DEFAULT_IO_THREADS  # parallel preadv reads per store (SSD queue depth)
    direct_io: bool = False         # O_DIRECT record reads: bypass the page cache (a DRAM tier caches)
    verify: bool = True             # check every record against its CRC-32C on read
    shared_memory_dir: str = SHM_DIR  # where same-host callers' regions are (ReadNeuronsShared); "" = off
    max_regions: int = 64           # shared regions mapped at once (least recently used dropped first)
    shared_socket: bool = True      # registered regions' reads over a Unix socket in shared_memory_dir
    share_record_files: bool = True  # same host: pass a dense model's records file to registered callers on
    # the socket, who read it themselves (short-circuit reads; off: every read is the store's)
    max_workers: int = 8            # gRPC handler threads
    metrics_port: int = 0           # Prometheus /metrics port, 0 = off
    grace_s: float = 5.0            # graceful-shutdown grace on SIGTERM

    def __post_init__(self):
        if min(self.max_batch_ids, self.max_payload_bytes, self.max_workers, self.stream_chunk_bytes,
               self.io_threads, self.max_regions) < 1:
            raise InvalidArgument("max_batch_ids, max_payload_bytes, stream_chunk_bytes, io_threads, "
                                  "max_regions and max_workers must be positive")
        if not Path(self.root).is_dir():
            raise InvalidArgument(f"store root {self.root} is not a directory")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "StoreConfig":
        return envflags.config_from_args(cls, args, ENV_PREFIX)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, default from ``M2CACHE_STORE_<FIELD>`` or the dataclass."""
    envflags.add_config_arguments(parser, StoreConfig, ENV_PREFIX)
