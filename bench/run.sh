#!/usr/bin/env bash
# pullcache benchmark: pullcache vs CNCF Distribution (proxy mode) vs nginx proxy_cache vs
# the upstream served directly, plus this machine's limits (sha256 on one core, nginx
# sendfile of the same file, nginx serving the manifest as a static file), in one run.
# See bench/README.md for every figure and how to read it.
#
#   bench/run.sh                                   # full run (~12 min on 2 cores)
#   BENCH_BIG_MB=128 BENCH_MID_MB=16 BENCH_REPEAT=1 BENCH_WRK_SECONDS=3 \
#     BENCH_STARTUP_BLOBS=10000 bench/run.sh      # quick run for development
#
# Environment (defaults in brackets):
#   PULLCACHE_BIN        binary to measure [build with CARGO_TARGET_DIR=$BENCH_TARGET_DIR]
#   BENCH_TARGET_DIR     cargo target dir for that build [/tmp/bench-target]
#   BENCH_BIG_MB [1024]  BENCH_MID_MB [64]  BENCH_REPEAT [3]  BENCH_WRK_SECONDS [10]
#   BENCH_MID_CLIENTS [16]  BENCH_WRK_CONNECTIONS [64]  BENCH_STARTUP_BLOBS [100000]
#   BENCH_SECTIONS       comma list of pulls,burst,manifests,coldmanifests,many,startup [all]
#   BENCH_COLD_MANIFESTS [200]  distinct manifests fetched cold in the coldmanifests section
#   BENCH_SYSTEMS        comma list of pullcache,distribution,nginx,upstream,static [all]
#   BENCH_METRICS        on|off|absent: pullcache's metrics listener on an ephemeral port,
#                        metrics.listen = "", or no [metrics] section (older binaries) [on]
#   BENCH_MANY_CLIENTS [100]  concurrent warm pulls of the big blob in the many section
#   BENCH_PORT_BASE      first of six loopback ports [36000]
#   BENCH_BUDGET         seconds the measurements may take before the run aborts [2400]
#   BENCH_SKIP_SETUP=1   do not run bench/setup.sh
#   KEEP_WORK=1          keep bench/work/run-* (data, logs, configs)
# Output: bench/results/<UTC time>-<full|custom>.md and .json
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$BENCH_DIR/.." && pwd)

if [ "${BENCH_SKIP_SETUP:-0}" != 1 ]; then
    "$BENCH_DIR/setup.sh"
fi

if [ -z "${PULLCACHE_BIN:-}" ]; then
    target=${BENCH_TARGET_DIR:-/tmp/bench-target}
    echo "bench: building pullcache (CARGO_TARGET_DIR=$target cargo build --release)" >&2
    (cd "$REPO_ROOT" && CARGO_TARGET_DIR=$target cargo build --release --quiet --bin pullcache) >&2
    PULLCACHE_BIN=$target/release/pullcache
fi
[ -x "$PULLCACHE_BIN" ] || { echo "bench: PULLCACHE_BIN=$PULLCACHE_BIN is not executable" >&2; exit 1; }
export PULLCACHE_BIN

exec python3 "$BENCH_DIR/bench.py" "$@"
