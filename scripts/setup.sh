#!/usr/bin/env bash
# Install what the tests need (run as root; idempotent; fast when everything is there):
# Debian packages for cells and images, and the repo's .venv with `pip install -e '.[test]'`.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
log() { echo "setup: $*"; }

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

# package -> a file it provides
declare -A WANT=(
    [runc]=/usr/sbin/runc
    [conmon]=/usr/bin/conmon
    [catatonit]=/usr/bin/catatonit
    [umoci]=/usr/bin/umoci
    [skopeo]=/usr/bin/skopeo
    [docker-registry]=/usr/bin/docker-registry
    [busybox-static]=/bin/busybox
    [iproute2]=/sbin/ip
    [iptables]=/usr/sbin/iptables
    [sqlite3]=/usr/bin/sqlite3
    [socat]=/usr/bin/socat
    [ca-certificates]=/etc/ssl/certs/ca-certificates.crt
)
declare -A ALT=(  # other places the same tool may live
    [runc]=/usr/bin/runc
    [busybox-static]=/usr/bin/busybox
    [iproute2]=/usr/sbin/ip
    [iptables]=/sbin/iptables
)

missing=()
for pkg in "${!WANT[@]}"; do
    if [ -e "${WANT[$pkg]}" ] || { [ -n "${ALT[$pkg]:-}" ] && [ -e "${ALT[$pkg]}" ]; }; then
        continue
    fi
    missing+=("$pkg")
done
# busybox-static: the test images need the static binary, not just any busybox.
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed"; then
    [[ " ${missing[*]} " == *" busybox-static "* ]] || missing+=(busybox-static)
fi
if ! command -v python3 >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
elif ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    if [ ! -x "$REPO/.venv/bin/python" ]; then
        missing+=(python3-venv)
    fi
fi

if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Debian's docker-registry starts a service on :5000 (every address, htpasswd auth) when
    # installed; the tests run their own on 127.0.0.1:5000. Keep apt from starting services
    # (policy-rc.d, honoured by invoke-rc.d and deb-systemd-invoke) unless a policy exists.
    POLICY=/usr/sbin/policy-rc.d
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
        $SUDO chmod 755 "$POLICY"
        trap '$SUDO rm -f "$POLICY"' EXIT
        log "wrote $POLICY (exit 101) for the install; removed afterwards"
    fi
    log "apt-get update"
    $SUDO apt-get update -q
    log "apt-get install -y --no-install-recommends ${missing[*]}"
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
    if [ -e "$POLICY" ] && [ "$(cat "$POLICY")" = "$(printf '#!/bin/sh\nexit 101')" ]; then
        $SUDO rm -f "$POLICY"
        trap - EXIT
    fi
    if [[ " ${missing[*]} " == *" docker-registry "* ]]; then
        # Should a policy have let it start anyway, stop the packaged service.
        if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
            log "stopping the packaged docker-registry service (the tests run their own)"
            $SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
        elif [ -x /etc/init.d/docker-registry ] && /etc/init.d/docker-registry status >/dev/null 2>&1; then
            log "stopping the packaged docker-registry service (the tests run their own)"
            $SUDO /etc/init.d/docker-registry stop >/dev/null 2>&1 || true
        fi
    fi
else
    log "system packages present: ${!WANT[*]}"
fi

if [ ! -x "$REPO/.venv/bin/python" ]; then
    log "python3 -m venv $REPO/.venv"
    python3 -m venv "$REPO/.venv"
fi

# pip only when the project (or its test extras) is not installed yet, or pyproject changed.
stamp="$REPO/.venv/.kiyot-setup-stamp"
want_stamp=$(cat "$REPO/pyproject.toml" | sha256sum | cut -c1-64)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_stamp" ] \
    && "$REPO/.venv/bin/python" -c 'import pytest, pytest_asyncio, kiyot_py' >/dev/null 2>&1; then
    log ".venv up to date ($REPO/.venv)"
else
    log "pip install -e '.[test]' into $REPO/.venv"
    "$REPO/.venv/bin/python" -m pip install -q -e "$REPO[test]"
    echo "$want_stamp" > "$stamp"
fi
log "done"
