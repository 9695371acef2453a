#!/usr/bin/env bash
# Installs what the benchmark (bench/run.sh) needs on Debian, idempotently:
#   docker-registry (CNCF Distribution 2.8: the upstream and the proxy-mode competitor),
#   nginx (proxy_cache competitor and the sendfile baseline), wrk (manifest load),
#   openssl (sha256 speed), python3 (the harness), curl (the blob client).
# `apt-get update` runs only when something is missing. Installs run with a temporary
# /usr/sbin/policy-rc.d that forbids starting services, so installing nginx or
# docker-registry does not start a daemon on :80 or :5000.
set -euo pipefail

APT_PACKAGES=(docker-registry nginx wrk openssl python3 curl procps)
COMMANDS=(docker-registry nginx wrk openssl python3 curl sync)

export DEBIAN_FRONTEND=noninteractive
log() { printf 'bench/setup: %s\n' "$*" >&2; }
die() { printf 'bench/setup: ERROR: %s\n' "$*" >&2; exit 1; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" != installed ]; then
        missing+=("$p")
    fi
done
for c in "${COMMANDS[@]}"; do
    command -v "$c" >/dev/null 2>&1 || missing+=("cmd:$c")
done

if [ "${#missing[@]}" -eq 0 ]; then
    log "ok (all installed)"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "missing ${missing[*]} and not root; run as root"
log "missing: ${missing[*]}"
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, from pullcache bench/setup.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
log "apt-get update"
apt-get update -qq >&2
log "apt-get install ${APT_PACKAGES[*]}"
apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >&2
for c in "${COMMANDS[@]}"; do
    command -v "$c" >/dev/null 2>&1 || die "command $c still missing after install"
done
log "ok"
