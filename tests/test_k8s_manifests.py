"""deploy/k8s: each overlay renders with `kubectl kustomize`, every object validates
strictly against the Kubernetes OpenAPI schemas (kubernetes-validate, offline), and the
deployment's properties hold: GPUs only in gpu-pool, hardened non-root pods, probes and
resources everywhere, selectors that select something, TLS on by default (every
service mounts its own certificate Secret, probes go through mTLS)."""
from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu-dev", "gpu-pool")
# Oldest supported (grpc probes GA in 1.27, CronJob/PDB v1 long before) and a recent one.
K8S_VERSIONS = ("1.29", "1.34")
GPU = "nvidia.com/gpu"
WORKLOADS = ("Deployment", "StatefulSet", "Job", "CronJob")
LONG_RUNNING = ("Deployment", "StatefulSet")
NAMESPACE = "m2cache"


@pytest.fixture(scope="session")
def kubectl() -> str:
    # Installs kubectl when the machine has none; a failure here fails the tests.
    out = subprocess.run([str(REPO / "scripts" / "ensure_kubectl.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def rendered(kubectl) -> dict[str, list[dict]]:
    docs = {}
    for overlay in OVERLAYS:
        out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                             check=True, capture_output=True, text=True)
        docs[overlay] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return docs


def pod_spec(obj: dict) -> dict | None:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] in WORKLOADS:
        return obj["spec"]["template"]["spec"]
    return None


def pod_labels(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    return obj["spec"]["template"]["metadata"]["labels"]


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj) or {}
    return list(spec.get("initContainers", [])) + list(spec["containers"]) if spec else []


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_strictly(rendered, overlay, version):
    kinds = set()
    for obj in rendered[overlay]:
        kubernetes_validate.validate(obj, version, strict=True)
        kinds.add(obj["kind"])
    assert {"StatefulSet", "Deployment", "Job", "Service", "ConfigMap", "PodDisruptionBudget",
            "NetworkPolicy", "Namespace", "PersistentVolumeClaim"} <= kinds


def test_strict_validation_rejects_an_unknown_field(rendered):
    # The check above is only worth something if strict mode catches a misplaced field.
    worker = copy.deepcopy(find(rendered["gpu-pool"], "Deployment", "m2cache-worker"))
    worker["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSIONS[-1], strict=True)


def test_gpus_only_in_gpu_pool(rendered):
    for obj in rendered["cpu-dev"]:
        assert GPU not in yaml.safe_dump(obj), f"cpu-dev {obj['kind']}/{obj['metadata']['name']} mentions {GPU}"
    gpu_docs = rendered["gpu-pool"]
    for obj in gpu_docs:
        for c in containers(obj):
            wants_gpu = obj["metadata"]["name"] == "m2cache-worker"
            for field in ("requests", "limits"):
                assert (GPU in c["resources"].get(field, {})) == wants_gpu, (obj["metadata"]["name"], c["name"], field)
    worker = find(gpu_docs, "Deployment", "m2cache-worker")
    spec = pod_spec(worker)
    assert spec["containers"][0]["resources"]["limits"][GPU] == "1"
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert any(e["key"] == "nvidia.com/gpu.present" for t in terms for e in t["matchExpressions"])
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert "replicas" not in worker["spec"], "gpu-pool leaves the worker replica count to the idle-GPU scaler"
    config = find(gpu_docs, "ConfigMap", "m2cache-config")
    assert config["data"]["M2CACHE_WORKER_DEVICE"] == "cuda"
    assert find(rendered["cpu-dev"], "ConfigMap", "m2cache-config")["data"]["M2CACHE_WORKER_DEVICE"] == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_hardened_non_root(rendered, overlay):
    workloads = [o for o in rendered[overlay] if o["kind"] in WORKLOADS]
    assert len(workloads) >= 7
    for obj in workloads:
        where = f"{overlay} {obj['kind']}/{obj['metadata']['name']}"
        psc = pod_spec(obj)["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in containers(obj):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert not sc.get("privileged"), (where, c["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_resources_and_services_have_probes(rendered, overlay):
    for obj in rendered[overlay]:
        for c in containers(obj):
            where = f"{overlay} {obj['metadata']['name']}/{c['name']}"
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]), where
            assert "memory" in res["limits"], where
        if obj["kind"] not in LONG_RUNNING:
            continue  # Jobs and init containers run to completion: nothing to probe
        for c in pod_spec(obj)["containers"]:
            where = f"{overlay} {obj['metadata']['name']}/{c['name']}"
            assert "readinessProbe" in c and "livenessProbe" in c, where
            grpc_ports = [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"]
            for port in grpc_ports:  # every gRPC service is probed through grpc.health.v1, over mTLS
                for probe in ("readinessProbe", "livenessProbe"):  # (the kubelet's grpc probe has no TLS)
                    cmd = c[probe]["exec"]["command"]
                    assert cmd[:4] == ["python", "-m", "m2cache.commands.health", f"127.0.0.1:{port}"], where
                    assert c[probe]["timeoutSeconds"] >= 5, where  # a Python start-up, not 1 s


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_select_pods(rendered, overlay):
    docs = rendered[overlay]
    pod_label_sets = [pod_labels(o) for o in docs if o["kind"] in WORKLOADS]

    def selects(selector: dict) -> bool:
        return any(all(labels.get(k) == v for k, v in selector.items()) for labels in pod_label_sets)

    for obj in docs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Service":
            assert selects(obj["spec"]["selector"]), name
        elif obj["kind"] == "PodDisruptionBudget":
            assert selects(obj["spec"]["selector"]["matchLabels"]), name
        elif obj["kind"] == "NetworkPolicy":
            sel = obj["spec"]["podSelector"].get("matchLabels")
            assert sel is None or selects(sel), name
            for rule in obj["spec"].get("ingress", []):
                for peer in rule.get("from", []):
                    if "podSelector" in peer:
                        assert selects(peer["podSelector"]["matchLabels"]), name
        elif obj["kind"] in ("Deployment", "StatefulSet"):
            match = obj["spec"]["selector"]["matchLabels"]
            assert all(pod_labels(obj).get(k) == v for k, v in match.items()), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_topology(rendered, overlay):
    docs = rendered[overlay]
    for obj in docs:
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]
    store = find(docs, "StatefulSet", "m2cache-store")
    (claim,) = store["spec"]["volumeClaimTemplates"]
    mounts = {m["name"] for m in pod_spec(store)["containers"][0]["volumeMounts"]}
    assert claim["metadata"]["name"] in mounts
    # The convert Job writes the PVC the StatefulSet controller creates for replica 0.
    job = find(docs, "Job", "m2cache-convert")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v}
    assert f"{claim['metadata']['name']}-{store['metadata']['name']}-0" in claims
    assert find(docs, "PersistentVolumeClaim", "m2cache-hf-model")["metadata"]["name"] in claims
    worker_svc = find(docs, "Service", "m2cache-worker")
    assert worker_svc["spec"]["clusterIP"] == "None"
    config = find(docs, "ConfigMap", "m2cache-config")
    assert config["data"]["M2CACHE_GATEWAY_WORKERS"] == "dns:///m2cache-worker:50064"
    for obj in docs:
        for c in containers(obj):
            for src in c.get("envFrom", []):
                find(docs, "ConfigMap", src["configMapRef"]["name"])
    ns = find(docs, "Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {p["metadata"]["name"] for p in docs if p["kind"] == "PodDisruptionBudget"} >= {"m2cache-worker"}
    deny = find(docs, "NetworkPolicy", "m2cache-default-deny-ingress")
    assert deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]


def test_gpu_pool_scaler_has_only_the_rights_it_needs(rendered):
    docs = rendered["gpu-pool"]
    cron = find(docs, "CronJob", "m2cache-scale-to-idle-gpus")
    args = pod_spec(cron)["containers"][0]["args"]
    assert args[:2] == ["k8s", "scale-to-idle-gpus"]
    assert args[args.index("--deployment") + 1] == "m2cache-worker"
    cluster_rules = find(docs, "ClusterRole", "m2cache-gpu-scaler")["rules"]
    assert all(set(r["verbs"]) == {"list"} for r in cluster_rules)
    (rule,) = find(docs, "Role", "m2cache-gpu-scaler")["rules"]
    assert rule["resources"] == ["deployments/scale"] and rule["resourceNames"] == ["m2cache-worker"]
    assert not any(o["kind"] == "CronJob" for o in rendered["cpu-dev"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tls_by_default_with_certificates_from_secrets(rendered, overlay):
    docs = rendered[overlay]
    config = find(docs, "ConfigMap", "m2cache-config")["data"]
    services = {"m2cache-store": "STORE", "m2cache-dram": "DRAM", "m2cache-ranker": "RANKER",
                "m2cache-worker": "WORKER", "m2cache-gateway": "GATEWAY"}
    for name, prefix in services.items():
        obj = next(d for d in docs if d["kind"] in LONG_RUNNING and d["metadata"]["name"] == name)
        spec = pod_spec(obj)
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        assert secrets["tls"] == f"m2cache-tls-{name.split('-', 1)[1]}", name  # its own certificate
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "tls"]
        assert mount["readOnly"] is True
        for field, file in (("TLS_CERT", "tls.crt"), ("TLS_KEY", "tls.key"), ("TLS_CA", "ca.crt")):
            assert config[f"M2CACHE_{prefix}_{field}"] == f"{mount['mountPath']}/{file}", (name, field)
        assert spec["securityContext"]["fsGroup"] == 10001, name  # 0440 secret files readable
    for name in ("m2cache-worker", "m2cache-gateway"):  # bearer tokens / API keys
        spec = pod_spec(find(docs, "Deployment", name))
        assert "m2cache-api-keys" in {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert config["M2CACHE_WORKER_API_KEYS_FILE"] == config["M2CACHE_GATEWAY_API_KEYS_FILE"]
    assert config["M2CACHE_GATEWAY_TOKEN_FILE"] == config["M2CACHE_WORKER_API_KEYS_FILE"]
    gateway = pod_spec(find(docs, "Deployment", "m2cache-gateway"))["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert set(config["M2CACHE_GATEWAY_TIERS"].split(",")) == {"dram=m2cache-dram:50062", "store=m2cache-store:50061"}


def test_m2cache_certs_writes_the_secrets_the_manifests_mount(rendered, tmp_path):
    from m2cache.commands import certs

    ca, pairs, keys = certs.make(tmp_path / "tls", namespace=NAMESPACE)
    made = [d for d in yaml.safe_load_all(certs.k8s_secrets(ca, pairs, keys, NAMESPACE)) if d]
    for doc in made:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    names = {d["metadata"]["name"] for d in made}
    for overlay in OVERLAYS:
        for obj in rendered[overlay]:
            for v in (pod_spec(obj) or {}).get("volumes", []):
                if "secret" in v:
                    assert v["secret"]["secretName"] in names, (overlay, obj["metadata"]["name"], v)
    # the worker's certificate answers for the headless Service name the gateway dials
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pairs["worker"].cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert {"m2cache-worker", "m2cache-worker.m2cache.svc.cluster.local", "worker", "worker-cpu"} <= set(sans)
