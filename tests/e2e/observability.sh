#!/usr/bin/env bash
# Observability suite: the compose stack's files, the Grafana dashboard and
# pullcache's metrics, checked with real tools, offline, on 127.0.0.1.
#
#   sudo tests/e2e/observability.sh
#   sudo PULLCACHE_BIN=path/to/pullcache tests/e2e/observability.sh
#
# Static checks (no pullcache running):
#   - `docker-compose -f compose/docker-compose.yml config -q` accepts the
#     stack, also with `--profile logs`; every service is there; every file
#     it mounts from the repository, its build context and Dockerfile exist;
#     Grafana's dashboard provider reads the folder compose mounts
#     ../dashboards at;
#   - `promtool check config compose/prometheus.yml`;
#   - Dockerfile: every COPY source exists and is not in .dockerignore, which
#     keeps target/, data/, bench/work, tests/e2e/work and .git out;
#   - compose/alloy/config.alloy: braces balance and every component it
#     refers to is declared (Alloy itself cannot be installed here);
#   - dashboards/pullcache.json: valid JSON, unique panel ids, the `upstream`
#     variable, and every datasource uid it uses (panels, targets, variables)
#     is defined in compose/grafana/provisioning/datasources/*.yml;
#   - `pullcache check-config` accepts compose/pullcache.toml and the
#     image's default configuration written by the Dockerfile.
# With pullcache running (a CNCF Distribution upstream, pullcache with
# `[metrics] listen` on loopback, JSON logs):
#   - /healthz and /metrics on the metrics listener (Prometheus text format,
#     parsed by promtool);
#   - a real Prometheus, configured from compose/prometheus.yml with the
#     target rewritten to the loopback metrics address and a 1 s scrape
#     interval, scrapes it (target up);
#   - skopeo pulls test images cold, then warm, then four copies of one image
#     at once on a cold cache (coalesced fills), lists tags, and asks for an
#     image that does not exist (a 404); manifest digests are checked;
#   - the counters that traffic drives are above zero in Prometheus (misses,
#     hits, bytes from the upstream and from the cache, sendfile bytes, disk
#     usage, the 404, the tags request);
#   - once Prometheus has scraped all that, EVERY PromQL expression of the
#     dashboard (each Prometheus target's expr) is evaluated through
#     /api/v1/query, with $upstream as `.*` and as the real upstream
#     (`docker\\.io`, as Grafana escapes it), $__rate_interval and
#     $__interval as 1m, $__range as 5m: each must answer success with a
#     non-empty result. The only exception is the quota expression: without
#     an upstream sending Docker Hub's ratelimit headers it has no series and
#     is reported as `skip (no quota-reporting upstream)`;
#   - the template variable's label_values query finds the upstream;
#   - every line pullcache wrote to stderr is a JSON object; it still runs.
#
# The last line is `N passed, M failed`; the exit status is non-zero on any
# failure, and the tails of the logs are printed.
#
# Environment:
#   PULLCACHE_BIN       pullcache binary to test (default: cargo build --release)
#   E2E_UPSTREAM_PORT   upstream registry port (default 17000)
#   E2E_MIRROR_PORT     pullcache's registry port (default 7000)
#   E2E_METRICS_PORT    pullcache's metrics port (default 7001)
#   E2E_PROM_PORT       Prometheus port (default 17090)
#   E2E_SKIP_SETUP=1    do not run setup.sh
#   E2E_DOCKER_PKG_DIR  where setup.sh unpacked docker.io (default tests/e2e/work/docker-pkg)
#   E2E_BUDGET          seconds the checks may take in all (default 300)
#   KEEP_WORK=1         keep tests/e2e/work/obs.XXXXXX (logs, configs, copies)
#   RUST_LOG            passed to pullcache (default: info)
set -euo pipefail

UPSTREAM_PORT=${E2E_UPSTREAM_PORT:-17000}
MIRROR_PORT=${E2E_MIRROR_PORT:-7000}
METRICS_PORT=${E2E_METRICS_PORT:-7001}
PROM_PORT=${E2E_PROM_PORT:-17090}
PULL_TIMEOUT=120            # seconds for one client pull or copy, at most
BUDGET=${E2E_BUDGET:-300}   # seconds for all checks (the build is not counted)
IMAGES=(tiny multi)         # pulled cold, then warm
BURST=burst                 # pulled by four skopeo copies at once, cold
BURST_N=4
# Dashboard expressions allowed to have no series here, and why: only an
# upstream that reports a pull quota (Docker Hub's ratelimit-remaining) has
# pullcache_upstream_quota_remaining, and the Distribution upstream sends none.
declare -A MAY_BE_EMPTY=(
    ['pullcache_upstream_quota_remaining{upstream=~"$upstream"}']="no quota-reporting upstream"
)
LOG_TAILS=(mirror:40 prometheus:20 registry:5 clients:30)
STOP_ORDER=(prometheus mirror registry)
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

UPSTREAM=127.0.0.1:$UPSTREAM_PORT
MIRROR=127.0.0.1:$MIRROR_PORT
METRICS=127.0.0.1:$METRICS_PORT
PROM=127.0.0.1:$PROM_PORT
SKOPEO_REPO=$MIRROR/docker/library    # the path prefix of the docker.io upstream
COMPOSE=$REPO_ROOT/compose/docker-compose.yml
DASHBOARD=$REPO_ROOT/dashboards/pullcache.json
DATASOURCES=$REPO_ROOT/compose/grafana/provisioning/datasources

[ "$(id -u)" = 0 ] || [ "${E2E_SKIP_SETUP:-0}" = 1 ] || die "run as root (setup.sh installs packages), or set E2E_SKIP_SETUP=1"
need_numbers "E2E_UPSTREAM_PORT, E2E_MIRROR_PORT, E2E_METRICS_PORT, E2E_PROM_PORT, E2E_BUDGET" \
    "$UPSTREAM_PORT" "$MIRROR_PORT" "$METRICS_PORT" "$PROM_PORT" "$BUDGET"

e2e_setup
for c in docker-compose prometheus promtool; do
    command -v "$c" >/dev/null 2>&1 || die "$c not installed (setup.sh installs it)"
done
e2e_build
e2e_workdirs obs "$UPSTREAM_PORT" "$MIRROR_PORT" "$METRICS_PORT" "$PROM_PORT"
e2e_no_internet
start_budget

# check NAME CMD...: pass if CMD succeeds, else fail with the last lines of its output.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        pass "$name"
    else
        fail "$name" "$(printf '%s' "$out" | tail -n 5 | tr '\n' ' ' | cut -c1-600)"
    fi
}

# ============================================================ static checks
log "static checks: compose, prometheus.yml, Dockerfile, Alloy, dashboard"
compose() { timeout 60 docker-compose -f "$COMPOSE" "$@"; }
check "docker-compose config -q accepts compose/docker-compose.yml" compose config -q
check "docker-compose --profile logs config -q accepts compose/docker-compose.yml" compose --profile logs config -q

compose --profile logs config >"$W/compose-config.yml" 2>"$LOGS/compose.log" || true
compose --profile logs config --services >"$W/compose-services" 2>>"$LOGS/compose.log" || true
check "compose: services pullcache, jaeger, prometheus, grafana, loki, alloy" \
    python3 - "$W/compose-services" <<'PY'
import sys
have = set(open(sys.argv[1]).read().split())
want = {"pullcache", "jaeger", "prometheus", "grafana", "loki", "alloy"}
if want - have:
    sys.exit("missing services %s (have %s)" % (sorted(want - have), sorted(have)))
PY

# Bind mounts, build context and Dockerfile, as docker-compose resolved them;
# Grafana's provider must read the folder ../dashboards is mounted at.
check "compose: every mounted repository file, the build context and Dockerfile exist" \
    python3 - "$W/compose-config.yml" "$REPO_ROOT" "$REPO_ROOT/compose/grafana/provisioning/dashboards" <<'PY'
import os, re, sys
text = open(sys.argv[1]).read()
root = sys.argv[2].rstrip("/") + "/"
problems, mounts, seen = [], {}, 0
for src, dst in re.findall(r"^\s+- (/[^:\s]+):([^:\s]+)(?::\w+)?\s*$", text, re.M):
    if not src.startswith(root):
        continue   # the Docker socket
    seen += 1
    mounts[os.path.relpath(src, root)] = dst
    if not os.path.exists(src):
        problems.append("mounted %s does not exist" % src)
ctx = re.search(r"^\s+context: (\S+)\s*$", text, re.M)
dockerfile = re.search(r"^\s+dockerfile: (\S+)\s*$", text, re.M)
if not ctx or not dockerfile:
    problems.append("no build context / dockerfile for pullcache")
elif not os.path.isfile(os.path.join(ctx.group(1), dockerfile.group(1))):
    problems.append("no %s in build context %s" % (dockerfile.group(1), ctx.group(1)))
for need in ("compose/pullcache.toml", "compose/prometheus.yml", "compose/alloy/config.alloy",
             "compose/grafana/provisioning", "dashboards"):
    if need not in mounts:
        problems.append("%s is not mounted (mounts: %s)" % (need, sorted(mounts)))
if "dashboards" in mounts:
    prov = "".join(open(os.path.join(sys.argv[3], f)).read()
                   for f in sorted(os.listdir(sys.argv[3])) if f.endswith((".yml", ".yaml")))
    paths = re.findall(r"^\s+path:\s*(\S+)\s*$", prov, re.M)
    if mounts["dashboards"] not in paths:
        problems.append("dashboards provider paths %s, but ../dashboards is mounted at %s"
                        % (paths, mounts["dashboards"]))
if problems:
    sys.exit("; ".join(problems))
print("%d repository mounts" % seen)
PY

check "promtool check config compose/prometheus.yml" promtool check config "$REPO_ROOT/compose/prometheus.yml"

check "Dockerfile: COPY sources exist and are not in .dockerignore, which keeps build output out" \
    python3 - "$REPO_ROOT" <<'PY'
import fnmatch, os, re, sys
root = sys.argv[1]
lines = open(os.path.join(root, "Dockerfile")).read().replace("\\\n", " ").splitlines()
ignore = [l.strip().rstrip("/") for l in open(os.path.join(root, ".dockerignore"))
          if l.strip() and not l.lstrip().startswith("#")]
problems = []
for need in (".git", "target", "data", "bench/work", "tests/e2e/work"):
    if need not in ignore:
        problems.append(".dockerignore does not exclude %s" % need)
def ignored(path):
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(p, pat.lstrip("/")) for pat in ignore for p in prefixes)
copies = 0
for l in lines:
    words = l.split()
    if not words or words[0].upper() not in ("COPY", "ADD"):
        continue
    args = [w for w in words[1:] if not w.startswith("--")]
    if any(w.startswith("--from") for w in words[1:]):
        continue
    for src in args[:-1]:
        copies += 1
        if not os.path.exists(os.path.join(root, src.rstrip("/"))):
            problems.append("COPY source %s does not exist" % src)
        elif ignored(src):
            problems.append("COPY source %s is excluded by .dockerignore" % src)
if not copies:
    problems.append("no COPY from the build context")
if problems:
    sys.exit("; ".join(problems))
PY

check "compose/alloy/config.alloy: braces balance, every referenced component is declared" \
    python3 - "$REPO_ROOT/compose/alloy/config.alloy" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
# Strings out (keeping their place), then comments.
code = re.sub(r'"(?:[^"\\\n]|\\.)*"', '""', src)
code = re.sub(r"//[^\n]*|/\*.*?\*/", "", code, flags=re.S)
depth = 0
for n, line in enumerate(code.splitlines(), 1):
    for ch in line:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            sys.exit("unbalanced } at line %d" % n)
if depth:
    sys.exit("%d unclosed {" % depth)
blocks = set(re.findall(r'^\s*([a-z_]+(?:\.[a-z_]+)+)\s+"([^"]+)"\s*\{', re.sub(r"//[^\n]*", "", src), re.M))
if not blocks:
    sys.exit("no labelled component")
refs = set()
for rhs in re.findall(r"=\s*([^\n]+)", code):
    refs.update(re.findall(r"\b([a-z_]+(?:\.[a-z_]+){3,})\b", rhs))
missing = []
for ref in sorted(refs):
    parts = ref.split(".")
    if not any((".".join(parts[:k]), parts[k]) in blocks for k in range(2, len(parts) - 1)):
        missing.append(ref)
if missing:
    sys.exit("references to undeclared components: %s (declared: %s)" % (missing, sorted(blocks)))
print("%d components, %d references" % (len(blocks), len(refs)))
PY

# The dashboard's structure and its datasource uids against the provisioning.
check "dashboards/pullcache.json: valid JSON, unique panel ids, the upstream variable" \
    python3 - "$DASHBOARD" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
problems = []
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
ids = [p.get("id") for p in panels(d.get("panels", []))]
if len(ids) != len(set(ids)) or None in ids:
    problems.append("panel ids not unique: %s" % ids)
if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
    problems.append("schemaVersion %r" % d.get("schemaVersion"))
var = [v for v in d.get("templating", {}).get("list", []) if v.get("name") == "upstream"]
if not var or "label_values(pullcache_upstream_up, upstream)" not in json.dumps(var[0]):
    problems.append("no variable upstream from label_values(pullcache_upstream_up, upstream)")
if problems:
    sys.exit("; ".join(problems))
print("%d panels" % len(ids))
PY

check "dashboard: every datasource uid it uses is provisioned in compose/grafana" \
    python3 - "$DASHBOARD" "$DATASOURCES" <<'PY'
import json, os, re, sys
d = json.load(open(sys.argv[1]))
defined = set()
for f in sorted(os.listdir(sys.argv[2])):
    if f.endswith((".yml", ".yaml")):
        for uid in re.findall(r"^\s+uid:\s*['\"]?([\w.-]+)['\"]?\s*$", open(os.path.join(sys.argv[2], f)).read(), re.M):
            defined.add(uid)
used = {}
def walk(x, where):
    if isinstance(x, dict):
        ds = x.get("datasource")
        if isinstance(ds, dict):
            used.setdefault(ds.get("uid"), where)
        elif isinstance(ds, str):
            used.setdefault("name:" + ds, where)
        title = x.get("title") or x.get("name") or where
        for k, v in x.items():
            walk(v, title if k != "datasource" else where)
    elif isinstance(x, list):
        for v in x:
            walk(v, where)
walk(d, "dashboard")
for need in ("prometheus", "jaeger", "loki"):
    if need not in defined:
        sys.exit("datasource uid %s not provisioned (defined: %s)" % (need, sorted(defined)))
bad = {u: w for u, w in used.items() if u not in defined}
if bad:
    sys.exit("uids not provisioned: %s (defined: %s)" % (bad, sorted(defined)))
print("uids used: %s" % sorted(used))
PY

# The configurations the image and the stack ship must be accepted by the binary.
env -u PULLCACHE_BIN "$BIN" check-config --config "$REPO_ROOT/compose/pullcache.toml" >"$LOGS/check-config.log" 2>&1 \
    && pass "pullcache check-config accepts compose/pullcache.toml" \
    || fail "pullcache check-config accepts compose/pullcache.toml" "$(tail -n 3 "$LOGS/check-config.log" | tr '\n' ' ')"
python3 - "$REPO_ROOT/Dockerfile" >"$W/image-default.toml" <<'PY' || true
import re, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
m = re.search(r"printf '%s\\n'(.*?)>\s*/etc/pullcache/pullcache\.toml", text, re.S)
if m:
    print("\n".join(re.findall(r"'([^']*)'", m.group(1))))
PY
if grep -q '^\[server\]' "$W/image-default.toml" \
    && env -u PULLCACHE_BIN "$BIN" check-config --config "$W/image-default.toml" >>"$LOGS/check-config.log" 2>&1; then
    pass "pullcache check-config accepts the Dockerfile's default configuration"
else
    fail "pullcache check-config accepts the Dockerfile's default configuration" \
        "$(tail -n 3 "$LOGS/check-config.log" | tr '\n' ' ') (config: $(tr '\n' ' ' <"$W/image-default.toml"))"
fi

# ============================================================ upstream, pullcache
start_upstream registry "$UPSTREAM" "$W/upstream-data"
log "building and pushing test images"
python3 "$E2E_DIR/make_images.py" --out "$W/images" --push "$UPSTREAM" --only "${IMAGES[@]}" "$BURST" \
    >"$LOGS/make_images.log" 2>&1 || { cat "$LOGS/make_images.log" >&2; die "make_images.py failed"; }
declare -A UP=()   # image -> manifest digest of its tag in the upstream
while IFS=$'\t' read -r name _ digest _; do UP[$name]=$digest; done <"$W/images/expected.tsv"

cat >"$W/pullcache.toml" <<EOF
[server]
listen = "$MIRROR"
shutdown_timeout = "5s"
[metrics]
listen = "$METRICS"
[storage]
root = "$W/cache"
[log]
format = "json"
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
out=$(env -u PULLCACHE_BIN "$BIN" check-config --config "$W/pullcache.toml" 2>&1) \
    || die "pullcache rejects a configuration with [metrics] listen: $(printf '%s' "$out" | tail -n 3 | tr '\n' ' ')"
start_pullcache mirror "$W/pullcache.toml"
wait_http mirror "http://$MIRROR/v2/" 30
wait_http mirror "http://$METRICS/healthz" 30
pass "metrics listener: /healthz answers 2xx on $METRICS"

code=$(curl -sS -o "$W/metrics-first.txt" -D "$W/metrics-first.headers" -w '%{http_code}' --max-time 10 \
    "http://$METRICS/metrics" 2>>"$LOGS/clients.log") || code=000
ctype=$(awk -F': *' 'tolower($1) == "content-type" { print $2 }' "$W/metrics-first.headers" | tr -d '\r')
if [ "$code" = 200 ] && case "$ctype" in text/plain*) true ;; *) false ;; esac; then
    pass "GET /metrics: 200, $ctype"
else
    fail "GET /metrics: 200, text/plain" "HTTP $code, Content-Type '$ctype'"
fi
# promtool parses the exposition; lint remarks (naming advice) are shown, not failed.
promtool check metrics <"$W/metrics-first.txt" >"$LOGS/promtool-metrics.log" 2>&1 || true
if grep -qi 'pars' "$LOGS/promtool-metrics.log"; then
    fail "promtool check metrics: /metrics parses" "$(head -n 3 "$LOGS/promtool-metrics.log" | tr '\n' ' ' | cut -c1-400)"
else
    pass "promtool check metrics: /metrics parses"
    [ ! -s "$LOGS/promtool-metrics.log" ] || log "promtool lint remarks: $(head -n 5 "$LOGS/promtool-metrics.log" | tr '\n' ';')"
fi

# ============================================================ Prometheus
# compose/prometheus.yml as it is, but the target is the loopback metrics
# address and the scrape interval 1 s.
python3 - "$REPO_ROOT/compose/prometheus.yml" "$METRICS" >"$W/prometheus.yml" <<'PY' \
    || die "cannot rewrite compose/prometheus.yml for the loopback target"
import re, sys
text = open(sys.argv[1]).read()
text, n = re.subn(r"""(['"])pullcache:5001\1""", '"%s"' % sys.argv[2], text)
if n != 1:
    sys.exit("target \"pullcache:5001\" found %d times in compose/prometheus.yml" % n)
text, n = re.subn(r"(scrape_interval|evaluation_interval):\s*\S+", r"\1: 1s", text)
if n == 0:
    sys.exit("no scrape_interval in compose/prometheus.yml")
sys.stdout.write(text)
PY
check "promtool check config: the loopback copy of compose/prometheus.yml" promtool check config "$W/prometheus.yml"
start prometheus "$LOGS/prometheus.log" prometheus --config.file="$W/prometheus.yml" \
    --web.listen-address="$PROM" --storage.tsdb.path="$W/prom" --log.level=warn
wait_http prometheus "http://$PROM/-/ready" 60

# promq EXPR: the instant query's JSON answer from Prometheus.
promq() { curl -sS --max-time 10 -G "http://$PROM/api/v1/query" --data-urlencode "query=$1" 2>/dev/null; }
# promval EXPR: the first sample's value, or "none".
promval() {
    promq "$1" | python3 -c 'import json,sys
r = json.load(sys.stdin)["data"]["result"]
print(r[0]["value"][1] if r else "none")' 2>/dev/null || echo none
}

end=$((SECONDS + 30))
health=
while [ "$SECONDS" -lt "$end" ]; do
    health=$(curl -sS --max-time 5 "http://$PROM/api/v1/targets" 2>/dev/null | python3 -c 'import json,sys
t = json.load(sys.stdin)["data"]["activeTargets"]
print(" ".join("%s=%s%s" % (x["labels"].get("job"), x["health"], (" (" + x["lastError"] + ")") if x.get("lastError") else "") for x in t))' 2>/dev/null) || true
    [ "$health" != "pullcache=up" ] || break
    sleep 0.5
done
if [ "$health" = "pullcache=up" ]; then
    pass "Prometheus scrapes pullcache's /metrics (job pullcache up)"
else
    fail "Prometheus scrapes pullcache's /metrics (job pullcache up)" "targets: ${health:-none}"
fi

# ============================================================ traffic
# copy NAME IMG: skopeo copy to dir:, the manifest digest checked.
copy() {
    local name=$1 img=$2 out got
    budget "$name" || return 0
    out=$W/copy-$RANDOM$RANDOM
    if ! timeout "$T" skopeo --insecure-policy copy --preserve-digests --src-tls-verify=false \
        "docker://$SKOPEO_REPO/$img:latest" "dir:$out" >>"$LOGS/clients.log" 2>&1; then
        fail "$name" "skopeo copy: $(why $?)"
        return
    fi
    got=sha256:$(sha256sum "$out/manifest.json" | cut -d' ' -f1)
    if [ "$got" = "${UP[$img]}" ]; then pass "$name"; else fail "$name" "manifest $got, upstream ${UP[$img]}"; fi
    rm -rf "$out"
}

log "traffic: cold, warm, concurrent cold, tags, a missing image"
for img in "${IMAGES[@]}"; do copy "skopeo copy $img (cold)" "$img"; done
for img in "${IMAGES[@]}"; do copy "skopeo copy $img (warm)" "$img"; done

if budget "concurrent cold copies of $BURST"; then
    pids=()
    for ((i = 1; i <= BURST_N; i++)); do
        timeout "$T" skopeo --insecure-policy copy --preserve-digests --src-tls-verify=false \
            "docker://$SKOPEO_REPO/$BURST:latest" "dir:$W/burst-$i" >"$LOGS/burst-$i.log" 2>&1 &
        pids+=($!)
    done
    for ((i = 1; i <= BURST_N; i++)); do
        name="concurrent cold copy $i of $BURST_N of $BURST"
        wait "${pids[$((i - 1))]}" && rc=0 || rc=$?
        if [ "$rc" != 0 ]; then
            fail "$name" "exit $rc: $(tail -n 1 "$LOGS/burst-$i.log" | cut -c1-300)"
            continue
        fi
        got=sha256:$(sha256sum "$W/burst-$i/manifest.json" | cut -d' ' -f1)
        if [ "$got" = "${UP[$BURST]}" ]; then pass "$name"; else fail "$name" "manifest $got, upstream ${UP[$BURST]}"; fi
    done
fi

if budget "skopeo list-tags tiny"; then
    if out=$(timeout "$T" skopeo list-tags --tls-verify=false "docker://$SKOPEO_REPO/tiny" 2>&1) \
        && case "$out" in *'"latest"'*) true ;; *) false ;; esac; then
        pass "skopeo list-tags tiny"
    else
        fail "skopeo list-tags tiny" "$(printf '%s' "$out" | tr '\n' ' ' | cut -c1-300)"
    fi
fi
# A client error for the error panels: an image the upstream does not have.
if budget "skopeo inspect of a missing image fails"; then
    if timeout "$T" skopeo inspect --raw --tls-verify=false "docker://$SKOPEO_REPO/nosuchimage:latest" \
        >>"$LOGS/clients.log" 2>&1; then
        fail "skopeo inspect of a missing image fails" "it succeeded"
    else
        pass "skopeo inspect of a missing image fails"
    fi
fi
curl -sS -o /dev/null --max-time 10 "http://$MIRROR/v2/_catalog" 2>>"$LOGS/clients.log" || true

# ============================================================ the dashboard's queries
# Prometheus has seen the traffic once its sum of registry_http_requests_total
# reaches what /metrics says now; then three more scrapes, so that every
# rate() has points after the last request.
want=$(curl -sS --max-time 10 "http://$METRICS/metrics" 2>/dev/null \
    | awk '/^registry_http_requests_total[{ ]/ { s += $NF } END { print s + 0 }')
end=$((SECONDS + 30))
got=none
while [ "$SECONDS" -lt "$end" ]; do
    got=$(promval 'sum(registry_http_requests_total)')
    if [ "$got" != none ] && python3 -c 'import sys; sys.exit(float(sys.argv[1]) < float(sys.argv[2]))' "$got" "$want"; then
        break
    fi
    sleep 0.5
done
if [ "$got" != none ] && [ "$want" != 0 ] && python3 -c 'import sys; sys.exit(float(sys.argv[1]) < float(sys.argv[2]))' "$got" "$want"; then
    pass "Prometheus has scraped the traffic (sum(registry_http_requests_total) = $got)"
else
    fail "Prometheus has scraped the traffic" "Prometheus says $got, /metrics says $want"
fi
sleep 3

# The traffic above must show in the counters it drives (not only as series
# that exist from the start): misses and hits, bytes from the upstream and
# from the cache (sendfile), the disk usage, the 404 and the tags request.
positive() {
    local name="metrics count the traffic: $1" v
    v=$(promval "$1")
    if [ "$v" != none ] && python3 -c 'import sys; sys.exit(not float(sys.argv[1]) > 0)' "$v" 2>/dev/null; then
        pass "$name ($v)"
    else
        fail "$name" "value $v, want > 0"
    fi
}
positive 'sum(pullcache_cache_outcomes_total{outcome="miss"})'
positive 'sum(pullcache_cache_outcomes_total{outcome="hit"})'
positive 'sum(registry_proxy_misses_total)'
positive 'sum(registry_proxy_hits_total)'
positive 'sum(registry_storage_cache_hits_total)'
positive 'sum(registry_storage_cache_requests_total) - sum(registry_storage_cache_hits_total)'
positive 'sum(pullcache_upstream_bytes_total)'
positive 'sum(registry_proxy_pulled_bytes_total)'
positive 'sum(pullcache_served_bytes_total{source="upstream"})'
positive 'sum(pullcache_served_bytes_total{source="cache"})'
positive 'sum(pullcache_bytes_saved_total)'
positive 'sum(pullcache_zero_copy_bytes_total)'
positive 'sum(pullcache_storage_bytes)'
positive 'sum(pullcache_upstream_requests_total{code="200"})'
positive 'sum(registry_http_requests_total{handler="manifest", code="404"})'
positive 'sum(registry_http_requests_total{handler="tags", code="200"})'
positive 'sum(registry_http_requests_total{handler="blob", code="200"})'
# Whether four copies at once joined one fill depends on timing: shown, not checked.
log "coalesced lookups during the concurrent copies: $(promval 'sum(pullcache_cache_outcomes_total{outcome="coalesced"})')"

upstream_value=$(curl -sS --max-time 10 -G "http://$PROM/api/v1/label/upstream/values" \
    --data-urlencode 'match[]=pullcache_upstream_up' 2>/dev/null | python3 -c 'import json,sys
print(" ".join(json.load(sys.stdin)["data"]))' 2>/dev/null) || upstream_value=
if [ "$upstream_value" = docker.io ]; then
    pass "variable upstream: label_values(pullcache_upstream_up, upstream) = docker.io"
else
    fail "variable upstream: label_values(pullcache_upstream_up, upstream) = docker.io" "got '$upstream_value'"
fi

log "evaluating every PromQL expression of the dashboard"
allow=$W/may-be-empty.tsv
: >"$allow"
for k in "${!MAY_BE_EMPTY[@]}"; do printf '%s\t%s\n' "$k" "${MAY_BE_EMPTY[$k]}" >>"$allow"; done
python3 - "$DASHBOARD" "http://$PROM" "$allow" >"$W/queries.tsv" 2>"$LOGS/queries.log" <<'PY' || true
import json, re, sys, urllib.parse, urllib.request

dash, prom, allow_file = sys.argv[1:4]
allow = dict(l.rstrip("\n").split("\t", 1) for l in open(allow_file) if l.strip())
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

def query(expr):
    url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with opener.open(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        try:
            return json.load(e)
        except Exception:
            return {"status": "error", "error": "HTTP %d" % e.code}
    except Exception as e:
        return {"status": "error", "error": str(e)}

def names(expr):
    """The metric names an expression reads."""
    return sorted(set(re.findall(r"\b((?:registry|pullcache|process)_[a-z0-9_]+)\b", expr)))

def why_empty(expr):
    out = []
    for n in names(expr):
        r = query("count({__name__=%s})" % json.dumps(n))
        c = r.get("data", {}).get("result", [])
        out.append("%s: %s" % (n, ("%s series" % c[0]["value"][1]) if c else "NO SERIES"))
    return "; ".join(out)

def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))

d = json.load(open(dash))
seen_allowed = set()
n = 0
for p in panels(d.get("panels", [])):
    pds = (p.get("datasource") or {}).get("uid")
    for t in p.get("targets", []):
        uid = (t.get("datasource") or {}).get("uid") or pds
        title = "%s [%s]" % (p.get("title"), t.get("refId"))
        if uid != "prometheus":
            kind = "expr" if t.get("expr") else "query"
            print("info\t%s\tnot PromQL: datasource %s %s" % (title, uid, kind))
            if uid not in ("loki", "jaeger"):
                print("fail\t%s\tunknown datasource uid %s" % (title, uid))
            continue
        raw = t.get("expr", "")
        if not raw.strip():
            print("fail\t%s\tPrometheus target without expr" % title)
            continue
        raw1 = raw.replace("${upstream}", "$upstream")
        if "$upstream" in raw1:
            variants = [(" (upstream All)", raw1.replace("$upstream", ".*")),
                        (" (upstream docker.io)", raw1.replace("$upstream", r"docker\\.io"))]
        else:
            variants = [("", raw1)]
        for label, e in variants:
            e = (e.replace("$__rate_interval", "1m").replace("${__rate_interval}", "1m")
                  .replace("$__interval", "1m").replace("${__interval}", "1m")
                  .replace("$__range", "5m").replace("${__range}", "5m"))
            if "$" in e:
                print("fail\t%s\tunsubstituted variable in: %s" % (title, e))
                continue
            n += 1
            name = "dashboard query %s%s: %s" % (title, label, e)
            r = query(e)
            if r.get("status") != "success":
                print("fail\t%s\t%s" % (name, r.get("error", r)))
                continue
            res = r["data"]["result"]
            if isinstance(res, list) and res:
                print("ok\t%s\t%d series" % (name, len(res)))
            elif raw in allow:
                seen_allowed.add(raw)
                print("skip\t%s\t%s" % (name, allow[raw]))
            else:
                print("fail\t%s\tempty result (%s)" % (name, why_empty(e)))
for raw in allow:
    if raw not in seen_allowed and raw not in json.dumps(d):
        print("fail\tallow-list entry %s\tnot an expression of the dashboard" % raw)
print("info\t-\t%d PromQL evaluations" % n)
PY
[ -s "$W/queries.tsv" ] || fail "dashboard queries evaluated" "the evaluator printed nothing: $(tail -n 3 "$LOGS/queries.log" | tr '\n' ' ')"
while IFS=$'\t' read -r verdict name detail; do
    case "$verdict" in
        ok) pass "$name ($detail)" ;;
        fail) fail "$name" "$detail" ;;
        skip) printf 'skip (%s) %s\n' "$detail" "$name" ;;
        *) log "$name: $detail" ;;
    esac
done <"$W/queries.tsv"

# ============================================================ logs, liveness
check "pullcache's stderr lines are JSON objects with a level" python3 - "$LOGS/mirror.log" <<'PY'
import json, sys
lines = [l for l in open(sys.argv[1], errors="replace") if l.strip()]
if not lines:
    sys.exit("no log line")
for n, l in enumerate(lines, 1):
    try:
        o = json.loads(l)
    except ValueError:
        sys.exit("line %d is not JSON: %s" % (n, l[:200]))
    if not isinstance(o, dict) or "level" not in o:
        sys.exit("line %d has no level: %s" % (n, l[:200]))
print("%d lines" % len(lines))
PY

alive mirror

summary "pullcache ($BIN), metrics $METRICS, Prometheus $PROM"
