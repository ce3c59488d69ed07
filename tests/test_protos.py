"""The committed gRPC stubs are exactly what scripts/gen_protos.py produces."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stubs_are_fresh():
    result = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_client_package_needs_only_grpc_and_protobuf():
    # Import the client stubs in a fresh interpreter and check torch/m2cache were not pulled in.
    code = ("import sys, m2cache_client.pb.worker_pb2_grpc, m2cache_client.pb.store_pb2_grpc;"
            "bad=[m for m in ('torch','m2cache','lmdb','redis') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
