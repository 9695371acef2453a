#!/usr/bin/env python3
"""Build deterministic test images and push them to a registry.

Python 3 standard library only. Every byte is derived from fixed seeds, a
fixed timestamp and fixed file metadata, so the same Python/zlib produce the
same blobs and therefore the same manifest digests on every run.

Images (all tagged ``latest`` under ``library/``; tiny and multi are built
for this machine's architecture, amd64 on x86_64):

  tiny        OCI image manifest, one small gzip layer.
  multi       OCI image manifest, three layers: a small gzip layer, a ~48 MiB
              layer of incompressible (seeded) random data stored as an
              uncompressed ``application/vnd.oci.image.layer.v1.tar``, and a
              second small gzip layer.
  multiarch   OCI image index with linux/amd64 and linux/arm64/v8 children
              (OCI manifests).
  dockerlist  Docker manifest list (manifest.list.v2+json) with linux/amd64
              and linux/arm64/v8 Docker schema 2 children, Docker media types
              for configs and layers.
  burst       OCI image manifest, a small layer and a 24 MiB layer of random
              data gzipped at level 1; run.sh pulls it with several clients at
              once on a cold cache.

Built only when named with ``--only`` (resilience.sh; the default set above
is unchanged):

  evict<N>    (N = 1, 2, ...) OCI image manifest with a single layer: an
              uncompressed tar of ``--layer-mib`` MiB (default 20) of
              incompressible random data seeded by the name, so every evictN
              is distinct. For the disk-budget checks.
  moving1,    two different small OCI images (one gzip layer each), meant to
  moving2     be pushed one after the other to the same tag with
              ``--push-as moving``, for the tag-revalidation check.

The OCI-typed images are written as OCI image layouts under OUT/<name>
(index.json, oci-layout, blobs/sha256/...). skopeo's ``oci:`` source does not
accept a Docker manifest list as a tagged descriptor, so ``dockerlist`` is
written in containers/image's ``dir:`` layout instead (manifest.json,
<hex>.manifest.json per instance, blobs named by hex digest). Both are copied
with ``skopeo copy --all --preserve-digests``, so no manifest is converted.

With ``--push HOST:PORT`` each layout is copied with skopeo to
``docker://HOST:PORT/library/<name>:latest`` (``--push-as NAME``: to
``library/NAME:latest`` instead, for a single image) and the digest of the raw
manifest the registry returns (``skopeo inspect --raw``) is compared with the
digest computed here; any difference is an error.

OUT/expected.tsv gets one line per image: ``name<TAB>tag<TAB>digest<TAB>mediaType``.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import platform as pyplatform
import shutil
import subprocess
import sys
import tarfile

MTIME = 1704067200  # 2024-01-01T00:00:00Z
CREATED = "2024-01-01T00:00:00Z"
TAG = "latest"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

BIG_LAYER_BYTES = 48 * 1024 * 1024
BURST_LAYER_BYTES = 24 * 1024 * 1024

# Single-platform images are built for this machine's architecture, so that
# the Docker daemon and containerd here accept them (the lists carry both).
HOST_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64",
             "arm64": "arm64"}.get(pyplatform.machine(), "amd64")


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def seeded_bytes(seed, size):
    """Incompressible, deterministic bytes (SHAKE-256 as a stream)."""
    return hashlib.shake_256(seed.encode()).digest(size)


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def pretty_json(obj):
    # Manifests are stored with indentation, like most registries' clients;
    # the digest is over these exact bytes either way.
    return json.dumps(obj, indent=3).encode()


def make_tar(entries):
    """entries: list of (path, bytes|None, mode); None = directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, data, mode in entries:
            info = tarfile.TarInfo(path)
            info.mtime = MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gz(data, level=6):
    return gzip.compress(data, compresslevel=level, mtime=0)


def rootfs_entries(name, arch):
    """A few files that make a plausible root filesystem."""
    os_release = (
        'NAME="pullcache-e2e"\nID=pullcache-e2e\nVERSION_ID="1"\n'
        'PRETTY_NAME="pullcache e2e test image {n} ({a})"\n'.format(n=name, a=arch)
    ).encode()
    return [
        ("bin/", None, 0o755),
        ("bin/hello", b"#!/bin/sh\necho hello from " + name.encode() + b"\n", 0o755),
        ("etc/", None, 0o755),
        ("etc/os-release", os_release, 0o644),
        ("etc/hostname", b"e2e\n", 0o644),
        ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644),
        ("etc/group", b"root:x:0:\n", 0o644),
        ("root/", None, 0o700),
        ("tmp/", None, 0o1777),
        ("usr/", None, 0o755),
        ("usr/share/", None, 0o755),
        ("usr/share/e2e/", None, 0o755),
        ("usr/share/e2e/seed.bin", seeded_bytes(name + "/" + arch + "/small", 4096), 0o644),
    ]


class Layout:
    """An image directory being written to disk.

    kind "oci": an OCI image layout (oci-layout, index.json, blobs/sha256/<hex>).
    kind "dir": containers/image's ``dir:`` transport layout (version,
    manifest.json for the top manifest, <hex>.manifest.json for the instances
    of a list, blobs as <hex>). skopeo's ``oci:`` source does not accept a
    Docker manifest list as the tagged descriptor, so the Docker-typed images
    use ``dir:``; it copies the exact bytes all the same.
    """

    def __init__(self, path, kind="oci"):
        self.path = path
        self.kind = kind
        if os.path.exists(path):
            shutil.rmtree(path)
        if kind == "oci":
            os.makedirs(os.path.join(path, "blobs", "sha256"))
            self._write("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        else:
            os.makedirs(path)
            self._write("version", b"Directory Transport Version: 1.1\n")

    def _write(self, rel, data):
        p = os.path.join(self.path, rel)
        if not os.path.exists(p):
            with open(p, "wb") as f:
                f.write(data)

    def blob(self, data, media_type):
        digest = sha256(data)
        hexd = digest.split(":", 1)[1]
        if self.kind == "oci":
            self._write(os.path.join("blobs", "sha256", hexd), data)
        else:
            self._write(hexd, data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def manifest(self, data, media_type, top=False):
        if self.kind == "oci":
            return self.blob(data, media_type)
        digest = sha256(data)
        if top:
            self._write("manifest.json", data)
        else:
            self._write(digest.split(":", 1)[1] + ".manifest.json", data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def transport(self):
        if self.kind == "oci":
            return "oci:%s:%s" % (self.path, TAG)
        return "dir:%s" % self.path

    def finish(self, top):
        if self.kind != "oci":
            return
        desc = dict(top)
        desc["annotations"] = {"org.opencontainers.image.ref.name": TAG}
        index = {"schemaVersion": 2, "manifests": [desc]}
        self._write("index.json", canonical_json(index))


def image_manifest(layout, layers, arch, docker, top=False):
    """layers: list of (uncompressed_tar, compressed_bytes|None).

    compressed None = stored uncompressed. Returns the manifest descriptor.
    """
    layer_descs, diff_ids = [], []
    for tar_bytes, comp in layers:
        diff_ids.append(sha256(tar_bytes))
        if comp is None:
            layer_descs.append(layout.blob(tar_bytes, OCI_LAYER_TAR))
        else:
            layer_descs.append(layout.blob(comp, DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP))
    config = {
        "architecture": arch,
        "os": "linux",
        "created": CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/hello"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": CREATED, "created_by": "make_images.py layer %d" % i}
            for i in range(len(layers))
        ],
    }
    if arch == "arm64":
        config["variant"] = "v8"
    config_desc = layout.blob(canonical_json(config), DOCKER_CONFIG if docker else OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": config_desc,
        "layers": layer_descs,
    }
    return layout.manifest(pretty_json(manifest), DOCKER_MANIFEST if docker else OCI_MANIFEST, top=top)


def platform(arch):
    p = {"architecture": arch, "os": "linux"}
    if arch == "arm64":
        p["variant"] = "v8"
    return p


def small_layer(name, arch):
    t = make_tar(rootfs_entries(name, arch))
    return t, gz(t)


def build_tiny(out):
    lay = Layout(os.path.join(out, "tiny"))
    top = image_manifest(lay, [small_layer("tiny", HOST_ARCH)], HOST_ARCH, docker=False, top=True)
    lay.finish(top)
    return top, lay


def build_multi(out):
    lay = Layout(os.path.join(out, "multi"))
    l1 = small_layer("multi", HOST_ARCH)
    big = make_tar([
        ("data/", None, 0o755),
        ("data/random.bin", seeded_bytes("multi/big", BIG_LAYER_BYTES), 0o644),
    ])
    l3_tar = make_tar([
        ("etc/", None, 0o755),
        ("etc/motd", b"third layer of library/multi\n", 0o644),
        ("usr/", None, 0o755),
        ("usr/share/", None, 0o755),
        ("usr/share/e2e/", None, 0o755),
        ("usr/share/e2e/layer3.txt", b"layer 3\n" * 512, 0o644),
    ])
    top = image_manifest(lay, [l1, (big, None), (l3_tar, gz(l3_tar))], HOST_ARCH, docker=False,
                         top=True)
    lay.finish(top)
    return top, lay


def build_burst(out):
    """Two layers, one of 24 MiB random data gzipped at level 1 (the real
    media type for incompressible data), for concurrent cold-cache pulls."""
    lay = Layout(os.path.join(out, "burst"))
    big = make_tar([
        ("data/", None, 0o755),
        ("data/burst.bin", seeded_bytes("burst/big", BURST_LAYER_BYTES), 0o644),
    ])
    top = image_manifest(lay, [small_layer("burst", HOST_ARCH), (big, gz(big, level=1))],
                         HOST_ARCH, docker=False, top=True)
    lay.finish(top)
    return top, lay


def build_evict(out, name, layer_mib):
    """One layer of LAYER_MIB MiB incompressible data, uncompressed tar."""
    lay = Layout(os.path.join(out, name))
    big = make_tar([
        ("data/", None, 0o755),
        ("data/%s.bin" % name, seeded_bytes(name + "/big", layer_mib * 1024 * 1024), 0o644),
    ])
    top = image_manifest(lay, [(big, None)], HOST_ARCH, docker=False, top=True)
    lay.finish(top)
    return top, lay


def build_moving(out, name):
    """A small single-layer image; moving1 and moving2 differ in content."""
    lay = Layout(os.path.join(out, name))
    top = image_manifest(lay, [small_layer(name, HOST_ARCH)], HOST_ARCH, docker=False, top=True)
    lay.finish(top)
    return top, lay


def build_list(out, name, docker):
    lay = Layout(os.path.join(out, name), kind="dir" if docker else "oci")
    children = []
    for arch in ("amd64", "arm64"):
        d = image_manifest(lay, [small_layer(name, arch)], arch, docker=docker)
        d["platform"] = platform(arch)
        children.append(d)
    media = DOCKER_LIST if docker else OCI_INDEX
    index = {"schemaVersion": 2, "mediaType": media, "manifests": children}
    top = lay.manifest(pretty_json(index), media, top=True)
    lay.finish(top)
    return top, lay


def run(cmd, **kw):
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, timeout=300, **kw)


def push(lay, name, registry, top):
    src = lay.transport()
    dst = "docker://%s/library/%s:%s" % (registry, name, TAG)
    run(["skopeo", "--insecure-policy", "copy", "--quiet", "--all", "--preserve-digests",
         "--dest-tls-verify=false", src, dst])
    raw = run(["skopeo", "inspect", "--raw", "--tls-verify=false", dst],
              stdout=subprocess.PIPE).stdout
    got = sha256(raw)
    if got != top["digest"]:
        raise SystemExit("digest mismatch for %s: computed %s, registry has %s"
                         % (name, top["digest"], got))
    try:
        media = json.loads(raw).get("mediaType")
    except ValueError:
        media = None
    if media != top["mediaType"]:
        raise SystemExit("media type mismatch for %s: built %s, registry has %s"
                         % (name, top["mediaType"], media))


BUILDERS = {
    "tiny": build_tiny,
    "multi": build_multi,
    "burst": build_burst,
    "multiarch": lambda out: build_list(out, "multiarch", docker=False),
    "dockerlist": lambda out: build_list(out, "dockerlist", docker=True),
    "moving1": lambda out: build_moving(out, "moving1"),
    "moving2": lambda out: build_moving(out, "moving2"),
}
DEFAULT_IMAGES = ["tiny", "multi", "multiarch", "dockerlist", "burst"]
EVICT_RE = re.compile(r"^evict[1-9][0-9]?$")


def builder(name, args):
    if name in BUILDERS:
        return BUILDERS[name]
    if EVICT_RE.match(name):
        return lambda out: build_evict(out, name, args.layer_mib)
    raise SystemExit("unknown image %r (known: %s, evict1..evict99)"
                     % (name, ", ".join(sorted(BUILDERS))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for the OCI layouts")
    ap.add_argument("--push", metavar="HOST:PORT", help="registry to push to (plain http)")
    ap.add_argument("--only", nargs="*", metavar="NAME",
                    help="images to build (default: %s; also evictN, moving1, moving2)"
                    % " ".join(DEFAULT_IMAGES))
    ap.add_argument("--layer-mib", type=int, default=20, metavar="MIB",
                    help="layer size of the evictN images (default 20)")
    ap.add_argument("--push-as", metavar="NAME",
                    help="push the one image built as library/NAME:latest")
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    names = args.only or DEFAULT_IMAGES
    builders = [(name, builder(name, args)) for name in names]
    if args.push_as and len(names) != 1:
        raise SystemExit("--push-as needs exactly one image in --only")
    if args.layer_mib < 1:
        raise SystemExit("--layer-mib must be at least 1")
    lines = []
    for name, build in builders:
        top, lay = build(args.out)
        print("built library/%s:%s %s %s" % (name, TAG, top["digest"], top["mediaType"]),
              file=sys.stderr, flush=True)
        repo = args.push_as or name
        if args.push:
            push(lay, repo, args.push, top)
            print("pushed library/%s:%s to %s, digest verified" % (repo, TAG, args.push),
                  file=sys.stderr, flush=True)
        lines.append("%s\t%s\t%s\t%s\n" % (repo, TAG, top["digest"], top["mediaType"]))
    with open(os.path.join(args.out, "expected.tsv"), "w") as f:
        f.writelines(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
