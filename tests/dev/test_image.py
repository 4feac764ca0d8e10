"""The plugin's OCI image (dev/oci_image.py) as registries and Istio/Envoy Gateway take
it: skopeo (an independent OCI implementation) reads the layout, pushes it to a real
registry (Debian's docker-registry, on loopback), and pulls back exactly the built
.wasm as `plugin.wasm` in the one layer of a manifest annotated as the compat variant."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "dev"))

import oci_image  # noqa: E402
import stack  # noqa: E402

REGISTRY_PORT = 25555


def skopeo(*args: str) -> str:
    return subprocess.run(["skopeo", *args], check=True, capture_output=True, text=True, timeout=120).stdout


def test_the_image_is_pushed_and_pulled_back_with_the_wasm_inside(tmp_path):
    wasm = stack.WASM.read_bytes()
    layout = tmp_path / "oci"
    digest = oci_image.build(stack.WASM, layout, "0.1.0")
    assert oci_image.build(stack.WASM, layout, "0.1.0") == digest, "reproducible"
    local = json.loads(skopeo("inspect", "--raw", f"oci:{layout}:0.1.0"))
    assert local["annotations"] == {"module.wasm.image/variant": "compat"}

    config = tmp_path / "registry.yml"
    config.write_text(json.dumps({"version": 0.1, "storage": {"filesystem": {"rootdirectory": str(tmp_path / "store")}},
                                  "http": {"addr": f"127.0.0.1:{REGISTRY_PORT}"}, "log": {"level": "error"}}))
    registry = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{REGISTRY_PORT}/v2/", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "the registry did not start"
                time.sleep(0.1)
        remote = f"docker://127.0.0.1:{REGISTRY_PORT}/principal-propagation:0.1.0"
        skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:0.1.0", remote)
        pulled = tmp_path / "pulled"
        skopeo("copy", "--src-tls-verify=false", remote, f"dir:{pulled}")
    finally:
        registry.terminate()
        registry.wait(timeout=10)
    manifest = json.loads((pulled / "manifest.json").read_text())
    assert manifest["annotations"] == {"module.wasm.image/variant": "compat"}
    assert [layer["mediaType"] for layer in manifest["layers"]] == ["application/vnd.oci.image.layer.v1.tar+gzip"]
    blob = (pulled / manifest["layers"][0]["digest"].removeprefix("sha256:")).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        assert tar.getnames() == ["plugin.wasm"]
        assert tar.extractfile("plugin.wasm").read() == wasm
