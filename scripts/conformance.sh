#!/usr/bin/env bash
# The CRI validation suite (critest, cri-tools v1.32.0) against kiyot-py on local cells.
#
#   bash scripts/conformance.sh [critest args...]      e.g. -ginkgo.focus='Networking'
#
# Starts `kiyot-py serve` with a state dir, socket, bridge and subnet of its own (apart from
# a developer's service), runs the whole suite through the kit's run-critest.sh with the
# kit's registries.conf, prints the suite's summary line, and fails when a spec fails that
# tests/conformance/known-failures.toml does not name. Afterwards the service is stopped
# and `kiyot-py reset` removes its cells and bridge. Needs root and scripts/setup.sh's
# packages; the kit's registry is used on 127.0.0.1:5000 (or started there).
#
# Environment:
#   KIYOTPY_CONFORMANCE_KIT   the kit (default: ../shared/conformance beside the repo, else
#                           /work/shared/conformance)
#   KIYOTPY_CONFORMANCE_OUT   where the results go (default /tmp/kiyot-conformance/<time>)
#   KIYOTPY_CONFORMANCE_POOL  standby cells in the service's warm pool (default 4; 0: none,
#                           every pod waits for its cell's boot)
set -euo pipefail

# A node's / is a shared mount (systemd makes it so; the kubelet makes its root directory
# rshared too), and a local cell's mount namespace is a slave of the node's: a mount made
# on the node after a cell came up reaches it under a shared mount only. These test
# machines have every mount private, unlike any systemd host; critest mounts on the node
# after its pods came up, so the suite runs in a mount namespace of its own in which / is
# rshared, as on a systemd host. Nothing outside that namespace changes.
root_is_shared() {
    awk '$5 == "/" { for (i = 7; i <= NF && $i != "-"; i++) if ($i ~ /^shared:/) s = 1 } END { exit !s }' \
        /proc/self/mountinfo
}
if ! root_is_shared; then
    if [ -n "${CONFORMANCE_MOUNT_NS:-}" ]; then
        echo "conformance: / is still not shared in the suite's mount namespace" >&2; exit 2
    fi
    exec unshare --mount --propagation unchanged -- env CONFORMANCE_MOUNT_NS=1 \
        bash -c 'mount --make-rshared / && exec bash "$0" "$@"' "$0" "$@"
fi

cd "$(dirname "$0")/.."
REPO=$(pwd)
log() { echo "conformance: $*"; }

KIT=${KIYOTPY_CONFORMANCE_KIT:-}
if [ -z "$KIT" ]; then
    for d in "$REPO/../shared/conformance" /work/shared/conformance; do
        if [ -x "$d/run-critest.sh" ]; then KIT=$(cd "$d" && pwd); break; fi
    done
fi
if [ -z "$KIT" ] || [ ! -x "$KIT/run-critest.sh" ]; then
    echo "conformance: no kit found (run-critest.sh); set KIYOTPY_CONFORMANCE_KIT" >&2
    exit 2
fi
[ -x "$REPO/.venv/bin/kiyot-py" ] || bash "$REPO/scripts/setup.sh"

POOL=${KIYOTPY_CONFORMANCE_POOL:-4}
case "$POOL" in ''|*[!0-9]*) echo "conformance: KIYOTPY_CONFORMANCE_POOL must be a number, got '$POOL'" >&2; exit 2;; esac
OUT=${KIYOTPY_CONFORMANCE_OUT:-/tmp/kiyot-conformance/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/kiyot-conformance-run.XXXXXX)
CONFIG=$WORK/kiyot.toml
cat > "$CONFIG" <<CONF
socket = "$WORK/kiyot.sock"
state_dir = "$WORK/state"
node_name = "conformance"
registries_conf = "$KIT/registry/registries.conf"
[local]
# critest runs privileged containers; on local cells they are root on this node, which
# the suite's own throwaway pods may be.
allow_privileged = true
bridge = "kiyotcrit0"
subnet = "10.125.0.0/24"
CONF
if [ "$POOL" -gt 0 ]; then
    # Standby cells, as a node that starts pods quickly runs with: each spec's pod claims one.
    printf '[[pools]]\nname = "conformance"\nsize = %d\n' "$POOL" >> "$CONFIG"
fi

SERVE_PID=
cleanup() {
    if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
        kill -TERM "$SERVE_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.1; done  # bounded: 10 s
        kill -9 "$SERVE_PID" 2>/dev/null || true
        wait "$SERVE_PID" 2>/dev/null || true
    fi
    "$REPO/.venv/bin/kiyot-py" reset --yes --config "$CONFIG" >>"$OUT/serve.log" 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "kiyot-py serve on $WORK/kiyot.sock (log: $OUT/serve.log)"
"$REPO/.venv/bin/kiyot-py" serve --config "$CONFIG" >"$OUT/serve.log" 2>&1 &
SERVE_PID=$!
CRICTL=("$KIT/bin/crictl" --config "$KIT/crictl-noconfig.yaml" --runtime-endpoint "unix://$WORK/kiyot.sock" --timeout 2s)
for _ in $(seq 1 300); do  # bounded: 30 s
    "${CRICTL[@]}" version >/dev/null 2>&1 && break
    if ! kill -0 "$SERVE_PID" 2>/dev/null; then
        echo "conformance: kiyot-py serve exited at start:" >&2; tail -20 "$OUT/serve.log" >&2; exit 1
    fi
    sleep 0.1
done

log "critest (results: $OUT)"
set +e
OUT_DIR=$OUT NAME=kiyot-py "$KIT/run-critest.sh" "unix://$WORK/kiyot.sock" "$@" >"$OUT/run-critest.out" 2>&1
rc=$?
set -e
if [ ! -s "$OUT/report.json" ]; then
    echo "conformance: critest gave no report (exit $rc):" >&2; tail -20 "$OUT/run-critest.out" >&2
    exit 1
fi
grep -m1 '^wall time' "$OUT/summary.txt" | sed 's/^/conformance: /' || true
"$REPO/.venv/bin/python" "$REPO/tests/conformance/check.py" "$OUT/report.json" \
    "$REPO/tests/conformance/known-failures.toml"

# What a new user met first (issue #10): crictl's pods set no hostname, and critest's have
# names longer than a host name may be. A 70-character pod with no hostname runs a
# container whose `hostname` fits in 64 bytes.
log "crictl: a pod with no hostname and a 70-character name"
CRICTL_LONG=("$KIT/bin/crictl" --config "$KIT/crictl-noconfig.yaml" --runtime-endpoint "unix://$WORK/kiyot.sock" --timeout 60s)
IMAGE=registry.k8s.io/e2e-test-images/busybox:1.29-2
POD_NAME="crictl-long-name-$(printf 'x%.0s' $(seq 1 53))"
mkdir -p "$WORK/crictl-logs"
cat >"$WORK/pod.json" <<JSON
{"metadata": {"name": "$POD_NAME", "namespace": "default", "uid": "crictl-long-name", "attempt": 0},
 "log_directory": "$WORK/crictl-logs", "linux": {}}
JSON
cat >"$WORK/ctr.json" <<JSON
{"metadata": {"name": "hostname"}, "image": {"image": "$IMAGE"}, "command": ["hostname"],
 "log_path": "hostname.log", "linux": {}}
JSON
"${CRICTL_LONG[@]}" pull "$IMAGE" >/dev/null
POD=$("${CRICTL_LONG[@]}" runp "$WORK/pod.json")
CTR=$("${CRICTL_LONG[@]}" create "$POD" "$WORK/ctr.json" "$WORK/pod.json")
"${CRICTL_LONG[@]}" start "$CTR" >/dev/null
for _ in $(seq 1 300); do  # bounded: 30 s
    "${CRICTL_LONG[@]}" inspect -o go-template --template '{{.status.state}}' "$CTR" | grep -q EXITED && break
    sleep 0.1
done
HOST_NAME=$("${CRICTL_LONG[@]}" logs "$CTR")
"${CRICTL_LONG[@]}" stopp "$POD" >/dev/null && "${CRICTL_LONG[@]}" rmp "$POD" >/dev/null
if [ -z "$HOST_NAME" ] || [ "${#HOST_NAME}" -gt 64 ]; then
    echo "conformance: crictl: the ${#POD_NAME}-character pod's container printed hostname '$HOST_NAME'" >&2
    exit 1
fi
log "crictl: the ${#POD_NAME}-character pod ran; its hostname is '$HOST_NAME' (${#HOST_NAME} bytes)"
