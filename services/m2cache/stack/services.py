"""The stack's processes as supervisor children: Redis (owned by the stack, so it
stops with it and is restarted by it), then ``m2cache serve <service>`` for each
service with the flags its composed config and the run's secrets give it, each
with its readiness check."""
from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

import redis

from m2cache import grpc_util
from m2cache.dram import numa
from m2cache.dram.redis_proc import find_redis_server
from m2cache.errors import FailedPrecondition
from m2cache.security import SecurityConfig
from m2cache.stack.config import PORTS, SERVICE_CONFIGS, STACK_OWNED, StackConfig, config_argv, service_of
from m2cache.stack.secrets import Secrets
from m2cache.supervisor import Child, ChildSpec

HEALTH = {"store": "m2cache.v1.NeuronStore", "dram": "m2cache.v1.DramTier", "ranker": "m2cache.v1.Ranker",
          "worker": "m2cache.v1.Worker"}


def same_code_env() -> dict[str, str]:
    """PYTHONPATH that makes the children import the very m2cache (and client) this
    process runs, not whatever else the interpreter would find installed."""
    import m2cache
    import m2cache_client

    roots = [str(Path(m.__file__).resolve().parents[1]) for m in (m2cache, m2cache_client)]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(roots + [p for p in [os.environ.get("PYTHONPATH")] if p]))}


def child_specs(c: StackConfig, log_dir: Path, secrets: Secrets | None) -> list[ChildSpec]:
    """Every process of the stack, in start order."""
    client = secrets.client_security() if secrets else SecurityConfig()
    env = same_code_env()
    specs = [redis_spec(c, log_dir, secrets)]
    for name, config in c.services().items():
        service = service_of(name)
        names = sorted(STACK_OWNED[service] | set(c.overrides.get(service, {})))
        argv = config_argv(config, names)
        if secrets:
            sec = secrets.service_security(service)
            argv += config_argv(sec, [f for f in sec.__dataclass_fields__ if getattr(sec, f)])
            for field, path in secrets.data_plane_args(SERVICE_CONFIGS[service]).items():
                argv += ["--" + field.replace("_", "-"), path]
        cmd = (sys.executable, "-m", "m2cache.cli", "--log-level", c.log_level, "serve", service, *argv)
        if service == "gateway":
            ready = gateway_ready(f"{'https' if secrets else 'http'}://{config.address}", client)
        else:
            ready = grpc_ready(config.address, HEALTH[service], client)
        specs.append(ChildSpec(name, cmd, log_dir / f"{name}.log", ready, env))
    return specs


# ---- Redis ---------------------------------------------------------------------------------
def redis_spec(c: StackConfig, log_dir: Path, secrets: Secrets | None) -> ChildSpec:
    """A private redis-server: loopback, no persistence, its own directory, and (in a
    secure stack whose DramTier takes a password) ``requirepass`` from a 0600 config
    file, never from argv."""
    port = c.base_port + PORTS["redis"]
    _refuse_if_taken(c.host, port)
    directory = Path(c.run_dir).resolve() / "redis" / str(port)
    directory.mkdir(parents=True, exist_ok=True)
    password = ""
    if secrets and "redis_password_file" in secrets.data_plane_args(SERVICE_CONFIGS["dram"]):
        password = secrets.redis_password.read_text().strip()
    lines = [f"port {port}", f"bind {c.host}", 'save ""', "appendonly no", "protected-mode yes",
             f"dir {directory}", "maxmemory 0", "daemonize no"]
    if password:
        lines.append(f"requirepass {password}")
    conf = directory / "redis.conf"
    conf.touch(mode=0o600)
    conf.write_text("\n".join(lines) + "\n")
    cmd = [find_redis_server(c.redis_server), str(conf)]
    if c.numa_node >= 0:
        numa.check_node(c.numa_node)  # fail here, clearly, not as a dead child
        cmd = numa.bind_command(cmd, c.numa_node)
    return ChildSpec("redis", tuple(cmd), log_dir / "redis.log", redis_ready(c.host, port, password))


def _refuse_if_taken(host: str, port: int) -> None:
    """A stale Redis (or anything) already on the port is never reused: stop here."""
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex((host, port)) != 0:
            return
    who = ""
    try:
        pid = redis.Redis(host=host, port=port, socket_timeout=0.5).info("server")["process_id"]
        who = f" (a redis-server, pid {pid}: an orphan of an earlier stack?)"
    except redis.exceptions.RedisError:
        pass
    raise FailedPrecondition(f"port {port} on {host} is already in use{who}; stop that process or pick another "
                             "--base-port: m2cache up never reuses a Redis it did not start")


def redis_ready(host: str, port: int, password: str):
    def ready(child: Child) -> bool:
        client = redis.Redis(host=host, port=port, password=password or None, socket_connect_timeout=0.2,
                             socket_timeout=0.5)
        try:
            pid = client.info("server")["process_id"]
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()
        if pid != child.pid:  # someone else answers on our port: never use it
            raise FailedPrecondition(f"port {port} answers as redis pid {pid}, not ours ({child.pid})")
        return True

    return ready


# ---- gRPC and HTTP readiness -------------------------------------------------------------------
def grpc_ready(target: str, service: str, security: SecurityConfig):
    return lambda child: grpc_util.check_health(target, service, 1.0, security=security) == "SERVING"


def gateway_ready(base_url: str, security: SecurityConfig):
    context = ssl.create_default_context(cafile=security.tls_ca) if security.tls_ca else None

    def ready(child: Child) -> bool:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2.0, context=context) as resp:
                return resp.status == 200 and json.load(resp)["status"] == "ok"
        except (OSError, urllib.error.URLError, ValueError):
            return False

    return ready
