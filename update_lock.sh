#!/usr/bin/env bash
# Refresh requirements-lock.txt, the tested versions of requirements.txt's ranges (CPU torch),
# which .ci/run installs with `pip install -r requirements.txt -c requirements-lock.txt`.
# Needs pip-tools (requirements-dev.txt). Run it, then the tests, then commit the lock.
set -euo pipefail
cd "$(dirname "$0")"
pip-compile --quiet --strip-extras --no-header --no-emit-index-url --no-emit-find-links \
    --annotation-style=line --constraint <(echo "torch==2.13.0") \
    --output-file requirements-lock.txt requirements.txt
# torch without its local label (+cpu), so that a CUDA build of the same version also fits
sed -i -e 's/^torch==\([0-9.]*\)+cpu .*/torch==\1  # via -r requirements.txt (CPU or CUDA build)/' \
    -e '1i # Tested versions of requirements.txt. Refresh: bash update_lock.sh' requirements-lock.txt
