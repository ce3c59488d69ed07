"""NeuronStore gRPC service on a root of real converted stores (tiny random
checkpoints and both real models), over a real loopback server."""
from __future__ import annotations

import json
import zlib

import grpc
import numpy as np
import pytest

from conftest import STORE_SOURCES
from m2cache.codec.checksum import crc32c
from m2cache.codec.format import Precision
from m2cache_client.pb import common_pb2
from tiers import DEADLINE_S, health, status_of

MODELS = sorted(STORE_SOURCES)


def fetch(stub, model, layer, ids=(), prec=Precision.FULL, all_neurons=False):
    req = common_pb2.NeuronBatchRequest(model=model, layer=layer, neuron_ids=list(ids), precision=int(prec),
                                        all_neurons=all_neurons)
    return stub.FetchNeurons(req, timeout=DEADLINE_S)


def test_lists_every_store_under_the_root(store_service):
    resp = store_service.stub.ListModels(common_pb2.ListModelsRequest(), timeout=DEADLINE_S)
    assert list(resp.models) == MODELS


@pytest.mark.parametrize("model", MODELS)
def test_manifest_is_the_stores(store_service, model):
    resp = store_service.stub.GetManifest(common_pb2.ManifestRequest(model=model), timeout=DEADLINE_S)
    local = store_service.catalog.get(model).manifest
    got = json.loads(resp.manifest_json)
    assert got["num_layers"] == local.num_layers and got["d_ffn"] == local.d_ffn
    assert got["record_bytes"] == local.record_bytes()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("prec", list(Precision))
def test_batched_fetch_matches_the_store_byte_for_byte(store_service, model, prec):
    store = store_service.catalog.get(model)
    rng = np.random.default_rng(1)
    for layer in range(store.manifest.num_layers):
        ids = rng.choice(store.manifest.d_ffn, size=min(37, store.manifest.d_ffn), replace=False).tolist()
        ids.append(ids[0])  # duplicates are served as asked
        batch = fetch(store_service.stub, model, layer, ids, prec)
        size = store.layout.num_bytes(prec)
        assert batch.record_bytes == size and list(batch.neuron_ids) == ids
        assert batch.payload == store.get_neurons(layer, ids, prec)
        table = store.crc_table(layer, prec)
        for i, nid in enumerate(ids):
            rec = batch.payload[i * size : (i + 1) * size]
            assert batch.crc32c[i] == table[nid] == crc32c(rec)


def test_whole_layer_fetch(store_service):
    store = store_service.catalog.get("stories260k")
    batch = fetch(store_service.stub, "stories260k", 4, prec=Precision.INT4, all_neurons=True)
    assert list(batch.neuron_ids) == list(range(store.manifest.d_ffn))
    assert batch.payload == store.get_layer(4, Precision.INT4)


def test_dense_and_files_match_the_store(store_service):
    store = store_service.catalog.get("tiny-opt")
    resp = store_service.stub.FetchDense(common_pb2.DenseRequest(model="tiny-opt"), timeout=DEADLINE_S)
    assert [t.name for t in resp.tensors] == store.dense_names()
    for blob in resp.tensors:
        assert blob.data == store.get_dense_bytes(blob.name) and zlib.crc32(blob.data) == blob.crc32
        assert list(blob.shape) == store.manifest.dense[blob.name]["shape"]
    name = next(iter(store_service.catalog.get("stories260k").manifest.files))
    blob = store_service.stub.FetchFile(common_pb2.FileRequest(model="stories260k", filename=name),
                                        timeout=DEADLINE_S)
    assert blob.data == store_service.catalog.get("stories260k").get_file(name)


BAD_REQUESTS = {
    "unknown model": (dict(model="nope", layer=0, neuron_ids=[0], precision=1), grpc.StatusCode.NOT_FOUND, "nope"),
    "bad model name": (dict(model="../x", layer=0, neuron_ids=[0], precision=1), grpc.StatusCode.INVALID_ARGUMENT,
                       "model name"),
    "layer": (dict(model="tiny-llama", layer=3, neuron_ids=[0], precision=1), grpc.StatusCode.INVALID_ARGUMENT,
              "layer 3"),
    "neuron": (dict(model="tiny-llama", layer=0, neuron_ids=[0, 96], precision=1),
               grpc.StatusCode.INVALID_ARGUMENT, "neuron id 96"),
    "unset precision": (dict(model="tiny-llama", layer=0, neuron_ids=[0]), grpc.StatusCode.INVALID_ARGUMENT,
                        "precision"),
    "unknown precision": (dict(model="tiny-llama", layer=0, neuron_ids=[0], precision=7),
                          grpc.StatusCode.INVALID_ARGUMENT, "precision"),
    "oversized batch": (dict(model="tiny-llama", layer=0, neuron_ids=[1] * 1001, precision=1),
                        grpc.StatusCode.RESOURCE_EXHAUSTED, "1001"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_status_with_a_message(store_service, case):
    fields, code, needle = BAD_REQUESTS[case]
    req = common_pb2.NeuronBatchRequest(**fields)
    got_code, details = status_of(lambda: store_service.stub.FetchNeurons(req, timeout=DEADLINE_S))
    assert got_code == code and needle in details
    assert fetch(store_service.stub, "tiny-llama", 0, [0]).record_bytes > 0  # server unharmed


def test_unknown_dense_name_and_file(store_service):
    code, _ = status_of(lambda: store_service.stub.FetchDense(
        common_pb2.DenseRequest(model="tiny-llama", names=["nope"]), timeout=DEADLINE_S))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = status_of(lambda: store_service.stub.FetchFile(
        common_pb2.FileRequest(model="tiny-llama", filename="nope"), timeout=DEADLINE_S))
    assert code == grpc.StatusCode.NOT_FOUND


def test_health_serving(store_service):
    assert health(store_service.target, "m2cache.v1.NeuronStore") == "SERVING"
    assert health(store_service.target, "") == "SERVING"
