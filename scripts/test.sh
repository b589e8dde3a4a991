#!/usr/bin/env bash
# Run the tests with their real parts: setup, a registry on 127.0.0.1:5000, pytest, then
# the CRI validation suite (scripts/conformance.sh) on the same registry.
#   bash scripts/test.sh                    everything (what CI runs)
#   bash scripts/test.sh [pytest args...]   only pytest, with these arguments
# KIYOTPY_CONFORMANCE=0 skips the suite.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
REGISTRY=127.0.0.1:5000

bash "$REPO/scripts/setup.sh"

v2_up() { curl -fsS -m 2 -o /dev/null "http://$REGISTRY/v2/" 2>/dev/null \
    || "$REPO/.venv/bin/python" -c "import sys, urllib.request as u; u.urlopen('http://$REGISTRY/v2/', timeout=2)" >/dev/null 2>&1; }

REG_PID=
REG_DIR=
cleanup() {
    if [ -n "$REG_PID" ] && kill -0 "$REG_PID" 2>/dev/null; then
        kill "$REG_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$REG_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$REG_PID" 2>/dev/null || true
    fi
    if [ -n "$REG_DIR" ]; then rm -rf "$REG_DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if v2_up; then
    echo "test: using the registry already at http://$REGISTRY/v2/"
else
    REG_DIR=$(mktemp -d /tmp/kiyot-test-registry.XXXXXX)
    cat > "$REG_DIR/config.yml" <<CONF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $REG_DIR/data
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $REGISTRY
CONF
    echo "test: starting docker-registry on $REGISTRY (storage $REG_DIR/data)"
    docker-registry serve "$REG_DIR/config.yml" >"$REG_DIR/registry.log" 2>&1 &
    REG_PID=$!
    for _ in $(seq 1 150); do  # bounded: 15 s
        v2_up && break
        if ! kill -0 "$REG_PID" 2>/dev/null; then
            echo "test: docker-registry exited at start:" >&2; cat "$REG_DIR/registry.log" >&2; exit 1
        fi
        sleep 0.1
    done
    v2_up || { echo "test: docker-registry did not answer at http://$REGISTRY/v2/" >&2; cat "$REG_DIR/registry.log" >&2; exit 1; }
fi

"$REPO/.venv/bin/ruff" check kiyot_py cells tests bench tools
"$REPO/.venv/bin/mypy" kiyot_py cells/kiyot_cell

if [ $# -eq 0 ]; then
    # The lifecycle's unit tests need no privilege (fakes for the provider and the agent):
    # prove it by running them once with every capability dropped.
    setpriv --bounding-set -all --inh-caps -all -- \
        "$REPO/.venv/bin/python" -m pytest -q -p no:cacheprovider tests/unit
fi
"$REPO/.venv/bin/python" -m pytest -q "$@"
if [ $# -eq 0 ] && [ "${KIYOTPY_CONFORMANCE:-1}" != 0 ]; then
    bash "$REPO/scripts/conformance.sh"
fi
