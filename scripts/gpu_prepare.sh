#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before scripts/gpu_check.sh: fetch the wheels the
# GPU image lacks (Python 3.12, manylinux) into .whl/ and copy the tiny shared models
# and the text the CUDA tests read into .gpu/shared. Both folders are ignored by git
# and travel with `device.run(carry=[".whl", ".gpu"])`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for spec in lmdb==3.0.0 redis==8.1.0 hiredis==3.5.0 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl "$spec" 2>/dev/null || "$PY" -m pip download -q --no-deps -d .whl "$spec"
done
mkdir -p .gpu/shared/models .gpu/shared/corpora/tinystories
cp -r ../shared/models/stories260k ../shared/models/tinystories-656k .gpu/shared/models/
cp ../shared/corpora/tinystories/valid_500-999_eval.txt .gpu/shared/corpora/tinystories/
du -sh .whl .gpu
