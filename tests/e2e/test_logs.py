"""No secret reaches Envoy's log: private key, client password, user JWTs, access
tokens or assertions. The plugin runs at trace level in this suite (conftest)."""

from __future__ import annotations

import re

import stack


def test_no_secret_in_the_log_after_success_and_failure_paths(gateway, client):
    jwt = client.jwt("log-alice")
    forwarded = []
    for path in ["/hello", "/hello", "/t/sf/x", "/t/reject/x", "/t/down/x", "/t/wrong-audience/x"]:
        status, _, body = client.gateway(path, client.jwt("log-bob", email="log-bob@example.com") if "sf" in path else jwt)
        if status == 200:
            forwarded.append(body["headers"]["authorization"].removeprefix("Bearer "))
    assert len(forwarded) == 3
    assertions = [r["form"]["assertion"] for r in client.token_requests() if r["form"].get("assertion")]
    assert assertions

    log = gateway.envoy_log.read_text()
    assert "principal-propagation:" in log, "the plugin's own lines are in the scanned log"
    key_lines = [line for slot in stack.KEY_SLOTS for line in stack.key_files(slot)[0].read_text().splitlines()
                 if not line.startswith("-----")]
    secrets = {
        "client password": ["gateway-secret"],
        "private key": key_lines,
        "user JWT": [jwt, jwt.split(".")[2]],
        "access token": forwarded,
        "assertion (encoded)": [a[:40] for a in assertions],
        "assertion (XML)": ["<saml2:Assertion", "SignatureValue"],
    }
    for kind, values in secrets.items():
        for value in values:
            assert value not in log, f"{kind} found in the Envoy log"
    assert not re.search(r"Basic [A-Za-z0-9+/=]{8,}", log), "client credentials found in the Envoy log"
