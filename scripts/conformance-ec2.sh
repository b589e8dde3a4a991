#!/usr/bin/env bash
# critest (the conformance kit's) against EC2 cells of the simulator, by hand: not part of CI
# yet (about 6 minutes). Run as root after scripts/setup.sh. Prints the suite's summary line;
# results stay in $KIYOTPY_CONFORMANCE_OUT (default /tmp/kiyot-conformance-ec2/<time>).
#
# The simulator's VPC is 10.129.0.0/16 on the bridge kiyotsc0; the kit's registry
# (127.0.0.1:5000) is served on its gateway, and the node's registries.conf sends
# registry.k8s.io and gcr.io there, so that node and cells pull the same stand-in images.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
KIT=${KIYOTPY_CONFORMANCE_KIT:-$REPO/../shared/conformance}
OUT=${KIYOTPY_CONFORMANCE_OUT:-/tmp/kiyot-conformance-ec2/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/kiyot-conformance-ec2-run.XXXXXX)
GATEWAY=10.129.1.1
export AWS_SHARED_CREDENTIALS_FILE=$WORK/sim/credentials AWS_CONFIG_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true
log() { echo "conformance-ec2: $*"; }

SIM_PID= NODE_PID=
stop() {  # bounded: 10 s, then SIGKILL
    local pid=$1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    stop "$NODE_PID"
    [ -f "$WORK/node.toml" ] && "$REPO/.venv/bin/kiyot-py" reset --yes --config "$WORK/node.toml" >>"$OUT/serve.log" 2>&1 || true
    stop "$SIM_PID"
    rm -rf "$WORK"
}
trap cleanup EXIT

"$KIT/registry/start-registry.sh" >/dev/null
mkdir -p "$WORK/sim"
"$REPO/.venv/bin/kiyot-ec2sim" --state-dir "$WORK/sim" --listen 127.0.0.1:0 --bridge kiyotsc0 \
    --vpc-cidr 10.129.0.0/16 --forward 5000=127.0.0.1:5000 >"$OUT/sim.log" 2>&1 &
SIM_PID=$!
for _ in $(seq 1 300); do grep -q '^ready' "$OUT/sim.log" && break; sleep 0.1; done  # bounded: 30 s
grep -q '^ready' "$OUT/sim.log" || { log "the simulator did not start (see $OUT/sim.log)"; exit 1; }

cat >"$WORK/registries.conf" <<CONF
unqualified-search-registries = []
[[registry]]
prefix = "registry.k8s.io"
location = "$GATEWAY:5000"
insecure = true
[[registry]]
prefix = "gcr.io"
location = "$GATEWAY:5000"
insecure = true
[[registry]]
location = "$GATEWAY:5000"
insecure = true
CONF
{
    echo "socket = \"$WORK/kiyot.sock\""
    echo "state_dir = \"$WORK/state\""
    echo 'node_name = "conformance-ec2"'
    echo "registries_conf = \"$WORK/registries.conf\""
    grep -v '^registries_conf' "$WORK/sim/node.toml"
    # critest's host paths are temporary directories on the node: an operator's allow-list.
    printf '\n[volumes]\nallowed_host_paths = "/tmp"\n'
} >"$WORK/node.toml"

log "kiyot-py serve (provider aws, on the simulator) on $WORK/kiyot.sock (log: $OUT/serve.log)"
"$REPO/.venv/bin/kiyot-py" serve --config "$WORK/node.toml" >"$OUT/serve.log" 2>&1 &
NODE_PID=$!
for _ in $(seq 1 300); do [ -S "$WORK/kiyot.sock" ] && break; sleep 0.1; done  # bounded: 30 s

status=0
OUT_DIR=$OUT/critest "$KIT/run-critest.sh" "unix://$WORK/kiyot.sock" | tail -1 || status=$?
log "results: $OUT/critest (summary.txt, critest.log)"
exit "$status"
