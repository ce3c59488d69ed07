"""Worker configuration: one frozen dataclass, built from flags/env in the entry point."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from m2cache import envflags
from m2cache.errors import InvalidArgument
from m2cache.store.shared import DEFAULT_REGION_BYTES

ENV_PREFIX = "worker"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    model: str = ""  # model name (the store's directory name under the store root)
    dram_target: str = "127.0.0.1:50062"
    address: str = "127.0.0.1:50064"  # listen address (port 0 = any)
    ranker_target: str = ""  # set with rank_mode="remote"
    rank_mode: str = "local"  # "local": predictor weights pulled once; "remote": a Rank RPC per layer
    device: str = "cpu"
    cache_fraction: float = 0.25  # HBM neuron-cache budget as a fraction of the model's FULL FFN bytes
    #                               (>= 1 with no policy: the dense path; > 1 may hold several precisions)
    window: int = 4  # tokens a used neuron stays cached (LLM in a flash: 4-5 OPT, 2 Llama-2)
    prefetch: str = "auto"  # guess and fetch the next layer's misses on a side thread: "on" | "off" | "auto"
    #                         (on with CUDA; off on CPU, where the guess's predictor pass takes cores from the
    #                         compute: SmolLM2 at 25% decoded 2.2x faster without it on 2 cores)
    dense_budget_bytes: int = 0  # device bytes for the resident parts; 0 = all resident, else over-budget
    #                              layers' attention streams through the tiers every step
    max_batch: int = 8  # sequences decoded together
    max_queue: int = 32  # waiting requests beyond the batch
    queue_timeout_s: float = 30.0  # how long a request may wait for a slot
    max_context: int = 0  # 0: the model's context length
    fetch_deadline_s: float = 30.0  # one fetch, retries included
    unavailable_s: float = 5.0  # how long an unreachable tier or store is retried before a typed UNAVAILABLE
    store_target: str = ""  # NeuronStore address; empty = learnt from the DRAM tier (needed to start without it)
    data_plane: bool = True  # read Redis and the store directly; false: every record through the DRAM tier
    shared_memory_bytes: int = DEFAULT_REGION_BYTES  # on the store's host its reads land in a shared region
    #                                                  of this size (store/shared.py); 0: misses stream
    page_cache_first: bool = True  # on the store's host, what its page cache holds is read before Redis
    #                                (worker/same_host.py): the nearest DRAM copy, no Redis round trip
    short_circuit: bool = True  # on the store's host, read its records file here (its descriptor passed over its
    #                             socket, worker/short_circuit.py) instead of asking the store per read
    mac_key_file: str = ""  # the deployment's record-sealing key (as the DRAM tier's); empty = the tier's answer
    redis_password_file: str = ""  # the DRAM tier's Redis password; empty = the tier's answer
    metrics_port: int = 0  # 0: no Prometheus endpoint
    grace_s: float = 5.0
    worker_id: str = "worker-0"
    hardware: str = "cpu-server"  # planner profile (name or YAML) for modelled power, price, embodied carbon
    grid_gco2_per_kwh: float = 820.0  # grid carbon intensity (M2Cache's figure)

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidArgument("worker needs --model")
        if not self.dram_target:
            raise InvalidArgument("worker needs --dram-target")
        if self.rank_mode not in ("local", "remote"):
            raise InvalidArgument(f"rank_mode must be local or remote, got {self.rank_mode!r}")
        if self.rank_mode == "remote" and not self.ranker_target:
            raise InvalidArgument("rank_mode=remote needs --ranker-target")
        if not self.cache_fraction > 0:
            raise InvalidArgument(f"cache_fraction must be > 0, got {self.cache_fraction}")
        if self.unavailable_s <= 0 or self.fetch_deadline_s <= 0:
            raise InvalidArgument("unavailable_s and fetch_deadline_s must be positive")
        if self.prefetch not in ("auto", "on", "off"):
            raise InvalidArgument(f"prefetch must be auto, on or off, got {self.prefetch!r}")
        if self.shared_memory_bytes < 0:
            raise InvalidArgument(f"shared_memory_bytes must be >= 0, got {self.shared_memory_bytes}")
        if self.window < 1 or self.max_batch < 1 or self.max_queue < 0:
            raise InvalidArgument("window and max_batch must be >= 1, max_queue >= 0")

    @property
    def prefetches(self) -> bool:
        return self.prefetch == "on" or (self.prefetch == "auto" and prefetch_by_default(self.device))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "WorkerConfig":
        return envflags.config_from_args(cls, args, ENV_PREFIX)


def prefetch_by_default(device: str) -> bool:
    """The side-thread prefetch pays where compute leaves the host's cores idle (CUDA)."""
    return not str(device).startswith("cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    envflags.add_config_arguments(parser, WorkerConfig, ENV_PREFIX)
