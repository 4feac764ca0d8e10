"""`pp config`: from a destination as the BTP cockpit exports it, a complete Envoy
configuration that the real Envoy accepts (`envoy --mode validate`, which also runs the
plugin's configuration check) and that propagates a user end to end against the
development parties; no secret is written into it."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
import uuid

import pytest

import stack
from conftest import Client

# A shift no other stack of the suite uses (each occupies 9000+shift to 10000+shift).
PORTS = stack.Ports().shifted(15000)


def exported_destination(ports: stack.Ports) -> dict:
    """The dev destination as the cockpit exports it: SAP properties only, the password inline."""
    d = stack.destination(ports, "dev-exported")
    d.pop("tokenServicePasswordEnv")
    d["tokenServicePassword"] = stack.CLIENT_SECRET
    return d


def pp_config(tmp_path, destination: dict, *extra: str) -> subprocess.CompletedProcess:
    source = tmp_path / f"{uuid.uuid4().hex}.json"
    source.write_text(json.dumps(destination))
    return subprocess.run(
        [str(stack.PP), "config", "--destination", str(source),
         "--idp-issuer", f"http://127.0.0.1:{PORTS.idp}", "--idp-jwks", f"http://127.0.0.1:{PORTS.idp}/.well-known/jwks.json",
         "--audience", stack.JWT_AUDIENCE, "--listen", f"127.0.0.1:{PORTS.listener}",
         "--admin", f"127.0.0.1:{PORTS.admin}", "--wasm", str(stack.WASM),
         "--key-env", "PP_KEY_A", "--cert-env", "PP_CERT_A", "--secret-env", stack.CLIENT_SECRET_ENV, *extra],
        capture_output=True, text=True, timeout=120)


def test_the_configuration_validates_and_holds_no_secret(tmp_path):
    result = pp_config(tmp_path, exported_destination(PORTS), "--allow-insecure-token-service", "true",
                       "--out", str(tmp_path / "envoy.json"))
    assert result.returncode == 0, result.stderr
    assert "PP_KEY_A, PP_CERT_A, PP_CLIENT_SECRET" in result.stdout
    text = (tmp_path / "envoy.json").read_text()
    assert stack.CLIENT_SECRET not in text
    plugin = json.loads(json.loads(text)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
                        ["typed_config"]["http_filters"][1]["typed_config"]["config"]["configuration"]["value"])
    assert plugin["destinations"][0]["tokenServicePasswordEnv"] == stack.CLIENT_SECRET_ENV
    validated = subprocess.run([str(stack.VENV_BIN / "envoy"), "--mode", "validate", "-c", str(tmp_path / "envoy.json")],
                               capture_output=True, text=True, timeout=120,
                               env=dict(os.environ, **stack.key_environment()))
    assert validated.returncode == 0, validated.stdout[-2000:] + validated.stderr[-2000:]


def test_a_destination_the_plugin_refuses_is_not_written(tmp_path):
    cleartext = pp_config(tmp_path, exported_destination(PORTS))  # http:// without the opt-in
    assert cleartext.returncode == 2
    assert "the plugin would refuse this destination" in cleartext.stderr
    assert "must be https://" in cleartext.stderr
    profiled = pp_config(tmp_path, {**exported_destination(PORTS), "targetProfile": "salesforce"},
                         "--allow-insecure-token-service", "true")
    assert profiled.returncode == 2 and "consumer key" in profiled.stderr


def test_the_configuration_propagates_a_user_end_to_end(tmp_path):
    result = pp_config(tmp_path, exported_destination(PORTS), "--allow-insecure-token-service", "true")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    with stack.Stack("test", PORTS, name="pp-config", bootstrap=config):
        client = Client(PORTS)
        user = f"cfg-{uuid.uuid4().hex[:8]}"
        status, _, body = client.gateway("/hello", client.jwt(user))
        assert status == 200, body
        assert body["user"] == user and body["token_valid"] is True
        assert client.exchanges(user) == 1
        status, headers, body = client.gateway("/hello")
        assert status == 401 and headers["www-authenticate"] == "Bearer"


def quovadis() -> dict:
    """An https destination as the cockpit exports it (SuccessFactors, the seed's QUOVADIS)."""
    return {
        "Name": "QUOVADIS", "Type": "HTTP", "URL": "https://apisalesdemo8.successfactors.com",
        "Authentication": "OAuth2SAMLBearerAssertion", "ProxyType": "Internet", "tokenServiceURLType": "Dedicated",
        "tokenServiceURL": "https://apisalesdemo8.successfactors.com/oauth/token", "clientKey": "API-KEY",
        "tokenServicePassword": "cockpit-secret", "companyId": "SFPART057448",
        "audience": "www.successfactors.com", "assertionIssuer": "quovadis",
        "nameIdFormat": "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified", "tokenServiceUser": "API-KEY",
        "KeyStoreLocation": "quovadis.pfx", "KeyStorePassword": "p12-secret",
        "x_user_token.jwks_uri": "https://quovadis.authentication.eu10.hana.ondemand.com/token_keys",
        "targetProfile": "successfactors",
    }


def test_istio_manifests_pass_the_published_schemas_and_hold_no_secret(tmp_path):
    import sys

    sys.path.insert(0, str(stack.ROOT / "tests" / "k8s"))
    import validate

    source = tmp_path / "quovadis.json"
    source.write_text(json.dumps([quovadis()]))
    out = tmp_path / "istio.yaml"
    result = subprocess.run(
        [str(stack.PP), "config", "--format", "istio", "--destination", str(source),
         "--idp-issuer", "https://idp.example.com", "--idp-jwks", "https://idp.example.com/.well-known/jwks.json",
         "--audience", "gateway", "--authority", "api.example.com",
         "--wasm", "oci://registry.example.com/principal-propagation:0.1.0", "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "cockpit-secret" not in text and "p12-secret" not in text
    documents = validate.load_documents(out)
    kinds = [d["kind"] for d in documents]
    assert kinds == ["RequestAuthentication", "ServiceEntry", "DestinationRule", "WasmPlugin"], kinds
    for document in documents:
        assert validate.validate(document) == [], document["kind"]
    plugin = documents[-1]["spec"]["pluginConfig"]
    assert plugin["destinations"][0]["tokenServiceCluster"] == "outbound|443||apisalesdemo8.successfactors.com"
    assert plugin["destinationRules"] == [{"authority": "api.example.com", "destination": "QUOVADIS"}]
    assert documents[2]["spec"]["trafficPolicy"]["tls"]["mode"] == "SIMPLE"
    # A broken copy fails the same check: the schemas do reject.
    broken = json.loads(json.dumps(documents[-1]))
    broken["spec"]["failStrategy"] = "FAIL_SOMETIMES"
    assert validate.validate(broken) != []


def test_envoy_gateway_manifests_pass_the_published_schemas(tmp_path):
    import sys

    sys.path.insert(0, str(stack.ROOT / "tests" / "k8s"))
    import validate

    source = tmp_path / "quovadis.json"
    source.write_text(json.dumps(quovadis()))
    out = tmp_path / "envoy-gateway.yaml"
    args = [str(stack.PP), "config", "--format", "envoy-gateway", "--destination", str(source),
            "--idp-issuer", "https://idp.example.com", "--idp-jwks", "https://idp.example.com/.well-known/jwks.json",
            "--audience", "gateway", "--authority", "api.example.com", "--gateway", "sap-gateway",
            "--namespace", "sap-gateway", "--wasm", "registry.example.com/principal-propagation:0.1.0"]
    result = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cockpit-secret" not in out.read_text()
    documents = validate.load_documents(out)
    kinds = [d["kind"] for d in documents]
    assert kinds == ["EnvoyProxy", "Backend", "HTTPRoute", "SecurityPolicy", "EnvoyExtensionPolicy"], kinds
    for document in documents:
        assert validate.validate(document) == [], document["kind"]
    plugin = documents[-1]["spec"]["wasm"][0]["config"]
    assert plugin["destinations"][0]["tokenServiceCluster"] == "httproute/sap-gateway/quovadis-route/rule/0"
    assert plugin["jwtPayloadMetadataKey"] == documents[3]["spec"]["jwt"]["providers"][0]["name"]
    # A token service on another host than the target: said plainly, nothing written.
    source.write_text(json.dumps({**quovadis(), "tokenServiceURL": "https://login.example.com/oauth/token"}))
    other = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "is not on the target's host" in other.stderr
