#!/usr/bin/env bash
# CI step: the core (jaxmol.losses, jaxmol.metrics, jaxmol.devices) on the newest JAX and NumPy
# on the package index, in a separate throwaway venv holding only jaxmol installed without
# extras (so jax and numpy, and what they need) and pytest. Runs the loss, metric and
# device-check tests there; they need no Flax, RDKit or data. Run from anywhere:
#   bash tools/ci_newest_jax.sh
#
# Newer JAX releases need a newer Python than the project's 3.11 (JAX 0.11 needs 3.12), so the
# venv uses the newest CPython >= 3.12 found on PATH or under pyenv ($JAXMOL_NEWEST_PYTHON
# overrides). Without one, it falls back to python3 and says so: JAX is then the newest for it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

find_python() {
    if [[ -n "${JAXMOL_NEWEST_PYTHON:-}" ]]; then
        echo "$JAXMOL_NEWEST_PYTHON"
        return
    fi
    local minor candidate
    for minor in 14 13 12; do
        for candidate in "python3.$minor" \
            "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3."$minor".*/bin/python3."$minor"; do
            if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c '' 2>/dev/null; then
                command -v "$candidate"
                return
            fi
        done
    done
    echo "ci_newest_jax: no Python >= 3.12 found; newest JAX for python3 only" >&2
    command -v python3
}

python="$(find_python)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

"$python" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip install -q --disable-pip-version-check)
# The project without extras, built from a copy of the tree (an in-tree build would leave build/
# in the checkout, whose stale files reach later wheels). It pulls its declared core
# dependencies, jax and numpy, at their newest versions; then pytest, and nothing else.
mkdir "$work/src"
tar -C "$repo" -cf - --exclude=./.git --exclude='./.venv*' --exclude=./runs --exclude=./build \
    --exclude=./dist --exclude='*.egg-info' --exclude=__pycache__ --exclude='.*cache' . |
    tar -C "$work/src" -xf -
"${pip[@]}" "$work/src"
"${pip[@]}" pytest

# From outside the checkout: the installed jaxmol, the core modules only, and no train extra.
(cd "$work" && "$work/venv/bin/python" - "$work" <<'EOF'
import importlib.util, sys
import jax, numpy, jaxmol, jaxmol.losses, jaxmol.metrics, jaxmol.devices
assert jaxmol.__file__.startswith(sys.argv[1]), f"not the installed jaxmol: {jaxmol.__file__}"
present = [m for m in ("flax", "optax", "rdkit", "ml_collections", "transformers")
           if importlib.util.find_spec(m)]
assert not present, f"the core venv has train dependencies: {present}"
print(f"ci_newest_jax: python {sys.version.split()[0]}, jax {jax.__version__}, "
      f"numpy {numpy.__version__}, jaxmol from {jaxmol.__file__}")
EOF
)

# --import-mode=importlib: the tests import the installed jaxmol, not the checkout's sources.
# A DeprecationWarning or FutureWarning that JAX or NumPy raise on a call in a core module fails.
strict=()
for module in jaxmol.losses jaxmol.metrics jaxmol.parallel jaxmol.devices; do
    strict+=(-W "error::DeprecationWarning:$module" -W "error::FutureWarning:$module")
done
(cd "$repo" && "$work/venv/bin/python" -P -m pytest -q -p no:cacheprovider \
    --import-mode=importlib "${strict[@]}" \
    tests/test_losses.py tests/test_metrics.py tests/test_devices.py)
echo "ci_newest_jax: done in $((SECONDS - start)) s"
