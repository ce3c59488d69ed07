"""How many decode workers fit on the cluster's idle GPUs.

Pure domain code over Kubernetes API JSON (the dicts ``GET /api/v1/nodes`` and
``GET /api/v1/pods`` return, camelCase keys); it imports no kubernetes client,
so tests and the ``m2cache k8s`` command feed it the same shapes.

A GPU counts as idle when it is allocatable on a usable node (schedulable,
Ready, no NoSchedule/NoExecute taint the workers do not tolerate) and no
unfinished pod other than our own workers requests it. Our own workers' GPUs
count as available to us, so the target is what the workers could hold if the
Deployment were scaled, packed per node (a worker cannot span nodes).
"""
from __future__ import annotations

from dataclasses import dataclass

from m2cache.errors import InvalidArgument

GPU_RESOURCE = "nvidia.com/gpu"
# Taints the worker pods tolerate (deploy/k8s gpu-pool overlay tolerates nvidia.com/gpu).
DEFAULT_TOLERATED_TAINTS = (GPU_RESOURCE,)
FINISHED_PHASES = ("Succeeded", "Failed")
BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")


@dataclass(frozen=True, slots=True)
class NodeGpus:
    """GPU accounting of one usable node."""

    name: str
    num_allocatable: int
    num_used_by_others: int
    num_used_by_workers: int

    @property
    def num_idle(self) -> int:
        return max(0, self.num_allocatable - self.num_used_by_others - self.num_used_by_workers)

    def num_workers_fit(self, gpus_per_worker: int) -> int:
        """Workers this node could hold: its GPUs not held by other pods, whole workers only."""
        return max(0, self.num_allocatable - self.num_used_by_others) // gpus_per_worker


@dataclass(frozen=True, slots=True)
class ScalePlan:
    current_replicas: int
    target_replicas: int
    gpus_per_worker: int
    nodes: tuple[NodeGpus, ...]
    skipped_nodes: tuple[str, ...]  # nodes with GPUs that are not usable (cordoned, NotReady, tainted)

    @property
    def changes(self) -> bool:
        return self.target_replicas != self.current_replicas

    def describe(self) -> str:
        lines = [f"{'node':<32} {'alloc':>5} {'others':>6} {'workers':>7} {'idle':>4} {'fit':>3}"]
        for n in self.nodes:
            lines.append(
                f"{n.name:<32} {n.num_allocatable:>5} {n.num_used_by_others:>6} "
                f"{n.num_used_by_workers:>7} {n.num_idle:>4} {n.num_workers_fit(self.gpus_per_worker):>3}"
            )
        for name in self.skipped_nodes:
            lines.append(f"{name:<32} (not usable: cordoned, not Ready or tainted)")
        lines.append(f"replicas: {self.current_replicas} -> {self.target_replicas} ({self.gpus_per_worker} GPU(s) per worker)")
        return "\n".join(lines)


def parse_count(quantity: object, what: str) -> int:
    """An extended-resource quantity ("2", 2); Kubernetes only allows whole numbers for them."""
    text = str(quantity).strip()
    if not text.isdigit():
        raise InvalidArgument(f"{what}: expected a whole number of GPUs, got {quantity!r}")
    return int(text)


def parse_selector(selector: str) -> dict[str, str]:
    """Equality-based label selector string ("app=a,tier=b", as a Scale's status.selector
    gives for matchLabels) -> dict. Set-based expressions are rejected."""
    labels: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, sep, value = term.partition("=")
        if not sep or key.endswith("!") or " " in key.strip():
            raise InvalidArgument(f"unsupported label selector term {term!r}: only key=value is supported")
        labels[key.strip()] = value.lstrip("=").strip()
    return labels


def node_gpus(node: dict, resource: str = GPU_RESOURCE) -> int:
    value = node.get("status", {}).get("allocatable", {}).get(resource)
    return 0 if value is None else parse_count(value, f"node {node['metadata']['name']} allocatable {resource}")


def node_usable(node: dict, tolerated_taints: tuple[str, ...] = DEFAULT_TOLERATED_TAINTS) -> bool:
    """Schedulable (not cordoned), Ready, and no blocking taint outside ``tolerated_taints``."""
    spec = node.get("spec", {})
    if spec.get("unschedulable"):
        return False
    conditions = node.get("status", {}).get("conditions") or []
    if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
        return False
    return all(
        t.get("key") in tolerated_taints for t in spec.get("taints") or [] if t.get("effect") in BLOCKING_EFFECTS
    )


def _container_gpus(container: dict, resource: str) -> int:
    # Extended resources: requests default to limits and must equal them when both are set.
    resources = container.get("resources") or {}
    value = (resources.get("requests") or {}).get(resource, (resources.get("limits") or {}).get(resource))
    return 0 if value is None else parse_count(value, f"container {container.get('name')} {resource}")


def pod_gpus(pod: dict, resource: str = GPU_RESOURCE) -> int:
    """Effective GPU request of a pod, as the scheduler counts it: the larger of
    (app containers + sidecars) and any single init container (+ sidecars started before it)."""
    spec = pod.get("spec", {})
    app = sum(_container_gpus(c, resource) for c in spec.get("containers") or [])
    sidecars = 0
    init_peak = 0
    for c in spec.get("initContainers") or []:
        gpus = _container_gpus(c, resource)
        if c.get("restartPolicy") == "Always":  # native sidecar: keeps running beside the app
            sidecars += gpus
        else:
            init_peak = max(init_peak, sidecars + gpus)
    return max(app + sidecars, init_peak)


def _matches(labels: dict[str, str] | None, selector: dict[str, str]) -> bool:
    labels = labels or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def plan_scale(
    nodes: list[dict],
    pods: list[dict],
    *,
    namespace: str,
    worker_selector: dict[str, str],
    current_replicas: int,
    gpus_per_worker: int = 1,
    min_replicas: int = 0,
    max_replicas: int | None = None,
    resource: str = GPU_RESOURCE,
    tolerated_taints: tuple[str, ...] = DEFAULT_TOLERATED_TAINTS,
) -> ScalePlan:
    """Replica count that fills the usable nodes' GPUs not held by other pods."""
    if gpus_per_worker < 1:
        raise InvalidArgument("gpus_per_worker must be >= 1")
    if not worker_selector:
        raise InvalidArgument("worker_selector is empty: it would match every pod")
    used_by_others: dict[str, int] = {}
    used_by_workers: dict[str, int] = {}
    for pod in pods:
        node_name = pod.get("spec", {}).get("nodeName")
        if not node_name or pod.get("status", {}).get("phase") in FINISHED_PHASES:
            continue  # unscheduled pods hold no GPU yet; finished ones released theirs
        meta = pod.get("metadata", {})
        ours = meta.get("namespace") == namespace and _matches(meta.get("labels"), worker_selector)
        bucket = used_by_workers if ours else used_by_others
        bucket[node_name] = bucket.get(node_name, 0) + pod_gpus(pod, resource)
    usable: list[NodeGpus] = []
    skipped: list[str] = []
    for node in nodes:
        name = node["metadata"]["name"]
        num_gpus = node_gpus(node, resource)
        if num_gpus == 0:
            continue
        if not node_usable(node, tolerated_taints):
            skipped.append(name)
            continue
        usable.append(NodeGpus(name, num_gpus, used_by_others.get(name, 0), used_by_workers.get(name, 0)))
    target = sum(n.num_workers_fit(gpus_per_worker) for n in usable)
    target = max(min_replicas, target if max_replicas is None else min(target, max_replicas))
    return ScalePlan(current_replicas, target, gpus_per_worker, tuple(usable), tuple(skipped))
