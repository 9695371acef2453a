#!/usr/bin/env bash
# Resilience suite for pullcache with real clients, offline, on 127.0.0.1.
#
#   sudo tests/e2e/resilience.sh
#
# The same set-up as run.sh (a CNCF Distribution upstream, pullcache as the
# mirror, dockerd 20.10 with --registry-mirror, containerd with a hosts.toml
# mirror, skopeo through the path prefix), in four sections, each with its
# own pullcache and storage root:
#
#   disk     a disk budget (storage.max_size 80 MiB, watermarks 0.9/0.8, a
#            sweep every 2 s, evict1 pinned): six images of one 20 MiB
#            incompressible layer each are pulled one after the other; the
#            bytes under blobs/ (+ tmp/) never pass max_size plus one blob
#            in flight, and are back under max_size within 10 s of each
#            pull; the pinned image's files stay (same inode); evicted
#            images are fetched again transparently, digests checked;
#            /readyz's usage_bytes equals the blob files' bytes.
#   tag      cache.tag_ttl 3s: library/moving:latest is pulled, another
#            image is pushed to the same tag upstream, and after 4 s
#            skopeo, a fresh containerd namespace and dockerd get the new
#            digest.
#   offline  health probing (1 s, threshold 2, timeout 1 s). Every image
#            cached while the upstream was up (tiny, multi, multiarch,
#            dockerlist, both digests of moving) is pulled by tag and by
#            digest by dockerd (images pruned first) and by a containerd
#            that never saw them, with the upstream stopped; /healthz,
#            /readyz and /v2/_health answer (200, JSON, docker.io "down");
#            an image never pulled fails within a few seconds; then the
#            upstream port becomes a black hole (accepts, never answers):
#            uncached requests still fail fast and cached tags are still
#            served at once. A stale tag carries `Warning: 110`. When the
#            upstream is back, /readyz says so within 10 s and the image
#            that failed fast pulls.
#   kill     20 concurrent pulls (10 skopeo copies, 10 curl GETs of large
#            blobs) on an empty cache, pullcache killed with SIGKILL while
#            bytes flow; restarted on the same root: tmp/ is empty, every
#            file under blobs/ hashes to its name, and the same 20 pulls all
#            succeed with every digest checked; /readyz's usage_bytes
#            equals the blob files' bytes.
#
# The last line is `N passed, M failed`; the exit status is non-zero on any
# failure, and the tails of the logs are printed.
#
# Environment:
#   PULLCACHE_BIN       pullcache binary to test (default: cargo build --release)
#   E2E_UPSTREAM_PORT   upstream registry port (default 16000)
#   E2E_MIRROR_PORT     mirror port (default 6000)
#   E2E_SECTIONS        sections to run (default "disk tag offline kill";
#                       offline uses what tag cached when both run)
#   E2E_SKIP_SETUP=1    do not run setup.sh
#   E2E_DOCKER_PKG_DIR  where setup.sh unpacked docker.io (default tests/e2e/work/docker-pkg)
#   E2E_BUDGET          seconds the checks may take in all (default 600)
#   KEEP_WORK=1         keep tests/e2e/work/res.XXXXXX (logs, configs, copies)
#   RUST_LOG            passed to pullcache (default: info)
set -euo pipefail

UPSTREAM_PORT=${E2E_UPSTREAM_PORT:-16000}
MIRROR_PORT=${E2E_MIRROR_PORT:-6000}
SECTIONS=${E2E_SECTIONS:-disk tag offline kill}
PULL_TIMEOUT=120            # seconds for one client pull or copy, at most
BUDGET=${E2E_BUDGET:-600}   # seconds for all checks (the build is not counted)
EVICT_IMAGES=(evict1 evict2 evict3 evict4 evict5 evict6)
LAYER_MIB=20                # layer of each evictN image
MAX_SIZE=$((80 * 1024 * 1024))   # storage.max_size of the disk section
ONLINE_IMAGES=(tiny multi multiarch dockerlist)
LOG_TAILS=(mirror-disk:40 mirror-b:60 mirror-kill:60 dockerd:20 containerd:10 containerd2:10 registry:15 clients:30)
STOP_ORDER=(dockerd containerd2 containerd blackhole mirror-disk mirror-b mirror-kill registry)
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

UPSTREAM=127.0.0.1:$UPSTREAM_PORT
MIRROR=127.0.0.1:$MIRROR_PORT
SKOPEO_REPO=$MIRROR/docker/library    # the path prefix of the docker.io upstream

[ "$(id -u)" = 0 ] || die "run as root (dockerd, containerd and unshare -m need it)"
need_numbers "E2E_UPSTREAM_PORT, E2E_MIRROR_PORT, E2E_BUDGET" "$UPSTREAM_PORT" "$MIRROR_PORT" "$BUDGET"
for s in $SECTIONS; do
    case "$s" in disk | tag | offline | kill) ;; *) die "E2E_SECTIONS: unknown section '$s'" ;; esac
done
want() { case " $SECTIONS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

e2e_setup
e2e_build
e2e_workdirs res "$UPSTREAM_PORT" "$MIRROR_PORT"
e2e_no_internet

# ------------------------------------------------------------------ helpers
sha_of() { printf 'sha256:%s' "$(sha256sum "$1" | cut -d' ' -f1)"; }
ms() { date +%s%3N; }

# bytes DIR...: apparent size of everything under the DIRs (du -sb), 0 if none.
bytes() { du -sb "$@" 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'; }

# blob_path ROOT DIGEST: where pullcache keeps a blob.
blob_path() { local h=${2#sha256:}; printf '%s/blobs/sha256/%s/%s' "$1" "${h:0:2}" "$h"; }

# manifest_blobs FILE: config and layer digests of an image manifest, one a line.
manifest_blobs() {
    python3 -c 'import json,sys
m = json.load(open(sys.argv[1]))
for d in [m["config"]] + m["layers"]:
    print(d["digest"])' "$1"
}

# mirror_config FILE ROOT EXTRA_TOML: a pullcache configuration on $MIRROR with
# the docker.io upstream (default, prefix docker) and health probing every 1 s.
mirror_config() {
    cat >"$1" <<EOF
[server]
listen = "$MIRROR"
shutdown_timeout = "5s"
[metrics]
listen = "127.0.0.1:0"   # tests/e2e/observability.sh covers the metrics listener
[storage]
root = "$2"
$3
[health]
interval = "1s"
threshold = 2
timeout = "1s"
[[upstreams]]
name = "docker.io"
url = "http://$UPSTREAM"
default = true
prefix = "docker"
EOF
}

# run_mirror NAME CONFIG: check-config, start, wait for /v2/. Returns 1 (and
# fails a check) when the binary rejects the configuration.
run_mirror() {
    local name=$1 cfg=$2 out
    if ! out=$(env -u PULLCACHE_BIN "$BIN" check-config --config "$cfg" 2>&1); then
        fail "$name: pullcache accepts the configuration" "$(printf '%s' "$out" | tail -n 3 | tr '\n' ' ' | cut -c1-400)"
        return 1
    fi
    start_pullcache "$name" "$cfg"
    wait_http "$name" "http://$MIRROR/v2/" 30
}

# check_skopeo_raw NAME REF DIGEST: `skopeo inspect --raw` through the mirror.
check_skopeo_raw() {
    local name=$1 ref=$2 want=$3 f got
    budget "$name" || return 0
    f=$W/raw.$RANDOM.json
    if timeout "$T" skopeo inspect --raw --tls-verify=false "docker://$ref" >"$f" 2>>"$LOGS/clients.log"; then
        got=$(sha_of "$f")
        if [ "$got" = "$want" ]; then pass "$name"; else fail "$name" "digest $got, want $want"; fi
    else
        fail "$name" "skopeo inspect: $(why $?)"
    fi
}

# verify_dir DIR DIGEST: a `dir:` copy holds the manifest DIGEST and every
# blob file hashes to its name; prints the problem otherwise.
verify_dir() {
    local dir=$1 want=$2 got f n=0
    [ -s "$dir/manifest.json" ] || { echo "no manifest.json"; return 1; }
    got=$(sha_of "$dir/manifest.json")
    [ "$got" = "$want" ] || { echo "manifest $got, want $want"; return 1; }
    while IFS= read -r d; do
        f=$dir/${d#sha256:}
        [ -f "$f" ] || { echo "blob $d missing"; return 1; }
        got=$(sha_of "$f")
        [ "$got" = "$d" ] || { echo "blob $d has content $got"; return 1; }
        n=$((n + 1))
    done < <(manifest_blobs "$dir/manifest.json")
    [ "$n" -gt 1 ] || { echo "no blobs listed"; return 1; }
}

# check_skopeo_copy NAME REF DIGEST: skopeo copy to dir:, all digests verified.
check_skopeo_copy() {
    local name=$1 ref=$2 want=$3 out problem
    budget "$name" || return 0
    out=$W/copy.$RANDOM$RANDOM
    timeout "$T" skopeo --insecure-policy copy --preserve-digests --src-tls-verify=false \
        "docker://$ref" "dir:$out" >>"$LOGS/clients.log" 2>&1 || {
        fail "$name" "skopeo copy: $(why $?)"
        return
    }
    if problem=$(verify_dir "$out" "$want"); then pass "$name"; else fail "$name" "$problem"; fi
    rm -rf "$out"
}

# check_ctr NAME SOCKET NAMESPACE REF DIGEST
check_ctr() {
    local name=$1 sock=$2 ns=$3 ref=$4 want=$5 got
    budget "$name" || return 0
    timeout "$T" ctr --address "$sock" -n "$ns" images pull --snapshotter native \
        --hosts-dir "$W/certs.d" "$ref" >>"$LOGS/clients.log" 2>&1 || {
        fail "$name" "ctr pull: $(why $?)"
        return
    }
    got=$(timeout 30 ctr --address "$sock" -n "$ns" images ls | awk -v r="$ref" '$1 == r { print $3 }') || true
    if [ "$got" = "$want" ]; then pass "$name"; else fail "$name" "digest '$got', want $want"; fi
}

# check_docker NAME REF DIGEST: docker pull REF (name:tag or name@digest);
# the image's RepoDigests must hold DIGEST.
check_docker() {
    local name=$1 ref=$2 want=$3 got
    budget "$name" || return 0
    timeout "$T" "$DOCKER_CLI" pull "$ref" >>"$LOGS/clients.log" 2>&1 || {
        fail "$name" "docker pull: $(why $?)"
        return
    }
    got=$(docker image inspect --format '{{join .RepoDigests " "}}' "$ref" 2>&1) || true
    case " $got " in
        *"@$want "*) pass "$name" ;;
        *) fail "$name" "RepoDigests '$got', want $want" ;;
    esac
}

# readyz PATH FILE: GET http://$MIRROR/PATH into FILE; prints the status code.
readyz() { curl -sS -o "$2" -w '%{http_code}' --max-time 5 "http://$MIRROR$1" 2>/dev/null || echo 000; }

# ready_state FILE: the docker.io upstream's state in a /readyz body, or
# "invalid: <why>" when the body is not the documented JSON.
ready_state() {
    python3 - "$1" <<'PY' 2>&1 || true
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit("invalid: not JSON: %s" % e)
# storage, metadata and upstreams (pullcache names the metadata flag metadata_ok).
missing = [k for k in ("storage", "upstreams") if k not in d]
if not any(k.startswith("metadata") for k in d):
    missing.append("metadata")
if missing:
    sys.exit("invalid: no %s in %s" % (missing, sorted(d)))
for k in ("ready", "storage_writable", "metadata_ok"):
    if k in d and d[k] is not True:
        sys.exit("invalid: %s is %s" % (k, d[k]))
ups = d["upstreams"]
items = ups.items() if isinstance(ups, dict) else [(u.get("name"), u) for u in ups]
for name, u in items:
    if name == "docker.io":
        if "state" not in u:
            sys.exit("invalid: upstream docker.io has no state: %s" % u)
        print(u["state"])
        break
else:
    sys.exit("invalid: no upstream docker.io in %s" % ups)
PY
}

# check_ready NAME PATH STATE SECONDS: PATH answers 200 with the documented
# JSON and docker.io in STATE, within SECONDS.
check_ready() {
    local name=$1 path=$2 want=$3 secs=$4 f code state end
    f=$W/ready.json
    end=$((SECONDS + secs))
    while :; do
        code=$(readyz "$path" "$f")
        state=$(ready_state "$f")
        if [ "$code" = 200 ] && [ "$state" = "$want" ]; then
            pass "$name"
            return
        fi
        [ "$SECONDS" -lt "$end" ] || break
        sleep 0.5
    done
    fail "$name" "HTTP $code, docker.io state '$state' after $secs s; body: $(head -c 300 "$f" 2>/dev/null | tr '\n' ' ')"
}

# check_usage NAME ROOT: /readyz's storage.usage_bytes (an exact counter, by
# the README) equals the bytes of the files under ROOT/blobs, within 5 s.
check_usage() {
    local name=$1 root=$2 k files usage
    for ((k = 0; k < 25; k++)); do
        files=$(find "$root/blobs" -type f -printf '%s\n' 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
        usage=$(curl -sS --max-time 5 "http://$MIRROR/readyz" 2>/dev/null | python3 -c 'import json,sys
print(json.load(sys.stdin)["storage"]["usage_bytes"])' 2>/dev/null) || usage=none
        if [ "$usage" = "$files" ]; then
            pass "$name ($usage bytes)"
            return
        fi
        sleep 0.2
    done
    fail "$name" "/readyz storage.usage_bytes $usage, files under blobs/ $files bytes"
}

log "building and pushing test images"
start_upstream registry "$UPSTREAM" "$W/upstream-data"
python3 "$E2E_DIR/make_images.py" --out "$W/images" --push "$UPSTREAM" >"$LOGS/make_images.log" 2>&1 \
    || { cat "$LOGS/make_images.log" >&2; die "make_images.py failed"; }
python3 "$E2E_DIR/make_images.py" --out "$W/images" --push "$UPSTREAM" --layer-mib "$LAYER_MIB" \
    --only "${EVICT_IMAGES[@]}" >>"$LOGS/make_images.log" 2>&1 \
    || { cat "$LOGS/make_images.log" >&2; die "make_images.py --only evict* failed"; }
python3 "$E2E_DIR/make_images.py" --out "$W/images" --push "$UPSTREAM" --only moving1 --push-as moving \
    >>"$LOGS/make_images.log" 2>&1 || { cat "$LOGS/make_images.log" >&2; die "make_images.py moving1 failed"; }
python3 "$E2E_DIR/make_images.py" --out "$W/images-moving2" --only moving2 >>"$LOGS/make_images.log" 2>&1 \
    || { cat "$LOGS/make_images.log" >&2; die "make_images.py moving2 failed"; }

declare -A UP=()      # image -> manifest digest of its tag in the upstream
declare -A BIGL=()    # image -> digest of its largest layer (single-manifest images)
for img in "${ONLINE_IMAGES[@]}" burst "${EVICT_IMAGES[@]}" moving; do
    timeout 60 skopeo inspect --raw --tls-verify=false "docker://$UPSTREAM/library/$img:latest" >"$W/upstream-$img.json" \
        || die "skopeo inspect of library/$img:latest on the upstream failed"
    UP[$img]=$(sha_of "$W/upstream-$img.json")
    BIGL[$img]=$(python3 -c 'import json,sys
m = json.load(open(sys.argv[1]))
print(max(m.get("layers", []), key=lambda l: l["size"], default={"digest": ""})["digest"])' "$W/upstream-$img.json")
done
MOVING1=${UP[moving]}
MOVING2=$(awk -F'\t' '$1 == "moving2" { print $3 }' "$W/images-moving2/expected.tsv")
if [ -z "$MOVING2" ] || [ "$MOVING2" = "$MOVING1" ]; then
    die "moving2 digest '$MOVING2' missing or equal to moving1's"
fi
log "upstream images: ${!UP[*]}"

# Clients: two containerds (the second only ever sees the upstream stopped),
# dockerd on the first; all mirrors of every section listen on $MIRROR.
CTD1=$R/ctd
CTD2=$R/ctd2
write_hosts_toml "$W/certs.d" "$MIRROR"
if want disk || want tag || want offline; then
    start_containerd containerd "$CTD1"
fi
if want tag || want offline; then
    start_containerd containerd2 "$CTD2"
    start_dockerd dockerd "$W/docker" "$CTD1/containerd.sock" "http://$MIRROR"
fi
start_budget

# ============================================================ 1. disk budget
section_disk() {
    local root=$W/disk/cache img i k p dg peak now lim ok f inode pinned=() slack layer_bytes sampler
    log "section disk: max_size $MAX_SIZE bytes, ${#EVICT_IMAGES[@]} images of $LAYER_MIB MiB"
    mirror_config "$W/disk.toml" "$root" "max_size = \"80MiB\"
high_watermark = 0.9
low_watermark = 0.8
sweep_interval = \"2s\"
pin = [\"docker.io/library/${EVICT_IMAGES[0]}:*\"]
[cache]
tag_ttl = \"5m\""
    run_mirror mirror-disk "$W/disk.toml" || return 0
    # One blob in flight: the largest layer, plus the directories' own sizes.
    layer_bytes=$(python3 -c 'import json,sys; print(max(l["size"] for l in json.load(open(sys.argv[1]))["layers"]))' \
        "$W/upstream-${EVICT_IMAGES[0]}.json")
    slack=$((1024 * 1024))
    for i in "${!EVICT_IMAGES[@]}"; do
        img=${EVICT_IMAGES[$i]}
        budget "disk: pull $img" || return 0
        # Sample blobs/ + tmp/ every 0.1 s while the pull runs.
        rm -f "$W/usage" "$W/usage.stop"
        (for ((k = 0; k < 3000; k++)); do
            [ -e "$W/usage.stop" ] && break
            bytes "$root/blobs" "$root/tmp" >>"$W/usage"
            sleep 0.1
        done) &
        sampler=$!
        check_skopeo_copy "disk: skopeo copy $img (pull $((i + 1)) of ${#EVICT_IMAGES[@]})" "$SKOPEO_REPO/$img:latest" "${UP[$img]}"
        touch "$W/usage.stop"
        wait "$sampler" || true
        bytes "$root/blobs" "$root/tmp" >>"$W/usage"
        peak=$(sort -n "$W/usage" | tail -n 1)
        lim=$((MAX_SIZE + layer_bytes + slack))
        if [ "$peak" -le "$lim" ]; then
            pass "disk: during pull of $img, blobs+tmp peaked at $peak <= max_size + one blob ($lim)"
        else
            fail "disk: during pull of $img, blobs+tmp stay <= max_size + one blob" "peak $peak > $lim"
        fi
        # The sweeper runs every 2 s: usage must be under max_size within 10 s.
        ok=0
        for ((k = 0; k < 50; k++)); do
            now=$(bytes "$root/blobs")
            if [ "$now" -le "$MAX_SIZE" ]; then ok=1; break; fi
            sleep 0.2
        done
        if [ "$ok" = 1 ]; then
            pass "disk: after pull of $img, du -sb blobs = $now <= max_size within 10 s"
        else
            fail "disk: after pull of $img, du -sb blobs <= max_size within 10 s" "$now > $MAX_SIZE: $(find "$root/blobs" -type f | wc -l) blob files"
        fi
        # LRU: the image just pulled is the most recent one; it stays.
        dg=${BIGL[$img]}
        if [ -f "$(blob_path "$root" "$dg")" ]; then
            pass "disk: $img's layer is still cached right after its pull (LRU keeps the newest)"
        else
            fail "disk: $img's layer is still cached right after its pull (LRU keeps the newest)" "$(blob_path "$root" "$dg") missing"
        fi
        if [ "$i" = 0 ]; then
            # The pinned image's files, to compare at the end.
            while IFS= read -r dg; do
                f=$(blob_path "$root" "$dg")
                pinned+=("$dg:$(stat -c %i "$f" 2>/dev/null || echo missing)")
            done < <(manifest_blobs "$W/upstream-$img.json")
        fi
    done
    if [ "$(bytes "$root/blobs")" -lt $((${#EVICT_IMAGES[@]} * layer_bytes)) ]; then
        pass "disk: blobs were evicted (less on disk than was pulled)"
    else
        fail "disk: blobs were evicted (less on disk than was pulled)" "$(bytes "$root/blobs") bytes on disk"
    fi

    # The pin: every blob of the first image is still the very file written
    # at its pull (never evicted, never fetched again).
    ok=1
    for p in "${pinned[@]}"; do
        dg=${p%:*}
        inode=${p##*:}
        f=$(blob_path "$root" "$dg")
        if [ "$inode" = missing ] || [ ! -f "$f" ] || [ "$(stat -c %i "$f")" != "$inode" ]; then
            ok=0
            fail "disk: pinned ${EVICT_IMAGES[0]} blob $dg kept on disk" "inode at pull $inode, now $(stat -c %i "$f" 2>&1)"
        fi
    done
    [ "$ok" = 0 ] || pass "disk: pinned ${EVICT_IMAGES[0]}'s ${#pinned[@]} blobs are still the files written at its pull"

    # Evicted images come back transparently: the second image (evicted,
    # least recently used) with containerd and skopeo, the pinned first one
    # with skopeo; then usage is under max_size again.
    img=${EVICT_IMAGES[1]}
    if [ -f "$(blob_path "$root" "${BIGL[$img]}")" ]; then
        fail "disk: $img (least recently used) was evicted" "its layer is still on disk"
    else
        pass "disk: $img (least recently used) was evicted"
    fi
    check_ctr "disk: ctr pull $img after its eviction" "$CTD1/containerd.sock" disk "docker.io/library/$img:latest" "${UP[$img]}"
    check_skopeo_copy "disk: skopeo copy $img after its eviction" "$SKOPEO_REPO/$img:latest" "${UP[$img]}"
    check_skopeo_copy "disk: skopeo copy pinned ${EVICT_IMAGES[0]} at the end" "$SKOPEO_REPO/${EVICT_IMAGES[0]}:latest" "${UP[${EVICT_IMAGES[0]}]}"
    check_ctr "disk: ctr pull pinned ${EVICT_IMAGES[0]} at the end" "$CTD1/containerd.sock" disk "docker.io/library/${EVICT_IMAGES[0]}:latest" "${UP[${EVICT_IMAGES[0]}]}"
    ok=0
    for ((k = 0; k < 50; k++)); do
        now=$(bytes "$root/blobs")
        if [ "$now" -le "$MAX_SIZE" ]; then ok=1; break; fi
        sleep 0.2
    done
    if [ "$ok" = 1 ]; then pass "disk: after the re-pulls, du -sb blobs = $now <= max_size"; else fail "disk: after the re-pulls, du -sb blobs <= max_size" "$now"; fi
    for p in "${pinned[@]}"; do
        f=$(blob_path "$root" "${p%:*}")
        [ -f "$f" ] || { fail "disk: pinned blobs on disk at the end" "$f missing"; return 0; }
    done
    pass "disk: pinned blobs on disk at the end"
    check_usage "disk: /readyz usage_bytes equals the bytes of the blob files" "$root"
    alive mirror-disk
    stop mirror-disk
}

# =================================================== 2. tag follows upstream
section_tag() {
    local t0
    log "section tag: tag_ttl 3s, library/moving:latest re-pushed upstream"
    check_skopeo_raw "tag: skopeo inspect --raw moving:latest (first image)" "$SKOPEO_REPO/moving:latest" "$MOVING1"
    check_ctr "tag: ctr pull moving:latest (first image)" "$CTD1/containerd.sock" tag1 "docker.io/library/moving:latest" "$MOVING1"
    check_docker "tag: docker pull moving:latest (first image)" "moving:latest" "$MOVING1"
    t0=$SECONDS
    skopeo --insecure-policy copy --quiet --preserve-digests --dest-tls-verify=false \
        "oci:$W/images-moving2/moving2:latest" "docker://$UPSTREAM/library/moving:latest" >>"$LOGS/clients.log" 2>&1 \
        || { fail "tag: push a new image to moving:latest upstream" "skopeo copy: $(tail -n 1 "$LOGS/clients.log")"; return 0; }
    pass "tag: push a new image to moving:latest upstream"
    # Past the 3 s TTL (counted from the push, after the last pull).
    sleep $((4 - (SECONDS - t0) > 0 ? 4 - (SECONDS - t0) : 0))
    sleep 0.5
    check_skopeo_raw "tag: skopeo inspect --raw moving:latest after the TTL serves the new digest" "$SKOPEO_REPO/moving:latest" "$MOVING2"
    check_ctr "tag: fresh ctr pull moving:latest after the TTL gets the new digest" "$CTD1/containerd.sock" tag2 "docker.io/library/moving:latest" "$MOVING2"
    check_docker "tag: docker pull moving:latest after the TTL gets the new digest" "moving:latest" "$MOVING2"
}

# ======================================================= 3. upstream stopped
section_offline() {
    local img ref refs t0 t1 code f k
    log "section offline: cache everything, stop the upstream, pull again"
    check_ready "offline: GET /readyz 200, JSON, docker.io up" /readyz up 10
    for img in "${ONLINE_IMAGES[@]}"; do
        check_docker "offline: docker pull $img:latest (upstream up)" "$img:latest" "${UP[$img]}"
        check_ctr "offline: ctr pull $img:latest (upstream up)" "$CTD1/containerd.sock" online "docker.io/library/$img:latest" "${UP[$img]}"
    done

    stop registry
    if port_open "$UPSTREAM_PORT"; then
        fail "offline: upstream stopped" "something still answers on $UPSTREAM"
    else
        pass "offline: upstream stopped"
    fi
    # threshold 2 at 1 s: down within ~3 s; 10 s allowed.
    check_ready "offline: GET /readyz 200, JSON, docker.io down within 10 s" /readyz down 10
    check_ready "offline: GET /v2/_health as /readyz" /v2/_health down 2
    code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 "http://$MIRROR/healthz" 2>/dev/null) || code=000
    if [ "$code" = 200 ]; then pass "offline: GET /healthz 200"; else fail "offline: GET /healthz 200" "HTTP $code"; fi
    # A tag past its TTL that the upstream cannot confirm is served stale,
    # marked with a `Warning: 110` header.
    f=$W/stale-headers
    code=$(curl -sS -I -o "$f" -w '%{http_code}' --max-time 5 "http://$MIRROR/v2/library/tiny/manifests/latest" 2>/dev/null) || code=000
    if [ "$code" = 200 ] && grep -qi '^warning: *110' "$f"; then pass "offline: HEAD of a stale tag: 200 with Warning: 110"; else
        fail "offline: HEAD of a stale tag: 200 with Warning: 110" "HTTP $code, headers: $(tr '\r\n' '  ' <"$f" | cut -c1-300)"; fi

    # Every cached image, by tag then by digest. moving has two digests, its
    # tag points at the second; both were pulled by every client in "tag".
    local -a tags=("${ONLINE_IMAGES[@]}") digests=()
    for img in "${ONLINE_IMAGES[@]}"; do digests+=("$img@${UP[$img]}"); done
    if want tag; then
        tags+=(moving)
        digests+=("moving@$MOVING1" "moving@$MOVING2")
    fi
    declare -A WANT=()
    for img in "${tags[@]}"; do WANT[$img]=${UP[$img]}; done
    WANT[moving]=$MOVING2

    docker image prune -a -f >>"$LOGS/clients.log" 2>&1 || true
    if [ -z "$(docker images -q)" ]; then pass "offline: docker image prune -a: no image left"; else
        fail "offline: docker image prune -a: no image left" "$(docker images --format '{{.Repository}}:{{.Tag}}' | tr '\n' ' ')"; fi
    for img in "${tags[@]}"; do
        check_docker "offline: docker pull $img:latest (upstream stopped)" "$img:latest" "${WANT[$img]}"
    done
    docker image prune -a -f >>"$LOGS/clients.log" 2>&1 || true
    for ref in "${digests[@]}"; do
        check_docker "offline: docker pull ${ref:0:30}... by digest (upstream stopped)" "$ref" "${ref#*@}"
    done

    for img in "${tags[@]}"; do
        check_ctr "offline: fresh ctr pull $img:latest (upstream stopped)" "$CTD2/containerd.sock" off "docker.io/library/$img:latest" "${WANT[$img]}"
    done
    ctr2() { timeout 60 ctr --address "$CTD2/containerd.sock" -n off "$@"; }
    refs=$(ctr2 images ls -q) || true
    if [ -n "$refs" ]; then
        # shellcheck disable=SC2086 # one ref per word
        ctr2 images rm --sync $refs >>"$LOGS/clients.log" 2>&1 || true
    fi
    ctr2 content prune references >>"$LOGS/clients.log" 2>&1 || true
    if [ -z "$(ctr2 content ls -q)" ]; then pass "offline: ctr images rm + content prune: no content left"; else
        fail "offline: ctr images rm + content prune: no content left" "$(ctr2 content ls -q | wc -l) blobs remain"; fi
    for ref in "${digests[@]}"; do
        check_ctr "offline: fresh ctr pull ${ref:0:30}... by digest (upstream stopped)" "$CTD2/containerd.sock" off "docker.io/library/$ref" "${ref#*@}"
    done

    # An image never pulled: an error within a few seconds, not a hang.
    fail_fast() {
        local name=$1 what=$2 t0 t1 rc
        t0=$(ms)
        timeout 60 skopeo inspect --raw --tls-verify=false "docker://$SKOPEO_REPO/$what:latest" >/dev/null 2>>"$LOGS/clients.log" && rc=0 || rc=$?
        t1=$(ms)
        if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ $((t1 - t0)) -le 5000 ]; then
            pass "$name (exit $rc in $((t1 - t0)) ms)"
        else
            fail "$name" "exit $rc after $((t1 - t0)) ms: $(tail -n 1 "$LOGS/clients.log" | cut -c1-300)"
        fi
        f=$W/uncached-blob
        t0=$(ms)
        code=$(curl -sS -o "$f" -w '%{http_code}' --max-time 60 "http://$MIRROR/v2/library/$what/blobs/${BIGL[$what]}" 2>/dev/null) || true
        t1=$(ms)
        if [ "${code:0:1}" != 2 ] && [ "${code:-000}" != 000 ] && [ $((t1 - t0)) -le 5000 ]; then
            pass "$name: GET of one of its blobs answers HTTP $code in $((t1 - t0)) ms"
        else
            fail "$name: GET of one of its blobs fails fast" "HTTP ${code:-none} after $((t1 - t0)) ms: $(head -c 200 "$f" 2>/dev/null)"
        fi
    }
    fail_fast "offline: skopeo inspect of a never-pulled image fails within 5 s" "${EVICT_IMAGES[4]}"

    # The upstream port becomes a black hole: connections are accepted and
    # never answered (a hung registry, a dead load balancer). A down upstream
    # must still cost nothing: uncached requests fail fast, cached tags
    # (past their TTL) are served at once.
    start blackhole "$LOGS/blackhole.log" python3 -c '
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(512)
held = []
end = time.time() + 900
s.settimeout(1)
while time.time() < end:
    try:
        c, _ = s.accept()
        held.append(c)
    except socket.timeout:
        pass
' "$UPSTREAM_PORT"
    for ((k = 0; k < 50; k++)); do port_open "$UPSTREAM_PORT" && break; sleep 0.1; done
    sleep 3   # a few probes time out against it
    check_ready "offline, black-hole upstream: /readyz 200, docker.io down" /readyz down 5
    fail_fast "offline, black-hole upstream: skopeo inspect of a never-pulled image fails within 5 s" "${EVICT_IMAGES[5]}"
    t0=$(ms)
    check_skopeo_raw "offline, black-hole upstream: skopeo inspect --raw tiny:latest (cached, TTL past)" "$SKOPEO_REPO/tiny:latest" "${UP[tiny]}"
    t1=$(ms)
    if [ $((t1 - t0)) -le 5000 ]; then pass "offline, black-hole upstream: cached tag served in $((t1 - t0)) ms (<= 5 s)"; else
        fail "offline, black-hole upstream: cached tag served within 5 s" "took $((t1 - t0)) ms"; fi
    docker image prune -a -f >>"$LOGS/clients.log" 2>&1 || true
    t0=$(ms)
    check_docker "offline, black-hole upstream: docker pull multi:latest" "multi:latest" "${UP[multi]}"
    t1=$(ms)
    if [ $((t1 - t0)) -le 20000 ]; then pass "offline, black-hole upstream: docker pull took $((t1 - t0)) ms (<= 20 s)"; else
        fail "offline, black-hole upstream: docker pull within 20 s" "took $((t1 - t0)) ms"; fi
    stop blackhole

    # The upstream comes back: probes see it within a few seconds and the
    # image that failed fast while it was down now pulls.
    start_upstream registry "$UPSTREAM" "$W/upstream-data"
    check_ready "offline: upstream back, /readyz shows docker.io up within 10 s" /readyz up 10
    check_skopeo_copy "offline: upstream back, skopeo copy of the image that failed fast" "$SKOPEO_REPO/${EVICT_IMAGES[4]}:latest" "${UP[${EVICT_IMAGES[4]}]}"
    alive mirror-b
}

# ====================================================== 4. kill -9 mid-pull
# kill_round ROUND: the 20 pulls at once, in the background; PULL_PIDS,
# PULL_NAMES and PULL_CHECK (how to verify) describe them.
kill_round() {
    local round=$1 i img n=0 dg
    PULL_PIDS=() PULL_NAMES=() PULL_CHECK=()
    # 10 skopeo copies: multi and burst twice, every evictN once.
    for img in multi multi burst burst "${EVICT_IMAGES[@]}"; do
        n=$((n + 1))
        timeout "$T" skopeo --insecure-policy copy --preserve-digests --src-tls-verify=false \
            "docker://$SKOPEO_REPO/$img:latest" "dir:$W/kill/$round-$n" >"$LOGS/kill-$round-$n.log" 2>&1 &
        PULL_PIDS+=($!) PULL_NAMES+=("skopeo copy $img") PULL_CHECK+=("dir $W/kill/$round-$n ${UP[$img]}")
    done
    # 10 curl GETs of the large layers: multi's and burst's three times,
    # evict1..evict4's once.
    for img in multi multi multi burst burst burst "${EVICT_IMAGES[@]:0:4}"; do
        n=$((n + 1))
        dg=${BIGL[$img]}
        curl -sS -f --max-time "$T" -o "$W/kill/$round-$n.blob" \
            "http://$MIRROR/v2/library/$img/blobs/$dg" >"$LOGS/kill-$round-$n.log" 2>&1 &
        PULL_PIDS+=($!) PULL_NAMES+=("curl GET $img blob ${dg:7:12}") PULL_CHECK+=("blob $W/kill/$round-$n.blob $dg")
    done
}

# blob_files_ok ROOT: every file under ROOT/blobs/sha256 hashes to its name.
blob_files_ok() {
    local root=$1 bad=0 n=0 f h
    while IFS= read -r f; do
        n=$((n + 1))
        h=$(sha256sum "$f" | cut -d' ' -f1)
        if [ "$h" != "$(basename "$f")" ] || [ "$(basename "$(dirname "$f")")" != "${h:0:2}" ]; then
            bad=$((bad + 1))
            echo "$f has content sha256:$h" >&2
        fi
    done < <(find "$root/blobs" -type f 2>/dev/null)
    echo "$n files, $bad bad"
    [ "$bad" = 0 ]
}

section_kill() {
    local root=$W/kill/cache i rc k t0 tmpb blobsn out left pid problem kind a b
    log "section kill: 20 concurrent pulls, kill -9, restart"
    if ! running registry; then
        start_upstream registry "$UPSTREAM" "$W/upstream-data"
    fi
    mkdir -p "$W/kill"
    mirror_config "$W/kill.toml" "$root" "[cache]
tag_ttl = \"5m\""
    run_mirror mirror-kill "$W/kill.toml" || return 0
    budget "kill: 20 concurrent pulls, then kill -9" || return 0
    kill_round 1
    # Kill while bytes flow: once some blobs are complete and others still
    # downloading (>= 4 MiB in tmp/), or at 1 s with anything in tmp/, or at 3 s.
    t0=$(ms)
    for ((k = 0; k < 300; k++)); do
        tmpb=$(bytes "$root/tmp")
        blobsn=$(find "$root/blobs" -type f 2>/dev/null | wc -l)
        [ "$blobsn" = 0 ] || [ "$tmpb" -lt $((4 * 1024 * 1024)) ] || break
        [ $(($(ms) - t0)) -lt 1000 ] || [ "$tmpb" = 0 ] || break
        [ $(($(ms) - t0)) -lt 3000 ] || break
        sleep 0.01
    done
    tmpb=$(bytes "$root/tmp")
    blobsn=$(find "$root/blobs" -type f 2>/dev/null | wc -l)
    kill9 mirror-kill
    log "kill -9 after $(($(ms) - t0)) ms: $tmpb bytes in tmp/, $blobsn blob files complete"
    if [ "$tmpb" -gt 0 ]; then
        pass "kill: SIGKILL landed with downloads in flight ($tmpb bytes in tmp/, $blobsn blobs complete)"
    else
        fail "kill: SIGKILL landed with downloads in flight" "tmp/ was empty ($blobsn blobs complete)"
    fi
    left=0
    for i in "${!PULL_PIDS[@]}"; do
        wait "${PULL_PIDS[$i]}" && rc=0 || rc=$?
        [ "$rc" = 0 ] || left=$((left + 1))
    done
    log "first round: $left of ${#PULL_PIDS[@]} pulls failed (expected: the mirror died)"
    if out=$(blob_files_ok "$root" 2>"$W/badblobs"); then
        pass "kill: after SIGKILL every file under blobs/ matches its digest ($out)"
    else
        fail "kill: after SIGKILL every file under blobs/ matches its digest" "$out: $(head -n 3 "$W/badblobs" | tr '\n' ' ')"
    fi
    log "tmp/ before the restart: $(find "$root/tmp" -type f 2>/dev/null | wc -l) files"

    start_pullcache mirror-kill "$W/kill.toml"
    wait_http mirror-kill "http://$MIRROR/v2/" 30
    # Leftovers of interrupted downloads are removed at start.
    for ((k = 0; k < 25; k++)); do
        [ -z "$(find "$root/tmp" -mindepth 1 2>/dev/null | head -n 1)" ] && break
        sleep 0.2
    done
    left=$(find "$root/tmp" -mindepth 1 2>/dev/null | wc -l)
    if [ "$left" = 0 ]; then pass "kill: restarted on the same root, tmp/ is empty"; else
        fail "kill: restarted on the same root, tmp/ is empty" "$left entries: $(find "$root/tmp" -mindepth 1 | head -n 3 | tr '\n' ' ')"; fi

    check_usage "kill: after the restart, /readyz usage_bytes equals the bytes of the blob files" "$root"
    budget "kill: the 20 pulls again after the restart" || return 0
    kill_round 2
    for i in "${!PULL_PIDS[@]}"; do
        wait "${PULL_PIDS[$i]}" && rc=0 || rc=$?
        pid=${PULL_NAMES[$i]}
        if [ "$rc" != 0 ]; then
            fail "kill: after restart, $pid" "exit $rc: $(tail -n 1 "$LOGS/kill-2-$((i + 1)).log" | cut -c1-300)"
            continue
        fi
        read -r kind a b <<<"${PULL_CHECK[$i]}"
        if [ "$kind" = dir ]; then
            if problem=$(verify_dir "$a" "$b"); then pass "kill: after restart, $pid, digests verified"; else fail "kill: after restart, $pid" "$problem"; fi
        else
            problem=$(sha_of "$a")
            if [ "$problem" = "$b" ]; then pass "kill: after restart, $pid, digest verified"; else fail "kill: after restart, $pid" "got $problem"; fi
        fi
    done
    if out=$(blob_files_ok "$root" 2>"$W/badblobs"); then
        pass "kill: at the end every file under blobs/ matches its digest ($out)"
    else
        fail "kill: at the end every file under blobs/ matches its digest" "$out: $(head -n 3 "$W/badblobs" | tr '\n' ' ')"
    fi
    check_usage "kill: /readyz usage_bytes equals the bytes of the blob files" "$root"
    left=$(find "$root/tmp" -mindepth 1 -type f 2>/dev/null | wc -l)
    if [ "$left" = 0 ]; then pass "kill: tmp/ is empty once the pulls are done"; else
        fail "kill: tmp/ is empty once the pulls are done" "$left files"; fi
    alive mirror-kill
    stop mirror-kill
}

# ------------------------------------------------------------------ run
if want disk; then section_disk; fi
if want tag || want offline; then
    mirror_config "$W/b.toml" "$W/b/cache" "[cache]
tag_ttl = \"3s\""
    if run_mirror mirror-b "$W/b.toml"; then
        if want tag; then section_tag; fi
        if want offline; then section_offline; fi
        stop mirror-b
    fi
fi
if want kill; then section_kill; fi

summary "pullcache ($BIN), sections: $SECTIONS"
