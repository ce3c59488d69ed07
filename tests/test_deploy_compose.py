"""docker-compose.yml, its host-network override, deploy/cpu.env and deploy/Dockerfile hang
together: every service is health-checked on the port it listens on, addresses name real
services, the GPU reservation is only on the gpu-profile worker, the host-network override
covers every service, and the Dockerfile's build context holds what it copies.
(The running stack is checked by scripts/compose_check.sh.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
HOST_NET = yaml.safe_load((REPO / "deploy" / "compose.host-network.yml").read_text())
DEFAULT_OVERRIDE = yaml.safe_load((REPO / "docker-compose.override.yml").read_text())
SERVICES = COMPOSE["services"]
GRPC_SERVICES = ("store", "dram", "ranker", "worker", "worker-cpu")
VAR = re.compile(r"\$\{([A-Z0-9_]+)(:?-[^}]*)?\}")


def env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in (SERVICES[service].get("environment") or {}).items()}


def listen_key(service: str) -> str:
    keys = [k for k in env(service) if k.endswith("_ADDRESS")]
    assert len(keys) == 1, (service, keys)
    return keys[0]


def default(text: str) -> str:
    """Interpolate ${VAR:-default} with the defaults, as compose does in an empty environment."""
    return VAR.sub(lambda m: (m.group(2) or ":-")[2:] if (m.group(2) or "").startswith(":-") else "", text)


def test_services_and_profiles():
    assert set(SERVICES) == {"redis", "convert", "store", "dram", "ranker", "worker", "worker-cpu", "gateway"}
    assert SERVICES["worker"]["profiles"] == ["gpu"] and SERVICES["worker-cpu"]["profiles"] == ["cpu"]
    assert all("profiles" not in SERVICES[s] for s in SERVICES if not s.startswith("worker"))
    images = {SERVICES[s]["image"] for s in SERVICES}
    assert images == {"${M2CACHE_IMAGE:-m2cache:latest}"}, "one image for every service"


def test_gpu_reservation_only_on_the_gpu_worker():
    (device,) = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] >= 1
    assert env("worker")["M2CACHE_WORKER_DEVICE"] == "cuda"
    assert env("worker-cpu")["M2CACHE_WORKER_DEVICE"] == "cpu"
    assert [s for s in SERVICES if "deploy" in SERVICES[s]] == ["worker"]
    # Apart from the device, both variants run the same worker.
    same = {k: v for k, v in env("worker").items() if k != "M2CACHE_WORKER_DEVICE"}
    assert same.items() <= env("worker-cpu").items()


def test_every_service_is_health_checked_on_its_own_port():
    for name in GRPC_SERVICES:
        test = SERVICES[name]["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "m2cache.commands.health"], name
        listen_port = default(env(name)[listen_key(name)]).rsplit(":", 1)[1]
        assert default(test[4]) == f"127.0.0.1:{listen_port}", name
    gw_port = default(env("gateway")[listen_key("gateway")]).rsplit(":", 1)[1]
    assert f"127.0.0.1:{gw_port}/health" in default(" ".join(SERVICES["gateway"]["healthcheck"]["test"]))
    redis_port = default(SERVICES["redis"]["command"][SERVICES["redis"]["command"].index("--port") + 1])
    assert f"port={redis_port}" in default(" ".join(SERVICES["redis"]["healthcheck"]["test"]))
    assert SERVICES["convert"]["healthcheck"] == {"disable": True}


def test_addresses_name_services_and_ports_they_listen_on():
    ports = {name: default(env(name)[listen_key(name)]).rsplit(":", 1)[1] for name in GRPC_SERVICES + ("gateway",)}
    redis_cmd = SERVICES["redis"]["command"]
    ports["redis"] = default(redis_cmd[redis_cmd.index("--port") + 1])
    targets = [(name, key, default(value)) for name in SERVICES for key, value in env(name).items()
               if key.endswith(("_TARGET", "_WORKERS", "_URL"))]
    assert len(targets) >= 6
    for name, key, value in targets:
        for address in value.split(","):
            host, port = re.sub(r"^\w+://", "", address).split("/")[0].rsplit(":", 1)
            assert host in SERVICES, (name, key, value)
            assert ports[host] == port, (name, key, value)


def test_start_order_and_the_store_volume():
    assert SERVICES["store"]["depends_on"]["convert"] == {"condition": "service_completed_successfully"}
    assert SERVICES["dram"]["depends_on"]["store"] == {"condition": "service_healthy"}
    assert SERVICES["convert"]["restart"] == "no"
    assert "store-data:/data/store" in SERVICES["convert"]["volumes"]
    assert "store-data:/data/store:ro" in SERVICES["store"]["volumes"]
    assert "store-data" in COMPOSE["volumes"]
    assert env("store")["M2CACHE_STORE_ROOT"] == "/data/store"
    for name, svc in SERVICES.items():
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name


def test_every_interpolation_has_a_default():
    text = "".join((REPO / f).read_text() for f in
                   ("docker-compose.yml", "docker-compose.override.yml", "deploy/compose.host-network.yml"))
    found = VAR.findall(text)
    assert found
    assert all(d.startswith(":-") for _, d in found), [v for v, d in found if not d.startswith(":-")]


def test_host_network_override_covers_every_service():
    overrides = HOST_NET["services"]
    assert set(overrides) == set(SERVICES)
    for name, svc in overrides.items():
        assert svc["network_mode"] == "host", name
        assert {h.split(":")[0] for h in svc["extra_hosts"]} == set(SERVICES) - {"convert"}, name  # servers
        assert all(h.endswith(":127.0.0.1") for h in svc["extra_hosts"]), name
    for name in GRPC_SERVICES + ("gateway",):
        key = listen_key(name)
        assert overrides[name]["environment"][key] == env(name)[key].replace("0.0.0.0", "127.0.0.1"), name
    assert "127.0.0.1" in overrides["redis"]["command"]
    # Host networking cannot be combined with published ports: those live in the default
    # override file, which `-f docker-compose.yml -f deploy/compose.host-network.yml` skips.
    assert all("ports" not in svc for svc in SERVICES.values())
    (published,) = DEFAULT_OVERRIDE["services"]["gateway"]["ports"]
    gw_port = default(env("gateway")[listen_key("gateway")]).rsplit(":", 1)[1]
    assert default(published) == f"127.0.0.1:{gw_port}:{gw_port}"


def test_cpu_env_selects_the_cpu_worker():
    lines = dict(line.split("=", 1) for line in (REPO / "deploy" / "cpu.env").read_text().splitlines()
                 if line and not line.startswith("#"))
    assert lines["COMPOSE_PROFILES"] == "cpu"
    host, port = lines["M2CACHE_GATEWAY_WORKERS"].rsplit(":", 1)
    assert host == "worker-cpu" and port == default(env("worker-cpu")["M2CACHE_WORKER_ADDRESS"]).rsplit(":", 1)[1]


def test_dockerfile_is_non_root_and_its_context_holds_what_it_copies():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=.+\nFROM \$\{BASE_IMAGE\}$", text, re.M)
    (user,) = re.findall(r"^USER (\S+)$", text, re.M)
    uid = re.search(r"^ARG UID=(\d+)$", text, re.M).group(1)
    assert user == "${UID}:${GID}" and int(uid) > 0
    assert re.search(r'^ENTRYPOINT \["m2cache"\]$', text, re.M)
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    rules = [l for l in ignore if l and not l.startswith("#")]
    assert rules[0] == "*", "the context is an allow-list"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for src in line.split()[:-1]:
            name = src.rstrip("/")
            if "[" in name:  # optional glob, e.g. .wh[l]
                name = re.sub(r"\[(.)\]", r"\1", name)
            assert name in allowed, f"COPY {src} is excluded by .dockerignore"
            assert (REPO / name).exists() or "[" in src, f"COPY {src}: missing from the repository"


def compose_schema() -> dict:
    """The Compose Specification's JSON schema, as check-jsonschema vendors it (offline)."""
    import importlib.resources
    import json

    return json.loads((importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json")
                      .read_text())


def merge(base, over):
    """Compose's merge of a later file into an earlier one: mappings merge key by key,
    anything else (lists, scalars) is replaced (enough for the keys these files use)."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {k: merge(base[k], v) if k in base else v for k, v in {**base, **over}.items()}
    return over


def interpolate(obj, values: dict[str, str]):
    """${VAR:-default} / ${VAR} with ``values`` (the env file), else the default, as compose does."""
    if isinstance(obj, dict):
        return {k: interpolate(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, values) for v in obj]
    if isinstance(obj, str):
        return VAR.sub(lambda m: values.get(m.group(1)) or (m.group(2) or ":-")[2:], obj)
    return obj


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


@pytest.mark.parametrize("files", [["docker-compose.yml", "docker-compose.override.yml"],
                                   ["docker-compose.yml", "deploy/compose.host-network.yml"]])
def test_compose_files_follow_the_compose_spec(files):
    """Validated offline against the Compose Specification schema (the real engine runs
    them in scripts/compose_check.sh; tests never install one)."""
    import jsonschema

    docs = [yaml.safe_load((REPO / f).read_text()) for f in files]
    for doc in docs:  # each file alone is a valid (partial) compose document
        jsonschema.validate(doc, compose_schema())
    merged = {}
    for doc in docs:
        merged = merge(merged, {k: v for k, v in doc.items() if not k.startswith("x-")})
    rendered = interpolate(merged, env_file(REPO / "deploy" / "cpu.env"))
    jsonschema.validate(rendered, compose_schema())
    assert rendered["services"]["gateway"]["environment"]["M2CACHE_GATEWAY_WORKERS"] == "worker-cpu:50064"


def test_the_schema_check_catches_a_broken_file():
    import jsonschema

    broken = merge(COMPOSE, {"services": {"store": {"healthcheck": {"interval": 5, "retries": "many"}}}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, compose_schema())


def test_tls_by_default_each_service_with_its_own_certificate():
    secrets = COMPOSE["secrets"]
    for name in GRPC_SERVICES + ("gateway",):
        svc = SERVICES[name]
        mounted = {s["target"]: s["source"] for s in svc["secrets"]}
        own = "worker" if name.startswith("worker") else name
        assert mounted["tls.crt"] == f"{own}-crt" and mounted["tls.key"] == f"{own}-key", name
        assert mounted["ca.crt"] == "m2cache-ca", name
        prefix = "M2CACHE_" + own.upper()
        assert env(name)[f"{prefix}_TLS_CERT"] == "/run/secrets/tls.crt", name
        assert env(name)[f"{prefix}_TLS_KEY"] == "/run/secrets/tls.key", name
        assert env(name)[f"{prefix}_TLS_CA"] == "/run/secrets/ca.crt", name
        # the healthcheck reaches the service over mTLS with the container's own identity
        assert env(name)["M2CACHE_HEALTH_TLS_CA"] == "/run/secrets/ca.crt", name
    for name in ("worker", "worker-cpu", "gateway"):
        assert "api-keys" in {s["source"] for s in SERVICES[name]["secrets"]}, name
    assert env("gateway")["M2CACHE_GATEWAY_API_KEYS_FILE"] == env("worker")["M2CACHE_WORKER_API_KEYS_FILE"]
    assert "https://127.0.0.1:" in " ".join(SERVICES["gateway"]["healthcheck"]["test"])
    for name, secret in secrets.items():
        assert default(secret["file"]).startswith("./deploy/tls/"), name
    # every file `m2cache certs` writes is what the secrets name
    from m2cache.commands.certs import SERVICES as CERT_SERVICES

    files = {default(s["file"]).rsplit("/", 1)[1] for s in secrets.values()}
    assert files == {"ca.crt", "api-keys"} | {f"{n}.{e}" for n in CERT_SERVICES if n != "client" for e in ("crt", "key")}
