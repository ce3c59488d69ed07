"""`m2cache health HOST:PORT [--service NAME]` (the compose healthcheck) against a real
gRPC server on loopback: exit 0 only while the service reports SERVING."""
from __future__ import annotations

import argparse
import socket

import pytest
from grpc_health.v1 import health_pb2

from m2cache.commands import health as health_command
from m2cache.grpc_util import create_server


def run_health(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    health_command.add_parser(parser.add_subparsers(dest="command"))
    return health_command.main(parser.parse_args(["health", *argv]))


@pytest.fixture
def server():
    srv, port, health = create_server("127.0.0.1:0", [], ["m2cache.v1.NeuronStore"], max_workers=2)
    srv.start()
    yield f"127.0.0.1:{port}", health
    srv.stop(0).wait()


def test_serving_server_exits_zero(server, capsys):
    address, _ = server
    assert run_health(address) == 0
    assert run_health(address, "--service", "m2cache.v1.NeuronStore") == 0
    assert capsys.readouterr().out.split() == ["SERVING", "SERVING"]


def test_not_serving_and_unknown_service_exit_one(server, capsys):
    address, health = server
    health.set("m2cache.v1.NeuronStore", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run_health(address, "--service", "m2cache.v1.NeuronStore") == 1
    assert run_health(address, "--service", "m2cache.v1.Nope") == 1
    assert run_health(address) == 0  # the server as a whole still serves
    assert capsys.readouterr().out.split() == ["NOT_SERVING", "UNREACHABLE", "SERVING"]


def test_nothing_listening_exits_one(capsys):
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert run_health(f"127.0.0.1:{port}", "--timeout", "0.5", "--quiet") == 1
    assert capsys.readouterr().out == ""
