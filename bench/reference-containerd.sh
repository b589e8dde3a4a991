#!/usr/bin/env bash
# A reference CRI runtime for bench/lifecycle.py: Debian's containerd (1.6) with runc,
# kept apart from any system containerd (own config, root, state, socket, CNI network).
#
#   sudo bench/reference-containerd.sh         # install, configure, start; prints the endpoint
#   sudo bench/reference-containerd.sh stop    # stop it, remove its pods, bridge and state
#
# Then: .venv/bin/python bench/lifecycle.py -n 20 \
#         --reference unix:///run/kiyot-bench-containerd/containerd.sock
#
# Idempotent: running it again while containerd runs only re-checks and prints the endpoint.
# Needs the tests' registry on 127.0.0.1:5000 (starts one when nothing answers there) for the
# sandbox image 127.0.0.1:5000/test/pause:latest, built offline from the host's busybox.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
ETC=/etc/kiyot-bench/containerd
ROOT=/var/lib/kiyot-bench-containerd
STATE=/run/kiyot-bench-containerd
SOCK="$STATE/containerd.sock"
LOG="$ROOT/containerd.log"
PIDFILE="$STATE/containerd.pid"
REG_PIDFILE="$STATE/registry.pid"
REGISTRY=127.0.0.1:5000
PAUSE="$REGISTRY/test/pause:latest"
BRIDGE=kbench0
SUBNET=10.125.0.0/24
CNI_NET=kbench
NS=k8s.io

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

ctr_() { ctr --address "$SOCK" --namespace "$NS" "$@"; }

cri() {  # cri up|rmpods: over the CRI socket, with the repo's generated stubs
    "$PY" - "$REPO" "$SOCK" "$1" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import grpc
from kiyot_py.gen.runtime.v1 import api_pb2 as pb, api_pb2_grpc
rt = api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel("unix://" + sys.argv[2]))
if sys.argv[3] == "up":
    rt.Version(pb.VersionRequest(), timeout=2)
else:  # stop and remove every pod (frees netns, veths, IPs)
    for s in rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=s.id), timeout=60)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=s.id), timeout=60)
        print(f"removed pod {s.id[:12]}")
EOF
}

cri_up() { cri up >/dev/null 2>&1; }

stop() {
    if running; then
        pid="$(cat "$PIDFILE")"
        # Pods first (CRI-created sandboxes hold netns, veths and IPs), while containerd runs.
        cri rmpods || true
        for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
        sleep 0.5
        for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$t" >/dev/null 2>&1 || true; done
        for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$c" >/dev/null 2>&1 || true; done
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "containerd ($pid) stopped"
    fi
    # Shims of this containerd only (they carry its socket in their argv), then their runc state.
    for p in $(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK" || true); do kill -9 "$p" 2>/dev/null || true; done
    if [ -d "$STATE/runc" ]; then
        for c in $(runc --root "$STATE/runc/$NS" list -q 2>/dev/null); do
            runc --root "$STATE/runc/$NS" delete -f "$c" >/dev/null 2>&1 || true
        done
    fi
    # The registry, only if this script started it.
    if [ -f "$REG_PIDFILE" ]; then
        rp="$(cat "$REG_PIDFILE")"
        kill "$rp" 2>/dev/null && echo "registry ($rp) stopped" || true
        rm -f "$REG_PIDFILE"
    fi
    # Network: the bridge, and any iptables rule naming our subnet or bridge (the bridge
    # plugin adds none with ipMasq=false; this is for older configs or other plugins).
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE" && echo "bridge $BRIDGE removed"; fi
    for table in nat filter; do
        iptables -t "$table" -S 2>/dev/null | grep -E -- "${SUBNET%/*}|$BRIDGE" | grep '^-A' \
            | while read -r _ rule; do iptables -t "$table" -D $rule || true; done || true
    done
    # CRI's pod netns (/var/run/netns/cni-*) went with the pods above; the IPAM store is ours.
    rm -rf "$ROOT/cni-ipam"
    # Unmount anything still mounted under our root/state, then drop the state dir.
    for m in $(awk -v r="$ROOT" -v s="$STATE" '$5 ~ "^"r || $5 ~ "^"s {print $5}' /proc/self/mountinfo | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$STATE"
    # containerd 1.6 puts shim sockets in /run/containerd/s whatever its state dir (hashed by
    # our address, so no clash): drop the directories only if empty, i.e. no other containerd.
    rmdir /run/containerd/s /run/containerd 2>/dev/null || true
}

if [ "${1:-start}" = stop ]; then
    stop
    exit 0
elif [ "${1:-start}" != start ]; then
    echo "usage: $0 [start|stop]" >&2; exit 2
fi

# --- packages ---------------------------------------------------------------------------
need=()
command -v containerd >/dev/null || need+=(containerd)
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/loopback ] \
    || need+=(containernetworking-plugins)
command -v runc >/dev/null || need+=(runc)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    # Debian's postinst would enable the system containerd.service; no systemd runs here, and
    # a policy-rc.d (if any) keeps it from starting. Ours never uses /run/containerd anyway.
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi

if running && cri_up; then
    echo "containerd already running (pid $(cat "$PIDFILE"))"
    echo "unix://$SOCK"
    exit 0
fi

# --- config -----------------------------------------------------------------------------
mkdir -p "$ETC/cni" "$ROOT" "$STATE"
cat >"$ETC/config.toml" <<EOF
# containerd for bench/lifecycle.py's --reference (written by bench/reference-containerd.sh)
version = 2
root = "$ROOT"
state = "$STATE"
oom_score = 0

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$ROOT/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  # CRI gives the sandbox oom_score_adj -998; lowering it needs CAP_SYS_RESOURCE, which this
  # host's root lacks (CapBnd 0x1fffeffffff), so runc's nsexec fails with "can't get final
  # child's PID from pipe: EOF". Restricting caps it at containerd's own (0), as rootless does.
  restrict_oom_score_adj = true
  max_container_log_line_size = 16384

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "$STATE/runc"
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$ETC/cni"
    max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$ETC/certs.d"
EOF

# Every image comes from the tests' registry: under its own name, and under the upstreams
# the conformance kit's images name (registry.k8s.io/..., gcr.io/...), as the kit's
# registries.conf sends those there for kiyot-py: critest runs against both runtimes offline.
for name in "$REGISTRY" registry.k8s.io gcr.io; do
    if [ "$name" = "$REGISTRY" ]; then server="http://$REGISTRY"; else server="https://$name"; fi
    mkdir -p "$ETC/certs.d/$name"
    cat >"$ETC/certs.d/$name/hosts.toml" <<EOF
server = "$server"

[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
EOF
done

# isGateway=false: no address on the bridge, so the bridge plugin leaves net.ipv4.ip_forward
# alone (with isGateway it turns it on host-wide); the pods need no route out for the bench.
cat >"$ETC/cni/10-$CNI_NET.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NET",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$SUBNET"}]],
        "dataDir": "$ROOT/cni-ipam"
      }
    }
  ]
}
EOF

# --- registry and the sandbox image -------------------------------------------------------
cd "$REPO"
"$PY" - "$REGISTRY" "$REG_PIDFILE" "$ROOT/registry" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.support import images as ti
from tests.support.registry import start_registry, v2_up

registry, pidfile, root = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if not v2_up(registry):
    proc = start_registry(root, registry)  # its own session: outlives this snippet
    pidfile.write_text(f"{proc.pid}\n")
    print(f"started docker-registry (pid {proc.pid}) on {registry}")
p = ti.Pusher(registry)
base = ti.make_layer(ti.busybox_rootfs_entries())
pause = p.push_image("test/pause", ["latest"], ti.host_arch(), [base],
                     {"Cmd": ["sleep", "2147483647"], "Env": [ti.PATH_ENV]}, "pause")
print(f"sandbox image {pause.ref} {pause.manifest_digest}")
EOF

# --- start --------------------------------------------------------------------------------
if running; then  # a containerd of ours that does not answer: restart it
    kill "$(cat "$PIDFILE")" 2>/dev/null || true
    sleep 1
fi
echo "=== $(date -u +%FT%TZ) start" >>"$LOG"
setsid containerd --config "$ETC/config.toml" >>"$LOG" 2>&1 </dev/null &
echo $! >"$PIDFILE"
for _ in $(seq 150); do
    if cri_up; then break; fi
    if ! running; then echo "containerd exited; see $LOG:" >&2; tail -30 "$LOG" >&2; exit 1; fi
    sleep 0.2
done
cri_up || { echo "containerd's CRI does not answer on $SOCK; see $LOG:" >&2; tail -30 "$LOG" >&2; exit 1; }
echo "containerd $(containerd --version | awk '{print $3}') running (pid $(cat "$PIDFILE")), log $LOG"
echo "unix://$SOCK"
