"""TLS to the token service verifies the server: a token service whose certificate a CA
in the configuration signed works; the same service reached through a cluster that
trusts another CA fails the handshake, and the request gets 503 without an exchange."""

from __future__ import annotations


def test_a_verified_tls_token_service_works(client):
    status, _, body = client.gateway("/t/tls/x", client.jwt("over-tls"))
    assert status == 200, body
    assert body["user"] == "over-tls" and body["token_valid"] is True
    assert client.exchanges("over-tls") == 1


def test_a_token_service_whose_certificate_is_not_trusted_gets_no_assertion(client):
    before = len(client.token_requests())
    status, headers, body = client.gateway("/t/tls-untrusted/x", client.jwt("untrusted-tls"))
    assert status == 503, body
    assert body["error"] == "temporarily_unavailable" and headers["retry-after"]
    assert len(client.token_requests()) == before, "nothing reached the token service"
    assert client.exchanges("untrusted-tls") == 0
