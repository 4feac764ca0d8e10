"""The deployment examples in envoy/ are accepted by Envoy and by the plugin: Envoy's
validate mode loads the .wasm and runs its configuration check."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

import local_ca
import stack
from conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"


def validate(config: dict, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PP_SIGNING_KEY=(FIXTURES / "signing-key.pem").read_text(),
               PP_SIGNING_CERT=(FIXTURES / "signing-cert.pem").read_text(), PP_CLIENT_SECRET="example-secret",
               PP_USERS_CA_KEY=(FIXTURES / "ca-rsa-key.pem").read_text(),
               PP_USERS_CA_CERT=(FIXTURES / "ca-rsa-cert.pem").read_text())
    return subprocess.run([str(stack.VENV_BIN / "envoy"), "--mode", "validate", "-c", str(path)],
                          env=env, capture_output=True, text=True, timeout=120)


def envoy_example() -> dict:
    """The example with the plugin built here and the TLS files of /etc/envoy/tls/ replaced
    by the local CA's (Envoy reads them even in validate mode)."""
    config = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    wasm = wasm_filter(config)
    wasm["config"]["vm_config"]["code"]["local"]["filename"] = str(stack.WASM)
    tls = local_ca.ensure(stack.TLS_DIR)
    local = {"/etc/envoy/tls/gateway-system.pem": tls.gateway_cert,
             "/etc/envoy/tls/gateway-system-key.pem": tls.gateway_key,
             "/etc/envoy/tls/abap-ca.pem": tls.ca}

    def replace(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "filename" and value in local:
                    node[key] = str(local[value])
                else:
                    replace(value)
        elif isinstance(node, list):
            for item in node:
                replace(item)

    replace(config)
    return config


def wasm_filter(config: dict) -> dict:
    filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    http_filters = filters["typed_config"]["http_filters"]
    return next(f for f in http_filters if f["name"] == "envoy.filters.http.wasm")["typed_config"]


def test_envoy_example_is_accepted(tmp_path):
    result = validate(envoy_example(), tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def embedded_plugin_config(file: str, kind: str, config_of) -> dict:
    docs = list(yaml.safe_load_all((ROOT / "envoy" / file).read_text()))
    return config_of(next(d for d in docs if d["kind"] == kind))


EMBEDDED = {
    "istio": ("istio.yaml", "WasmPlugin", lambda d: d["spec"]["pluginConfig"]),
    "envoy-gateway": ("envoy-gateway.yaml", "EnvoyExtensionPolicy", lambda d: d["spec"]["wasm"][0]["config"]),
}


@pytest.mark.parametrize("platform", EMBEDDED)
def test_the_plugin_configuration_of_each_platform_is_accepted_by_the_plugin(tmp_path, platform):
    plugin = embedded_plugin_config(*EMBEDDED[platform])
    config = envoy_example()
    wasm_filter(config)["config"]["configuration"]["value"] = json.dumps(plugin)
    result = validate(config, tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_validate_mode_does_run_the_plugin_check(tmp_path):
    config = envoy_example()
    value = json.loads(wasm_filter(config)["config"]["configuration"]["value"])
    value["destinations"][0]["audience"] = ""
    wasm_filter(config)["config"]["configuration"]["value"] = json.dumps(value)
    result = validate(config, tmp_path)
    assert result.returncode != 0
    assert "`destinations[0].audience` must not be empty" in result.stdout + result.stderr
