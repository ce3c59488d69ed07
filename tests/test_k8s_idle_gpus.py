"""`m2cache k8s scale-to-idle-gpus` against a local HTTP server that answers like the
Kubernetes API (NodeList, paginated PodList, Scale) and records the PATCH it receives;
plus the pure accounting in m2cache.k8s.idle_gpus."""
from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from m2cache.commands import k8s as k8s_command
from m2cache.errors import InvalidArgument
from m2cache.k8s.idle_gpus import node_usable, parse_count, parse_selector, plan_scale, pod_gpus

NS = "m2cache"
DEPLOYMENT = "m2cache-worker"
SELECTOR = {"app.kubernetes.io/name": "m2cache-worker"}
GPU = "nvidia.com/gpu"


def node(name, gpus, *, ready=True, unschedulable=False, taints=()):
    alloc = {"cpu": "64", "memory": "512Gi", "pods": "110"}
    if gpus is not None:
        alloc[GPU] = str(gpus)
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"unschedulable": unschedulable, "taints": [dict(t) for t in taints]} if unschedulable or taints else {},
        "status": {
            "allocatable": alloc,
            "capacity": dict(alloc),
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": "True" if ready else "Unknown"},
            ],
        },
    }


def pod(name, node_name, gpus, *, namespace="research", labels=None, phase="Running", init_gpus=None):
    def container(cname, n):
        res = {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}}
        if n:
            res["limits"][GPU] = str(n)  # extended resources: requests default to limits
        return {"name": cname, "image": "x", "resources": res}

    spec = {"containers": [container("main", gpus)]}
    if node_name:
        spec["nodeName"] = node_name
    if init_gpus is not None:
        spec["initContainers"] = [container("init", init_gpus)]
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
        "spec": spec,
        "status": {"phase": phase},
    }


def worker_pod(name, node_name, namespace=NS):
    return pod(name, node_name, 1, namespace=namespace, labels=dict(SELECTOR, **{"pod-template-hash": "abc"}))


NODES = [
    node("gpu-a", 4),
    node("gpu-b", 8, taints=[{"key": GPU, "value": "present", "effect": "NoSchedule"}]),
    node("gpu-c", 8, unschedulable=True),                      # cordoned
    node("gpu-d", 2, ready=False),                             # NotReady
    node("gpu-e", 4, taints=[{"key": "dedicated", "value": "batch", "effect": "NoSchedule"}]),
    node("cpu-f", None),
]
PODS = [
    pod("train-1", "gpu-a", 2),
    worker_pod("m2cache-worker-1", "gpu-a"),
    pod("old-job", "gpu-a", 4, phase="Succeeded"),
    pod("starting", "gpu-b", 3, phase="Pending"),               # bound, not finished: holds its GPUs
    worker_pod("m2cache-worker-2", "gpu-b"),
    worker_pod("lookalike", "gpu-b", namespace="other"),      # same labels, other namespace: not ours
    pod("unscheduled", None, 8, phase="Pending"),               # holds nothing yet
    pod("crashed", "gpu-b", 1, phase="Failed"),
]
# gpu-a: 4 - 2 (train-1) = 2 workers; gpu-b: 8 - 3 (starting) - 1 (lookalike) = 4 workers.
EXPECTED_TARGET = 6


class FakeKubeAPI:
    """What the API server holds, and every request it received."""

    def __init__(self, nodes, pods, replicas):
        self.nodes, self.pods, self.replicas = nodes, pods, replicas
        self.requests: list[tuple[str, str, dict]] = []
        self.patches: list[tuple[str, str, dict]] = []

    def scale(self):
        return {
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {"name": DEPLOYMENT, "namespace": NS, "resourceVersion": "7"},
            "spec": {"replicas": self.replicas},
            "status": {"replicas": self.replicas, "selector": "app.kubernetes.io/name=m2cache-worker"},
        }

    def pod_page(self, query):
        # Two pages, to prove the client follows `continue`.
        half = len(self.pods) // 2
        if query.get("continue") == ["page-2"]:
            return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "9"}, "items": self.pods[half:]}
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "9", "continue": "page-2"},
                "items": self.pods[:half]}

    def handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urlparse(self.path)
                query = parse_qs(url.query)
                api.requests.append(("GET", url.path, query))
                if url.path == "/api/v1/nodes":
                    self.reply(200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": api.nodes})
                elif url.path == "/api/v1/pods":
                    self.reply(200, api.pod_page(query))
                elif url.path == f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}/scale":
                    self.reply(200, api.scale())
                else:
                    self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                     "code": 404, "message": f"{url.path} not found"})

            def do_PATCH(self):
                url = urlparse(self.path)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.patches.append((url.path, self.headers["Content-Type"], body))
                if url.path != f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}/scale":
                    return self.reply(404, {"kind": "Status", "apiVersion": "v1", "code": 404})
                api.replicas = body["spec"]["replicas"]
                self.reply(200, api.scale())

        return Handler


@pytest.fixture
def cluster(tmp_path):
    """Start a fake API server; yields (api, kubeconfig path)."""
    servers = []

    def start(nodes=NODES, pods=PODS, replicas=2):
        api = FakeKubeAPI(nodes, pods, replicas)
        server = ThreadingHTTPServer(("127.0.0.1", 0), api.handler())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        kubeconfig = tmp_path / f"kubeconfig-{len(servers)}"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }))
        return api, kubeconfig

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def run(kubeconfig, *extra) -> int:
    parser = argparse.ArgumentParser()
    k8s_command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["k8s", "scale-to-idle-gpus", "--namespace", NS, "--deployment", DEPLOYMENT,
                              "--kubeconfig", str(kubeconfig), *extra])
    return k8s_command.main(args)


def test_scales_the_worker_deployment_to_the_idle_gpus(cluster, capsys):
    api, kubeconfig = cluster(replicas=2)
    assert run(kubeconfig) == 0
    assert api.patches == [(f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}/scale",
                            "application/merge-patch+json", {"spec": {"replicas": EXPECTED_TARGET}})]
    pod_gets = [q for method, path, q in api.requests if path == "/api/v1/pods"]
    assert [q.get("continue") for q in pod_gets] == [None, ["page-2"]]
    assert pod_gets[0]["fieldSelector"] == ["status.phase!=Succeeded,status.phase!=Failed"]
    out = capsys.readouterr().out
    assert f"scaled deployment/{DEPLOYMENT} in namespace {NS} from 2 to {EXPECTED_TARGET}" in out
    assert "gpu-c" in out and "not usable" in out


def test_dry_run_prints_the_plan_and_patches_nothing(cluster, capsys):
    api, kubeconfig = cluster(replicas=2)
    assert run(kubeconfig, "--dry-run") == 0
    assert api.patches == []
    out = capsys.readouterr().out
    assert f"dry run: would scale deployment/{DEPLOYMENT} in namespace {NS} from 2 to {EXPECTED_TARGET}" in out
    assert f"replicas: 2 -> {EXPECTED_TARGET}" in out


def test_workers_needing_two_gpus_are_packed_per_node(cluster):
    # gpu-a: 2 free -> 1 worker; gpu-b: 4 free -> 2 workers (a worker cannot span nodes).
    api, kubeconfig = cluster(replicas=1)
    assert run(kubeconfig, "--gpus-per-worker", "2") == 0
    assert api.patches[-1][2] == {"spec": {"replicas": 3}}


def test_no_patch_when_already_at_target(cluster, capsys):
    api, kubeconfig = cluster(replicas=EXPECTED_TARGET)
    assert run(kubeconfig) == 0
    assert api.patches == []
    assert "nothing to do" in capsys.readouterr().out


def test_bounds_and_a_full_cluster(cluster):
    api, kubeconfig = cluster(replicas=2)
    assert run(kubeconfig, "--max-replicas", "4") == 0
    assert api.patches[-1][2] == {"spec": {"replicas": 4}}
    busy = [pod("hog-a", "gpu-a", 4), pod("hog-b", "gpu-b", 8)]
    api, kubeconfig = cluster(pods=busy, replicas=3)
    assert run(kubeconfig, "--min-replicas", "1") == 0
    assert api.patches[-1][2] == {"spec": {"replicas": 1}}


def test_unknown_deployment_is_an_error(cluster):
    from kubernetes.client.exceptions import ApiException

    api, kubeconfig = cluster()
    parser = argparse.ArgumentParser()
    k8s_command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["k8s", "scale-to-idle-gpus", "--deployment", "nope", "--kubeconfig", str(kubeconfig)])
    with pytest.raises(ApiException) as err:
        k8s_command.main(args)
    assert err.value.status == 404
    assert api.patches == []


# -- pure accounting ---------------------------------------------------------------------

def test_plan_counts_only_usable_nodes_and_foreign_pods():
    plan = plan_scale(NODES, PODS, namespace=NS, worker_selector=SELECTOR, current_replicas=2)
    by_name = {n.name: n for n in plan.nodes}
    assert set(by_name) == {"gpu-a", "gpu-b"}
    assert set(plan.skipped_nodes) == {"gpu-c", "gpu-d", "gpu-e"}
    assert (by_name["gpu-a"].num_used_by_others, by_name["gpu-a"].num_used_by_workers, by_name["gpu-a"].num_idle) == (2, 1, 1)
    assert (by_name["gpu-b"].num_used_by_others, by_name["gpu-b"].num_used_by_workers, by_name["gpu-b"].num_idle) == (4, 1, 3)
    assert plan.target_replicas == EXPECTED_TARGET and plan.changes
    tolerant = plan_scale(NODES, PODS, namespace=NS, worker_selector=SELECTOR, current_replicas=2,
                          tolerated_taints=(GPU, "dedicated"))
    assert tolerant.target_replicas == EXPECTED_TARGET + 4


def test_pod_gpus_follows_the_scheduler():
    assert pod_gpus(pod("p", "n", 2)) == 2
    assert pod_gpus(pod("p", "n", 1, init_gpus=3)) == 3       # init container peak wins
    assert pod_gpus(pod("p", "n", 2, init_gpus=1)) == 2
    sidecar = pod("p", "n", 1, init_gpus=1)
    sidecar["spec"]["initContainers"][0]["restartPolicy"] = "Always"
    assert pod_gpus(sidecar) == 2                              # a native sidecar runs beside the app
    requested = pod("p", "n", 0)
    requested["spec"]["containers"][0]["resources"] = {"requests": {GPU: "2"}, "limits": {GPU: "2"}}
    assert pod_gpus(requested) == 2


def test_parsing_rejects_what_it_cannot_count():
    assert parse_selector("a=b, c==d") == {"a": "b", "c": "d"}
    for bad in ("a!=b", "env in (x,y)", "!a", "a"):
        with pytest.raises(InvalidArgument):
            parse_selector(bad)
    assert parse_count("8", "x") == 8
    for bad in ("0.5", "1k", "-1"):
        with pytest.raises(InvalidArgument):
            parse_count(bad, "x")
    with pytest.raises(InvalidArgument):
        plan_scale(NODES, PODS, namespace=NS, worker_selector={}, current_replicas=0)
    assert not node_usable(node("n", 1, taints=[{"key": "x", "effect": "NoExecute"}]))
    assert node_usable(node("n", 1, taints=[{"key": "x", "effect": "PreferNoSchedule"}]))
