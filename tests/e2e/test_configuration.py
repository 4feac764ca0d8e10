"""A bad plugin configuration is refused when Envoy loads the plugin, with a log line
naming the key and the problem; nothing starts serving."""

from __future__ import annotations

import pytest

import stack
from conftest import ROOT

PORTS = stack.Ports().shifted(20000)


def broken(mutate) -> dict:
    config = stack.plugin_config(PORTS, "demo")
    mutate(config)
    return config


CASES = {
    "missing-audience": (
        lambda c: c["destinations"][0].pop("audience"),
        "configuration key `destinations[0].audience` is required",
    ),
    "unknown-property": (
        lambda c: c["destinations"][0].update({"tokenServiceUrl": "http://x"}),
        "`destinations[0].tokenServiceUrl` is not a supported destination property",
    ),
    "wrong-authentication": (
        lambda c: c["destinations"][0].update({"Authentication": "BasicAuthentication"}),
        "supported are OAuth2SAMLBearerAssertion and PrincipalPropagation",
    ),
    "key-env-unset": (
        lambda c: c["keys"]["default"]["active"].update({"privateKeyEnv": "PP_NOT_SET"}),
        "`keys.default.active.privateKeyEnv` names environment variable \"PP_NOT_SET\", which is not set",
    ),
    "certificate-of-another-key": (
        lambda c: c["keys"]["default"].update({"active": {
            "privateKeyEnv": "PP_KEY_A",
            "certificate": (ROOT / "tests/fixtures/other-cert.pem").read_text(),
        }}),
        "`keys.default.active.certificate` does not certify the configured private key",
    ),
    "cleartext-token-service": (
        lambda c: c.pop("allowInsecureTokenService"),
        "`destinations[0].tokenServiceURL` must be https://",
    ),
    "format-without-user-source": (
        lambda c: c["destinations"][0].update(
            {"nameIdFormat": "urn:oasis:names:tc:SAML:1.1:nameid-format:X509SubjectName"}
        ),
        "`destinations[0].nameIdFormat` has no default user id claim",
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_configuration_is_refused_at_load(name):
    mutate, message = CASES[name]
    s = stack.Stack(f"badconfig-{name}", PORTS, config_override=broken(mutate))
    with pytest.raises(RuntimeError, match="envoy exited"):
        try:
            s.start(timeout=30)
        finally:
            s.stop()
    log = s.envoy_log.read_text(errors="replace")
    assert message in log
    assert "BEGIN PRIVATE KEY" not in log and "gateway-secret" not in log
