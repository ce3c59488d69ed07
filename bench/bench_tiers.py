#!/usr/bin/env python3
"""The SSD tier at device speed (issue 13), all figures from one run. Not a test.

A synthetic store (format 2, convert/store_writer.py) of 7B-shape layers:
SwiGLU, d_model 4096, fp16 -> FULL records of 3 x 4096 x 2 B = 24 KiB, 11008
neurons per layer (270 MB). The page cache is dropped before every cold figure.

- device_seq_bytes_per_s:      a raw file read sequentially by the store's thread pool (4 MiB preadv)
- device_random_bytes_per_s:   the same pool reading record-sized reads at random offsets of that file
- cold_layer_bytes_per_s:      NeuronStore.read_into of a whole layer (sorted ids) into a preallocated buffer
- cold_random_quarter_bytes_per_s: read_into of a random 25% of a layer's neurons
- warm_layer_bytes_per_s:      read_into of a whole layer from the page cache
- rpc_over_inprocess:          the NeuronStore RPC (server in its own process, loopback) on the same
                               host, ReadNeuronsShared into the client's shared-memory region, / in-
                               process read_into, warm, for the smallest batch of >= 1 MB (every
                               batch's ratio is printed too)
- stream_over_inprocess:       the same for StreamNeurons assembled into a client buffer (the path
                               across hosts, where no region is shared)
- short_circuit_over_inprocess: what a same-host worker does instead of a read RPC: it reads the
                               records file itself, with the descriptor and CRC tables the store
                               passed over its socket (worker/short_circuit.py), / in-process

The "Done when" targets are printed beside the ratios measured here, not asserted.

    python bench/bench_tiers.py --json bench/out/tiers.json
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness.honest import drop_caches  # noqa: E402
from m2cache import grpc_util  # noqa: E402
from m2cache.codec.format import RECORDS_FILE, Manifest, Precision  # noqa: E402
from m2cache.convert.store_writer import StoreWriter  # noqa: E402
from m2cache.store.reader import DEFAULT_IO_THREADS, NeuronStore  # noqa: E402
from m2cache.store.segments import RecordFile, plan  # noqa: E402
from m2cache.store.shared_reader import SharedReader  # noqa: E402
from m2cache_client.pb import common_pb2, store_pb2, store_pb2_grpc  # noqa: E402
from m2cache.worker.short_circuit import LocalRecords  # noqa: E402

D_MODEL, NVEC = 4096, 3
FULL = Precision.FULL
MB = 1e6


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_store(path: Path, num_layers: int, num_neurons: int) -> Manifest:
    """FULL records of random fp16 weights (one segment per layer), manifest last."""
    manifest = Manifest(family="llama", hf_config={}, dtype="float16", num_layers=num_layers, d_model=D_MODEL,
                        d_ffn=num_neurons, ffn_kind="swiglu", int4_group=32, source="synthetic")
    rb = manifest.layout.num_bytes(FULL)
    rng = np.random.default_rng(0)
    writer = StoreWriter(path, 256 << 20)
    try:
        for layer in range(num_layers):
            seg = writer.begin_segment(layer, FULL)
            for lo in range(0, num_neurons, 512):
                writer.add_rows(seg, rng.integers(0, 256, size=(min(512, num_neurons - lo), rb), dtype=np.uint8))
            writer.end_segment(seg)
        writer.finish(manifest)
    finally:
        writer.close()
    return manifest


def write_raw(path: Path, nbytes: int) -> None:
    rng = np.random.default_rng(1)
    with open(path, "wb") as f:
        for _ in range(0, nbytes, 16 << 20):
            f.write(rng.integers(0, 256, size=16 << 20, dtype=np.uint8).tobytes())
        os.fsync(f.fileno())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def raw_pool_read(path: Path, offsets: np.ndarray, size: int, threads: int, direct: bool = False) -> float:
    """Seconds for the store's reader (RecordFile, ``threads`` preadv threads) to read
    ``size`` bytes at each of ``offsets`` of a raw file, no checksums."""
    rf = RecordFile(path, threads, direct)
    try:
        lengths = np.full(offsets.size, size, dtype=np.int64)
        dest = np.empty(offsets.size * size, dtype=np.uint8)
        dest[::4096] = 0  # resident before the clock
        tasks = plan(offsets.astype(np.int64), lengths, None, rf.task_bytes)
        return timed(lambda: rf.read(dest, tasks))
    finally:
        rf.close()


def memcpy_figures(path: Path, nbytes: int) -> dict:
    """The copy ceilings of this machine: anonymous (hugepage) memory, and the page cache (4 KiB pages)."""
    src = np.empty(nbytes, np.uint8)
    src[:] = 1
    dst = np.empty_like(src)
    dst[:] = 0
    anon = min(timed(lambda: np.copyto(dst, src)) for _ in range(3))
    with open(path, "rb") as f:
        f.read(nbytes)  # warm
        mm = mmap.mmap(f.fileno(), nbytes, prot=mmap.PROT_READ)
        view = np.frombuffer(mm, np.uint8)
        cached = min(timed(lambda: np.copyto(dst, view)) for _ in range(3))
        del view
        mm.close()
    return {"memcpy_anon_bytes_per_s": nbytes / anon, "memcpy_page_cache_bytes_per_s": nbytes / cached}


class StoreServer:
    """``m2cache serve store`` in its own process (its own GIL), stopped by PID."""

    def __init__(self, root: Path):
        self.target = f"127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen([sys.executable, "-m", "m2cache.cli", "serve", "store", "--root", str(root),
                                      "--address", self.target], start_new_session=True)
        deadline = time.monotonic() + 60
        while grpc_util.check_health(self.target, "m2cache.v1.NeuronStore", 1.0) != "SERVING":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit("store did not come up")
            time.sleep(0.1)
        self.channel = grpc_util.channel(self.target)
        self.stub = store_pb2_grpc.NeuronStoreStub(self.channel)

    def stream_into(self, model: str, layer: int, ids: np.ndarray, dest: np.ndarray) -> None:
        req = common_pb2.NeuronBatchRequest(model=model, layer=layer, neuron_ids=ids.tolist(), precision=int(FULL))
        flat, at = dest.reshape(-1), 0
        for msg in self.stub.StreamNeurons(req, timeout=120):
            n = len(msg.payload)
            flat[at : at + n] = np.frombuffer(msg.payload, np.uint8)
            at += n
        assert at == dest.nbytes

    def shared_reader(self, capacity: int) -> SharedReader:
        rpc = grpc_util.Rpc(self.channel, store_pb2_grpc.NeuronStoreStub, "NeuronStore")
        return SharedReader(rpc, capacity, timeout_s=120)

    @staticmethod
    def shared_into(model: str, layer: int, ids: np.ndarray, reader: SharedReader) -> np.ndarray:
        """The records land in the reader's region (zero-copy, as read_into's in its buffer)."""
        req = common_pb2.NeuronBatchRequest(model=model, layer=layer, neuron_ids=ids.tolist(), precision=int(FULL))
        return reader.read(req, lambda data, resp: data)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def ssd_figures(store_dir: Path, raw: Path, manifest: Manifest, threads: int) -> dict:
    rb = manifest.layout.num_bytes(FULL)
    n = manifest.d_ffn
    layer_bytes = n * rb
    rng = np.random.default_rng(2)
    quarter = np.sort(rng.choice(n, n // 4, replace=False))
    out = {}
    seq_offsets = np.arange(0, layer_bytes, 4 << 20, dtype=np.int64)
    drop_caches([raw])
    out["device_seq_bytes_per_s"] = seq_offsets.size * (4 << 20) / raw_pool_read(raw, seq_offsets, 4 << 20, threads)
    drop_caches([raw])
    out["device_seq_direct_bytes_per_s"] = (seq_offsets.size * (4 << 20)
                                            / raw_pool_read(raw, seq_offsets, 4 << 20, threads, direct=True))
    rand_offsets = np.sort(rng.integers(0, layer_bytes - rb, size=quarter.size))
    drop_caches([raw])
    out["device_random_bytes_per_s"] = quarter.size * rb / raw_pool_read(raw, rand_offsets, rb, threads)
    store = NeuronStore(store_dir, io_threads=threads)
    try:
        whole = np.empty((n, rb), np.uint8)
        whole[:, ::4096] = 0
        part = np.empty((quarter.size, rb), np.uint8)
        part[:, ::4096] = 0
        all_ids = np.arange(n)
        drop_caches([store_dir / RECORDS_FILE])
        out["cold_layer_bytes_per_s"] = layer_bytes / timed(lambda: store.read_into(0, FULL, all_ids, whole))
        drop_caches([store_dir / RECORDS_FILE])
        out["cold_random_quarter_bytes_per_s"] = part.nbytes / timed(lambda: store.read_into(1, FULL, quarter, part))
        warm = [timed(lambda: store.read_into(0, FULL, all_ids, whole)) for _ in range(3)]
        out["warm_layer_bytes_per_s"] = layer_bytes / min(warm)
        segment = store.record_spans(0, FULL, np.asarray([0]))[0][0]
    finally:
        store.close()
    direct = RecordFile(store_dir / RECORDS_FILE, threads, direct=True)
    try:
        tasks = plan(segment + np.arange(n, dtype=np.int64) * rb, np.full(n, rb, np.int64), None, direct.task_bytes)
        drop_caches([store_dir / RECORDS_FILE])
        out["cold_layer_direct_bytes_per_s"] = layer_bytes / timed(lambda: direct.read(whole.reshape(-1), tasks))
    finally:
        direct.close()
    return out


def rpc_figures(root: Path, model: str, store_dir: Path, manifest: Manifest, batches: list[int], reps: int,
                threads: int) -> dict:
    """Warm, round-robin, median of ``reps``: ReadNeuronsShared into a shared region and
    StreamNeurons into a client buffer, each against in-process read_into."""
    rb = manifest.layout.num_bytes(FULL)
    rng = np.random.default_rng(3)
    server = StoreServer(root)
    store = NeuronStore(store_dir, io_threads=threads)
    reader = server.shared_reader(max(batches) * rb)
    reader.region.data[::4096] = 0  # resident before the clock, like ``dest``
    local_records = LocalRecords.open(reader, model, manifest.layout, manifest.d_ffn, verify=True)
    if local_records is None:
        sys.exit("the store would not share its records file (short-circuit reads)")
    rows = {}
    try:
        store.read_into(0, FULL, np.arange(manifest.d_ffn), np.empty((manifest.d_ffn, rb), np.uint8))  # warm
        for batch in batches:
            ids = [np.sort(rng.choice(manifest.d_ffn, batch, replace=False)) for _ in range(4)]
            dest = np.empty((batch, rb), np.uint8)
            dest[:, ::4096] = 0
            server.stream_into(model, 0, ids[0], dest)  # warm-up and check
            assert dest.tobytes() == store.get_neurons(0, ids[0], FULL)
            assert server.shared_into(model, 0, ids[1], reader).tobytes() == store.get_neurons(0, ids[1], FULL)
            local_records.read(0, FULL, ids[2], dest)
            assert dest.tobytes() == store.get_neurons(0, ids[2], FULL)
            t_stream, t_shared, t_local, t_short = [], [], [], []
            for r in range(reps):  # each read follows one of other ids (not of its own, hot in the CPU's caches)
                t_shared.append(timed(lambda: server.shared_into(model, 0, ids[r % 4], reader)))
                t_stream.append(timed(lambda: server.stream_into(model, 0, ids[(r + 1) % 4], dest)))
                t_local.append(timed(lambda: store.read_into(0, FULL, ids[(r + 2) % 4], dest)))
                t_short.append(timed(lambda: local_records.read(0, FULL, ids[(r + 3) % 4], dest)))
            shared, stream, local, short = (statistics.median(t) for t in (t_shared, t_stream, t_local, t_short))
            rows[batch] = {"batch_bytes": batch * rb, "rpc_bytes_per_s": batch * rb / shared,
                           "stream_bytes_per_s": batch * rb / stream, "inprocess_bytes_per_s": batch * rb / local,
                           "short_circuit_bytes_per_s": batch * rb / short,
                           "rpc_over_inprocess": local / shared, "stream_over_inprocess": local / stream,
                           "short_circuit_over_inprocess": local / short}
    finally:
        local_records.close()
        reader.close()
        store.close()
        server.stop()
    return rows


def report(doc: dict) -> None:
    f, r = doc["figures"], doc["rpc"]
    print(f"\nSSD tier, {doc['layer_bytes'] / MB:.0f} MB layers of {doc['record_bytes']} B records, "
          f"{doc['io_threads']} I/O threads, {doc['cores']} cores, load average {doc['load_avg']}")
    for key, value in f.items():
        shown = f"{value:10.2f}" if key.endswith("_over_inprocess") else f"{value / MB:10,.0f} MB/s"
        print(f"  {key:36s} {shown}")
    print("\n| batch | MB | ReadNeuronsShared MB/s | StreamNeurons MB/s | short-circuit MB/s | in-process read_into MB/s"
          " | shared / in-process | stream / in-process | short-circuit / in-process |\n|---|---|---|---|---|---|---|---|---|")
    for batch, row in r.items():
        print(f"| {batch} | {row['batch_bytes'] / MB:.1f} | {row['rpc_bytes_per_s'] / MB:,.0f} | "
              f"{row['stream_bytes_per_s'] / MB:,.0f} | {row['short_circuit_bytes_per_s'] / MB:,.0f} | "
              f"{row['inprocess_bytes_per_s'] / MB:,.0f} | {row['rpc_over_inprocess']:.2f} | "
              f"{row['stream_over_inprocess']:.2f} | {row['short_circuit_over_inprocess']:.2f} |")
    t = doc["targets"]
    print("\nDone-when targets (measured ratio vs target):")
    for name, (ratio, target) in t.items():
        print(f"  {name:58s} {ratio:6.2f}  (target >= {target})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--neurons", type=int, default=11008, help="neurons per layer (default 11008: Llama-2-7B)")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256, 1024, 4096],
                    help="records per RPC batch (24 KiB each)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--io-threads", type=int, default=DEFAULT_IO_THREADS)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--tmp", type=Path, default=None, help="where the synthetic store goes (default: a temp dir)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tiers-", dir=args.tmp))
    try:
        model = "synthetic"
        store_dir = tmp / "root" / model
        manifest = write_store(store_dir, 2, args.neurons)
        rb = manifest.layout.num_bytes(FULL)
        raw = tmp / "raw.bin"
        write_raw(raw, args.neurons * rb)
        figures = ssd_figures(store_dir, raw, manifest, args.io_threads)
        figures.update(memcpy_figures(raw, args.neurons * rb))
        rpc = rpc_figures(tmp / "root", model, store_dir, manifest, args.batches, args.reps, args.io_threads)
        big = [row for row in rpc.values() if row["batch_bytes"] >= 1 << 20]
        for key in ("rpc_over_inprocess", "stream_over_inprocess", "short_circuit_over_inprocess"):
            figures[key] = min(row[key] for row in big) if big else float("nan")
        doc = {"figures": figures, "rpc": rpc, "record_bytes": rb, "layer_bytes": args.neurons * rb,
               "io_threads": args.io_threads, "cores": os.cpu_count(),
               "load_avg": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
               "targets": {
                   "cold whole layer / device sequential": (
                       figures["cold_layer_bytes_per_s"] / figures["device_seq_bytes_per_s"], 0.8),
                   "cold random 25% / same pool at random raw offsets": (
                       figures["cold_random_quarter_bytes_per_s"] / figures["device_random_bytes_per_s"], 0.5),
                   "warm whole layer, GB/s (target 5 GB/s)": (figures["warm_layer_bytes_per_s"] / 1e9, 5.0),
                   "warm whole layer / page-cache memcpy ceiling": (
                       figures["warm_layer_bytes_per_s"] / figures["memcpy_page_cache_bytes_per_s"], 1.0),
                   "NeuronStore RPC / in-process, batches >= 1 MB (min; same host, shared region)": (
                       figures["rpc_over_inprocess"], 0.7),
                   "StreamNeurons / in-process, batches >= 1 MB (min; across hosts)": (
                       figures["stream_over_inprocess"], 0.7),
                   "(not a target) same-host worker's short-circuit read / in-process, batches >= 1 MB (min)": (
                       figures["short_circuit_over_inprocess"], 0.7)}}
        report(doc)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**figures, "detail": doc}, indent=1))
            print(f"\nwrote {args.json}")
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
