"""No secret reaches Envoy's log: private keys, client password, user JWTs, access
tokens or assertions. The plugin runs at trace level in this suite (conftest); `make
test` also runs Envoy at trace level and audits every stack's log when it stops."""

from __future__ import annotations

import log_audit
import stack


def test_no_secret_in_the_log_after_success_and_failure_paths(gateway, client):
    jwt = client.jwt("log-alice")
    forwarded = 0
    for path in ["/hello", "/hello", "/t/sf/x", "/t/reject/x", "/t/down/x", "/t/wrong-audience/x"]:
        status, _, _ = client.gateway(path, client.jwt("log-bob", email="log-bob@example.com") if "sf" in path else jwt)
        forwarded += status == 200
    assert forwarded == 3

    p = client.ports
    secrets = log_audit.collect(f"http://127.0.0.1:{p.idp}", f"http://127.0.0.1:{p.token}",
                                list(stack.key_environment().values()), stack.CLIENT_SECRET)
    # (Kinds and counts only: a failing assertion must not print the secrets.)
    assert [kind for kind, values in secrets.items() if not values] == [], "every kind was handled"
    assert "principal-propagation:" in gateway.envoy_log.read_text(errors="replace"), "the plugin's own lines are scanned"
    report = log_audit.scan(gateway.envoy_log, secrets)
    assert report.leaks == []
