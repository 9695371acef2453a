# Shared by the end-to-end suites (run.sh, resilience.sh); sourced, not run.
#
# Provides: logging and the pass/fail tally (and `alive NAME`), the PID registry of every process
# the suite starts (`start`, `stop`, `kill9`), the cleanup trap (stops the
# processes in STOP_ORDER, then any other, unmounts leftovers, removes the
# work directories unless KEEP_WORK=1, prints the tally of an aborted run),
# setup and build, the Distribution upstream, containerd, dockerd, the time
# budget of the checks and the summary.
#
# The sourcing script sets `set -euo pipefail` first and may set:
#   LOG_TAILS   "name:lines" of $LOGS/name.log shown on failure
#   STOP_ORDER  names stopped first by cleanup, in this order
#   BUDGET      seconds for all checks; PULL_TIMEOUT seconds for one step
# shellcheck shell=bash

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$E2E_DIR/../.." && pwd)
DEAD=127.0.0.1:9            # nothing listens here: a proxy / server that refuses
START=$SECONDS

log() { printf '[%4ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
DIE_MSG=
die() {
    DIE_MSG=$*
    printf '[%4ds] ERROR: %s\n' "$((SECONDS - START))" "$*" >&2
    exit 1
}

# alive NAME: a check that the mirror NAME still runs.
alive() {
    local rc
    if running "$1"; then
        pass "$1 still running"
    else
        wait "${PIDS[$1]}" 2>/dev/null && rc=0 || rc=$?
        PIDS[$1]=
        fail "$1 still running" "it exited with status $rc"
    fi
}

# Is something accepting connections on 127.0.0.1:$1?
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# need_numbers WHAT VALUE...: die unless every VALUE is a non-negative integer.
need_numbers() {
    local what=$1 p
    shift
    for p in "$@"; do
        case "$p" in '' | *[!0-9]*) die "bad number '$p' ($what)" ;; esac
    done
}

W=           # work dir: tests/e2e/work/<prefix>.XXXXXX
R=           # short runtime dir for sockets: /tmp/pce2e.XXXXXX
LOGS=
PASS=0
FAIL=0
FAILED=()
SUMMARY_DONE=0
declare -A PIDS=()   # name -> pid of every process this script started
[ -n "${LOG_TAILS+x}" ] || LOG_TAILS=()
[ -n "${STOP_ORDER+x}" ] || STOP_ORDER=()
PULL_TIMEOUT=${PULL_TIMEOUT:-120}

pass() { PASS=$((PASS + 1)); printf 'ok   %s\n' "$1"; }
fail() {
    FAIL=$((FAIL + 1))
    FAILED+=("$1")
    printf 'FAIL %s: %s\n' "$1" "$2"
}

# start NAME LOGFILE CMD...: run in the background, remember the pid.
start() {
    local name=$1 logf=$2
    shift 2
    "$@" >"$logf" 2>&1 &
    PIDS[$name]=$!
    log "started $name (pid ${PIDS[$name]})"
}

# running NAME: is the process recorded as NAME alive?
running() { [ -n "${PIDS[$1]:-}" ] && kill -0 "${PIDS[$1]}" 2>/dev/null; }

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

# kill9 NAME: SIGKILL the recorded pid at once and reap it.
kill9() {
    local name=$1 pid
    pid=${PIDS[$name]:-}
    [ -n "$pid" ] || return 0
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    PIDS[$name]=
}

show_logs() {
    local f n
    [ -n "$LOGS" ] || return 0
    for f in "${LOG_TAILS[@]}"; do
        n=${f##*:}
        f=${f%:*}
        [ -s "$LOGS/$f.log" ] || continue
        printf '\n===== tail -n %s %s.log =====\n' "$n" "$f"
        tail -n "$n" "$LOGS/$f.log"
    done
}

cleanup() {
    local rc=$? i m name
    set +e
    trap - EXIT INT TERM
    if [ "$rc" != 0 ] && [ "$SUMMARY_DONE" = 0 ]; then
        show_logs
        printf '\nthe run stopped early (exit %s): %s\n' "$rc" "${DIE_MSG:-see above}"
        # The aborted run counts as one failed check.
        printf '%d passed, %d failed\n' "$PASS" "$((FAIL + 1))"
    fi
    for name in "${STOP_ORDER[@]}"; do
        stop "$name"
    done
    for name in "${!PIDS[@]}"; do
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

# e2e_setup: setup.sh unless E2E_SKIP_SETUP=1; sets DOCKERD and DOCKER_CLI.
DOCKER_PKG_DIR=${E2E_DOCKER_PKG_DIR:-$E2E_DIR/work/docker-pkg}
e2e_setup() {
    if [ "${E2E_SKIP_SETUP:-0}" != 1 ]; then
        log "setup.sh"
        E2E_DOCKER_PKG_DIR=$DOCKER_PKG_DIR bash "$E2E_DIR/setup.sh" || die "setup.sh failed"
    fi
    DOCKERD=$DOCKER_PKG_DIR/pkg/usr/sbin/dockerd
    DOCKER_CLI=$DOCKER_PKG_DIR/pkg/usr/bin/docker
    if [ ! -x "$DOCKERD" ] || [ ! -x "$DOCKER_CLI" ]; then
        die "no unpacked docker.io in $DOCKER_PKG_DIR (run setup.sh)"
    fi
}

# e2e_build: sets BIN to $PULLCACHE_BIN, or builds pullcache (cargo build --release).
e2e_build() {
    local target
    BIN=
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
}

# e2e_workdirs PREFIX PORT...: the ports must be free and DEAD must refuse;
# creates W (tests/e2e/work/PREFIX.XXXXXX), R and LOGS.
e2e_workdirs() {
    local prefix=$1 p
    shift
    for p in "$@"; do
        if port_open "$p"; then
            die "port 127.0.0.1:$p is busy; stop what listens there or set E2E_UPSTREAM_PORT / E2E_MIRROR_PORT"
        fi
    done
    if port_open "${DEAD##*:}"; then
        die "something listens on $DEAD, which must refuse connections"
    fi
    mkdir -p "$E2E_DIR/work"
    W=$(mktemp -d "$E2E_DIR/work/$prefix.XXXXXX")
    # Unix sockets have a 108-byte path limit: keep them (and runtime state)
    # under a short directory, whatever the checkout's path.
    R=$(mktemp -d /tmp/pce2e.XXXXXX)
    LOGS=$W/logs
    mkdir -p "$LOGS"
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
e2e_no_internet() {
    export HTTP_PROXY=http://$DEAD HTTPS_PROXY=http://$DEAD http_proxy=http://$DEAD https_proxy=http://$DEAD
    export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
}

# start_upstream NAME ADDR DATADIR: a hosted Distribution registry (the same
# DATADIR again after a stop keeps what was pushed).
start_upstream() {
    local name=$1 addr=$2 data=$3
    cat >"$W/$name.yml" <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $data
  delete:
    enabled: true
http:
  addr: $addr
EOF
    start "$name" "$LOGS/$name.log" docker-registry serve "$W/$name.yml"
    wait_http "$name" "http://$addr/v2/" 30
}

# start_pullcache NAME CONFIG: pullcache serving CONFIG, log in $LOGS/NAME.log
# (appended to, so a restart keeps the earlier run's lines).
# pullcache reads PULLCACHE_<SECTION>__<KEY> variables as configuration and
# rejects unknown keys (PULLCACHE_BIN would be one): the daemon gets the file
# and nothing else.
start_pullcache() {
    local name=$1 cfg=$2 v unset_pc=()
    while IFS= read -r v; do unset_pc+=(-u "$v"); done < <(compgen -e | grep '^PULLCACHE_' || true)
    env "${unset_pc[@]}" RUST_LOG="${RUST_LOG:-info}" "$BIN" serve --config "$cfg" >>"$LOGS/$name.log" 2>&1 &
    PIDS[$name]=$!
    log "started $name (pid ${PIDS[$name]})"
}

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

# start_dockerd NAME DIR CONTAINERD_SOCKET MIRROR_URL: Docker Engine with
# --registry-mirror MIRROR_URL; exports DOCKER_HOST.
# The dead proxy keeps dockerd from falling back to the internet when the
# mirror fails (loopback mirrors are not proxied); `unshare -m` keeps its
# mounts (and the /run/docker it insists on, on a tmpfs) private.
start_dockerd() {
    local name=$1 d=$2 ctd=$3 mirror=$4 i end info
    mkdir -p "$d"
    echo "{\"deprecated-key-path\": \"$d/key.json\"}" >"$d/daemon.json"
    # shellcheck disable=SC2016 # $0 and $@ are for the inner sh
    start "$name" "$LOGS/$name.log" \
        unshare -m --propagation private sh -c 'mkdir -p /run/docker && mount -t tmpfs none /run/docker && exec "$0" "$@"' \
        "$DOCKERD" --config-file "$d/daemon.json" \
        --data-root "$d/root" --exec-root "$R/dexec" --pidfile "$R/dockerd.pid" \
        -H "unix://$R/docker.sock" --containerd "$ctd" \
        --storage-driver vfs --bridge none --iptables=false --ip6tables=false \
        --registry-mirror "$mirror"
    export DOCKER_HOST=unix://$R/docker.sock
    end=$((SECONDS + 60))
    for ((i = 0; i < 300 && SECONDS < end; i++)); do
        timeout 5 "$DOCKER_CLI" version >/dev/null 2>&1 && break
        kill -0 "${PIDS[$name]}" 2>/dev/null || die "dockerd exited while starting"
        sleep 0.2
    done
    timeout 10 "$DOCKER_CLI" version >/dev/null 2>&1 || die "dockerd did not answer within 60 s"
    info=$(timeout 10 "$DOCKER_CLI" info 2>&1) || die "docker info failed: $info"
    case "$info" in
        *"$mirror/"*) ;;
        *) die "dockerd does not list $mirror/ as a registry mirror" ;;
    esac
    log "dockerd ready, mirror $mirror"
}

# docker CMD...: the unpacked client, bounded in time.
docker() { timeout 60 "$DOCKER_CLI" "$@"; }

# write_hosts_toml DIR MIRROR: containerd hosts dir where only MIRROR answers
# for docker.io.
write_hosts_toml() {
    local dir=$1 mirror=$2
    mkdir -p "$dir/docker.io"
    cat >"$dir/docker.io/hosts.toml" <<EOF
# Only the mirror can answer: the server itself is a dead address.
server = "http://$DEAD"

[host."http://$mirror"]
  capabilities = ["pull", "resolve"]
EOF
}

# why RC: a one-line reason for a failed client command (last line of
# $LOGS/clients.log).
why() {
    if [ "$1" = 124 ]; then
        printf 'timed out after %s s' "$T"
    else
        printf 'exit %s: %s' "$1" "$(tail -n 1 "$LOGS/clients.log" | cut -c1-400)"
    fi
}

# start_budget: the checks' time budget (BUDGET seconds) starts now.
start_budget() { CHECKS_END=$((SECONDS + BUDGET)); }
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

# summary MIRROR_DESCRIPTION: logs on failure, the tally as the last line;
# returns non-zero on any failure.
summary() {
    if [ "$FAIL" != 0 ]; then
        show_logs
    fi
    printf '\nmirror: %s\nrun took %d s\n' "$1" "$((SECONDS - START))"
    [ "${KEEP_WORK:-0}" != 1 ] || printf 'work dir kept: %s\n' "$W"
    if [ "$FAIL" != 0 ]; then
        printf 'failed checks:\n'
        printf '  %s\n' "${FAILED[@]}"
    fi
    SUMMARY_DONE=1
    printf '%d passed, %d failed\n' "$PASS" "$FAIL"
    [ "$FAIL" = 0 ]
}
