#!/usr/bin/env bash
# The real check of the container deployment, rerunnable on a bare Debian machine (root):
#   1. daemon    start a private Docker engine (Debian's docker.io) on a socket of its own,
#                with no bridge and no iptables, stopped again by PID at the end
#   2. base      build a local base image with debootstrap + `docker import` (no registry)
#   3. image     docker build deploy/Dockerfile on that base (local torch CPU wheel via ./.whl)
#   4. certs     `m2cache certs` in the image: a CA, per-service certificates, an API key (TLS is
#                the compose default), owned by the containers' user
#   5. config    docker compose config for the plain and the host-network stack
#   6. up        compose up (CPU worker profile, host networking, free loopback ports)
#   7. generate  POST /v1/completions to the gateway over HTTPS with the API key (and check that
#                no key gets 401 and plaintext gets nothing); then tear down
#
# Usage: scripts/compose_check.sh [--until STAGE] [--keep-daemon] [--clean]
#   --until STAGE   stop after STAGE (daemon|base|image|certs|config|up|generate; default generate)
#   --keep-daemon   leave the engine (and the stack) running; prints DOCKER_HOST to use
#   --clean         delete the check's Docker data root and base rootfs first
# Env: M2CACHE_CHECK_DIR (default /tmp/m2cache-compose-check: data root, socket, logs; images
# are kept there between runs), BASE_IMAGE (default m2cache-base:bookworm, built if missing),
# M2CACHE_HF_DIR (default ../shared/models/tinystories-656k), M2CACHE_MODEL, DEBIAN_MIRROR,
# M2CACHE_UP_TIMEOUT_S (default 900).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

UNTIL=generate
KEEP_DAEMON=0
CLEAN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --until) UNTIL=$2; shift 2 ;;
    --keep-daemon) KEEP_DAEMON=1; shift ;;
    --clean) CLEAN=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
STAGES=(daemon base image certs config up generate)
[[ " ${STAGES[*]} " == *" $UNTIL "* ]] || { echo "--until: one of ${STAGES[*]}" >&2; exit 2; }

WORK=${M2CACHE_CHECK_DIR:-/tmp/m2cache-compose-check}
SOCK=$WORK/docker.sock
export DOCKER_HOST=unix://$SOCK
BASE_IMAGE=${BASE_IMAGE:-m2cache-base:bookworm}
IMAGE=${M2CACHE_IMAGE:-m2cache:check}
PROJECT=m2cache-check
export M2CACHE_HF_DIR=${M2CACHE_HF_DIR:-$(cd "$REPO/.." && pwd)/shared/models/tinystories-656k}
export M2CACHE_MODEL=${M2CACHE_MODEL:-$(basename "$M2CACHE_HF_DIR")}
export M2CACHE_IMAGE=$IMAGE
export M2CACHE_TLS_DIR=$WORK/tls
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
UP_TIMEOUT_S=${M2CACHE_UP_TIMEOUT_S:-900}
DOCKERD_PID=""
STACK_UP=0

log() { printf '[compose_check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
done_if() { if [ "$UNTIL" = "$1" ]; then [ "$1" = generate ] || log "stopping after stage '$1' as asked"; exit 0; fi; }

compose() {
  local files=(-p "$PROJECT" --env-file deploy/cpu.env -f docker-compose.yml -f deploy/compose.host-network.yml)
  if docker compose version >/dev/null 2>&1; then docker compose "${files[@]}" "$@"; else docker-compose "${files[@]}" "$@"; fi
}

cleanup() {
  local rc=$?
  if [ "$STACK_UP" = 1 ] && [ "$KEEP_DAEMON" = 0 ]; then
    log "tearing the stack down"
    compose down -v --remove-orphans --timeout 20 >"$WORK/down.log" 2>&1 || log "compose down failed (see $WORK/down.log)"
  fi
  if [ -n "$DOCKERD_PID" ] && [ "$KEEP_DAEMON" = 0 ]; then
    log "stopping dockerd (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID" 2>/dev/null || true
  elif [ -n "$DOCKERD_PID" ]; then
    log "dockerd left running (pid $DOCKERD_PID): export DOCKER_HOST=$DOCKER_HOST"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ensure_tools() {
  local want=()
  command -v dockerd >/dev/null || want+=(docker.io)
  command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || want+=(docker-compose)
  command -v debootstrap >/dev/null || want+=(debootstrap)
  if [ ${#want[@]} -gt 0 ]; then
    log "installing ${want[*]} (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}" >"$WORK/apt.log" 2>&1
  fi
}

stage_daemon() {
  [ "$(id -u)" = 0 ] || { echo "needs root (dockerd, debootstrap)" >&2; exit 1; }
  if [ "$CLEAN" = 1 ]; then log "removing $WORK"; rm -rf "$WORK"; fi
  mkdir -p "$WORK"
  ensure_tools
  if docker info >/dev/null 2>&1; then
    log "reusing the engine already on $SOCK (left by --keep-daemon)"
    return
  fi
  log "starting dockerd (no bridge, no iptables) on $SOCK"
  # nice: the machine's cores are shared; builds and containers inherit it.
  nice -n 10 dockerd --iptables=false --ip6tables=false --bridge=none \
    --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
    -H "$DOCKER_HOST" >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$WORK/dockerd.log"; echo "dockerd exited" >&2; exit 1; }
    sleep 0.5
  done
  docker info --format 'engine {{.ServerVersion}}, storage {{.Driver}}, cgroup v{{.CgroupVersion}}'
}

stage_base() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then log "base image $BASE_IMAGE present"; return; fi
  log "debootstrap Debian bookworm (minbase + python3, python3-venv) -> $BASE_IMAGE"
  rm -rf "$WORK/rootfs"
  nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  tar -C "$WORK/rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE"
  rm -rf "$WORK/rootfs"
}

# Local build inputs in ./.whl (git-ignored): the torch CPU wheel pip finds on this machine
# (so the image does not download a CUDA build) and the CA bundle pip trusts here.
stage_build_inputs() {
  mkdir -p .whl
  local links
  links=$( (pip config list 2>/dev/null | sed -n "s/^.*find-links='\(.*\)'$/\1/p"; echo "${PIP_FIND_LINKS:-}") | tr ' ' '\n' | sort -u)
  local torch_pin
  torch_pin=$(sed -n 's/^torch==\(.*\)$/\1/p' requirements.txt)
  for dir in $links; do
    for whl in "$dir"/torch-"$torch_pin"*-cp3*.whl; do
      [ -f "$whl" ] || continue
      [ -f ".whl/$(basename "$whl")" ] || ln "$whl" .whl/ 2>/dev/null || cp "$whl" .whl/
      log "local wheel: $(basename "$whl")"
    done
  done
  local ca=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}
  if [ -n "$ca" ] && [ -f "$ca" ]; then cp "$ca" .whl/ca-bundle.crt; fi
}

stage_image() {
  stage_build_inputs
  log "docker build -f deploy/Dockerfile --build-arg BASE_IMAGE=$BASE_IMAGE -t $IMAGE (log: $WORK/build.log)"
  # --network host: the engine has no bridge; RUN steps reach the package index through the host.
  if ! docker build --network host -f deploy/Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" . \
      >"$WORK/build.log" 2>&1; then
    tail -30 "$WORK/build.log"; exit 1
  fi
  docker image inspect "$IMAGE" --format 'image {{.Id}} {{.Size}} bytes, user {{.Config.User}}'
  [ "$(docker image inspect "$IMAGE" --format '{{.Config.User}}')" != "" ] || { echo "image runs as root" >&2; exit 1; }
  docker run --rm --network none "$IMAGE" health --help >/dev/null
  docker run --rm --network none --entrypoint redis-server "$IMAGE" --version
}

free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

stage_certs() {
  mkdir -p "$M2CACHE_TLS_DIR"
  chown 10001:10001 "$M2CACHE_TLS_DIR"
  docker run --rm --network none --user 10001:10001 -v "$M2CACHE_TLS_DIR:/tls" "$IMAGE" certs --out /tls >/dev/null
  log "certificates and API key in $M2CACHE_TLS_DIR (owned by uid 10001, the containers' user)"
}

stage_config() {
  docker-compose version --short >/dev/null 2>&1 || docker compose version
  (unset M2CACHE_HF_DIR M2CACHE_MODEL M2CACHE_IMAGE
   if docker compose version >/dev/null 2>&1; then docker compose config -q
   else docker-compose config -q; fi)
  compose config -q
  log "compose config: plain and host-network stacks are valid"
}

stage_up() {
  [ -f "$M2CACHE_HF_DIR/config.json" ] || { echo "no checkpoint at M2CACHE_HF_DIR=$M2CACHE_HF_DIR" >&2; exit 1; }
  read -r p_redis p_store p_dram p_ranker p_worker p_gw <<<"$(free_ports 6)"
  export M2CACHE_REDIS_PORT=$p_redis M2CACHE_STORE_PORT=$p_store M2CACHE_DRAM_PORT=$p_dram \
    M2CACHE_RANKER_PORT=$p_ranker M2CACHE_WORKER_PORT=$p_worker M2CACHE_GATEWAY_PORT=$p_gw
  export M2CACHE_GATEWAY_WORKERS=worker-cpu:$p_worker M2CACHE_DRAM_BUDGET_BYTES=$((64 << 20)) M2CACHE_REDIS_MAXMEMORY=256mb
  log "compose up (cpu profile, host network; gateway on 127.0.0.1:$p_gw, model $M2CACHE_MODEL)"
  STACK_UP=1
  compose up -d >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; compose logs --tail 40 || true; exit 1; }
  local deadline=$((SECONDS + UP_TIMEOUT_S))
  until curl -sf --cacert "$M2CACHE_TLS_DIR/ca.crt" "https://127.0.0.1:$p_gw/health" >/dev/null; do  # 200 once ready
    if [ $SECONDS -ge $deadline ]; then
      compose ps; compose logs --tail 60; echo "gateway not ready after ${UP_TIMEOUT_S}s" >&2; exit 1
    fi
    if compose ps | grep -E 'Exit [1-9]|exited \([1-9]|Restarting' >/dev/null; then
      compose ps; compose logs --tail 60; echo "a container failed" >&2; exit 1
    fi
    sleep 3
  done
  compose ps
}

stage_generate() {
  local body out url key code
  url="https://127.0.0.1:$M2CACHE_GATEWAY_PORT/v1/completions"
  key=$(head -1 "$M2CACHE_TLS_DIR/api-keys")
  body=$(printf '{"model": "%s", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}' "$M2CACHE_MODEL")
  code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$M2CACHE_TLS_DIR/ca.crt" "$url" \
    -H 'content-type: application/json' -d "$body")
  [ "$code" = 401 ] || { echo "a request without an API key got HTTP $code, not 401" >&2; exit 1; }
  if curl -s -m 10 -o /dev/null "http://127.0.0.1:$M2CACHE_GATEWAY_PORT/health"; then
    echo "the gateway answered plaintext HTTP" >&2; exit 1
  fi
  out=$(curl -sf -m 120 --cacert "$M2CACHE_TLS_DIR/ca.crt" -H "Authorization: Bearer $key" "$url" \
    -H 'content-type: application/json' -d "$body") || { compose logs --tail 60; echo "completion failed" >&2; exit 1; }
  python3 - "$out" <<'EOF'
import json, sys
resp = json.loads(sys.argv[1])
text = resp["choices"][0]["text"]
print("completion:", repr(text), "usage:", resp.get("usage"))
assert text.strip(), "empty completion"
EOF
  log "generated through the stack over TLS (no key: 401; plaintext: refused)"
}

for stage in "${STAGES[@]}"; do
  "stage_$stage"
  done_if "$stage"
done
