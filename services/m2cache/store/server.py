"""NeuronStore gRPC service: thin proto <-> domain layer over
:class:`StoreCatalog` (LMDB reads live in reader.py and catalog.py)."""
from __future__ import annotations

import logging

import grpc
from prometheus_client import CollectorRegistry, Counter

from m2cache import grpc_util
from m2cache.codec.format import DTYPES, POLICY_KEY, Precision
from m2cache.errors import InvalidArgument, ResourceExhausted
from m2cache.metrics import RpcMetrics, start_metrics_server
from m2cache.store.catalog import StoreCatalog, check_batch, read_records
from m2cache.store.config import StoreConfig
from m2cache_client.pb import common_pb2, store_pb2, store_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = store_pb2.DESCRIPTOR.services_by_name["NeuronStore"].full_name


class StoreMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.rpc = RpcMetrics("store", registry)
        self.records = Counter("m2cache_store_records", "neuron records served", ["model"], registry=registry)
        self.bytes = Counter("m2cache_store_bytes", "bytes served", ["model", "kind"], registry=registry)


class NeuronStoreServicer(store_pb2_grpc.NeuronStoreServicer):
    """Every converted model under the config's root, read-only."""

    def __init__(self, config: StoreConfig, catalog: StoreCatalog, metrics: StoreMetrics):
        self.config = config
        self.catalog = catalog
        self.metrics = metrics

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

    def FetchNeurons(self, request, context):
        """Records of many neurons of one layer at one precision, one payload,
        with the per-record crc32 recorded at conversion; bitmap stores send
        their records as stored (compressed) with per-record lengths."""
        with self.metrics.rpc.observe("FetchNeurons"):
            store = self.catalog.get(request.model)
            prec = Precision.parse(request.precision)
            store.check_layer(request.layer)
            ids = store.check_neurons(range(store.manifest.d_ffn) if request.all_neurons else request.neuron_ids)
            size = store.layout.num_bytes(prec)
            check_batch(ids.size, size, self.config.max_batch_ids, self.config.max_payload_bytes)
            payload, crcs, lengths = read_records(store, request.layer, prec, ids)
            self.metrics.records.labels(request.model).inc(ids.size)
            self.metrics.bytes.labels(request.model, "neurons").inc(len(payload))
            return common_pb2.NeuronBatch(model=request.model, layer=request.layer, precision=int(prec),
                                          neuron_ids=ids.tolist(), record_bytes=size, payload=payload,
                                          crc32=crcs.tolist(), codec=store.manifest.codec,
                                          record_lengths=lengths)

    def FetchDense(self, request, context):
        """Named dense tensors (all of them when ``names`` is empty)."""
        with self.metrics.rpc.observe("FetchDense"):
            store = self.catalog.get(request.model)
            names = list(request.names) or store.dense_names()
            total = sum(_dense_nbytes(store, n) for n in names)
            if total > self.config.max_payload_bytes:
                raise ResourceExhausted(f"{len(names)} dense tensors total {total} B, over the "
                                        f"{self.config.max_payload_bytes}-byte limit; request fewer names")
            blobs = []
            for name in names:
                data = store.get_dense_bytes(name)
                meta = store.manifest.dense[name]
                blobs.append(common_pb2.TensorBlob(name=name, data=data, shape=meta["shape"], dtype=meta["dtype"],
                                                   crc32=meta["crc32"]))
            self.metrics.bytes.labels(request.model, "dense").inc(total)
            return common_pb2.DenseBatch(tensors=blobs)

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
    catalog = StoreCatalog(config.root, verify=config.verify)
    registry = registry or CollectorRegistry()
    servicer = NeuronStoreServicer(config, catalog, StoreMetrics(registry))
    server, port, _health = grpc_util.create_server(
        config.address, [(store_pb2_grpc.add_NeuronStoreServicer_to_server, servicer)], [SERVICE_NAME],
        max_workers=config.max_workers)
    log.info("NeuronStore for %s on port %d", config.root, port)
    return server, port, catalog


def serve(config: StoreConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain for ``grace_s`` and close the stores."""
    registry = CollectorRegistry()
    server, port, catalog = create_server(config, registry)
    start_metrics_server(config.metrics_port, registry)
    grpc_util.serve_until_signal(server, config.grace_s, on_stop=catalog.close)
