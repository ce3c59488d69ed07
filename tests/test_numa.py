"""The DRAM tier's Redis bound to a NUMA node (how a CXL expander is used): on the
nodes this machine has. Binding to node 0 shows in /proc/<pid>/numa_maps; a
missing node fails clearly; numactl is used when it is on PATH; the flag goes
from `m2cache up` through the stack to `m2cache serve dram`."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from m2cache import grpc_util
from m2cache.dram import numa
from m2cache.dram.config import DramConfig
from m2cache.dram.redis_proc import RedisProcess, find_redis_server
from m2cache.errors import FailedPrecondition, InvalidArgument
from m2cache.stack import StackConfig
from m2cache.stack.services import redis_spec
from tiers import free_port


def _missing_node() -> int:
    return max(numa.memory_nodes()) + 1


def test_this_machine_has_node_zero():
    assert 0 in numa.memory_nodes()
    assert numa._parse_list("0-2,5\n") == [0, 1, 2, 5]


def test_redis_bound_to_node_zero_shows_in_numa_maps():
    proc = RedisProcess(find_redis_server(), free_port(), numa_node=0).start()
    try:
        assert Path(f"/proc/{proc.pid}/exe").resolve().name.startswith("redis")  # exec'd in place: same PID
        assert numa.bound_nodes(proc.pid) == {0}
    finally:
        proc.stop()
    plain = RedisProcess(find_redis_server(), free_port()).start()
    try:
        assert numa.bound_nodes(plain.pid) == set()  # no binding asked, none set
    finally:
        plain.stop()


def test_binding_to_a_missing_node_fails_clearly():
    node = _missing_node()
    with pytest.raises(FailedPrecondition, match=rf"NUMA node {node} does not exist.*nodes with memory: 0"):
        RedisProcess(find_redis_server(), free_port(), numa_node=node)
    wrapper = subprocess.run([sys.executable, "-m", "m2cache.dram.numa", str(node), "true"], capture_output=True,
                             text=True, timeout=60)
    assert wrapper.returncode != 0 and f"NUMA node {node} does not exist" in wrapper.stderr


def test_numactl_is_used_when_installed(tmp_path, monkeypatch):
    """A stand-in numactl on PATH (tests install no system packages) records its arguments and runs the command."""
    log = tmp_path / "numactl.args"
    fake = tmp_path / "numactl"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {log}\nshift 2\nexec \"$@\"\n")  # drop --membind=N and --
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    proc = RedisProcess(find_redis_server(), free_port(), numa_node=0).start()
    try:
        assert log.read_text().startswith("--membind=0 -- ")
    finally:
        proc.stop()


def test_config_flag_and_stack_passthrough(tmp_path):
    assert DramConfig(numa_node=0).numa_node == 0
    with pytest.raises(InvalidArgument):
        DramConfig(numa_node=0, redis_url="redis://127.0.0.1:1/0")  # someone else's Redis: bind it yourself
    with pytest.raises(InvalidArgument):
        DramConfig(numa_node=-2)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "data.mdb").write_bytes(b"")
    config = StackConfig(store_root=tmp_path, model="m", numa_node=0, base_port=free_port() // 100 * 100,
                         run_dir=tmp_path / "run")
    spec = redis_spec(config, tmp_path, None)  # the stack owns its Redis: the binding wraps that command
    assert list(spec.argv) == numa.bind_command([find_redis_server(), spec.argv[-1]], 0)
    assert spec.argv[-1].endswith("redis.conf")


def test_serve_dram_binds_its_redis(store_service, tmp_path):
    """`m2cache serve dram --numa-node 0`: the tier's own redis-server is bound to node 0."""
    address = f"127.0.0.1:{free_port()}"
    args = [sys.executable, "-m", "m2cache.cli", "serve", "dram", "--store-target", store_service.target,
            "--address", address, "--redis-port", str(free_port()), "--numa-node", "0"]
    with open(tmp_path / "dram.log", "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while grpc_util.check_health(address, "", 1.0) != "SERVING":
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "dram.log").read_text()
            time.sleep(0.2)
        redis = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name().startswith("redis")]
        assert redis and numa.bound_nodes(redis[0].pid) == {0}
    finally:
        proc.terminate()
        proc.wait(30)
