"""``m2cache k8s ...``: operations on an m2cache deployment in Kubernetes.

``m2cache k8s scale-to-idle-gpus`` lists nodes and pods, works out how many
decode workers the idle GPUs hold (m2cache.k8s.idle_gpus, pure) and patches the
worker Deployment's scale subresource (``--dry-run``: print the plan only).
Needs the ``kubernetes`` Python client (requirements.txt)."""
from __future__ import annotations

import argparse
import logging

from m2cache.errors import FailedPrecondition, InvalidArgument
from m2cache.k8s.idle_gpus import GPU_RESOURCE, ScalePlan, parse_selector, plan_scale

log = logging.getLogger(__name__)

PAGE_SIZE = 500
REQUEST_TIMEOUT_S = 30.0
MERGE_PATCH = "application/merge-patch+json"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("k8s", help="operate an m2cache deployment in Kubernetes")
    sub = p.add_subparsers(dest="k8s_command", required=True)
    s = sub.add_parser(
        "scale-to-idle-gpus",
        help="scale the worker Deployment to the GPUs no other pod requests",
        description="Set the worker Deployment's replicas to the number of workers that fit on the "
        "usable nodes' GPUs not requested by other unfinished pods (packed per node).",
    )
    s.add_argument("--namespace", default="m2cache", help="namespace of the worker Deployment (default m2cache)")
    s.add_argument("--deployment", default="m2cache-worker", help="worker Deployment name (default m2cache-worker)")
    s.add_argument("--gpus-per-worker", type=int, default=1, help="GPUs each worker requests (default 1)")
    s.add_argument("--min-replicas", type=int, default=0, help="never scale below this (default 0)")
    s.add_argument("--max-replicas", type=int, default=None, help="never scale above this (default: no cap)")
    s.add_argument("--resource", default=GPU_RESOURCE, help=f"extended resource name (default {GPU_RESOURCE})")
    s.add_argument(
        "--tolerate-taint", action="append", default=None, metavar="KEY",
        help=f"taint key the workers tolerate (repeatable; default {GPU_RESOURCE})",
    )
    s.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    s.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    s.add_argument("--context", default=None, help="kubeconfig context (default: current)")
    s.set_defaults(_k8s_main=scale_to_idle_gpus)
    return p


def main(args: argparse.Namespace) -> int:
    return args._k8s_main(args)


def api_client(kubeconfig: str | None, context: str | None):
    """An ApiClient for the given kubeconfig, else the in-cluster service account,
    else the default kubeconfig. No global client configuration is touched."""
    from kubernetes import client, config

    if kubeconfig is None and context is None:
        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        except config.ConfigException:
            pass
    return config.new_client_from_config(config_file=kubeconfig, context=context, persist_config=False)


def _list_all(list_fn, serialize, **kwargs) -> list[dict]:
    """All items of a paginated list call, as API JSON dicts."""
    items: list[dict] = []
    token = None
    while True:
        page = list_fn(limit=PAGE_SIZE, _continue=token, _request_timeout=REQUEST_TIMEOUT_S, **kwargs)
        items.extend(serialize(item) for item in page.items or [])
        token = page.metadata._continue if page.metadata else None
        if not token:
            return items


def scale_to_idle_gpus(args: argparse.Namespace) -> int:
    try:
        from kubernetes import client
    except ImportError as err:
        raise FailedPrecondition("the kubernetes Python client is not installed (pip install kubernetes)") from err
    if args.gpus_per_worker < 1 or args.min_replicas < 0:
        raise InvalidArgument("--gpus-per-worker must be >= 1 and --min-replicas >= 0")
    with api_client(args.kubeconfig, args.context) as api:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        scale = apps.read_namespaced_deployment_scale(
            args.deployment, args.namespace, _request_timeout=REQUEST_TIMEOUT_S
        )
        selector = parse_selector((scale.status.selector if scale.status else None) or "")
        nodes = _list_all(core.list_node, api.sanitize_for_serialization)
        pods = _list_all(
            core.list_pod_for_all_namespaces,
            api.sanitize_for_serialization,
            field_selector="status.phase!=Succeeded,status.phase!=Failed",
        )
        plan = plan_scale(
            nodes,
            pods,
            namespace=args.namespace,
            worker_selector=selector,
            current_replicas=(scale.spec.replicas if scale.spec else None) or 0,
            gpus_per_worker=args.gpus_per_worker,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            resource=args.resource,
            tolerated_taints=tuple(args.tolerate_taint or (GPU_RESOURCE,)),
        )
        print(plan.describe())
        return _apply(apps, args, plan)


def _apply(apps, args: argparse.Namespace, plan: ScalePlan) -> int:
    target = f"deployment/{args.deployment} in namespace {args.namespace}"
    if not plan.changes:
        print(f"{target} already has {plan.target_replicas} replicas: nothing to do")
    elif args.dry_run:
        print(f"dry run: would scale {target} from {plan.current_replicas} to {plan.target_replicas}")
    else:
        apps.patch_namespaced_deployment_scale(
            args.deployment,
            args.namespace,
            {"spec": {"replicas": plan.target_replicas}},
            _content_type=MERGE_PATCH,
            _request_timeout=REQUEST_TIMEOUT_S,
        )
        log.info("scaled %s to %d", target, plan.target_replicas)
        print(f"scaled {target} from {plan.current_replicas} to {plan.target_replicas}")
    return 0
