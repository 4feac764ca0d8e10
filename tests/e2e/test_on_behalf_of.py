"""The assertion from the user's identity provider, in the real Envoy: an Entra-style
user token (the development IdP, `idp=entra`) is exchanged on behalf of the user at the
development Entra ID token endpoint (dev/sts.py, which checks the token, the client
credential and the scope, and signs a SAML assertion with signxml), and that assertion
at the development token server (RFC 7522), which verifies it against the STS's
certificate. Only the final token is cached; every refusal reaches the client with the
provider's code and never a token."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

import stack
import sts


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sts_call(client, path: str, method: str = "GET"):
    status, _, body = client.call(f"http://127.0.0.1:{client.ports.sts}{path}", method=method,
                                  data=b"" if method == "POST" else None)
    assert status == 200, body
    return json.loads(body)


def sts_requests_for(client, user: str) -> list[dict]:
    """The on-behalf-of requests whose user token names `user`."""
    import base64
    found = []
    for r in sts_call(client, "/_sts/requests"):
        token = (r.get("form") or {}).get("assertion") or ""
        parts = token.split(".")
        if len(parts) != 3:
            continue
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        if payload.get("preferred_username") == user:
            found.append(r)
    return found


def entra_jwt(client, user: str, **claims) -> str:
    return client.jwt(user, idp="entra", **claims)


def test_an_entra_user_reaches_the_backend_through_both_exchanges_once(client):
    user = unique("alice")
    token = entra_jwt(client, user)
    status, _, body = client.gateway("/entra/hello", token)
    assert status == 200, body
    assert body["user"] == user and body["token_valid"] is True
    assert body["headers"]["authorization"] != f"Bearer {token}", "the user's token is replaced"
    assert sts_call(client, "/_sts/stats")["issued"].get(user) == 1
    assert client.exchanges(user) == 1
    (obo,) = sts_requests_for(client, user)
    assert obo["form"]["requested_token_use"] == "on_behalf_of"
    assert obo["form"]["requested_token_type"] == "urn:ietf:params:oauth:token-type:saml2"
    assert obo["form"]["scope"] == f"spn:{stack.ENTITY_ID}/.default"
    # The target got the STS's assertion, verified with the STS's certificate.
    (exchange,) = [r for r in client.token_requests()
                   if r["outcome"] == "ok" and f">{user}<" in (r.get("assertion_xml") or "")]
    assert f">{sts.sts_issuer(sts.DEV_TENANT_ID)}<" in exchange["assertion_xml"]
    assert exchange["verified_by"] is not None

    for _ in range(3):
        assert client.gateway("/entra/again", token)[0] == 200
    assert sts_call(client, "/_sts/stats")["issued"].get(user) == 1, "the token is cached"
    assert client.exchanges(user) == 1


@pytest.mark.parametrize("route", ["entra-key", "entra-ec-key", "entra-base64"])
def test_a_key_credential_and_base64_reencoding_work_too(client, route):
    user = unique(route)
    status, _, body = client.gateway(f"/t/{route}/x", entra_jwt(client, user))
    assert status == 200, body
    assert body["user"] == user
    (obo,) = sts_requests_for(client, user)
    keyed = route != "entra-base64"
    assert ("client_assertion" in obo["form"]) is keyed
    assert "client_secret" not in obo["form"], "a secret goes in HTTP Basic, never the form"


REFUSALS = {
    # case: (user prefix, extra claims, status, code in the description)
    "consent-missing": ("noconsent", {}, 502, "invalid_grant AADSTS65001"),
    "mfa-required": ("mfa", {}, 502, "interaction_required AADSTS50076"),
    "token-without-expiry": ("noexp", {"exp": None}, 401, "AADSTS500133"),
    "token-for-another-app": ("otheraud", {"aud": stack.OTHER_APP_AUDIENCE}, 401, "AADSTS500131"),
    # An app-only token (no `scp`): Entra cannot act on behalf of a user with it.
    "app-only-token": ("apponly", {"scp": None}, 401, "AADSTS50013"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_identity_provider_refusals_reach_the_client_with_their_code(client, case):
    prefix, claims, expected_status, code = REFUSALS[case]
    user = unique(prefix)
    token = entra_jwt(client, user, **claims)
    status, headers, body = client.gateway(f"/entra/{case}", token)
    assert status == expected_status, body
    assert code in body["error_description"], body
    assert token not in json.dumps(body)
    if status == 401:
        assert headers["www-authenticate"] == "Bearer"
        assert body["error_description"].startswith("identity provider refused the user's token")
    else:
        assert body["error_description"].startswith("identity provider refused to issue the SAML assertion")
    assert client.exchanges(user) == 0, "no RFC 7522 call after a refusal"


FAILURES = {
    "entra-garbage": 503,
    "entra-html": 503,
    "entra-down": 503,
    "entra-slow": 504,
}


@pytest.mark.parametrize("route", FAILURES)
def test_an_unusable_identity_provider_is_503_or_504(client, route):
    user = unique(route)
    status, headers, body = client.gateway(f"/t/{route}/x", entra_jwt(client, user))
    assert status == FAILURES[route], body
    assert "retry-after" in headers
    assert client.exchanges(user) == 0


def test_concurrent_first_requests_make_one_chain(client):
    user = unique("crowd")
    token = entra_jwt(client, user)
    statuses: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        status = client.gateway(f"/entra/{i}", token)[0]
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert statuses == [200] * 20
    assert sts_call(client, "/_sts/stats")["issued"].get(user) == 1, "one on-behalf-of call"
    assert client.exchanges(user) == 1, "one token exchange"


def test_a_token_jwt_authn_does_not_keep_cannot_be_passed_on(client):
    """The dev IdP's provider does not `forward` its tokens: jwt_authn removes them from
    the request, so the plugin has nothing to pass on and says what the set-up lacks."""
    user = unique("noforward")
    status, _, body = client.gateway("/entra/x", client.jwt(user))
    assert status == 500, body
    assert "forward: true" in body["error_description"]
    assert sts_requests_for(client, user) == []


def test_an_assertion_the_target_refuses_is_logged_naming_destination_and_error(client, gateway):
    """The seed's readers' failure: Entra's enterprise application has another Identifier
    than the target's entity id, so the target refuses the assertion Entra issued."""
    user = unique("misconfigured")
    status, _, body = client.gateway("/t/entra-wrong-entity/x", entra_jwt(client, user))
    assert status == 502, body
    assert body["error_description"] == "token service rejected the SAML bearer assertion: invalid_grant"
    assert sts_call(client, "/_sts/stats")["issued"].get(user) == 1, "Entra issued it"
    expected = 'destination entra-wrong-entity: token service rejected the assertion for user "'
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = gateway.envoy_log.read_text(errors="replace")
        if any(expected in line and ": invalid_grant" in line for line in log.splitlines()):
            break
        time.sleep(0.2)
    else:
        pytest.fail("no rejection line naming the destination and the error in Envoy's log")
