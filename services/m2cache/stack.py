"""The whole stack as local processes on loopback: store, DRAM tier (which
starts its own Redis), ranker, workers and the HTTP gateway, started in order
with health waits and stopped by PID. ``m2cache up`` is a thin CLI over this."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from m2cache import grpc_util
from m2cache.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StackConfig:
    store_root: Path
    model: str
    num_workers: int = 1
    host: str = "127.0.0.1"
    base_port: int = 50060  # store +1, dram +2, ranker +3, redis +9, workers +10.., gateway +80
    gateway: bool = True
    dram_budget_bytes: int = 1 << 30
    numa_node: int = -1  # bind the DRAM tier's Redis memory to this NUMA node (a CXL expander); -1 = off
    cache_fraction: float = 0.25
    window: int = 4
    device: str = "cpu"
    log_dir: Path = Path("runs/logs")
    state_file: Path = Path("runs/stack.json")
    start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not (Path(self.store_root) / self.model / "data.mdb").is_file():
            raise InvalidArgument(f"no converted store {self.model!r} under {self.store_root} (run m2cache convert)")
        if self.num_workers < 1:
            raise InvalidArgument("need at least one worker")

    def addr(self, offset: int) -> str:
        return f"{self.host}:{self.base_port + offset}"


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str  # process name, also its log file
    argv: tuple[str, ...]
    target: str
    health_service: str  # grpc health service name ("" for HTTP)


def service_specs(c: StackConfig) -> list[ServiceSpec]:
    """In start order: each depends only on those before it."""
    serve = (sys.executable, "-m", "m2cache.cli", "serve")
    root = str(c.store_root)
    specs = [
        ServiceSpec("store", serve + ("store", "--root", root, "--address", c.addr(1)), c.addr(1), "m2cache.v1.NeuronStore"),
        ServiceSpec("dram", serve + ("dram", "--store-target", c.addr(1), "--address", c.addr(2),
                                     "--redis-port", str(c.base_port + 9), "--budget-bytes", str(c.dram_budget_bytes),
                                     "--numa-node", str(c.numa_node)),
                    c.addr(2), "m2cache.v1.DramTier"),
        ServiceSpec("ranker", serve + ("ranker", "--root", root, "--address", c.addr(3), "--device", c.device),
                    c.addr(3), "m2cache.v1.Ranker"),
    ]
    for i in range(c.num_workers):
        specs.append(ServiceSpec(
            f"worker-{i}", serve + ("worker", "--model", c.model, "--dram-target", c.addr(2), "--ranker-target",
                                    c.addr(3), "--address", c.addr(10 + i), "--device", c.device, "--worker-id",
                                    f"worker-{i}", "--cache-fraction", str(c.cache_fraction), "--window", str(c.window)),
            c.addr(10 + i), "m2cache.v1.Worker"))
    if c.gateway:
        workers = ",".join(c.addr(10 + i) for i in range(c.num_workers))
        specs.append(ServiceSpec("gateway", serve + ("gateway", "--workers", workers, "--model", c.model,
                                                     "--address", c.addr(80)), c.addr(80), ""))
    return specs


@dataclass
class Stack:
    config: StackConfig
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self) -> None:
        """Start every service in order, waiting for each to be healthy."""
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for spec in service_specs(self.config):
                self._start_one(spec)
        except BaseException:
            self.stop()
            raise
        self._write_state()

    def _start_one(self, spec: ServiceSpec) -> None:
        log_path = self.config.log_dir / f"{spec.name}.log"
        with open(log_path, "ab") as out:
            # own process group: a Ctrl-C reaches us once, and we stop children in order
            self.procs[spec.name] = subprocess.Popen(spec.argv, stdout=out, stderr=subprocess.STDOUT,
                                                     start_new_session=True)
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            if self.procs[spec.name].poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise FailedPrecondition(f"{spec.name} exited with {self.procs[spec.name].returncode}:\n{tail}")
            if _healthy(spec):
                log.info("%s healthy on %s (pid %d)", spec.name, spec.target, self.procs[spec.name].pid)
                return
            time.sleep(0.2)
        raise FailedPrecondition(f"{spec.name} not healthy within {self.config.start_timeout_s:.0f}s (log: {log_path})")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM in reverse start order, SIGKILL whatever outlives the grace."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) ignored SIGTERM; killing", name, proc.pid)
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        self.config.state_file.unlink(missing_ok=True)

    def _write_state(self) -> None:
        c = self.config
        state = {
            "model": c.model, "store": c.addr(1), "dram": c.addr(2), "ranker": c.addr(3),
            "workers": [c.addr(10 + i) for i in range(c.num_workers)],
            "gateway": f"http://{c.addr(80)}" if c.gateway else "",
            "pids": {name: p.pid for name, p in self.procs.items()},
            "config": {k: str(v) for k, v in asdict(c).items()},
        }
        c.state_file.parent.mkdir(parents=True, exist_ok=True)
        c.state_file.write_text(json.dumps(state, indent=2))


def _healthy(spec: ServiceSpec) -> bool:
    if spec.health_service:
        return grpc_util.check_health(spec.target, spec.health_service, timeout_s=1.0) == "SERVING"
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{spec.target}/health", timeout=1.0) as resp:
            return resp.status == 200
    except OSError:
        return False


def read_state(path: Path) -> dict:
    """The running stack's addresses, as ``m2cache up`` wrote them."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FailedPrecondition(f"no running stack: {path} not found (start one with m2cache up)") from None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
