#!/usr/bin/env python3
"""pullcache benchmark harness (Python 3 standard library only; run it via bench/run.sh).

Systems, all on 127.0.0.1, serving the same URL paths (/v2/library/<name>/...):

  pullcache     the binary in $PULLCACHE_BIN, upstream "docker.io" (default) -> upstream
  distribution  CNCF Distribution 2.8 (Debian docker-registry) in proxy mode -> upstream
  nginx         nginx proxy_cache (key $uri, proxy_cache_lock on) in front of the upstream
  upstream      the upstream itself (Distribution, hosted), served directly
  static        nginx serving the blob / manifest files from page cache with sendfile
                (a machine limit, not a cache)

The upstream's access log (combined format, one line per completed request with the bytes
written) counts what each cache asked of the upstream. See bench/README.md.
"""

import datetime
import hashlib
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)


def env_int(name, default):
    v = os.environ.get(name, "")
    return int(v) if v.strip() else default


BIG_MB = env_int("BENCH_BIG_MB", 1024)
MID_MB = env_int("BENCH_MID_MB", 64)
REPEAT = env_int("BENCH_REPEAT", 3)
WRK_S = env_int("BENCH_WRK_SECONDS", 10)
WRK_C = env_int("BENCH_WRK_CONNECTIONS", 64)
MID_CLIENTS = env_int("BENCH_MID_CLIENTS", 16)
WARM_CLIENTS = 4
MANY_CLIENTS = env_int("BENCH_MANY_CLIENTS", 100)
STARTUP_BLOBS = env_int("BENCH_STARTUP_BLOBS", 100000)
COLD_MANIFESTS = env_int("BENCH_COLD_MANIFESTS", 200)
PORT_BASE = env_int("BENCH_PORT_BASE", 36000)
BUDGET = env_int("BENCH_BUDGET", 2400)
KEEP_WORK = os.environ.get("KEEP_WORK") == "1"
ALL_SECTIONS = "pulls,burst,manifests,coldmanifests,many,startup"
SECTIONS = set(
    s.strip()
    for s in os.environ.get("BENCH_SECTIONS", ALL_SECTIONS).split(",")
    if s.strip()
)
PULLCACHE_BIN = os.environ.get("PULLCACHE_BIN", "")
# Systems measured (the upstream always runs: the caches need it); default all.
SYSTEMS = set(s.strip() for s in os.environ.get("BENCH_SYSTEMS", "").split(",") if s.strip())
# pullcache's metrics listener: "on" (default, an ephemeral loopback port: the counting
# and the listener as deployed), "off" (metrics.listen = "", no listener), or "absent"
# (no [metrics] section: binaries from before the metrics listener).
METRICS = os.environ.get("BENCH_METRICS", "on")
if METRICS not in ("on", "off", "absent"):
    sys.exit(f"BENCH_METRICS must be on, off or absent, not {METRICS!r}")
METRICS_SECTION = "" if METRICS == "absent" else (
    '[metrics]\nlisten = "%s"\n' % ("127.0.0.1:0" if METRICS == "on" else ""))


def measured(systems):
    return [s for s in systems if not SYSTEMS or s in SYSTEMS]

PORTS = {
    "upstream": PORT_BASE,
    "pullcache": PORT_BASE + 1,
    "distribution": PORT_BASE + 2,
    "nginx": PORT_BASE + 3,
    "static": PORT_BASE + 4,
    "startup": PORT_BASE + 5,
}
LABELS = {
    "pullcache": "pullcache",
    "distribution": "Distribution proxy",
    "nginx": "nginx proxy_cache",
    "upstream": "upstream direct",
    "static": "nginx static (sendfile)",
}
CACHES = ["pullcache", "distribution", "nginx"]
ALL_SYSTEMS = ["pullcache", "distribution", "nginx", "upstream", "static"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MTIME = 1704067200
MIB = 1 << 20
GIB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class BudgetExceeded(Exception):
    pass


def check_budget():
    if time.monotonic() - T0 > BUDGET:
        raise BudgetExceeded(f"BENCH_BUDGET={BUDGET}s exceeded")


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(port, path, headers=None, method="GET", timeout=10):
    """(status, headers dict lower-case, body bytes)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        body = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    finally:
        c.close()


# ------------------------------------------------------------------------------------
# processes: every one started here is recorded and stopped by its PID


class Proc:
    started = []

    def __init__(self, name, argv, out_path, err_path=None, env=None, cwd=None):
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd
        self.out_path, self.err_path = out_path, err_path or out_path
        self.p = None

    def start(self):
        out = open(self.out_path, "ab")
        err = out if self.err_path == self.out_path else open(self.err_path, "ab")
        try:
            self.p = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=self.env, cwd=self.cwd)
        finally:
            out.close()
            if err is not out:
                err.close()
        Proc.started.append(self)
        return self

    @property
    def pid(self):
        return self.p.pid if self.p else None

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def stop(self, timeout=30):
        if self.p is None:
            return
        if self.p.poll() is None:
            try:
                os.kill(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.p.pid}) ignored SIGTERM for {timeout}s: SIGKILL")
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(10)
        if self in Proc.started:
            Proc.started.remove(self)

    @classmethod
    def stop_all(cls):
        for p in list(reversed(cls.started)):
            try:
                p.stop(timeout=20)
            except Exception as e:  # keep stopping the others
                print(f"stopping {p.name}: {e}", file=sys.stderr)


# ------------------------------------------------------------------------------------
# /proc accounting


def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def tree(pid):
    """pid and its descendants (nginx: master + workers)."""
    if pid is None:
        return []
    seen, todo = [], [pid]
    while todo and len(seen) < 64:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += children(p)
    return seen


def cpu_ticks(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
            fields = s[s.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            pass
    return total


def status_kb(pids, key):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class RssSampler:
    """Samples the summed VmRSS of a process tree every 50 ms in a thread."""

    def __init__(self, pid_fn):
        self.pid_fn, self.peak_kb, self.samples = pid_fn, 0, 0
        self.stop_ev = threading.Event()
        self.th = threading.Thread(target=self.run, daemon=True)

    def run(self):
        n = 0
        while not self.stop_ev.is_set() and n < 20 * 3600:
            kb = status_kb(self.pid_fn(), "VmRSS")
            self.peak_kb = max(self.peak_kb, kb)
            self.samples += 1
            n += 1
            self.stop_ev.wait(0.05)

    def __enter__(self):
        self.th.start()
        return self

    def __exit__(self, *a):
        self.stop_ev.set()
        self.th.join(5)


# ------------------------------------------------------------------------------------
# test images


def seeded_chunks(seed, size):
    r = random.Random(seed)
    left = size
    while left > 0:
        n = min(left, MIB)
        yield r.randbytes(n)
        left -= n


def write_tar_layer(path, seed, payload):
    """An uncompressed tar with one file of `payload` seeded random bytes. (digest, size)."""
    h = hashlib.sha256()
    size = 0

    def w(f, b):
        nonlocal size
        f.write(b)
        h.update(b)
        size += len(b)

    name = b"data".ljust(100, b"\0")
    hdr = bytearray(512)
    hdr[0:100] = name
    hdr[100:108] = b"0000644\0"
    hdr[108:116] = b"0000000\0"
    hdr[116:124] = b"0000000\0"
    hdr[124:136] = (b"%011o" % payload) + b"\0"
    hdr[136:148] = (b"%011o" % MTIME) + b"\0"
    hdr[148:156] = b" " * 8
    hdr[156:157] = b"0"
    hdr[257:265] = b"ustar\x0000"
    chk = sum(hdr)
    hdr[148:156] = (b"%06o" % chk) + b"\0 "
    with open(path, "wb") as f:
        w(f, bytes(hdr))
        for c in seeded_chunks(seed, payload):
            w(f, c)
        pad = (-payload) % 512
        w(f, b"\0" * (pad + 1024))
    return "sha256:" + h.hexdigest(), size


def make_images(out):
    """Writes the blobs of three images under out/; returns the image descriptions."""
    os.makedirs(out, exist_ok=True)
    images = {}
    specs = [("big", BIG_MB * MIB - 1536, 1), ("mid", MID_MB * MIB - 1536, 2), ("small", 4096, 3)]
    for name, payload, seed in specs:
        lpath = os.path.join(out, f"{name}.layer")
        ldig, lsize = write_tar_layer(lpath, seed, payload)
        config = json.dumps({
            "created": "2024-01-01T00:00:00Z", "architecture": "amd64", "os": "linux",
            "config": {}, "rootfs": {"type": "layers", "diff_ids": [ldig]},
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"bench {name}"}],
        }, sort_keys=True, separators=(",", ":")).encode()
        cdig = "sha256:" + hashlib.sha256(config).hexdigest()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cdig, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER_TAR, "digest": ldig, "size": lsize}],
        }, sort_keys=True, separators=(",", ":")).encode()
        mdig = "sha256:" + hashlib.sha256(manifest).hexdigest()
        images[name] = {
            "repo": f"library/{name}", "layer": {"digest": ldig, "size": lsize, "path": lpath},
            "config": config, "config_digest": cdig, "manifest": manifest,
            "manifest_digest": mdig,
        }
        log(f"  image {name}: layer {ldig[:19]}… {lsize / MIB:.1f} MiB, manifest {mdig[:19]}…")
    return images


def push_blob(port, repo, digest, size, data=None, path=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600, blocksize=MIB)
    try:
        c.request("HEAD", f"/v2/{repo}/blobs/{digest}")
        r = c.getresponse()
        r.read()
        if r.status == 200:
            return
        c.request("POST", f"/v2/{repo}/blobs/uploads/")
        r = c.getresponse()
        r.read()
        if r.status != 202:
            raise RuntimeError(f"upload start for {repo}: HTTP {r.status}")
        loc = r.getheader("Location")
        loc = re.sub(r"^https?://[^/]+", "", loc)
        loc += ("&" if "?" in loc else "?") + "digest=" + digest
        hdrs = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if path:
            with open(path, "rb") as f:
                c.request("PUT", loc, body=f, headers=hdrs)
                r = c.getresponse()
        else:
            c.request("PUT", loc, body=data, headers=hdrs)
            r = c.getresponse()
        body = r.read()
        if r.status != 201:
            raise RuntimeError(f"upload of {digest} to {repo}: HTTP {r.status} {body[:200]!r}")
    finally:
        c.close()


def push_image(port, img):
    repo = img["repo"]
    push_blob(port, repo, img["layer"]["digest"], img["layer"]["size"], path=img["layer"]["path"])
    push_blob(port, repo, img["config_digest"], len(img["config"]), data=img["config"])
    st, h, body = http_get_put(port, f"/v2/{repo}/manifests/latest", img["manifest"])
    if st != 201 or h.get("docker-content-digest") != img["manifest_digest"]:
        raise RuntimeError(f"manifest push {repo}: HTTP {st} {h.get('docker-content-digest')} {body[:200]!r}")


def push_cold_manifests(port, img, n):
    """n distinct manifests (tags t0..t<n-1> of library/cold) of the small image's blobs,
    each with its own annotation: n manifests no cache has seen. Returns {tag: digest}."""
    repo = "library/cold"
    for d in (img["layer"]["digest"], img["config_digest"]):
        st, _, body = http_get(port, f"/v2/{repo}/blobs/uploads/?mount={d}&from={img['repo']}",
                               method="POST", timeout=60)
        if st != 201:
            raise RuntimeError(f"mount of {d} into {repo}: HTTP {st} {body[:200]!r}")
    base = json.loads(img["manifest"])
    out = {}
    for i in range(n):
        m = dict(base, annotations={"bench.cold": str(i)})
        body = json.dumps(m, sort_keys=True, separators=(",", ":")).encode()
        st, h, b = http_get_put(port, f"/v2/{repo}/manifests/t{i}", body)
        if st != 201:
            raise RuntimeError(f"manifest push {repo}:t{i}: HTTP {st} {b[:200]!r}")
        out[f"t{i}"] = "sha256:" + hashlib.sha256(body).hexdigest()
    return out


def http_get_put(port, path, body):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("PUT", path, body=body, headers={"Content-Type": OCI_MANIFEST})
        r = c.getresponse()
        b = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, b
    finally:
        c.close()


# ------------------------------------------------------------------------------------
# the upstream's access log


ACCESS_RE = re.compile(rb'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


class AccessLog:
    def __init__(self, path):
        self.path = path

    def mark(self):
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def since(self, mark):
        """[(method, path, status, bytes)] of complete lines written after mark."""
        with open(self.path, "rb") as f:
            f.seek(mark)
            data = f.read()
        out = []
        for line in data.split(b"\n")[:-1]:  # the last piece is incomplete (or empty)
            m = ACCESS_RE.search(line)
            if m:
                size = 0 if m.group(4) == b"-" else int(m.group(4))
                out.append((m.group(1).decode(), m.group(2).decode(), int(m.group(3)), size))
        return out


# ------------------------------------------------------------------------------------
# systems


def rmtree(path):
    if os.path.lexists(path):
        shutil.rmtree(path)


def wait_ready(port, path="/v2/", timeout=30, proc=None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}; see {proc.err_path}")
        try:
            st, _, _ = http_get(port, path, timeout=2)
            if st in (200, 401):
                return
            last = st
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"127.0.0.1:{port}{path} not ready after {timeout}s (last: {last})")


PORT_POOL = list(range(PORT_BASE + 6, PORT_BASE + 100))


def bindable(port):
    """Whether a listener (SO_REUSEADDR, as nginx, Go and actix set it) can bind now."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def pick_port(preferred, name, avoid=()):
    taken = {p for n, p in PORTS.items() if n != name}
    for p in [preferred] + PORT_POOL:
        if p not in taken and p not in avoid and bindable(p):
            return p
    raise RuntimeError(f"no free port in {PORT_BASE}-{PORT_BASE + 99}")


def bind_failed(proc):
    for path in {proc.out_path, proc.err_path}:
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 4000))
                tail = f.read().decode(errors="replace").lower()
        except OSError:
            continue
        if "address already in use" in tail or "address in use" in tail:
            return True
    return False


class Server:
    cacheable = True

    def __init__(self, name, work):
        self.name, self.port = name, PORTS[name]
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.proc = None

    def pids(self):
        return tree(self.proc.pid) if self.proc and self.proc.alive() else []

    def stop(self):
        if self.proc:
            self.proc.stop()
            self.proc = None

    def restart(self, fresh):
        self.stop()
        if fresh:
            rmtree(self.data_dir())
            os.makedirs(self.data_dir(), exist_ok=True)
        os.sync()  # nobody's dirty pages flush during the next measurement
        # Our ports lie in the kernel's ephemeral range: another program's outgoing
        # connection may hold one for a moment. Retry a bind failure a few times.
        # Client sockets (wrk, curl, the caches' upstream connections) get source ports
        # from the same range and leave them in TIME_WAIT for 60 s, which blocks a listener:
        # a busy port is replaced by a free one from the pool, and a bind failure retried.
        avoid = set()
        for attempt in range(10):
            port = pick_port(self.port, self.name, avoid)
            if port != self.port:
                log(f"{self.name}: 127.0.0.1:{self.port} is busy; using {port}")
                self.port = PORTS[self.name] = port
            self.proc = self.make_proc().start()
            try:
                wait_ready(self.port, proc=self.proc)
                return
            except RuntimeError as e:
                exited = not self.proc.alive()
                self.proc.stop()
                if not (exited and bind_failed(self.proc)) or attempt == 9:
                    raise
                log(f"{self.name}: bind to 127.0.0.1:{self.port} failed ({e}); another port")
                avoid.add(self.port)
                time.sleep(0.2)

    def ensure(self):
        if not (self.proc and self.proc.alive()):
            self.restart(fresh=False)


class Upstream(Server):
    cacheable = False

    def data_dir(self):
        return os.path.join(self.dir, "data")

    def make_proc(self):
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write(f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {self.data_dir()}
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:{self.port}
  secret: pullcache-bench
""")
        # stdout: the combined access log (one line per completed request); stderr: the rest
        return Proc("upstream", ["docker-registry", "serve", cfg],
                    os.path.join(self.dir, "access.log"), os.path.join(self.dir, "registry.log"))


class Pullcache(Server):
    def data_dir(self):
        return os.path.join(self.dir, "data")

    def make_proc(self):
        cfg = os.path.join(self.dir, "pullcache.toml")
        with open(cfg, "w") as f:
            f.write(f"""[server]
listen = "127.0.0.1:{self.port}"
{METRICS_SECTION}[storage]
root = "{self.data_dir()}"
[log]
level = "warn"
[[upstreams]]
name = "docker.io"
url = "http://127.0.0.1:{PORTS['upstream']}"
default = true
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RUST_LOG", "PULLCACHE_"))}
        return Proc("pullcache", [PULLCACHE_BIN, "serve", "--config", cfg],
                    os.path.join(self.dir, "pullcache.log"), env=env)


class DistributionProxy(Server):
    def data_dir(self):
        return os.path.join(self.dir, "data")

    def make_proc(self):
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write(f"""version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {self.data_dir()}
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:{self.port}
  secret: pullcache-bench
proxy:
  remoteurl: http://127.0.0.1:{PORTS['upstream']}
""")
        return Proc("distribution", ["docker-registry", "serve", cfg],
                    os.path.join(self.dir, "registry.log"))


NGINX_COMMON = """user root;
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_temp_path {dir}/tmp/client;
  proxy_temp_path {dir}/tmp/proxy;
  fastcgi_temp_path {dir}/tmp/fastcgi;
  uwsgi_temp_path {dir}/tmp/uwsgi;
  scgi_temp_path {dir}/tmp/scgi;
{body}
}}
"""


class NginxCache(Server):
    def data_dir(self):
        return os.path.join(self.dir, "cache")

    def make_proc(self):
        os.makedirs(os.path.join(self.dir, "tmp"), exist_ok=True)
        body = f"""  proxy_cache_path {self.data_dir()} levels=1:2 keys_zone=registry:16m max_size=50g
                   inactive=1y use_temp_path=off;
  upstream registry_upstream {{ server 127.0.0.1:{PORTS['upstream']}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    location /v2/ {{
      proxy_pass http://registry_upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_cache registry;
      proxy_cache_key $uri;
      proxy_cache_valid 200 206 1y;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 10m;
      proxy_cache_lock_age 10m;
      proxy_buffering on;
      proxy_ignore_headers Cache-Control Expires Set-Cookie;
      add_header X-Cache-Status $upstream_cache_status;
    }}
  }}"""
        return nginx_proc("nginx", self.dir, body)


class NginxStatic(Server):
    cacheable = False

    def data_dir(self):
        return os.path.join(self.dir, "files")

    def make_proc(self):
        os.makedirs(os.path.join(self.dir, "tmp"), exist_ok=True)
        files = self.data_dir()
        body = f"""  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    location = /v2/ {{ default_type application/json; return 200 "{{}}"; }}
    location ~ "^/v2/library/([a-z]+)/blobs/(sha256:[0-9a-f]{{64}})$" {{
      default_type application/octet-stream;
      alias {files}/$1/blobs/$2;
    }}
    location ~ "^/v2/library/([a-z]+)/manifests/([A-Za-z0-9_.:-]+)$" {{
      default_type {OCI_MANIFEST};
      alias {files}/$1/manifests/$2;
    }}
  }}"""
        return nginx_proc("static", self.dir, body)


def nginx_proc(name, d, body):
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_COMMON.format(dir=d, body=body))
    return Proc(name, ["nginx", "-p", d, "-e", os.path.join(d, "error.log"), "-c", conf,
                       "-g", "daemon off;"], os.path.join(d, "stderr.log"))


# ------------------------------------------------------------------------------------
# clients


CURL_FMT = "%{http_code} %{time_starttransfer} %{size_download} %{time_total}\\n"


def curl_pulls(port, path, n, timeout=900):
    """n concurrent curl GETs; (wall seconds, [(code, ttfb, size, total)])."""
    url = f"http://127.0.0.1:{port}{path}"
    argv = ["curl", "-s", "-o", "/dev/null", "--max-time", str(timeout), "-w", CURL_FMT, url]
    t = time.monotonic()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
             for _ in range(n)]
    res = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        f = out.decode().split()
        if len(f) == 4:
            res.append((int(f[0]), float(f[1]), int(f[2]), float(f[3])))
        else:
            res.append((0, 0.0, 0, 0.0))
    return time.monotonic() - t, res


def fetch_sha256(port, path, headers=None, timeout=300):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        h, n = hashlib.sha256(), 0
        while True:
            b = r.read(MIB)
            if not b:
                break
            h.update(b)
            n += len(b)
        return r.status, "sha256:" + h.hexdigest(), n
    finally:
        c.close()


LAT_RE = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def run_wrk(port, path, seconds):
    url = f"http://127.0.0.1:{port}{path}"
    argv = ["wrk", "-t2", f"-c{WRK_C}", f"-d{seconds}s", "--latency",
            "-H", f"Accept: {OCI_MANIFEST}", url]
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=seconds + 60, stdin=subprocess.DEVNULL)
    out = p.stdout.decode(errors="replace")
    r = {"raw": out[-1500:]}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    r["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    for pct, val, unit in LAT_RE.findall(out):
        r[f"p{pct}_ms"] = float(val) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return r


# ------------------------------------------------------------------------------------
# pullcache's start-up log

ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
TS_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z")


def log_time(line, wall0, fallback):
    """Seconds from wall0 to the line's own UTC timestamp (fallback if it has none)."""
    m = TS_RE.match(line.strip())
    if not m:
        return fallback
    ts = m.group(1)
    if "." in ts:
        head, frac = ts.split(".")
        ts = head + "." + frac[:6]
    try:
        t = datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc).timestamp()
    except ValueError:
        return fallback
    return t - wall0


def reconcile_done(txt, wall0, now):
    """(seconds until the store was reconciled including any background re-check, report)
    or (None, "") while it is still going. Handles both the report after a background
    reconciliation and a reconciliation before serving followed by a background re-hash of
    unrecorded files (`unrecorded_files=N`, then `unrecorded blob files re-checked`)."""
    lines = [ln for ln in txt.splitlines()
             if "reconcil" in ln or "re-check" in ln or "unrecorded" in ln]
    main = [ln for ln in lines if "store reconciled" in ln or "reconciliation failed" in ln]
    if not main:
        return None, ""
    m = re.search(r"unrecorded_files=(\d+)", main[-1])
    if m and int(m.group(1)) > 0:
        bg = [ln for ln in lines if "unrecorded blob files re-checked" in ln
              or "re-checking unrecorded blob files failed" in ln]
        if not bg:
            return None, ""
        return log_time(bg[-1], wall0, now), " | ".join(x.strip() for x in main[-1:] + bg[-1:])
    return log_time(main[-1], wall0, now), main[-1].strip()


# ------------------------------------------------------------------------------------
# the run


class Bench:
    def __init__(self):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.stamp = stamp
        self.work = os.path.join(BENCH_DIR, "work", f"run-{stamp}")
        os.makedirs(self.work)
        self.samples = {}   # figure -> system -> [value or None]
        self.extra = []     # raw per-measurement records
        self.anomalies = []
        self.startup = {}
        self.machine = {}

    # -- bookkeeping
    def add(self, fig, system, value):
        self.samples.setdefault(fig, {}).setdefault(system, []).append(value)

    def anomaly(self, system, what, detail):
        msg = f"{LABELS.get(system, system)}: {what}: {detail}"
        log("ANOMALY " + msg)
        self.anomalies.append({"system": system, "what": what, "detail": detail})

    def settle(self, srv, quiet=0.8, max_s=90):
        """Waits until the server's CPU and the upstream log are still for `quiet` s."""
        deadline = time.monotonic() + max_s
        last = (cpu_ticks(srv.pids()), self.alog.mark())
        still_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = (cpu_ticks(srv.pids()), self.alog.mark())
            if now[0] - last[0] <= 1 and now[1] == last[1]:
                if time.monotonic() - still_since >= quiet:
                    return True
            else:
                still_since = time.monotonic()
            last = now
        self.anomaly(srv.name, "settle", f"still busy after {max_s}s")
        return False

    def blob_path(self, name):
        return f"/v2/library/{name}/blobs/{self.images[name]['layer']['digest']}"

    # -- set-up
    def setup(self):
        log(f"work dir {self.work}")
        log(f"generating images (big {BIG_MB} MiB, mid {MID_MB} MiB, small)")
        self.images = make_images(os.path.join(self.work, "images"))
        self.up = Upstream("upstream", self.work)
        self.up.restart(fresh=True)
        self.alog = AccessLog(self.up.proc.out_path)
        log("pushing images to the upstream")
        for img in self.images.values():
            push_image(self.up.port, img)
            os.remove(img["layer"]["path"])  # the upstream has it now; keep disk use at 1x
        if "coldmanifests" in SECTIONS:
            self.cold_tags = push_cold_manifests(self.up.port, self.images["small"], COLD_MANIFESTS)
        # the static baseline serves the upstream's own files (hard links, same page cache)
        st = NginxStatic("static", self.work)
        files = st.data_dir()
        upblobs = os.path.join(self.up.data_dir(), "docker/registry/v2/blobs")
        for name, img in self.images.items():
            os.makedirs(os.path.join(files, name, "blobs"), exist_ok=True)
            os.makedirs(os.path.join(files, name, "manifests"), exist_ok=True)
            d = img["layer"]["digest"]
            src = os.path.join(upblobs, "sha256", d[7:9], d[7:], "data")
            os.link(src, os.path.join(files, name, "blobs", d))
            for ref in (img["manifest_digest"], "latest"):
                with open(os.path.join(files, name, "manifests", ref), "wb") as f:
                    f.write(img["manifest"])
        self.servers = {
            "pullcache": Pullcache("pullcache", self.work),
            "distribution": DistributionProxy("distribution", self.work),
            "nginx": NginxCache("nginx", self.work),
            "upstream": self.up,
            "static": st,
        }
        st.restart(fresh=False)
        # every system answers the same paths: check the small image's manifest through each
        self.machine_info()

    def machine_info(self):
        def cmd(argv):
            try:
                return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip() \
                    or subprocess.run(argv, capture_output=True, text=True, timeout=20).stderr.strip()
            except Exception as e:
                return f"? ({e})"
        model = "?"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
        git = cmd(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
        dirty = cmd(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])
        self.machine.update({
            "cpu_model": model, "cores": os.cpu_count(), "mem_gib": round(mem_kb / 2**20, 1),
            "kernel": platform.release(),
            "nginx": cmd(["nginx", "-v"]),
            "distribution": cmd(["dpkg-query", "-W", "-f=${Version}", "docker-registry"]),
            "wrk": cmd(["dpkg-query", "-W", "-f=${Version}", "wrk"]),
            "curl": cmd(["curl", "--version"]).splitlines()[0],
            "pullcache_bin": PULLCACHE_BIN,
            "pullcache_git": git + (" (+ uncommitted changes)" if dirty else ""),
            "pullcache_bin_mtime": datetime.datetime.fromtimestamp(
                os.path.getmtime(PULLCACHE_BIN), datetime.timezone.utc).isoformat(timespec="seconds"),
        })

    # -- machine limits
    def sha256_speed(self):
        p = subprocess.run(["openssl", "speed", "-evp", "sha256", "-bytes", "16384", "-seconds", "2"],
                           capture_output=True, text=True, timeout=60)
        m = re.search(r"^sha256\s+([\d.]+)k", p.stdout, re.M)
        v = float(m.group(1)) * 1000 / 1e6 if m else None
        self.add("sha256_mbps", "machine", v)
        log(f"  sha256 one core: {v:.0f} MB/s" if v else "  sha256: no result")

    # -- figures
    def burst(self, s, rep):
        """MID_CLIENTS concurrent cold GETs of the mid blob; fresh cache."""
        srv = self.servers[s]
        if srv.cacheable:
            srv.restart(fresh=True)
        else:
            srv.ensure()
        img = self.images["mid"]
        size = img["layer"]["size"]
        mark = self.alog.mark()
        c0 = cpu_ticks(srv.pids())
        wall, res = curl_pulls(srv.port, self.blob_path("mid"), MID_CLIENTS)
        self.settle(srv)
        cpu = (cpu_ticks(srv.pids()) - c0) / TICK
        ups = [e for e in self.alog.since(mark) if "/blobs/" in e[1]]
        gets = [e for e in ups if e[0] == "GET"]
        ok = sum(1 for r in res if r[0] == 200 and r[2] == size)
        if ok != MID_CLIENTS:
            self.anomaly(s, f"burst rep {rep}", f"{ok}/{MID_CLIENTS} clients got the whole blob: "
                         f"{[(r[0], r[2]) for r in res if not (r[0] == 200 and r[2] == size)][:4]}")
        good = ok == MID_CLIENTS
        self.add("burst_wall_s", s, wall if good else None)
        self.add("burst_ttfb_max_ms", s, max(r[1] for r in res) * 1000 if good else None)
        self.add("burst_upstream_gets", s, len(gets))
        self.add("burst_upstream_ratio", s, sum(e[3] for e in gets) / size)
        st, dig, n = fetch_sha256(srv.port, self.blob_path("mid"))
        if st != 200 or dig != img["layer"]["digest"]:
            self.anomaly(s, f"burst rep {rep}", f"re-read after the burst: HTTP {st}, {n} bytes, {dig}")
        self.extra.append({"figure": "burst", "system": s, "rep": rep, "wall_s": wall,
                           "clients": [list(r) for r in res], "cpu_s": cpu,
                           "upstream": [list(e) for e in ups]})
        log(f"  {s:12s} burst {MID_CLIENTS}x{MID_MB} MiB cold: {wall:.2f}s wall, "
            f"{len(gets)} upstream GETs, {sum(e[3] for e in gets) / size:.2f}x blob bytes, ok {ok}")

    def pulls(self, s, rep):
        """Cold pull of the big blob (fresh cache), warm 1 and 4 clients, RSS."""
        srv = self.servers[s]
        img = self.images["big"]
        size = img["layer"]["size"]
        path = self.blob_path("big")
        if s != "static":
            if srv.cacheable:
                srv.restart(fresh=True)
            else:
                srv.ensure()
                os.sync()
            mark = self.alog.mark()
            c0 = cpu_ticks(srv.pids())
            _, res = curl_pulls(srv.port, path, 1)
            code, ttfb, got, total = res[0]
            self.settle(srv)
            cpu = (cpu_ticks(srv.pids()) - c0) / TICK
            ups = [e for e in self.alog.since(mark) if "/blobs/" in e[1] and e[0] == "GET"]
            upb = sum(e[3] for e in ups)
            good = code == 200 and got == size
            if not good:
                self.anomaly(s, f"cold pull rep {rep}", f"HTTP {code}, {got} of {size} bytes")
            self.add("cold_mbps", s, size / total / 1e6 if good else None)
            self.add("cold_ttfb_ms", s, ttfb * 1000 if good else None)
            if s != "upstream":
                self.add("cold_upstream_ratio", s, upb / size)
                self.add("cold_upstream_gets", s, len(ups))
            self.add("cold_cpu_per_gib", s, cpu / (size / GIB) if good else None)
            self.extra.append({"figure": "cold", "system": s, "rep": rep, "client": list(res[0]),
                               "cpu_s": cpu, "upstream": [list(e) for e in ups]})
            log(f"  {s:12s} cold {BIG_MB} MiB: {size / max(total, 1e-9) / 1e6:7.0f} MB/s, "
                f"TTFB {ttfb * 1000:.1f} ms, upstream {upb / size:.2f}x in {len(ups)} GETs, "
                f"CPU {cpu:.2f}s")
        else:
            srv.ensure()
        # warm: 1 client, then WARM_CLIENTS at once (RSS sampled)
        mark = self.alog.mark()
        c0 = cpu_ticks(srv.pids())
        _, res1 = curl_pulls(srv.port, path, 1)
        c1 = cpu_ticks(srv.pids())
        with RssSampler(srv.pids) as rss:
            wall4, res4 = curl_pulls(srv.port, path, WARM_CLIENTS)
        c2 = cpu_ticks(srv.pids())
        ok1 = res1[0][0] == 200 and res1[0][2] == size
        ok4 = all(r[0] == 200 and r[2] == size for r in res4)
        if not (ok1 and ok4):
            self.anomaly(s, f"warm pull rep {rep}", f"1 client {res1[0][:3:2]}, "
                         f"{WARM_CLIENTS} clients {[(r[0], r[2]) for r in res4]}")
        self.add("warm1_mbps", s, size / res1[0][3] / 1e6 if ok1 else None)
        self.add("warm4_mbps", s, WARM_CLIENTS * size / wall4 / 1e6 if ok4 else None)
        self.add("warm_cpu_per_gib", s, (c2 - c0) / TICK / ((1 + WARM_CLIENTS) * size / GIB)
                 if ok1 and ok4 else None)
        self.add("warm4_peak_rss_mib", s, rss.peak_kb / 1024)
        time.sleep(2)
        idle = status_kb(srv.pids(), "VmRSS") / 1024
        self.add("idle_rss_mib", s, idle)
        if s != "upstream":
            # health pings (GET /v2/) are not caused by the clients; anything else is
            ups = [e for e in self.alog.since(mark) if e[1] != "/v2/"]
            if ups:
                self.anomaly(s, f"warm pulls rep {rep}", f"{len(ups)} upstream requests while warm: "
                             f"{ups[:3]}")
        self.extra.append({"figure": "warm", "system": s, "rep": rep, "client1": list(res1[0]),
                           "clients4": [list(r) for r in res4], "wall4_s": wall4,
                           "cpu1_s": (c1 - c0) / TICK, "cpu4_s": (c2 - c1) / TICK,
                           "peak_rss_kb": rss.peak_kb, "rss_samples": rss.samples,
                           "hwm_kb": status_kb(srv.pids(), "VmHWM"), "idle_rss_kb": idle * 1024})
        log(f"  {s:12s} warm: 1 client {size / max(res1[0][3], 1e-9) / 1e6:7.0f} MB/s, "
            f"{WARM_CLIENTS} clients {WARM_CLIENTS * size / wall4 / 1e6:7.0f} MB/s, CPU "
            f"{(c2 - c0) / TICK:.2f}s, peak RSS {rss.peak_kb / 1024:.0f} MiB, idle {idle:.0f} MiB")
        if rep == 1 and s != "upstream":
            st, dig, n = fetch_sha256(srv.port, path)
            if st != 200 or dig != img["layer"]["digest"]:
                self.anomaly(s, "big blob content", f"HTTP {st}, {n} bytes, {dig}")

    def manifests(self, s, rep):
        srv = self.servers[s]
        srv.ensure()
        img = self.images["small"]
        hdr = {"Accept": OCI_MANIFEST}
        for kind, ref in (("digest", img["manifest_digest"]), ("tag", "latest")):
            path = f"/v2/library/small/manifests/{ref}"
            st, h, body = http_get(srv.port, path, headers=hdr)   # caches it
            if st != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != img["manifest_digest"]:
                self.anomaly(s, f"manifest by {kind}", f"HTTP {st}, {len(body)} bytes, "
                             f"content-type {h.get('content-type')}")
            self.settle(srv, quiet=0.3, max_s=10)
            mark = self.alog.mark()
            c0 = cpu_ticks(srv.pids())
            w = run_wrk(srv.port, path, WRK_S)
            c1 = cpu_ticks(srv.pids())
            self.settle(srv, quiet=0.3, max_s=15)
            ups = self.alog.since(mark)
            good = w["rps"] is not None and w["non2xx"] == 0 and w["requests"] > 0
            if not good or w["socket_errors"]:
                self.anomaly(s, f"wrk by {kind} rep {rep}", f"{w['requests']} requests, "
                             f"{w['non2xx']} non-2xx, {w['socket_errors']} socket errors")
            self.add(f"m_{kind}_rps", s, w["rps"] if good else None)
            self.add(f"m_{kind}_p50_ms", s, w.get("p50_ms") if good else None)
            self.add(f"m_{kind}_p99_ms", s, w.get("p99_ms") if good else None)
            self.add(f"m_{kind}_cpu_ms_per_1k", s,
                     (c1 - c0) / TICK * 1000 / (w["requests"] / 1000) if w["requests"] else None)
            if s != "upstream":
                self.add(f"m_{kind}_upstream_per_req", s,
                         len(ups) / w["requests"] if w["requests"] else None)
            self.extra.append({"figure": f"manifest_{kind}", "system": s, "rep": rep,
                               "wrk": {k: v for k, v in w.items() if k != "raw"},
                               "wrk_raw": w["raw"], "upstream_requests": len(ups),
                               "upstream_methods": sorted(set(e[0] for e in ups)),
                               "cpu_s": (c1 - c0) / TICK})
            log(f"  {s:12s} manifest by {kind}: {w['rps'] or 0:8.0f} req/s, p50 "
                f"{w.get('p50_ms', 0):.2f} ms, p99 {w.get('p99_ms', 0):.2f} ms, upstream "
                f"{len(ups)} requests for {w['requests']}")

    def cold_manifests(self, s, rep):
        """COLD_MANIFESTS manifests the cache has not seen, GET by tag one after the other
        on one keep-alive connection: the latency of the cold manifest path (for pullcache:
        the upstream round trip, digest check, storing the manifest and its tag durably)."""
        srv = self.servers[s]
        if srv.cacheable:
            srv.restart(fresh=True)
        else:
            srv.ensure()
        mark = self.alog.mark()
        c0 = cpu_ticks(srv.pids())
        lat, bad = [], []
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        try:
            for tag, digest in self.cold_tags.items():
                t = time.monotonic()
                c.request("GET", f"/v2/library/cold/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
                r = c.getresponse()
                body = r.read()
                lat.append((time.monotonic() - t) * 1000)
                if r.status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                    bad.append((tag, r.status, len(body)))
        finally:
            c.close()
        cpu = (cpu_ticks(srv.pids()) - c0) / TICK
        self.settle(srv, quiet=0.3, max_s=15)
        ups = [e for e in self.alog.since(mark) if "/manifests/" in e[1]]
        good = not bad
        if bad:
            self.anomaly(s, f"cold manifests rep {rep}", f"{len(bad)} wrong answers: {bad[:4]}")
        lat_sorted = sorted(lat)
        p50 = statistics.median(lat_sorted)
        p99 = lat_sorted[min(len(lat_sorted) - 1, int(len(lat_sorted) * 0.99))]
        self.add("cm_p50_ms", s, p50 if good else None)
        self.add("cm_p99_ms", s, p99 if good else None)
        self.add("cm_cpu_ms_per_req", s, cpu * 1000 / len(lat) if good else None)
        if s != "upstream":
            self.add("cm_upstream_per_req", s, len(ups) / len(lat))
        self.extra.append({"figure": "cold_manifests", "system": s, "rep": rep,
                           "latencies_ms": [round(x, 3) for x in lat], "cpu_s": cpu,
                           "upstream_requests": len(ups), "bad": bad})
        log(f"  {s:12s} {len(lat)} cold manifests: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
            f"{len(ups)} upstream manifest requests, CPU {cpu:.2f}s")

    # -- start-up with many cached blobs
    def startup_figure(self):
        d = os.path.join(self.work, "startup")
        root = os.path.join(d, "data")
        blobs = os.path.join(root, "blobs", "sha256")
        log(f"start-up: generating {STARTUP_BLOBS} tiny blob files")
        t = time.monotonic()
        made = set()
        for i in range(STARTUP_BLOBS):
            b = b"pullcache bench blob %d\n" % i
            hx = hashlib.sha256(b).hexdigest()
            sub = os.path.join(blobs, hx[:2])
            if hx[:2] not in made:
                os.makedirs(sub, exist_ok=True)
                made.add(hx[:2])
            with open(os.path.join(sub, hx), "wb") as f:
                f.write(b)
        os.sync()
        log(f"  generated in {time.monotonic() - t:.1f}s")
        port = PORTS["startup"] = pick_port(PORTS["startup"], "startup")
        cfg = os.path.join(d, "pullcache.toml")
        with open(cfg, "w") as f:
            f.write(f"""[server]
listen = "127.0.0.1:{port}"
{METRICS_SECTION}[storage]
root = "{root}"
[log]
level = "info"
[[upstreams]]
name = "docker.io"
url = "http://127.0.0.1:{PORTS['upstream']}"
default = true
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RUST_LOG", "PULLCACHE_"))}
        logpath = os.path.join(d, "pullcache.log")

        def one(label, reconcile_timeout=600):
            nonlocal port
            p2 = pick_port(port, "startup")
            if p2 != port:
                log(f"  127.0.0.1:{port} is busy; using {p2}")
                with open(cfg) as f:
                    c = f.read()
                with open(cfg, "w") as f:
                    f.write(c.replace(f'listen = "127.0.0.1:{port}"', f'listen = "127.0.0.1:{p2}"'))
                port = PORTS["startup"] = p2
            with open(logpath, "ab") as f:
                f.write(f"=== {label}\n".encode())
            mark = os.path.getsize(logpath)
            p = Proc("pullcache-startup", [PULLCACHE_BIN, "serve", "--config", cfg], logpath, env=env)
            wall0 = time.time()
            t0 = time.monotonic()
            p.start()
            first = None
            try:
                deadline = t0 + 120
                while time.monotonic() < deadline and p.alive():
                    try:
                        st, _, _ = http_get(port, "/v2/", timeout=5)
                        if st == 200:
                            first = time.monotonic() - t0
                            break
                    except OSError:
                        pass
                    time.sleep(0.005)
                # then, together: RSS at 5 s after the start, and the background
                # reconciliation's report in the log (bounded)
                rss5, done, report = None, None, ""
                deadline = t0 + reconcile_timeout
                while first is not None and time.monotonic() < deadline and p.alive():
                    el = time.monotonic() - t0
                    if rss5 is None and el >= 5:
                        rss5 = status_kb([p.pid], "VmRSS") / 1024
                    if done is None:
                        with open(logpath, "rb") as f:
                            f.seek(mark)
                            txt = ANSI_RE.sub("", f.read().decode(errors="replace"))
                        done, report = reconcile_done(txt, wall0, el)
                    if rss5 is not None and done is not None:
                        break
                    time.sleep(0.05)
                rss_after = status_kb([p.pid], "VmRSS") / 1024
                cpu = cpu_ticks([p.pid]) / TICK
            finally:
                p.stop()
            r = {"first_200_s": first, "rss_5s_mib": rss5, "reconcile_done_s": done,
                 "rss_after_reconcile_mib": rss_after, "cpu_s_until_reconciled": cpu,
                 "reconcile_log": report[-600:]}
            log(f"  {label}: first 200 after {first if first is None else round(first, 3)}s, "
                f"RSS at 5 s {rss5 if rss5 is None else round(rss5)} MiB, reconciled after "
                f"{done if done is None else round(done, 1)}s ({r['reconcile_log'][-120:]})")
            if first is None:
                self.anomaly("pullcache", f"start-up {label}", "no 200 on /v2/ within 120 s")
            if done is None:
                self.anomaly("pullcache", f"start-up {label}", "no reconciliation report")
            return r

        self.startup["blobs"] = STARTUP_BLOBS
        self.startup["first_start"] = one("first start: files, empty metadata")
        self.startup["restarts"] = [one(f"restart {i + 1}: blobs in metadata")
                                    for i in range(max(REPEAT, 1))]
        # reference: the same binary with an empty store
        rmtree(os.path.join(d, "empty"))
        self.startup["empty_store"] = None
        with open(cfg) as f:
            c = f.read()
        with open(cfg, "w") as f:
            f.write(c.replace(f'root = "{root}"', f'root = "{os.path.join(d, "empty")}"'))
        self.startup["empty_store"] = one("empty store (reference)", reconcile_timeout=30)

    def many(self, s):
        """MANY_CLIENTS concurrent warm pulls of the big blob: peak RSS (nothing may be
        buffered whole) and the aggregate rate. Once per system, after the repetitions."""
        srv = self.servers[s]
        img = self.images["big"]
        size = img["layer"]["size"]
        path = self.blob_path("big")
        srv.ensure()
        if s != "static":
            # warm (the pulls section leaves it cached; without it, this fills the cache)
            curl_pulls(srv.port, path, 1)
            self.settle(srv)
        c0 = cpu_ticks(srv.pids())
        with RssSampler(srv.pids) as rss:
            wall, res = curl_pulls(srv.port, path, MANY_CLIENTS)
        cpu = (cpu_ticks(srv.pids()) - c0) / TICK
        ok = sum(1 for r in res if r[0] == 200 and r[2] == size)
        if ok != MANY_CLIENTS:
            self.anomaly(s, "many warm pulls", f"{ok}/{MANY_CLIENTS} clients got the whole blob: "
                         f"{[(r[0], r[2]) for r in res if not (r[0] == 200 and r[2] == size)][:4]}")
        good = ok == MANY_CLIENTS
        self.add("many_peak_rss_mib", s, rss.peak_kb / 1024)
        self.add("many_mbps", s, MANY_CLIENTS * size / wall / 1e6 if good else None)
        self.add("many_cpu_per_gib", s, cpu / (MANY_CLIENTS * size / GIB) if good else None)
        self.extra.append({"figure": "many", "system": s, "wall_s": wall, "cpu_s": cpu,
                           "peak_rss_kb": rss.peak_kb, "rss_samples": rss.samples,
                           "ok": ok, "clients": MANY_CLIENTS})
        log(f"  {s:12s} {MANY_CLIENTS} warm pulls of {BIG_MB} MiB: {wall:.1f}s, "
            f"{MANY_CLIENTS * size / wall / 1e6:.0f} MB/s, peak RSS {rss.peak_kb / 1024:.0f} MiB, "
            f"ok {ok}")

    def only(self, s):
        """Stops the caches other than s: nothing else talks to the upstream (pullcache
        pings it for health) or takes CPU while s is measured. Upstream and the static
        nginx stay up (idle unless measured)."""
        for o in CACHES:
            if o != s:
                self.servers[o].stop()

    # -- the whole run
    def run(self):
        self.setup()
        for rep in range(1, REPEAT + 1):
            log(f"=== repetition {rep}/{REPEAT}")
            self.sha256_speed()
            if "burst" in SECTIONS:
                for s in measured(CACHES + ["upstream"]):
                    check_budget()
                    self.only(s)
                    self.burst(s, rep)
            for s in measured(ALL_SYSTEMS):
                check_budget()
                self.only(s)
                if "pulls" in SECTIONS:
                    self.pulls(s, rep)
                if "manifests" in SECTIONS:
                    self.manifests(s, rep)
                if "coldmanifests" in SECTIONS and s != "static":
                    self.cold_manifests(s, rep)
        if "many" in SECTIONS:
            log(f"=== {MANY_CLIENTS} concurrent warm pulls")
            for s in measured(CACHES + ["static"]):
                check_budget()
                self.only(s)
                self.many(s)
        for s in ALL_SYSTEMS:
            self.servers[s].stop()
        if "startup" in SECTIONS:
            check_budget()
            self.startup_figure()


# ------------------------------------------------------------------------------------
# report

FIGURES = [
    # key, label, better ("up" = higher is better)
    ("cold_mbps", f"cold pull {BIG_MB} MiB blob, 1 client: MB/s", "up"),
    ("cold_ttfb_ms", "cold pull: time to first byte, ms", "down"),
    ("cold_upstream_ratio", "cold pull: upstream bytes / blob size", "down"),
    ("cold_cpu_per_gib", "cold pull: server CPU s per GiB served", "down"),
    ("warm1_mbps", "warm pull, 1 client: MB/s", "up"),
    (f"warm4_mbps", f"warm pull, {WARM_CLIENTS} clients: aggregate MB/s", "up"),
    ("warm_cpu_per_gib", "warm pulls: server CPU s per GiB served", "down"),
    ("warm4_peak_rss_mib", f"peak RSS during the {WARM_CLIENTS}-client warm pull, MiB", "down"),
    ("idle_rss_mib", "idle RSS 2 s after it, MiB", "down"),
    ("many_peak_rss_mib", f"peak RSS during {MANY_CLIENTS} concurrent warm pulls of the {BIG_MB} MiB blob, MiB", "down"),
    ("many_mbps", f"  same: aggregate MB/s", "up"),
    ("many_cpu_per_gib", f"  same: server CPU s per GiB served", "down"),
    ("burst_wall_s", f"{MID_CLIENTS} concurrent cold pulls of the {MID_MB} MiB blob: wall s", "down"),
    ("burst_ttfb_max_ms", "  same: slowest client's time to first byte, ms", "down"),
    ("burst_upstream_gets", "  same: upstream blob GETs", "down"),
    ("burst_upstream_ratio", "  same: upstream bytes / blob size", "down"),
    ("m_digest_rps", f"cached manifest by digest, wrk {WRK_C} conns: req/s", "up"),
    ("m_digest_p50_ms", "  by digest: p50 latency, ms", "down"),
    ("m_digest_p99_ms", "  by digest: p99 latency, ms", "down"),
    ("m_digest_cpu_ms_per_1k", "  by digest: server CPU ms per 1000 requests", "down"),
    ("m_digest_upstream_per_req", "  by digest: upstream requests per client request", "none"),
    ("m_tag_rps", f"cached manifest by tag (fresh), wrk {WRK_C} conns: req/s", "up"),
    ("m_tag_p50_ms", "  by tag: p50 latency, ms", "down"),
    ("m_tag_p99_ms", "  by tag: p99 latency, ms", "down"),
    ("m_tag_cpu_ms_per_1k", "  by tag: server CPU ms per 1000 requests", "down"),
    ("m_tag_upstream_per_req", "  by tag: upstream requests per client request", "none"),
    ("cm_p50_ms", f"{COLD_MANIFESTS} cold manifests by tag, one after the other: p50 latency, ms", "down"),
    ("cm_p99_ms", "  cold manifests: p99 latency, ms", "down"),
    ("cm_cpu_ms_per_req", "  cold manifests: server CPU ms per request", "down"),
    ("cm_upstream_per_req", "  cold manifests: upstream manifest requests per client request", "none"),
]


def stats(vals):
    good = [v for v in vals if v is not None]
    if not good:
        return None
    return {"min": min(good), "median": statistics.median(good), "max": max(good),
            "n": len(good), "failed": len(vals) - len(good)}


def fmt(v):
    if v is None:
        return "—"
    a = abs(v)
    if float(v).is_integer() and a < 1e6:
        return f"{int(v):,}"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2g}"


def report(b, elapsed, error=None):
    summary = {}
    for key, label, better in FIGURES:
        per = b.samples.get(key, {})
        summary[key] = {"label": label.strip(), "better": better, "systems": {}}
        base = stats(per.get("pullcache", []))
        for s in ALL_SYSTEMS:
            st = stats(per.get(s, []))
            if st is None and s not in per:
                continue
            entry = {"samples": per.get(s, []), **(st or {})}
            if st and base and base["median"]:
                entry["ratio_to_pullcache"] = st["median"] / base["median"]
            summary[key]["systems"][s] = entry
    sha = stats(b.samples.get("sha256_mbps", {}).get("machine", []))

    quick = ((BIG_MB, MID_MB, REPEAT, WRK_S) != (1024, 64, 3, 10) or STARTUP_BLOBS != 100000
             or SECTIONS != set(ALL_SECTIONS.split(",")) or bool(SYSTEMS))
    name = f"{b.stamp}-{'custom' if quick else 'full'}"
    os.makedirs(os.path.join(BENCH_DIR, "results"), exist_ok=True)
    cmd = " ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ)
                   if k.startswith("BENCH_") or k in ("KEEP_WORK",)) + " bench/run.sh"
    params = {"BENCH_BIG_MB": BIG_MB, "BENCH_MID_MB": MID_MB, "BENCH_REPEAT": REPEAT,
              "BENCH_WRK_SECONDS": WRK_S, "BENCH_WRK_CONNECTIONS": WRK_C,
              "BENCH_MID_CLIENTS": MID_CLIENTS, "BENCH_STARTUP_BLOBS": STARTUP_BLOBS,
              "BENCH_SECTIONS": ",".join(sorted(SECTIONS)), "warm_clients": WARM_CLIENTS,
              "BENCH_METRICS": METRICS}
    doc = {"run": name, "command": cmd.strip(), "params": params, "elapsed_s": round(elapsed, 1),
           "error": error, "machine": b.machine, "sha256_one_core_mbps": sha,
           "figures": summary, "startup": b.startup, "anomalies": b.anomalies,
           "measurements": b.extra}
    with open(os.path.join(BENCH_DIR, "results", name + ".json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)

    L = []
    L.append(f"# pullcache benchmark {b.stamp}")
    L.append("")
    L.append(f"Command: `{cmd.strip()}`  ")
    L.append(f"Parameters: big blob {BIG_MB} MiB, mid blob {MID_MB} MiB × {MID_CLIENTS} clients, "
             f"{REPEAT} repetitions interleaved, wrk {WRK_S} s × {WRK_C} connections, "
             f"start-up store {STARTUP_BLOBS} blobs. Elapsed {elapsed / 60:.1f} min.  ")
    m = b.machine
    L.append(f"Machine: {m.get('cpu_model')}, {m.get('cores')} cores, {m.get('mem_gib')} GiB, "
             f"Linux {m.get('kernel')}; {m.get('nginx')}; Distribution {m.get('distribution')}; "
             f"pullcache {m.get('pullcache_git')} (binary built {m.get('pullcache_bin_mtime')}).")
    if error:
        L.append("")
        L.append(f"**Run aborted: {error}** (figures below are partial)")
    L.append("")
    L.append("Cells: median [min–max] over the repetitions, then ×ratio = median / pullcache's "
             "median. ↑ = higher is better, ↓ = lower is better. MB = 10^6 bytes. "
             "A ✗n marks n failed samples (see anomalies).")
    L.append("")
    hdr = "| figure | | " + " | ".join(LABELS[s] for s in ALL_SYSTEMS) + " |"
    L.append(hdr)
    L.append("|---|---|" + "---|" * len(ALL_SYSTEMS))
    for key, label, better in FIGURES:
        sysd = summary[key]["systems"]
        if not sysd:
            continue
        cells = []
        for s in ALL_SYSTEMS:
            e = sysd.get(s)
            if e is None:
                cells.append("")
                continue
            if "median" not in e:
                cells.append(f"✗{len(e['samples'])}")
                continue
            c = f"**{fmt(e['median'])}**"
            if e["n"] > 1:
                c += f" [{fmt(e['min'])}–{fmt(e['max'])}]"
            if s != "pullcache" and "ratio_to_pullcache" in e and better != "none":
                r = e["ratio_to_pullcache"]
                c += f" ×{r:.2f}" if r >= 0.095 else f" ×{r:.2g}"
            if e["failed"]:
                c += f" ✗{e['failed']}"
            cells.append(c)
        arrow = {"up": "↑", "down": "↓"}.get(better, "↓ (no ratio)")
        L.append(f"| {label.strip()} | {arrow} | " + " | ".join(cells) + " |")
    L.append("")
    if sha:
        L.append(f"Machine limit: sha256 on one core (`openssl speed -evp sha256 -bytes 16384`): "
                 f"**{fmt(sha['median'])} MB/s** [{fmt(sha['min'])}–{fmt(sha['max'])}]. "
                 f"The nginx static column is the sendfile ceiling for the same file and the "
                 f"static-file ceiling for the manifest.")
        L.append("")
    if b.startup:
        su = b.startup
        L.append(f"## pullcache start-up with {su.get('blobs')} cached blobs")
        L.append("")
        L.append("| start | first 200 on /v2/, s | RSS at 5 s, MiB | background reconcile done, s | "
                 "RSS after, MiB |")
        L.append("|---|---|---|---|---|")

        def row(label, rs):
            def col(k):
                v = stats([r.get(k) for r in rs])
                if v is None:
                    return "—"
                return f"**{fmt(v['median'])}**" + (f" [{fmt(v['min'])}–{fmt(v['max'])}]"
                                                    if v["n"] > 1 else "")
            return (f"| {label} | {col('first_200_s')} | {col('rss_5s_mib')} | "
                    f"{col('reconcile_done_s')} | {col('rss_after_reconcile_mib')} |")
        if su.get("first_start"):
            L.append(row("first start: blob files, empty metadata (re-hash all)", [su["first_start"]]))
        if su.get("restarts"):
            L.append(row(f"restart: blobs in metadata (×{len(su['restarts'])})", su["restarts"]))
        if su.get("empty_store"):
            L.append(row("empty store (reference)", [su["empty_store"]]))
        L.append("")
    L.append("## Anomalies")
    L.append("")
    if b.anomalies:
        for a in b.anomalies:
            L.append(f"- {LABELS.get(a['system'], a['system'])}: {a['what']}: {a['detail']}")
    else:
        L.append("- none")
    L.append("")
    with open(os.path.join(BENCH_DIR, "results", name + ".md"), "w") as f:
        f.write("\n".join(L))
    print("\n".join(L))
    log(f"results: bench/results/{name}.md and .json")


def main():
    if not PULLCACHE_BIN or not os.access(PULLCACHE_BIN, os.X_OK):
        sys.exit("bench: set PULLCACHE_BIN (bench/run.sh builds it)")

    def on_signal(sig, _):
        raise KeyboardInterrupt(f"signal {sig}")
    signal.signal(signal.SIGTERM, on_signal)
    b = Bench()
    error = None
    try:
        b.run()
    except (Exception, KeyboardInterrupt) as e:
        error = f"{type(e).__name__}: {e}"
        log(f"ERROR {error}")
        import traceback
        traceback.print_exc()
    finally:
        Proc.stop_all()
    try:
        report(b, time.monotonic() - T0, error)
    finally:
        if KEEP_WORK:
            log(f"KEEP_WORK=1: kept {b.work}")
        else:
            rmtree(b.work)
    sys.exit(1 if error else 0)


if __name__ == "__main__":
    main()
