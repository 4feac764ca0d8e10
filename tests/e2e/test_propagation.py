"""End-to-end: real Envoy, the built .wasm, jwt_authn, the dev IdP, token server, echo."""

from __future__ import annotations

import asyncio
import time
import urllib.parse

import httpx

from conftest import decode_assertion


def test_users_are_propagated_as_themselves(client):
    for user in ["alice", "bob", "Zoë O'Brien <admin>"]:
        status, _, body = client.gateway("/hello", client.jwt(user))
        assert status == 200, body
        assert body["user"] == user
        assert body["token_valid"] is True
        assert client.exchanges(user) == 1


def test_inbound_authorization_is_replaced_by_the_exchanged_token(client):
    jwt = client.jwt("replace-check")
    status, _, body = client.gateway("/hello", jwt)
    assert status == 200
    forwarded = body["headers"]["authorization"]
    assert forwarded.startswith("Bearer ") and jwt not in forwarded
    assert body["token_valid"] is True


def test_five_concurrent_requests_of_one_user_on_one_worker_cause_one_exchange(client):
    # HTTP/2 multiplexes the five requests on one connection, hence on one Envoy worker.
    # The token endpoint of `/t/lagging/` answers after 0.5 s, so all five are in flight
    # together: the first starts the exchange, the other four join it.
    jwt = client.jwt("carol")
    url = f"http://127.0.0.1:{client.ports.listener}/t/lagging/x"

    async def five():
        async with httpx.AsyncClient(http1=False, http2=True, timeout=20) as h2:
            return await asyncio.gather(*[h2.get(url, headers={"Authorization": f"Bearer {jwt}"}) for _ in range(5)])

    responses = asyncio.run(five())
    assert [(r.status_code, r.http_version) for r in responses] == [(200, "HTTP/2")] * 5
    assert all(r.json()["user"] == "carol" for r in responses)
    assert client.exchanges("carol") == 1


def test_five_requests_of_one_user_cause_one_exchange(client):
    # Separate connections may land on either worker: the cache is shared by all.
    jwt = client.jwt("carl")
    for _ in range(5):
        status, _, body = client.gateway("/hello", jwt)
        assert status == 200 and body["user"] == "carl"
    assert client.exchanges("carl") == 1


def test_an_expired_token_triggers_a_new_exchange(client):
    # expires_in=33 with the default 30 s margin: reusable for 3 s.
    jwt = client.jwt("dave")
    assert client.gateway("/t/short/x", jwt)[0] == 200
    assert client.gateway("/t/short/x", jwt)[0] == 200
    assert client.exchanges("dave") == 1
    time.sleep(3.5)
    status, _, body = client.gateway("/t/short/x", jwt)
    assert status == 200 and body["user"] == "dave"
    assert client.exchanges("dave") == 2


def total_token_requests(client) -> int:
    return len(client.token_requests())


def test_missing_or_invalid_jwt_gets_401_and_no_exchange(client):
    before = total_token_requests(client)
    status, headers, body = client.gateway("/hello")
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert headers["content-type"] == "application/json"
    assert body["error"] == "unauthorized" and body["error_description"]

    jwt = client.jwt("mallory")
    head, payload, signature = jwt.split(".")
    forged = ".".join([head, payload, signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")])
    for bad in [forged, "not-a-jwt", jwt + "x"]:
        status, headers, body = client.gateway("/hello", bad)
        assert status == 401, bad
        assert headers["www-authenticate"] == "Bearer"
    assert total_token_requests(client) == before


def test_missing_user_id_claim_gets_401_naming_the_claim(client):
    before = total_token_requests(client)
    status, headers, body = client.gateway("/t/sf/x", client.jwt("erin"))  # sf reads `email`
    assert status == 401
    assert "'email'" in body["error_description"]
    status, _, body = client.gateway("/hello", client.jwt("nameless", user_name=None))
    assert status == 401 and "'user_name'" in body["error_description"]
    assert total_token_requests(client) == before


def test_rejected_assertion_gets_502_with_the_oauth_error(client):
    status, headers, body = client.gateway("/t/reject/x", client.jwt("frank"))
    assert status == 502
    assert body["error"] == "bad_gateway"
    assert "invalid_grant" in body["error_description"]
    assert "retry-after" not in headers


def test_audience_mismatch_is_rejected_by_the_token_server_and_gets_502(client):
    status, _, body = client.gateway("/t/wrong-audience/x", client.jwt("grace"))
    assert status == 502
    assert "invalid_grant" in body["error_description"]
    rejected = [r for r in client.token_requests() if r["path"] == "/oauth/token" and r["outcome"] != "ok"]
    assert rejected, "the token server itself refused the assertion"


def test_token_server_down_gets_503_with_retry_after(client):
    status, headers, body = client.gateway("/t/down/x", client.jwt("heidi"))
    assert status == 503
    assert headers["retry-after"].isdigit()
    assert body["error"] == "temporarily_unavailable"


def test_slow_token_server_gets_504_within_the_configured_timeout(client):
    # SocketReadTimeoutInSeconds = 1; the endpoint sleeps 4 s.
    started = time.monotonic()
    status, headers, body = client.gateway("/t/slow/x", client.jwt("ivan"))
    elapsed = time.monotonic() - started
    assert status == 504
    assert headers["retry-after"].isdigit()
    assert elapsed < 1 + 2.0, f"answered after {elapsed:.1f}s"


def test_destination_properties_reach_the_token_service_and_the_backend(client):
    status, _, body = client.gateway("/t/sf/orders?x=1", client.jwt("judy", email="judy@example.com"))
    assert status == 200, body
    assert body["user"] == "judy@example.com"
    assert body["headers"]["x-propagated"] == "1"
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(body["path"]).query)
    assert query == {"x": ["1"], "sap-client": ["100"]}

    sent = [r for r in client.token_requests() if r["outcome"] == "ok" and "judy@example.com" in (r.get("assertion_xml") or "")]
    assert len(sent) == 1
    form, headers = sent[0]["form"], sent[0]["headers"]
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:saml2-bearer"
    assert form["client_id"] == "gateway-client"
    assert form["company_id"] == "ACME"
    assert form["scope"] == "read write"
    assert form["extra_field"] == "1"
    assert headers["x-token-test"] == "yes"
    assert headers["authorization"].startswith("Basic ")
    # samlAssertionEncoding=base64: the standard alphabet with padding.
    assert len(form["assertion"]) % 4 == 0
    assert "<ds:X509Certificate>" in sent[0]["assertion_xml"]
    assert "emailAddress" in sent[0]["assertion_xml"]


def test_default_encoding_is_base64url_without_padding(client):
    client.gateway("/hello", client.jwt("kim"))
    sent = [r for r in client.token_requests() if r["outcome"] == "ok" and ">kim<" in (r.get("assertion_xml") or "")]
    assert sent
    assertion = sent[0]["form"]["assertion"]
    assert "=" not in assertion and "+" not in assertion and "/" not in assertion
    assert decode_assertion(assertion).decode() == sent[0]["assertion_xml"]


def test_metrics_count_cache_use_and_exchanges(client):
    def counters():
        _, _, body = client.call(f"http://127.0.0.1:{client.ports.admin}/stats?filter=wasmcustom")
        return {k: v for k, v in (line.split(": ", 1) for line in body.decode().splitlines())}

    ok = "wasmcustom.principal_propagation.token_exchange.ok"
    hit = "wasmcustom.principal_propagation.cache_hit"
    time.sleep(1.2)  # earlier tests' counts reported (workers report once a second)
    before = counters()
    jwt = client.jwt("metrics-user")
    for _ in range(3):
        assert client.gateway("/hello", jwt)[0] == 200
    # Workers add up their counters and report them once a second.
    deadline = time.monotonic() + 5
    while True:
        after = counters()
        if int(after.get(hit, 0)) - int(before.get(hit, 0)) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(1.2)  # every worker's next report
    after = counters()
    assert int(after[ok]) - int(before.get(ok, 0)) == 1
    assert int(after[hit]) - int(before.get(hit, 0)) >= 2
    assert "wasmcustom.principal_propagation.signing_us" in after
    # The two workers' VMs and the main thread's (Envoy runs the plugin there too); the VM
    # that checked the configuration at start leaves once it is 10 s stale.
    workers = "wasmcustom.principal_propagation.workers_registered"
    deadline = time.monotonic() + 15
    while int(counters()[workers]) != 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert int(counters()[workers]) == 3
