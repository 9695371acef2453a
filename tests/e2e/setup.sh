#!/usr/bin/env bash
# Installs what the end-to-end suites (tests/e2e/run.sh, resilience.sh,
# observability.sh) need on Debian 12, idempotently:
#   - from apt: docker-registry (CNCF Distribution), skopeo, containerd,
#     python3, curl, the two libraries dockerd links (libdevmapper1.02.1,
#     libsystemd0), prometheus (with promtool) and docker-compose (1.29, to
#     validate compose/docker-compose.yml offline); `apt-get update` runs only
#     when something is missing;
#   - the Debian docker.io package (Docker Engine 20.10), downloaded and
#     unpacked with `dpkg -x` into $E2E_DOCKER_PKG_DIR
#     (default tests/e2e/work/docker-pkg, gitignored), never installed, so no
#     service is started and the machine's own Docker (if any) is untouched.
#
# Package installs run with a temporary /usr/sbin/policy-rc.d that forbids
# starting services: on a machine with systemd, installing docker-registry
# would otherwise start a registry on :5000, containerd on /run/containerd
# and Prometheus on :9090, which the suites neither need nor want.
#
# Must run as root (or find everything already installed).
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DOCKER_PKG_DIR=${E2E_DOCKER_PKG_DIR:-$E2E_DIR/work/docker-pkg}
APT_PACKAGES=(docker-registry skopeo containerd python3 curl libdevmapper1.02.1 libsystemd0 prometheus docker-compose)
# Commands the suite runs, each from one of the packages above.
COMMANDS=(docker-registry skopeo containerd ctr python3 curl unshare mount umount timeout sha256sum prometheus promtool docker-compose)

export DEBIAN_FRONTEND=noninteractive

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" = 0 ]; then
        log "apt-get update"
        apt-get update -qq >&2
        apt_updated=1
    fi
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" != installed ]; then
        missing+=("$p")
    fi
done
for c in "${COMMANDS[@]}"; do
    command -v "$c" >/dev/null 2>&1 || missing+=("cmd:$c")
done

if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]} and not root; run as root"
    log "missing: ${missing[*]}"
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# temporary, from pullcache tests/e2e/setup.sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
        trap 'rm -f "$policy"' EXIT
    fi
    apt_update_once
    log "apt-get install ${APT_PACKAGES[*]}"
    apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >&2
    if [ "$created_policy" = 1 ]; then
        rm -f "$policy"
        trap - EXIT
    fi
    for c in "${COMMANDS[@]}"; do
        command -v "$c" >/dev/null 2>&1 || die "command $c still missing after install"
    done
fi

# Docker Engine 20.10 from Debian, unpacked only.
if [ -x "$DOCKER_PKG_DIR/pkg/usr/sbin/dockerd" ] && [ -x "$DOCKER_PKG_DIR/pkg/usr/bin/docker" ]; then
    log "docker.io already unpacked in $DOCKER_PKG_DIR/pkg"
else
    [ "$(id -u)" = 0 ] || die "docker.io not unpacked yet and not root; run as root"
    mkdir -p "$DOCKER_PKG_DIR"
    tmp=$(mktemp -d "$DOCKER_PKG_DIR/dl.XXXXXX")
    download() {
        (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root docker.io >&2)
    }
    log "apt-get download docker.io"
    if ! download; then
        apt_update_once
        download || die "apt-get download docker.io failed"
    fi
    debs=("$tmp"/docker.io_*.deb)
    [ -f "${debs[0]}" ] || die "no docker.io_*.deb downloaded"
    rm -rf "$DOCKER_PKG_DIR/pkg" "$DOCKER_PKG_DIR"/docker.io_*.deb
    dpkg -x "${debs[0]}" "$tmp/pkg"
    mv "${debs[0]}" "$DOCKER_PKG_DIR/"
    mv "$tmp/pkg" "$DOCKER_PKG_DIR/pkg"
    rmdir "$tmp"
    [ -x "$DOCKER_PKG_DIR/pkg/usr/sbin/dockerd" ] || die "dockerd not found in the docker.io package"
    log "unpacked $(basename "$DOCKER_PKG_DIR"/docker.io_*.deb) into $DOCKER_PKG_DIR/pkg"
fi

libs=$(ldd "$DOCKER_PKG_DIR/pkg/usr/sbin/dockerd" 2>&1) || die "ldd dockerd failed: $libs"
case "$libs" in
    *"not found"*) die "dockerd has unresolved libraries: $(printf '%s\n' "$libs" | grep 'not found' | tr '\n' ' ')" ;;
esac
log "ok"
