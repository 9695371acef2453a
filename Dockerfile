# pullcache container image.
#
#   docker build -t pullcache .
#   docker run -p 127.0.0.1:5000:5000 -p 127.0.0.1:5001:5001 \
#       -v pullcache-data:/var/lib/pullcache pullcache
#
# The image's default configuration (/etc/pullcache/pullcache.toml, written
# below) is a Docker Hub mirror on 0.0.0.0:5000, metrics and /healthz on
# 0.0.0.0:5001, JSON logs on stderr, data in the volume /var/lib/pullcache.
# Mount your own file over it (compose/docker-compose.yml does) or override
# single keys with PULLCACHE_<SECTION>__<KEY> variables.

# ---------------------------------------------------------------- builder
FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependencies first, against stub sources, so that a change to pullcache's
# own code does not rebuild the crates.io dependencies (this layer is cached
# as long as Cargo.toml, actors/Cargo.toml and Cargo.lock stay the same).
COPY Cargo.toml Cargo.lock ./
COPY actors/Cargo.toml actors/
RUN mkdir -p src actors/src tests/integration \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs actors/src/lib.rs tests/integration/main.rs \
    && cargo build --release --locked --bin pullcache \
    && rm -rf src actors/src

# pullcache itself. `touch` makes cargo see the real sources as newer than
# the stub build, whatever times COPY gave them.
COPY src src
COPY actors/src actors/src
COPY config config
RUN find src actors/src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bin pullcache \
    && install -D -m 0755 target/release/pullcache /out/pullcache

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim

# Upstream TLS uses the webpki roots compiled into the binary; nothing else
# is needed beyond glibc.
RUN groupadd --system --gid 10001 pullcache \
    && useradd --system --uid 10001 --gid pullcache --home-dir /var/lib/pullcache \
       --no-create-home --shell /usr/sbin/nologin pullcache \
    && mkdir -p /etc/pullcache /var/lib/pullcache \
    && chown pullcache:pullcache /var/lib/pullcache \
    && printf '%s\n' \
       '# pullcache in a container: see README.md ("Configuration") for every key.' \
       '[server]' \
       'listen = "0.0.0.0:5000"' \
       '[metrics]' \
       'listen = "0.0.0.0:5001"' \
       '[storage]' \
       'root = "/var/lib/pullcache"' \
       '[log]' \
       'format = "json"' \
       > /etc/pullcache/pullcache.toml

COPY --from=builder /out/pullcache /usr/local/bin/pullcache

USER pullcache:pullcache
WORKDIR /var/lib/pullcache
VOLUME ["/var/lib/pullcache"]
# 5000: the registry API (clients pull here); 5001: /metrics and /healthz.
EXPOSE 5000 5001
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pullcache", "serve", "--config", "/etc/pullcache/pullcache.toml"]
