"""Credential hygiene in real Envoy: a token belongs to one identity (issuer, origin and
user), no inbound credential but the gateway's reaches the backend, and a token the
backend refuses is dropped."""

from __future__ import annotations

import json
import time
import urllib.parse

import pytest

import stack


def echo(client, path: str, jwt: str, headers: dict | None = None):
    """What the echo upstream received for a propagated request."""
    all_headers = {"Authorization": f"Bearer {jwt}", **(headers or {})}
    status, _, body = client.call(f"http://127.0.0.1:{client.ports.listener}{path}", headers=all_headers)
    return status, body


def test_the_same_user_name_from_two_issuers_gets_two_tokens(client):
    own = client.jwt("twin")
    second = client.jwt("twin", iss=stack.SECOND_ISSUER)
    xsuaa_ldap = client.jwt("twin", origin="ldap")
    seen = {}
    for _ in range(3):
        for name, jwt in [("own", own), ("second", second), ("ldap", xsuaa_ldap)]:
            status, body = echo(client, "/hello", jwt)
            assert status == 200, body
            body = json.loads(body)
            assert body["user"] == "twin" and body["token_valid"] is True
            seen.setdefault(name, set()).add(body["headers"]["authorization"])
    # One token per identity, every request with its own identity's token.
    assert all(len(tokens) == 1 for tokens in seen.values()), seen
    assert len(set.union(*seen.values())) == 3, "three identities, three tokens"
    assert client.exchanges("twin") == 3


# One request per inbound credential kind: (headers to send, path suffix, what must not arrive).
CREDENTIALS = {
    "proxy-authorization": ({"Proxy-Authorization": "Basic dXNlcjpwdw=="}, "", "proxy-authorization"),
    "x-user-token": ({"X-User-Token": "eyJhbGciOi.user.jwt"}, "", "x-user-token"),
    "ssl_client_cert": ({"SSL_CLIENT_CERT": "MIIBsjCCAVmgAwIBAgIU"}, "", "ssl_client_cert"),
    "ssl_client_cert_chain": ({"SSL_CLIENT_CERT_CHAIN_0": "MIIBsjCCAVmgAwIBAgIU"}, "", "ssl_client_cert_chain_0"),
    "x-ssl-client-cert": ({"X-SSL-Client-Cert": "-----BEGIN%20CERTIFICATE-----"}, "", "x-ssl-client-cert"),
    "x-forwarded-client-cert": ({"X-Forwarded-Client-Cert": "By=spiffe://a;Hash=ab;Subject=\"CN=admin\""}, "",
                                "x-forwarded-client-cert"),
    "mysapsso2-header": ({"MYSAPSSO2": "AjQxMDMBABhBAEQATQBJAE4AIAAgACAAIAAgACAAIAAgAAIA"}, "", "mysapsso2"),
    "mysapsso2-cookie": ({"Cookie": "MYSAPSSO2=AjQxMDMBABhB; keep=1"}, "", "MYSAPSSO2"),
    "sap-user": ({}, "?sap-user=ADMIN&keep=1", "sap-user"),
    "sap-password": ({}, "?keep=1&sap-password=secret", "sap-password"),
    # jwt_authn reads this parameter too; a provider with `forward` (Envoy Gateway's are
    # all so) leaves the user's verified JWT in the URL.
    "access_token": ({}, "?access_token={jwt}&keep=1", "access_token"),
}


@pytest.mark.parametrize("kind", CREDENTIALS)
def test_no_inbound_credential_reaches_the_backend(client, kind):
    headers, query, needle = CREDENTIALS[kind]
    jwt = client.jwt("hygiene", iss=stack.SECOND_ISSUER)
    status, body = echo(client, "/hygiene" + query.replace("{jwt}", jwt), jwt, headers)
    assert status == 200, body
    body = json.loads(body)
    arrived = body["headers"]
    assert needle.lower() not in {name.lower() for name in arrived}, arrived
    assert needle.lower() not in body["path"].lower() and needle not in arrived.get("cookie", "")
    assert arrived["authorization"].startswith("Bearer ") and jwt not in json.dumps(body)
    # What is not a credential passes as it was.
    if query:
        assert "keep=1" in body["path"]
    if "Cookie" in headers:
        assert arrived["cookie"] == "keep=1"


def test_the_destinations_query_parameter_replaces_the_clients_own(client):
    status, body = echo(client, "/t/sf/x?sap-client=999&top=5", client.jwt("client-param", email="cp@example.com"))
    assert status == 200, body
    path = json.loads(body)["path"]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    assert query == {"sap-client": ["100"], "top": ["5"]}, path


def test_a_token_the_backend_refuses_is_dropped_and_exchanged_anew(client):
    jwt = client.jwt("revoked-user")
    status, body = echo(client, "/evict", jwt)
    assert status == 200
    first = json.loads(body)["headers"]["authorization"].removeprefix("Bearer ")
    assert client.exchanges("revoked-user") == 1
    client.call(f"http://127.0.0.1:{client.ports.token}/revoke", method="POST", data=first.encode())
    # The backend's answer reaches the client unchanged.
    status, body = echo(client, "/evict", jwt)
    assert status == 401 and json.loads(body)["error"] == "invalid_token"
    # The next request (on either worker, once the other one has its notice) exchanges anew.
    deadline = time.monotonic() + 5
    while True:
        status, body = echo(client, "/evict", jwt)
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200, body
    second = json.loads(body)["headers"]["authorization"].removeprefix("Bearer ")
    assert second != first
    assert client.exchanges("revoked-user") == 2
    # The fresh token is cached again.
    for _ in range(4):
        assert echo(client, "/evict", jwt)[0] == 200
    assert client.exchanges("revoked-user") == 2


def test_header_values_that_are_not_utf8_pass_and_credentials_still_go(client):
    """A client may send any byte above 0x7f in a header value (HTTP's obs-text), which
    Envoy accepts: the plugin reads the headers without requiring UTF-8 (the SDK's own
    readers would panic and take the worker's VM down)."""
    import socket

    jwt = client.jwt("odd-bytes")
    request = (b"GET /odd HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
               b"Authorization: Bearer " + jwt.encode() + b"\r\n"
               b"X-Odd: caf\xe9\r\n"
               b"Cookie: caf\xe9=1; MYSAPSSO2=AjQx\r\n"
               b"MYSAPSSO2: AjQx\r\n\r\n")
    with socket.create_connection(("127.0.0.1", client.ports.listener), timeout=10) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    arrived = json.loads(body)["headers"]
    assert "mysapsso2" not in arrived and "MYSAPSSO2" not in arrived.get("cookie", "")
    assert arrived["x-odd"].startswith("caf"), arrived
    assert arrived["cookie"].startswith("caf") and arrived["cookie"].endswith("=1"), arrived
    # The worker is alive: the same user is served from the cache.
    assert echo(client, "/odd", jwt)[0] == 200
    assert client.exchanges("odd-bytes") == 1
