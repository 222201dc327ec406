#!/usr/bin/env bash
# Wheels of the `serve` extra that the device image lacks (it has anyio, h11, click, prometheus-client, uvloop), for
# Python 3.12 on manylinux x86_64, into .whl/ (git-ignored through .git/info/exclude): the device tool carries them
# (carry: [".whl"]) and bench/device_run.sh's serve step installs them into /tmp/site. Run here, with network:
#   bash bench/serve_wheels.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
# one version of each; the pure-Python ones as any wheel
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl pydantic-core==2.46.4
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    annotated-doc uvicorn==0.54.0 opentelemetry-api importlib-metadata
du -sh .whl && ls .whl
