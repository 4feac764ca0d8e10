"""Builds the plugin's OCI image, the form Istio's WasmPlugin (`url: oci://…`) and Envoy
Gateway's EnvoyExtensionPolicy (`code.type: Image`) pull: the Wasm image specification's
*compat* variant (one tar+gzip layer holding `plugin.wasm`, the manifest annotated
`module.wasm.image/variant: compat`), written as an OCI image layout directory that
standard tools push, for example `skopeo copy oci:<dir>:<tag> docker://<registry>/<name>:<tag>`.
The image is reproducible: the same .wasm always gives the same digests.

  python dev/oci_image.py --wasm target/…/principal_propagation.wasm --out target/oci --tag 0.1.0
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _blob(out: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    path = out / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _layer_tar(wasm: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size, info.mode, info.mtime = len(wasm), 0o644, 0
        tar.addfile(info, io.BytesIO(wasm))
    return buffer.getvalue()


def build(wasm_path: Path, out: Path, tag: str) -> str:
    """Writes the image layout into `out` (kept images of other tags stay); returns the
    manifest's digest."""
    tar = _layer_tar(wasm_path.read_bytes())
    layer = _blob(out, gzip.compress(tar, mtime=0))
    config = _blob(out, json.dumps({
        "architecture": "wasm", "os": "wasip1",
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(tar).hexdigest()}"]},
        "config": {},
    }, sort_keys=True).encode())
    manifest_bytes = json.dumps({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, **config},
        "layers": [{"mediaType": LAYER, **layer}],
        "annotations": {"module.wasm.image/variant": "compat"},
    }, sort_keys=True).encode()
    manifest = _blob(out, manifest_bytes)
    (out / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    index["manifests"].append({"mediaType": MANIFEST, **manifest,
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    index_path.write_text(json.dumps(index, sort_keys=True))
    return manifest["digest"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wasm", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the OCI image layout directory")
    p.add_argument("--tag", required=True)
    args = p.parse_args(argv)
    digest = build(args.wasm, args.out, args.tag)
    print(f"oci:{args.out}:{args.tag} {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
