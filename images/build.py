#!/usr/bin/env python3
"""Container images of eden-operator and eden-sidecar, without a container engine.

Each image is one layer: the binary, the shared libraries it links (as `ldd` finds them on the
build machine, with the dynamic loader; none for a static binary), the machine's CA
certificates, an nsswitch.conf, and a passwd/group naming the non-root user the chart runs as
(65532). Debug information is stripped (a debug build packs as small as it runs). Nothing is
downloaded. The layer is built reproducibly (sorted entries, zero timestamps and owners), so
the same binaries give the same image digest.

The output is an OCI image layout in a tar file (an "OCI archive"), which `docker load` (Docker
25 or later), `podman load`, `ctr images import`, `skopeo copy oci-archive:FILE
docker://REGISTRY/NAME:TAG` and `crane push` take as they are. Each archive names its image
fully qualified (`io.containerd.image.name`), as the chart's default values do
(`ghcr.io/eden/eden-sidecar:0.1.0`): a short name (`eden-sidecar:0.1.0`) is imported by
containerd as is, while its CRI looks pods' images up as `docker.io/library/eden-sidecar:0.1.0`
and finds nothing.

Usage:  images/build.py --out DIR --chart charts/eden [--tag TAG] BINARY...
        (`make images` builds the release binaries and calls this; the repository of each image
        is the chart's `*.image.repository` ending in the binary's name, the tag its appVersion)
        images/build.py --out DIR --name REPOSITORY:TAG BINARY...
        (one image holding every BINARY, run as the first: the test node's own images)
Prints the path of each archive written.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile

USER = 65532
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
FILES = {
    "etc/passwd": f"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{USER}:{USER}:nonroot:/home/nonroot:/sbin/nologin\n",
    "etc/group": f"root:x:0:\nnonroot:x:{USER}:\n",
    # Names from /etc/hosts (the kubelet writes it), then DNS (its resolv.conf).
    "etc/nsswitch.conf": "hosts: files dns\n",
}


def shared_libraries(binary):
    """The absolute paths of what `binary` links, the dynamic loader included."""
    run = subprocess.run(["ldd", binary], capture_output=True, text=True)
    output = run.stdout + run.stderr
    if "not a dynamic executable" in output or "statically linked" in output:
        return []
    if run.returncode != 0:
        raise SystemExit(f"{binary}: `ldd` failed\n{output}")
    paths = []
    for line in output.splitlines():
        found = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if found:
            paths.append(found.group(1))
    if not any("ld-linux" in path for path in paths):
        raise SystemExit(f"{binary}: no dynamic loader in `ldd` output; is it a Linux executable?\n{output}")
    return paths


def stripped(binary):
    """`binary`'s bytes without debug information."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "stripped")
        subprocess.run(["objcopy", "--strip-debug", binary, out], check=True)
        with open(out, "rb") as f:
            return f.read()


def layer(binaries):
    """The image's one layer, as an uncompressed tar (bytes)."""
    entries = {}  # path in the image -> (bytes, mode)
    for binary in binaries:
        entries[f"usr/local/bin/{os.path.basename(binary)}"] = (stripped(binary), 0o755)
        for path in shared_libraries(binary):
            with open(os.path.realpath(path), "rb") as f:
                entries[path.lstrip("/")] = (f.read(), 0o755)
    with open(CA_BUNDLE, "rb") as f:
        entries[CA_BUNDLE.lstrip("/")] = (f.read(), 0o644)
    for path, text in FILES.items():
        entries[path] = (text.encode(), 0o644)
    directories = {"tmp", "home", "home/nonroot"}
    for path in entries:
        parts = path.split("/")[:-1]
        directories.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in sorted(directories):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            if directory == "tmp":
                info.mode = 0o1777
            if directory == "home/nonroot":
                info.uid = info.gid = USER
            tar.addfile(info)
        for path in sorted(entries):
            data, mode = entries[path]
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def blob(blobs, data, media_type):
    """Stores `data` under its digest; returns its OCI descriptor."""
    digest = hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def chart_names(chart):
    """The chart's appVersion and its default image repositories (`repository:` in values.yaml),
    read as text: PyYAML is not everywhere, and these are plain scalars."""
    def scalars(path, key):
        with open(os.path.join(chart, path)) as f:
            return [m.group(1).strip('"\'') for m in re.finditer(rf"^\s*{key}:\s*(\S+)", f.read(), re.M)]
    return scalars("Chart.yaml", "appVersion")[0], scalars("values.yaml", "repository")


def qualified(reference):
    """Whether `reference` names its registry, as containerd's CRI needs (a first component with
    a dot or a port, or localhost)."""
    first = reference.split("/", 1)[0]
    return "/" in reference and ("." in first or ":" in first or first == "localhost")


def image(binaries, repository, tag):
    """The OCI archive of the image of `binaries` (run as the first), named `repository:tag`
    (bytes), and its manifest digest."""
    name = os.path.basename(binaries[0])
    tar = layer(binaries)
    blobs = {}
    # Level 6: within 1% of level 9 in size for these binaries, in under half the time.
    compressed = gzip.compress(tar, compresslevel=6, mtime=0)
    layer_descriptor = blob(blobs, compressed, "application/vnd.oci.image.layer.v1.tar+gzip")
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": f"{USER}:{USER}",
            "Entrypoint": [f"/usr/local/bin/{name}"],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", f"SSL_CERT_FILE={CA_BUNDLE}"],
            "Labels": {"org.opencontainers.image.title": name, "org.opencontainers.image.version": tag},
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(tar).hexdigest()}"]},
        "history": [{"created_by": "images/build.py"}],
    }
    config_descriptor = blob(blobs, canonical(config), "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_descriptor,
        "layers": [layer_descriptor],
    }
    manifest_descriptor = blob(blobs, canonical(manifest), "application/vnd.oci.image.manifest.v1+json")
    manifest_descriptor["annotations"] = {"org.opencontainers.image.ref.name": tag,
                                          "io.containerd.image.name": f"{repository}:{tag}"}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [manifest_descriptor]}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        files = {"oci-layout": canonical({"imageLayoutVersion": "1.0.0"}), "index.json": canonical(index)}
        files.update({f"blobs/sha256/{digest}": data for digest, data in blobs.items()})
        for directory in ["blobs", "blobs/sha256"]:
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            archive.addfile(info)
        for path in sorted(files):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(files[path]), 0o644, 0
            archive.addfile(info, io.BytesIO(files[path]))
    return out.getvalue(), manifest_descriptor["digest"]


def write(out, binaries, repository, tag):
    for binary in binaries:
        if not os.path.isfile(binary):
            sys.exit(f"images/build.py: no binary at {binary}")
    archive, digest = image(binaries, repository, tag)
    path = os.path.join(out, f"{repository.rsplit('/', 1)[-1]}-{tag}.oci.tar")
    with open(path, "wb") as f:
        f.write(archive)
    print(f"{path} {digest}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the archives")
    names = parser.add_mutually_exclusive_group(required=True)
    names.add_argument("--chart", help="the chart whose default values name the images (one per binary)")
    names.add_argument("--name", help="REPOSITORY:TAG of one image holding every binary")
    parser.add_argument("--tag", help="with --chart, the images' tag; the chart's appVersion when absent")
    parser.add_argument("binaries", nargs="+")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.name:
        repository, _, tag = args.name.rpartition(":")
        if not qualified(repository):
            sys.exit(f"images/build.py: {args.name} does not name its registry")
        write(args.out, args.binaries, repository, tag)
        return
    app_version, repositories = chart_names(args.chart)
    tag = args.tag or app_version
    for binary in args.binaries:
        name = os.path.basename(binary)
        repository = next((r for r in repositories if r.rsplit("/", 1)[-1] == name), None)
        if repository is None or not qualified(repository):
            sys.exit(f"images/build.py: no fully qualified repository ending in /{name} in {args.chart}/values.yaml")
        write(args.out, [binary], repository, tag)


if __name__ == "__main__":
    main()
