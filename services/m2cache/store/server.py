"""NeuronStore gRPC service: thin proto <-> domain layer over
:class:`StoreCatalog` (the reads live in reader.py and segments.py).

Streamed responses are pipelined: the next chunk is read (on a small thread
pool, its I/O on the store's own pool) while the current one is sent. Callers on
the same host read into their shared-memory regions instead (store/shared.py,
store/shared_socket.py): a region registered on the store's Unix socket is tied to
that connection and unmapped when it closes."""
from __future__ import annotations

import hmac
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from m2cache import grpc_util
from m2cache.codec.format import DTYPES, POLICY_KEY, Precision
from m2cache.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from m2cache.metrics import RpcMetrics, start_metrics_server
from m2cache.store.catalog import StoreCatalog, check_batch, chunk_bounds
from m2cache.store.config import StoreConfig
from m2cache.store.shared import RegionMaps
from m2cache.store.shared_socket import Peer, SocketServer
from m2cache_client.pb import common_pb2, store_pb2, store_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = store_pb2.DESCRIPTOR.services_by_name["NeuronStore"].full_name


class StoreMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.rpc = RpcMetrics("store", registry)
        self.records = Counter("m2cache_store_records", "neuron records served", ["model"], registry=registry)
        self.bytes = Counter("m2cache_store_bytes", "bytes served", ["model", "kind"], registry=registry)
        self.regions = Gauge("m2cache_store_shared_regions", "same-host callers' shared-memory regions mapped now",
                             registry=registry)


class NeuronStoreServicer(store_pb2_grpc.NeuronStoreServicer):
    """Every converted model under the config's root, read-only."""

    def __init__(self, config: StoreConfig, catalog: StoreCatalog, metrics: StoreMetrics):
        self.config = config
        self.catalog = catalog
        self.metrics = metrics
        self.readers = ThreadPoolExecutor(config.max_workers, thread_name_prefix="stream-read")
        self.regions = RegionMaps(config.shared_memory_dir, config.max_regions)
        metrics.regions.set_function(self.regions.__len__)
        self._socket_server: SocketServer | None = None
        self._socket_lock = threading.Lock()
        self._socket_tried = False

    def ListModels(self, request, context):
        with self.metrics.rpc.observe("ListModels"):
            return common_pb2.ListModelsResponse(models=self.catalog.models())

    def GetManifest(self, request, context):
        """The store's manifest JSON and its precision policy (empty if none)."""
        with self.metrics.rpc.observe("GetManifest"):
            store = self.catalog.get(request.model)
            with store.read_txn() as txn:
                policy = txn.get(POLICY_KEY) or b""
            return common_pb2.Manifest(model=request.model, manifest_json=store.manifest.to_json().decode(),
                                       policy_json=policy.decode())

    def _neuron_request(self, request):
        store = self.catalog.get(request.model)
        prec = Precision.parse(request.precision)
        store.check_layer(request.layer)
        ids = store.check_neurons(range(store.manifest.d_ffn) if request.all_neurons else request.neuron_ids)
        return store, prec, ids

    def _batch(self, request, store, prec, got, ids) -> common_pb2.NeuronBatch:
        self.metrics.records.labels(request.model).inc(ids.size)
        self.metrics.bytes.labels(request.model, "neurons").inc(got.payload.nbytes)
        return common_pb2.NeuronBatch(model=request.model, layer=request.layer, precision=int(prec),
                                      neuron_ids=ids.tolist(), record_bytes=got.record_bytes,
                                      payload=got.payload.tobytes(), crc32c=got.crcs.tolist(),
                                      codec=store.manifest.codec,
                                      record_lengths=[] if got.lengths is None else got.lengths.tolist())

    def FetchNeurons(self, request, context):
        """Records of many neurons of one layer at one precision, one payload,
        with the per-record CRC-32C recorded at conversion; bitmap stores send
        their records as stored (compressed) with per-record lengths."""
        with self.metrics.rpc.observe("FetchNeurons"):
            store, prec, ids = self._neuron_request(request)
            check_batch(ids.size, store.layout.num_bytes(prec), self.config.max_batch_ids,
                        self.config.max_payload_bytes)
            got = store.read_stored(request.layer, prec, ids)
            return self._batch(request, store, prec, got, ids)

    def StreamNeurons(self, request, context):
        """The same records in chunks of about ``stream_chunk_bytes`` (``first`` = a
        chunk's request position); the next chunk is read while one is sent."""
        with self.metrics.rpc.observe("StreamNeurons"):
            store, prec, ids = self._neuron_request(request)
            lengths = store.stored_lengths(request.layer, prec, ids)
            bounds = chunk_bounds(ids.size, store.layout.num_bytes(prec), lengths, self.config.stream_chunk_bytes)

            def read(lo: int, hi: int):
                return store.read_stored(request.layer, prec, ids[lo:hi])

            pending = self.readers.submit(read, *bounds[0]) if bounds else None
            for k, (lo, hi) in enumerate(bounds):
                got = pending.result()
                pending = self.readers.submit(read, *bounds[k + 1]) if k + 1 < len(bounds) else None
                batch = self._batch(request, store, prec, got, ids[lo:hi])
                batch.first = lo
                yield batch

    def SharedSocket(self, request, context):
        """The socket on which a same-host caller registers its memfd region, and the token
        the registration presents (so only callers that passed this channel's checks register)."""
        with self.metrics.rpc.observe("SharedSocket"):
            self.regions.check_enabled()
            sock = self._socket()
            if sock is None:
                return store_pb2.SharedSocketInfo()
            return store_pb2.SharedSocketInfo(socket_path=str(sock.path), token=sock.token)

    def OpenShared(self, request, context):
        """Map the caller's named region (checking its tag); answer with the socket for its reads."""
        with self.metrics.rpc.observe("OpenShared"):
            self.regions.view(request.name, request.tag, 0, 0)
            sock = self._socket()
            return store_pb2.SharedOpened(socket_path=str(sock.path) if sock else "",
                                          capacity=self.regions.capacity(request.name))

    def ReadNeuronsShared(self, request, context):
        with self.metrics.rpc.observe("ReadNeuronsShared"):
            return self.read_shared(request)

    def read_shared(self, request, peer: Peer | None = None) -> store_pb2.SharedReadResponse:
        """The records, as stored, read straight into the caller's shared-memory region
        (``peer``: the socket connection asking, which serves only what it may see)."""
        store, prec, ids = self._neuron_request(request.batch)
        check_batch(ids.size, 0, self.config.max_batch_ids, 0)
        if request.resident_only:
            return self._read_resident(request, store, prec, ids, peer)
        lengths = store.stored_lengths(request.batch.layer, prec, ids)
        rb = store.layout.num_bytes(prec)
        nbytes = ids.size * rb if lengths is None else int(lengths.sum())
        dest = self.regions.view(request.region.name, request.region.tag, request.offset, nbytes,
                                 open_new=peer is None, peer=peer)
        got = store.read_stored(request.batch.layer, prec, ids, out=dest)
        self.metrics.records.labels(request.batch.model).inc(ids.size)
        self.metrics.bytes.labels(request.batch.model, "neurons").inc(nbytes)
        return store_pb2.SharedReadResponse(record_bytes=rb, crc32c=got.crcs.tolist(), codec=store.manifest.codec,
                                            record_lengths=[] if lengths is None else lengths.tolist(),
                                            nbytes=nbytes, verified=store.verify)

    def _read_resident(self, request, store, prec, ids, peer: Peer | None) -> store_pb2.SharedReadResponse:
        """What the page cache holds of the batch, each record at its row's place in the
        region; the rest named in ``absent`` (the caller reads them from the next tier)."""
        rb = store.layout.num_bytes(prec)
        if store.manifest.codec != "dense":
            return store_pb2.SharedReadResponse(record_bytes=rb, codec=store.manifest.codec, resident_unsupported=True)
        dest = self.regions.view(request.region.name, request.region.tag, request.offset, ids.size * rb,
                                 open_new=peer is None, peer=peer).reshape(ids.size, rb)
        present = store.read_resident(request.batch.layer, prec, ids, dest)
        if present is None:
            return store_pb2.SharedReadResponse(record_bytes=rb, codec="dense", resident_unsupported=True)
        read = int(np.count_nonzero(present))
        self.metrics.records.labels(request.batch.model).inc(read)
        self.metrics.bytes.labels(request.batch.model, "resident").inc(read * rb)
        crcs = [] if store.verify else store.crc_table(request.batch.layer, prec)[ids].tolist()
        return store_pb2.SharedReadResponse(record_bytes=rb, codec="dense", nbytes=ids.size * rb, verified=store.verify,
                                            absent=np.flatnonzero(~present).tolist(), crc32c=crcs)

    def _socket_request(self, request: store_pb2.SocketRequest, fds: list[int], peer: Peer
                        ) -> tuple[store_pb2.SocketResponse, list[int]]:
        kind = request.WhichOneof("kind")
        if kind == "read":
            with self.metrics.rpc.observe("ReadNeuronsShared"):
                return store_pb2.SocketResponse(read=self.read_shared(request.read, peer)), []
        if kind == "record_file":
            with self.metrics.rpc.observe("RecordFile"):
                resp, out_fds = self.record_file(request.record_file, peer)
                return store_pb2.SocketResponse(record_file=resp), out_fds
        if kind == "register":
            with self.metrics.rpc.observe("RegisterRegion"):
                return store_pb2.SocketResponse(registered=self.register_region(request.register, fds, peer)), []
        raise InvalidArgument("an empty shared-memory socket request")

    def register_region(self, request: store_pb2.RegisterRegion, fds: list[int], peer: Peer
                        ) -> store_pb2.RegionRegistered:
        """Map the caller's memfd region (its descriptor passed with the request) for this
        connection alone, until it closes."""
        if not hmac.compare_digest(request.token, self._socket_server.token):
            raise FailedPrecondition("RegisterRegion needs the token SharedSocket gives (over gRPC)")
        if len(fds) != 1:
            raise InvalidArgument(f"RegisterRegion carries the region's descriptor, and only it ({len(fds)} came)")
        name = self.regions.register_fd(fds[0], request.tag, request.capacity, peer)
        return store_pb2.RegionRegistered(region=store_pb2.SharedRegion(name=name, tag=request.tag),
                                          capacity=self.regions.capacity(name))

    def _peer_closed(self, peer: Peer) -> None:
        dropped = self.regions.release_peer(peer)
        if dropped:
            log.info("shared-memory peer %d gone: unmapped its %d region(s)", peer.pid, dropped)

    def record_file(self, request: store_pb2.RecordFileRequest, peer: Peer
                    ) -> tuple[store_pb2.RecordFileResponse, list[int]]:
        """Short-circuit reads: where a layer's records of one precision lie, their CRCs, and
        (``want_fd``) the records file's descriptor, for a caller with a region registered
        (on this connection, or a named one over gRPC): the proof that it is on this host."""
        store = self.catalog.get(request.model)
        if not self.config.share_record_files:
            raise FailedPrecondition("this store shares no records file (share_record_files is off)")
        if store.manifest.codec != "dense":
            raise FailedPrecondition(f"model {request.model}'s records are {store.manifest.codec}-coded: "
                                     "the store reads them (and callers get them dense)")
        if store.records.direct_fd is not None:
            raise FailedPrecondition("this store reads with O_DIRECT: its records bypass the page cache")
        self.regions.view(request.region.name, request.region.tag, 0, 0, open_new=False, peer=peer)
        prec = Precision.parse(request.precision)
        store.check_layer(request.layer)
        seg_offset, _nbytes = store.segment(request.layer, prec)
        crcs = store.crc_table(request.layer, prec).astype("<u4", copy=False)
        resp = store_pb2.RecordFileResponse(segment_offset=seg_offset, record_bytes=store.layout.num_bytes(prec),
                                            crc32c=crcs.tobytes(), file_bytes=store.manifest.records_file_bytes,
                                            fd_attached=request.want_fd)
        return resp, [store.records.fd] if request.want_fd else []

    def ReleaseRegion(self, request, context):
        with self.metrics.rpc.observe("ReleaseRegion"):
            self.regions.release(request.name)
            return store_pb2.ReleaseRegionResponse()

    def _socket(self) -> SocketServer | None:
        """The Unix socket for same-host callers, made at the first SharedSocket or OpenShared."""
        with self._socket_lock:
            if self._socket_server is None and self.config.shared_socket and not self._socket_tried:
                self._socket_tried = True
                try:
                    self._socket_server = SocketServer(self.config.shared_memory_dir, self._socket_request,
                                                       on_close=self._peer_closed)
                except OSError as err:
                    log.warning("no shared-memory socket in %s (%s): shared reads go over gRPC",
                                self.config.shared_memory_dir, err)
            return self._socket_server

    def close(self) -> None:
        if self._socket_server is not None:
            self._socket_server.close()

    def FetchDense(self, request, context):
        """Named dense tensors (all of them when ``names`` is empty), up to the payload limit."""
        with self.metrics.rpc.observe("FetchDense"):
            store = self.catalog.get(request.model)
            names = list(request.names) or store.dense_names()
            total = sum(_dense_nbytes(store, n) for n in names)
            if total > self.config.max_payload_bytes:
                raise ResourceExhausted(f"{len(names)} dense tensors total {total} B, over the "
                                        f"{self.config.max_payload_bytes}-byte limit; use StreamDense")
            blobs = []
            for name in names:
                data = store.get_dense_bytes(name)
                meta = store.manifest.dense[name]
                blobs.append(common_pb2.TensorBlob(name=name, data=data, shape=meta["shape"], dtype=meta["dtype"],
                                                   crc32=meta["crc32"]))
            self.metrics.bytes.labels(request.model, "dense").inc(total)
            return common_pb2.DenseBatch(tensors=blobs)

    def StreamDense(self, request, context):
        """Dense tensors of any size in chunks of at most ``stream_chunk_bytes``."""
        with self.metrics.rpc.observe("StreamDense"):
            store = self.catalog.get(request.model)
            names = list(request.names) or store.dense_names()
            for name in names:
                _dense_nbytes(store, name)  # unknown names fail before anything is sent
            for name in names:
                meta, total = store.manifest.dense[name], _dense_nbytes(store, name)
                for offset, data in store.iter_dense(name, self.config.stream_chunk_bytes):
                    self.metrics.bytes.labels(request.model, "dense").inc(len(data))
                    yield common_pb2.TensorChunk(name=name, offset=offset, data=data, shape=meta["shape"],
                                                 dtype=meta["dtype"], crc32=meta["crc32"], total_bytes=total)

    def FetchFile(self, request, context):
        with self.metrics.rpc.observe("FetchFile"):
            store = self.catalog.get(request.model)
            return common_pb2.FileBlob(filename=request.filename, data=store.get_file(request.filename))


def _dense_nbytes(store, name: str) -> int:
    meta = store.manifest.dense.get(name)
    if meta is None:
        raise InvalidArgument(f"no dense tensor {name!r} in model {store.path.name!r}")
    num = 1
    for dim in meta["shape"]:
        num *= dim
    return num * DTYPES[meta["dtype"]].itemsize


def create_server(config: StoreConfig, registry: CollectorRegistry | None = None
                  ) -> tuple[grpc.Server, int, StoreCatalog]:
    """A NeuronStore server bound to ``config.address`` (not started)."""
    catalog = StoreCatalog(config.root, verify=config.verify, io_threads=config.io_threads,
                           direct_io=config.direct_io)
    registry = registry or CollectorRegistry()
    servicer = NeuronStoreServicer(config, catalog, StoreMetrics(registry))
    server, port, _health = grpc_util.create_server(
        config.address, [(store_pb2_grpc.add_NeuronStoreServicer_to_server, servicer)], [SERVICE_NAME],
        max_workers=config.max_workers)
    catalog.on_close(servicer.close)
    log.info("NeuronStore for %s on port %d", config.root, port)
    return server, port, catalog


def serve(config: StoreConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain for ``grace_s`` and close the stores."""
    registry = CollectorRegistry()
    server, port, catalog = create_server(config, registry)
    start_metrics_server(config.metrics_port, registry)
    grpc_util.serve_until_signal(server, config.grace_s, on_stop=catalog.close)
