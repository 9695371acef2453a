#!/usr/bin/env bash
# End-to-end suite for pullcache with real clients, offline, on 127.0.0.1.
#
#   sudo tests/e2e/run.sh
#
# Starts and stops by itself: a CNCF Distribution registry as the upstream,
# pullcache as the mirror, a Docker Engine 20.10 daemon (unpacked Debian
# docker.io, its own containerd, vfs) with --registry-mirror, containerd
# (`ctr` with a hosts.toml mirror, `?ns=docker.io`) and skopeo (path prefix
# /v2/docker/...). Every client pulls every test image through the mirror and
# the manifest digests are compared with the upstream's; then the upstream is
# stopped and everything is pulled again with fresh client state, served from
# pullcache's cache alone. The last line is `N passed, M failed`.
#
# Environment:
#   PULLCACHE_BIN       pullcache binary to test (default: cargo build --release)
#   E2E_STANDIN=distribution
#                       use Distribution in proxy mode as the mirror instead of
#                       pullcache (debugging the suite itself; the path-prefix
#                       checks then go to /v2/library/... instead)
#   E2E_UPSTREAM_PORT   upstream registry port (default 15000)
#   E2E_MIRROR_PORT     mirror port (default 5000)
#   E2E_SKIP_SETUP=1    do not run setup.sh
#   E2E_DOCKER_PKG_DIR  where setup.sh unpacked docker.io (default tests/e2e/work/docker-pkg)
#   E2E_BUDGET          seconds the checks may take in all (default 480): a
#                       hanging mirror fails the remaining checks instead of
#                       running past it
#   KEEP_WORK=1         keep tests/e2e/work/run.XXXXXX (logs, configs, copies)
#   RUST_LOG            passed to pullcache (default: info)
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$E2E_DIR/../.." && pwd)
UPSTREAM_PORT=${E2E_UPSTREAM_PORT:-15000}
MIRROR_PORT=${E2E_MIRROR_PORT:-5000}
STANDIN=${E2E_STANDIN:-}
DOCKER_PKG_DIR=${E2E_DOCKER_PKG_DIR:-$E2E_DIR/work/docker-pkg}
IMAGES=(tiny multi multiarch dockerlist)   # pulled by every client, twice
BURST=burst                                 # pulled by five clients at once, cold
DEAD=127.0.0.1:9            # nothing listens here: a proxy / server that refuses
PULL_TIMEOUT=120            # seconds for one client pull or copy, at most
BUDGET=${E2E_BUDGET:-480}   # seconds for all checks (the build is not counted)
START=$SECONDS

UPSTREAM=127.0.0.1:$UPSTREAM_PORT
MIRROR=127.0.0.1:$MIRROR_PORT

log() { printf '[%4ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
DIE_MSG=
die() {
    DIE_MSG=$*
    printf '[%4ds] ERROR: %s\n' "$((SECONDS - START))" "$*" >&2
    exit 1
}

# Is something accepting connections on 127.0.0.1:$1?
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

W=           # work dir: tests/e2e/work/run.XXXXXX
R=           # short runtime dir for sockets: /tmp/pce2e.XXXXXX
LOGS=
PASS=0
FAIL=0
FAILED=()
SUMMARY_DONE=0
declare -A PIDS=()   # name -> pid of every process this script started

pass() { PASS=$((PASS + 1)); printf 'ok   %s\n' "$1"; }
fail() {
    FAIL=$((FAIL + 1))
    FAILED+=("$1")
    printf 'FAIL %s: %s\n' "$1" "$2"
}

# stop NAME: TERM the recorded pid, wait up to 20 s, then KILL.
stop() {
    local name=$1 pid i
    pid=${PIDS[$name]:-}
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) ignored SIGTERM for 20 s; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    PIDS[$name]=
}

show_logs() {
    local f n
    [ -n "$LOGS" ] || return 0
    for f in mirror:60 dockerd:30 containerd:15 containerd2:15 registry:20 clients:30; do
        n=${f#*:}
        f=${f%:*}
        [ -s "$LOGS/$f.log" ] || continue
        printf '\n===== tail -n %s %s.log =====\n' "$n" "$f"
        tail -n "$n" "$LOGS/$f.log"
    done
}

cleanup() {
    local rc=$? i m
    set +e
    trap - EXIT INT TERM
    if [ "$rc" != 0 ] && [ "$SUMMARY_DONE" = 0 ]; then
        show_logs
        printf '\nthe run stopped early (exit %s): %s\n' "$rc" "${DIE_MSG:-see above}"
        # The aborted run counts as one failed check.
        printf '%d passed, %d failed\n' "$PASS" "$((FAIL + 1))"
    fi
    # dockerd first, then the containerds, then the mirror, then the upstream.
    for name in dockerd containerd2 containerd mirror registry; do
        stop "$name"
    done
    if [ -z "$W" ] || [ -z "$R" ]; then
        exit "$rc"
    fi
    # dockerd runs in its own mount namespace, so its mounts die with it;
    # anything still mounted under our directories is unmounted here.
    for ((i = 0; i < 3; i++)); do
        m=$(awk -v w="$W/" -v r="$R/" 'index($5, w) == 1 || index($5, r) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
        [ -n "$m" ] || break
        while IFS= read -r mp; do umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null; done <<<"$m"
    done
    if awk -v w="$W/" -v r="$R/" 'index($5, w) == 1 || index($5, r) == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo; then
        printf 'cleanup: mounts remain under %s or %s; not removing them\n' "$W" "$R" >&2
    else
        rm -rf "$R"
        [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$W"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'DIE_MSG="interrupted (SIGINT)"; exit 130' INT
trap 'DIE_MSG="terminated (SIGTERM)"; exit 143' TERM

case "$STANDIN" in
    "" | pullcache) STANDIN="" ;;
    distribution) ;;
    *) die "E2E_STANDIN must be empty or 'distribution', not '$STANDIN'" ;;
esac
[ "$(id -u)" = 0 ] || die "run as root (dockerd, containerd and unshare -m need it)"
for p in "$UPSTREAM_PORT" "$MIRROR_PORT" "$BUDGET"; do
    case "$p" in '' | *[!0-9]*) die "bad number '$p' (E2E_UPSTREAM_PORT, E2E_MIRROR_PORT, E2E_BUDGET)" ;; esac
done

# ---------------------------------------------------------------- setup, build
if [ "${E2E_SKIP_SETUP:-0}" != 1 ]; then
    log "setup.sh"
    E2E_DOCKER_PKG_DIR=$DOCKER_PKG_DIR bash "$E2E_DIR/setup.sh" || die "setup.sh failed"
fi
DOCKERD=$DOCKER_PKG_DIR/pkg/usr/sbin/dockerd
DOCKER_CLI=$DOCKER_PKG_DIR/pkg/usr/bin/docker
if [ ! -x "$DOCKERD" ] || [ ! -x "$DOCKER_CLI" ]; then
    die "no unpacked docker.io in $DOCKER_PKG_DIR (run setup.sh)"
fi

BIN=
if [ -z "$STANDIN" ]; then
    if [ -n "${PULLCACHE_BIN:-}" ]; then
        BIN=$(cd "$(dirname "$PULLCACHE_BIN")" && pwd)/$(basename "$PULLCACHE_BIN")
    else
        log "cargo build --release"
        (cd "$REPO_ROOT" && cargo build --release --bin pullcache) >&2 || die "cargo build --release failed"
        target=${CARGO_TARGET_DIR:-target}
        case "$target" in /*) ;; *) target=$REPO_ROOT/$target ;; esac
        BIN=$target/release/pullcache
    fi
    [ -x "$BIN" ] || die "pullcache binary $BIN not found or not executable"
fi

# ------------------------------------------------------------------ work dirs
for p in "$UPSTREAM_PORT" "$MIRROR_PORT"; do
    if port_open "$p"; then
        die "port 127.0.0.1:$p is busy; stop what listens there or set E2E_UPSTREAM_PORT / E2E_MIRROR_PORT"
    fi
done
if port_open "${DEAD##*:}"; then
    die "something listens on $DEAD, which must refuse connections"
fi

mkdir -p "$E2E_DIR/work"
W=$(mktemp -d "$E2E_DIR/work/run.XXXXXX")
# Unix sockets have a 108-byte path limit: keep them (and runtime state)
# under a short directory, whatever the checkout's path.
R=$(mktemp -d /tmp/pce2e.XXXXXX)
LOGS=$W/logs
mkdir -p "$LOGS"


# start NAME LOGFILE CMD...: run in the background, remember the pid.
start() {
    local name=$1 logf=$2
    shift 2
    "$@" >"$logf" 2>&1 &
    PIDS[$name]=$!
    log "started $name (pid ${PIDS[$name]})"
}

# wait_http NAME URL SECONDS: until URL answers 2xx, NAME's process alive.
wait_http() {
    local name=$1 url=$2 secs=$3 i end
    end=$((SECONDS + secs))
    for ((i = 0; i < secs * 5 && SECONDS < end; i++)); do
        if curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then
            return 0
        fi
        kill -0 "${PIDS[$name]}" 2>/dev/null || die "$name exited while starting (see $name log)"
        sleep 0.2
    done
    die "$name: $url did not answer 2xx within $secs s"
}

# Clients never reach the internet: any proxied request goes to a dead port.
export HTTP_PROXY=http://$DEAD HTTPS_PROXY=http://$DEAD http_proxy=http://$DEAD https_proxy=http://$DEAD
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

# ------------------------------------------------------------------ upstream
cat >"$W/upstream.yml" <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $W/upstream-data
  delete:
    enabled: true
http:
  addr: $UPSTREAM
EOF
start registry "$LOGS/registry.log" docker-registry serve "$W/upstream.yml"
wait_http registry "http://$UPSTREAM/v2/" 30

log "building and pushing test images"
python3 "$E2E_DIR/make_images.py" --out "$W/images" --push "$UPSTREAM" >"$LOGS/make_images.log" 2>&1 \
    || { cat "$LOGS/make_images.log" >&2; die "make_images.py failed"; }

declare -A UP=()   # image -> manifest digest of its tag in the upstream
declare -A MT=()   # image -> manifest media type
for img in "${IMAGES[@]}" "$BURST"; do
    timeout 60 skopeo inspect --raw --tls-verify=false "docker://$UPSTREAM/library/$img:latest" >"$W/upstream-$img.json" \
        || die "skopeo inspect of library/$img:latest on the upstream failed"
    UP[$img]=sha256:$(sha256sum "$W/upstream-$img.json" | cut -d' ' -f1)
    MT[$img]=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("mediaType",""))' "$W/upstream-$img.json")
    log "upstream library/$img:latest = ${UP[$img]} (${MT[$img]})"
    printf 'library/%s:latest\t%s\t%s\n' "$img" "${UP[$img]}" "${MT[$img]}" >>"$W/upstream-digests.tsv"
done

# -------------------------------------------------------------------- mirror
if [ -z "$STANDIN" ]; then
    cat >"$W/pullcache.toml" <<EOF
[server]
listen = "$MIRROR"
[storage]
root = "$W/cache"
[cache]
tag_ttl = "5m"
[[upstreams]]
name = "docker.io"
url = "http://$UPSTREAM"
default = true
prefix = "docker"
EOF
    export RUST_LOG=${RUST_LOG:-info}
    # pullcache reads PULLCACHE_<SECTION>__<KEY> variables as configuration
    # and rejects unknown keys (PULLCACHE_BIN would be one): the daemon gets
    # the file above and nothing else.
    unset_pc=()
    while IFS= read -r v; do unset_pc+=(-u "$v"); done < <(compgen -e | grep '^PULLCACHE_' || true)
    start mirror "$LOGS/mirror.log" env "${unset_pc[@]}" "$BIN" serve --config "$W/pullcache.toml"
    # skopeo goes through the path prefix that routes to the docker.io upstream.
    SKOPEO_REPO=$MIRROR/docker/library
else
    cat >"$W/standin.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $W/standin-data
  delete:
    enabled: true
http:
  addr: $MIRROR
proxy:
  remoteurl: http://$UPSTREAM
EOF
    start mirror "$LOGS/mirror.log" docker-registry serve "$W/standin.yml"
    # Distribution's proxy mode has no path prefixes.
    SKOPEO_REPO=$MIRROR/library
fi
wait_http mirror "http://$MIRROR/v2/" 30

# --------------------------------------------------------- containerd, dockerd
# start_containerd NAME DIR
start_containerd() {
    local name=$1 d=$2 i end
    mkdir -p "$d"
    cat >"$d/config.toml" <<EOF
version = 2
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$d/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$d/opt"
EOF
    start "$name" "$LOGS/$name.log" containerd --config "$d/config.toml"
    end=$((SECONDS + 30))
    for ((i = 0; i < 150 && SECONDS < end; i++)); do
        timeout 5 ctr --address "$d/containerd.sock" version >/dev/null 2>&1 && return 0
        kill -0 "${PIDS[$name]}" 2>/dev/null || die "$name exited while starting"
        sleep 0.2
    done
    die "$name did not answer within 30 s"
}
CTD1=$R/ctd       # dockerd's containerd, also used by ctr while the upstream is up
CTD2=$R/ctd2      # a fresh containerd for ctr once the upstream is stopped
start_containerd containerd "$CTD1"
start_containerd containerd2 "$CTD2"

D=$W/docker
mkdir -p "$D"
echo "{\"deprecated-key-path\": \"$D/key.json\"}" >"$D/daemon.json"
# The dead proxy keeps dockerd from falling back to the internet when the
# mirror fails (loopback mirrors are not proxied); `unshare -m` keeps its
# mounts (and the /run/docker it insists on, on a tmpfs) private.
# shellcheck disable=SC2016 # $0 and $@ are for the inner sh
start dockerd "$LOGS/dockerd.log" \
    unshare -m --propagation private sh -c 'mkdir -p /run/docker && mount -t tmpfs none /run/docker && exec "$0" "$@"' \
    "$DOCKERD" --config-file "$D/daemon.json" \
    --data-root "$D/root" --exec-root "$R/dexec" --pidfile "$R/dockerd.pid" \
    -H "unix://$R/docker.sock" --containerd "$CTD1/containerd.sock" \
    --storage-driver vfs --bridge none --iptables=false --ip6tables=false \
    --registry-mirror "http://$MIRROR"
export DOCKER_HOST=unix://$R/docker.sock
# docker CMD...: the unpacked client, bounded in time.
docker() { timeout 60 "$DOCKER_CLI" "$@"; }
end=$((SECONDS + 60))
for ((i = 0; i < 300 && SECONDS < end; i++)); do
    timeout 5 "$DOCKER_CLI" version >/dev/null 2>&1 && break
    kill -0 "${PIDS[dockerd]}" 2>/dev/null || die "dockerd exited while starting"
    sleep 0.2
done
timeout 10 "$DOCKER_CLI" version >/dev/null 2>&1 || die "dockerd did not answer within 60 s"
info=$(timeout 10 "$DOCKER_CLI" info 2>&1) || die "docker info failed: $info"
case "$info" in
    *"http://$MIRROR/"*) ;;
    *) die "dockerd does not list http://$MIRROR/ as a registry mirror" ;;
esac
log "dockerd ready, mirror http://$MIRROR"

mkdir -p "$W/certs.d/docker.io"
cat >"$W/certs.d/docker.io/hosts.toml" <<EOF
# Only the mirror can answer: the server itself is a dead address.
server = "http://$DEAD"

[host."http://$MIRROR"]
  capabilities = ["pull", "resolve"]
EOF

# ------------------------------------------------------------------ checks
# why RC: a one-line reason for a failed client command.
why() {
    if [ "$1" = 124 ]; then
        printf 'timed out after %s s' "$T"
    else
        printf 'exit %s: %s' "$1" "$(tail -n 1 "$LOGS/clients.log" | cut -c1-400)"
    fi
}
CHECKS_END=$((SECONDS + BUDGET))
# budget NAME: sets T to the seconds one step of check NAME may take; fails
# the check and returns 1 once the suite's time budget is spent.
budget() {
    T=$((CHECKS_END - SECONDS))
    if [ "$T" -le 0 ]; then
        fail "$1" "not run: the suite's time budget (E2E_BUDGET=$BUDGET s) is spent"
        return 1
    fi
    [ "$T" -le "$PULL_TIMEOUT" ] || T=$PULL_TIMEOUT
}
# check_docker PHASE IMG
check_docker() {
    local phase=$1 img=$2 name got
    name="docker pull $img:latest ($phase)"
    budget "$name" || return 0
    timeout "$T" "$DOCKER_CLI" pull "$img:latest" >>"$LOGS/clients.log" 2>&1 || {
        fail "$name" "docker pull: $(why $?)"
        return
    }
    got=$(docker image inspect --format '{{index .RepoDigests 0}}' "$img:latest" 2>&1) || true
    got=${got#*@}
    if [ "$got" = "${UP[$img]}" ]; then
        pass "$name"
    else
        fail "$name" "RepoDigest $got, upstream ${UP[$img]}"
    fi
}

# check_ctr PHASE SOCKET NAMESPACE IMG REF
check_ctr() {
    local phase=$1 sock=$2 ns=$3 img=$4 ref=$5 name got
    name="ctr pull $ref ($phase)"
    budget "$name" || return 0
    timeout "$T" ctr --address "$sock" -n "$ns" images pull --snapshotter native \
        --hosts-dir "$W/certs.d" "$ref" >>"$LOGS/clients.log" 2>&1 || {
        fail "$name" "ctr pull: $(why $?)"
        return
    }
    got=$(timeout 30 ctr --address "$sock" -n "$ns" images ls | awk -v r="$ref" '$1 == r { print $3 }') || true
    if [ "$got" = "${UP[$img]}" ]; then
        pass "$name"
    else
        fail "$name" "digest '$got', upstream ${UP[$img]}"
    fi
}

# check_skopeo PHASE IMG: inspect --raw (exact bytes) and copy --all.
check_skopeo() {
    local phase=$1 img=$2 src name got out dst
    src=docker://$SKOPEO_REPO/$img:latest
    name="skopeo inspect --raw $SKOPEO_REPO/$img:latest ($phase)"
    if budget "$name"; then
        if timeout "$T" skopeo inspect --raw --tls-verify=false "$src" \
            >"$W/raw-$phase-$img.json" 2>>"$LOGS/clients.log"; then
            got=sha256:$(sha256sum "$W/raw-$phase-$img.json" | cut -d' ' -f1) || true
            if [ "$got" = "${UP[$img]}" ]; then pass "$name"; else fail "$name" "digest $got, upstream ${UP[$img]}"; fi
        else
            fail "$name" "skopeo inspect: $(why $?)"
        fi
    fi

    # skopeo's oci: destination only takes OCI manifests (it would convert a
    # Docker list); Docker-typed images are copied to dir:, byte for byte.
    name="skopeo copy --all $SKOPEO_REPO/$img:latest ($phase)"
    out=$W/out-$phase-$img
    case "${MT[$img]}" in
        application/vnd.oci.*) dst=oci:$out:latest ;;
        *) dst=dir:$out ;;
    esac
    budget "$name" || return 0
    timeout "$T" skopeo --insecure-policy copy --all --preserve-digests \
        --src-tls-verify=false "$src" "$dst" >>"$LOGS/clients.log" 2>&1 || {
        fail "$name" "skopeo copy: $(why $?)"
        return
    }
    case "$dst" in
        oci:*) got=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$out/index.json" 2>&1) || true ;;
        *) got=sha256:$(sha256sum "$out/manifest.json" | cut -d' ' -f1) || true ;;
    esac
    if [ "$got" = "${UP[$img]}" ]; then pass "$name"; else fail "$name" "copied manifest $got, upstream ${UP[$img]}"; fi
}

# check_tags PHASE IMG
check_tags() {
    local phase=$1 img=$2 name out
    name="skopeo list-tags $SKOPEO_REPO/$img ($phase)"
    budget "$name" || return 0
    if out=$(timeout "$T" skopeo list-tags --tls-verify=false "docker://$SKOPEO_REPO/$img" 2>&1) \
        && python3 -c 'import json,sys; sys.exit(0 if "latest" in json.loads(sys.argv[1])["Tags"] else 1)' "$out" 2>/dev/null; then
        pass "$name"
    else
        fail "$name" "no tag 'latest' in: $(printf '%s' "$out" | tr '\n' ' ' | cut -c1-300)"
    fi
}

# check_catalog PHASE: /v2/_catalog lists what the cache holds; every test
# repository must be in it, possibly under a prefix (docker/library/tiny).
check_catalog() {
    local phase=$1 name out
    name="GET /v2/_catalog lists every image ($phase)"
    budget "$name" || return 0
    if ! out=$(curl -fsS --max-time "$T" "http://$MIRROR/v2/_catalog" 2>&1); then
        fail "$name" "curl: $out"
        return
    fi
    if out=$(python3 - "$out" "${IMAGES[@]}" "$BURST" <<'PY' 2>&1
import json, sys
repos = json.loads(sys.argv[1])["repositories"]
missing = [i for i in sys.argv[2:] if not any(r == "library/" + i or r.endswith("/library/" + i) for r in repos)]
if missing:
    sys.exit("missing %s in %s" % (missing, repos))
PY
    ); then
        pass "$name"
    else
        fail "$name" "$(printf '%s' "$out" | tail -n 1 | cut -c1-300)"
    fi
}

# check_burst: five clients pull the same image at once while the cache has
# none of it: dockerd, containerd and three skopeo copies.
check_burst() {
    local img=$BURST pids=() names=(docker ctr skopeo-1 skopeo-2 skopeo-3) i n rc got name
    budget "concurrent cold pulls of $img" || return 0
    timeout "$T" "$DOCKER_CLI" pull "$img:latest" >"$LOGS/burst-docker.log" 2>&1 &
    pids+=($!)
    timeout "$T" ctr --address "$CTD1/containerd.sock" -n e2e-burst images pull --snapshotter native \
        --hosts-dir "$W/certs.d" "docker.io/library/$img:latest" >"$LOGS/burst-ctr.log" 2>&1 &
    pids+=($!)
    for i in 1 2 3; do
        timeout "$T" skopeo --insecure-policy copy --preserve-digests --src-tls-verify=false \
            "docker://$SKOPEO_REPO/$img:latest" "oci:$W/out-burst-$i:latest" >"$LOGS/burst-skopeo-$i.log" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        n=${names[$i]}
        name="concurrent cold pull of $img: $n"
        wait "${pids[$i]}" && rc=0 || rc=$?
        if [ "$rc" != 0 ]; then
            if [ "$rc" = 124 ]; then
                fail "$name" "timed out after $T s"
            else
                fail "$name" "exit $rc: $(tail -n 1 "$LOGS/burst-$n.log" | cut -c1-400)"
            fi
            continue
        fi
        case "$n" in
            docker) got=$(docker image inspect --format '{{index .RepoDigests 0}}' "$img:latest" 2>&1) || true
                    got=${got#*@} ;;
            ctr) got=$(timeout 30 ctr --address "$CTD1/containerd.sock" -n e2e-burst images ls \
                       | awk -v r="docker.io/library/$img:latest" '$1 == r { print $3 }') || true ;;
            *) got=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' \
                     "$W/out-burst-${n#skopeo-}/index.json" 2>&1) || true ;;
        esac
        if [ "$got" = "${UP[$img]}" ]; then pass "$name"; else fail "$name" "digest '$got', upstream ${UP[$img]}"; fi
    done
}

log "phase 1: upstream up"
for img in "${IMAGES[@]}"; do check_docker online "$img"; done
for img in "${IMAGES[@]}"; do check_ctr online "$CTD1/containerd.sock" e2e "$img" "docker.io/library/$img:latest"; done
for img in "${IMAGES[@]}"; do check_skopeo online "$img"; done
check_tags online tiny
check_burst

log "phase 2: upstream stopped, fresh clients, cache only"
stop registry
if port_open "$UPSTREAM_PORT"; then
    fail "upstream stopped" "something still answers on $UPSTREAM"
else
    pass "upstream stopped"
fi

# dockerd: remove the images (and so their layers) and pull again.
docker rmi "${IMAGES[@]/%/:latest}" "$BURST:latest" >>"$LOGS/clients.log" 2>&1 || true
if [ -z "$(docker images -q)" ]; then
    pass "docker rmi: no image left"
else
    fail "docker rmi: no image left" "$(docker images --format '{{.Repository}}:{{.Tag}}' | tr '\n' ' ')"
fi
for img in "${IMAGES[@]}"; do check_docker offline "$img"; done

# containerd: a containerd that has never seen the images pulls by tag; then
# everything is removed and garbage-collected, and it pulls by digest.
for img in "${IMAGES[@]}"; do check_ctr offline "$CTD2/containerd.sock" e2e "$img" "docker.io/library/$img:latest"; done
ctr2() { timeout 60 ctr --address "$CTD2/containerd.sock" -n e2e "$@"; }
refs=$(ctr2 images ls -q) || true
if [ -n "$refs" ]; then
    # shellcheck disable=SC2086 # one ref per word
    ctr2 images rm --sync $refs >>"$LOGS/clients.log" 2>&1 || true
fi
ctr2 content prune references >>"$LOGS/clients.log" 2>&1 || true
if [ -z "$(ctr2 content ls -q)" ]; then
    pass "ctr images rm + content prune: no content left"
else
    fail "ctr images rm + content prune: no content left" "$(ctr2 content ls -q | wc -l) blobs remain"
fi
for img in "${IMAGES[@]}"; do check_ctr offline "$CTD2/containerd.sock" e2e "$img" "docker.io/library/$img@${UP[$img]}"; done

for img in "${IMAGES[@]}"; do check_skopeo offline "$img"; done

check_catalog offline

if kill -0 "${PIDS[mirror]}" 2>/dev/null; then
    pass "mirror still running after all pulls"
else
    wait "${PIDS[mirror]}" 2>/dev/null && rc=0 || rc=$?
    PIDS[mirror]=
    fail "mirror still running after all pulls" "it exited with status $rc"
fi

# ------------------------------------------------------------------ summary
if [ "$FAIL" != 0 ]; then
    show_logs
fi
printf '\nmirror: %s\nrun took %d s\n' "${STANDIN:-pullcache ($BIN)}" "$((SECONDS - START))"
[ "${KEEP_WORK:-0}" != 1 ] || printf 'work dir kept: %s\n' "$W"
if [ "$FAIL" != 0 ]; then
    printf 'failed checks:\n'
    printf '  %s\n' "${FAILED[@]}"
fi
SUMMARY_DONE=1
printf '%d passed, %d failed\n' "$PASS" "$FAIL"
[ "$FAIL" = 0 ]
