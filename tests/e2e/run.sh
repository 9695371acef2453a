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

UPSTREAM_PORT=${E2E_UPSTREAM_PORT:-15000}
MIRROR_PORT=${E2E_MIRROR_PORT:-5000}
STANDIN=${E2E_STANDIN:-}
IMAGES=(tiny multi multiarch dockerlist)   # pulled by every client, twice
BURST=burst                                 # pulled by five clients at once, cold
PULL_TIMEOUT=120            # seconds for one client pull or copy, at most
BUDGET=${E2E_BUDGET:-480}   # seconds for all checks (the build is not counted)
# Logs shown on failure; processes stopped first at exit: dockerd, then the
# containerds, then the mirror, then the upstream.
LOG_TAILS=(mirror:60 dockerd:30 containerd:15 containerd2:15 registry:20 clients:30)
STOP_ORDER=(dockerd containerd2 containerd mirror registry)
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

UPSTREAM=127.0.0.1:$UPSTREAM_PORT
MIRROR=127.0.0.1:$MIRROR_PORT

case "$STANDIN" in
    "" | pullcache) STANDIN="" ;;
    distribution) ;;
    *) die "E2E_STANDIN must be empty or 'distribution', not '$STANDIN'" ;;
esac
[ "$(id -u)" = 0 ] || die "run as root (dockerd, containerd and unshare -m need it)"
need_numbers "E2E_UPSTREAM_PORT, E2E_MIRROR_PORT, E2E_BUDGET" "$UPSTREAM_PORT" "$MIRROR_PORT" "$BUDGET"

# ---------------------------------------------------------------- setup, build
e2e_setup
BIN=
[ -n "$STANDIN" ] || e2e_build

# ------------------------------------------------------------------ work dirs
e2e_workdirs run "$UPSTREAM_PORT" "$MIRROR_PORT"
e2e_no_internet

# ------------------------------------------------------------------ upstream
start_upstream registry "$UPSTREAM" "$W/upstream-data"

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
[metrics]
listen = "127.0.0.1:0"   # tests/e2e/observability.sh covers the metrics listener
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
    start_pullcache mirror "$W/pullcache.toml"
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
CTD1=$R/ctd       # dockerd's containerd, also used by ctr while the upstream is up
CTD2=$R/ctd2      # a fresh containerd for ctr once the upstream is stopped
start_containerd containerd "$CTD1"
start_containerd containerd2 "$CTD2"

start_dockerd dockerd "$W/docker" "$CTD1/containerd.sock" "http://$MIRROR"
write_hosts_toml "$W/certs.d" "$MIRROR"

# ------------------------------------------------------------------ checks
start_budget
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

alive mirror

# ------------------------------------------------------------------ summary
summary "${STANDIN:-pullcache ($BIN)}"
