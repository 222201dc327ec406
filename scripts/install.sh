#!/usr/bin/env bash
# Install fp6llm (editable, from this checkout) and everything its tests need, for users and CI.
#
#   bash scripts/install.sh            # PYTHON=python3.12 bash scripts/install.sh for another interpreter
#
# - torch: installed (torch==2.13.0) only when `import torch` fails. Where torch imports it is never replaced: GPU
#   machines ship their own build and may have no network.
# - triton: installed (triton==3.6.0) only on Linux x86_64 when `import triton` fails.
# - the other requirements of pyproject.toml ([project] dependencies and the `test` extra) that are missing or too
#   old are installed by name (with numpy<2.4 for Triton's interpreter, replacing a newer numpy; see below), then
#   fp6llm itself with --no-deps, so pip never resolves torch or triton again. An fp6llm installed from another
#   checkout is kept.
# Idempotent: when everything is there it only checks (no network, a few seconds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
TORCH_REQUIREMENT="torch==2.13.0"
TRITON_REQUIREMENT="triton==3.6.0"

log() { echo "install.sh: $*" >&2; }
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check "$@"; }
importable() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

if importable torch; then
    log "torch $("$PYTHON" -c 'import torch; print(torch.__version__)') is installed; leaving it as it is"
else
    log "installing $TORCH_REQUIREMENT"
    pip_install "$TORCH_REQUIREMENT"
fi
if [[ "$(uname -s)" == Linux && "$(uname -m)" == x86_64 ]] && ! importable triton; then
    log "installing $TRITON_REQUIREMENT"
    pip_install "$TRITON_REQUIREMENT"
fi

# One line per requirement of pyproject.toml (dependencies + the test extra) that is not installed at a satisfying
# version, torch and triton aside (handled above); a single "?" when this Python cannot read the requirements.
missing=$("$PYTHON" - <<'EOF'
import importlib.metadata as metadata
import sys

try:
    import tomllib
except ImportError:  # Python 3.10: the copy vendored by pip
    try:
        from pip._vendor import tomli as tomllib
    except ImportError:
        tomllib = None
try:
    from packaging.requirements import Requirement
except ImportError:
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:
        Requirement = None

if tomllib is None or Requirement is None:
    print("?")
    raise SystemExit
with open("pyproject.toml", "rb") as file:
    project = tomllib.load(file)["project"]
for line in project["dependencies"] + project["optional-dependencies"]["test"]:
    requirement = Requirement(line)
    if requirement.name in ("torch", "triton") or (requirement.marker and not requirement.marker.evaluate()):
        continue
    try:
        installed = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        print(line)
        continue
    if not requirement.specifier.contains(installed, prereleases=True):
        print(line)

# Triton 3.6's interpreter (TRITON_INTERPRET=1, how the kernel tests run on CPU) turns 1-element arrays into ints,
# which numpy 2.4 refuses. numpy arrives with transformers: install it below 2.4, and replace a newer one that is
# already there (FP6LLM_KEEP_NUMPY=1 keeps it; then the kernel tests fail in the interpreter).
import os

NUMPY = Requirement("numpy<2.4")
try:
    numpy_version = metadata.version("numpy")
except metadata.PackageNotFoundError:
    print(NUMPY)
else:
    if not NUMPY.specifier.contains(numpy_version):
        keep = os.environ.get("FP6LLM_KEEP_NUMPY") == "1"
        print(f"install.sh: numpy {numpy_version} breaks Triton's interpreter (the kernel tests on CPU need {NUMPY}): "
              f"{'kept, as FP6LLM_KEEP_NUMPY=1 asks' if keep else 'replacing it'}", file=sys.stderr)
        if not keep:
            print(NUMPY)
EOF
)

# The folder that `import fp6llm` finds the package in (found without importing it), or nothing.
installed_from() {
    "$PYTHON" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("fp6llm")
print(pathlib.Path(spec.origin).resolve().parent.parent if spec and spec.origin else "")
EOF
}

if [[ "$missing" == "?" ]]; then
    log "cannot read pyproject.toml's requirements with $PYTHON; letting pip resolve them"
    pip_install -e ".[test]"
    exit 0
fi
if [[ -n "$missing" ]]; then
    mapfile -t requirements <<<"$missing"
    log "installing ${requirements[*]}"
    pip_install "${requirements[@]}"
fi
installed=$(installed_from)
if [[ "$installed" == "$(pwd -P)/src" ]]; then
    log "fp6llm is installed from $(pwd -P); nothing else to do"
elif [[ -n "$installed" ]]; then
    # Another checkout's install (CI runs in a fresh clone on a developer's machine) is left alone: this checkout's
    # tests import ./src first (tests/conftest.py), the CLI included.
    log "fp6llm is installed from $installed, another checkout: kept (tests use ./src); to switch to this one:"
    log "    $PYTHON -m pip install --no-deps -e ."
else
    log "installing fp6llm from $(pwd -P) (editable, --no-deps)"
    # No build isolation when a recent setuptools is here: no download of the build backend (offline machines).
    if "$PYTHON" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" 2>/dev/null
    then
        pip_install --no-deps --no-build-isolation -e .
    else
        pip_install --no-deps -e .
    fi
fi
