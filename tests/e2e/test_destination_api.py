"""The find-destination API in the real Envoy: an application asks the gateway, as it
would ask SAP BTP's Destination Service, for a destination and its user's token
(`GET /destination-configuration/v1/destinations/<name>`, its service token in
`Authorization`, the user's in `X-user-token`, both verified by jwt_authn). The answer has
SAP's shape and no secret; the token comes from the same engine and cache as propagated
requests: one exchange per user, whichever way the token is used."""

from __future__ import annotations

import json
import threading
import urllib.parse
import uuid

import pytest

import stack

API = "/destination-configuration/v1/destinations/"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def service_token(client, client_id: str = stack.API_CLIENT_ID, secret: str = stack.API_CLIENT_SECRET) -> str:
    """A client-credentials token from the development IdP, as an application gets one."""
    form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": client_id,
                                   "client_secret": secret}).encode()
    status, _, body = client.call(f"http://127.0.0.1:{client.ports.idp}/oauth/token", method="POST",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"}, data=form)
    assert status == 200, body
    return json.loads(body)["access_token"]


def find(client, name: str, service: str | None, user: str | None = None, query: str = "",
         method: str = "GET"):
    headers = {}
    if service is not None:
        headers["Authorization"] = f"Bearer {service}"
    if user is not None:
        headers["X-user-token"] = user
    status, headers, body = client.call(f"http://127.0.0.1:{client.ports.listener}{API}{name}{query}",
                                        method=method, headers=headers)
    return status, {k.lower(): v for k, v in headers.items()}, body


def found(client, name: str, service: str, user: str | None = None, query: str = "") -> dict:
    status, headers, body = find(client, name, service, user, query)
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store", "an answer with a token is never cached"
    return json.loads(body)


def upstream_user(client, token: str):
    """The user the echo upstream finds behind `token` (the application calls it itself)."""
    status, _, body = client.call(f"http://127.0.0.1:{client.ports.echo}/hello",
                                  headers={"Authorization": f"Bearer {token}"})
    assert status == 200, body
    answer = json.loads(body)
    return answer["user"] if answer["token_valid"] else None


@pytest.fixture(scope="module")
def app(client) -> str:
    return service_token(client)


def test_an_application_gets_the_destination_and_its_users_token_once(client, app):
    user = unique("alice")
    answer = found(client, "dev", app, client.jwt(user))
    assert answer["owner"]["SubaccountId"], "the SAP Cloud SDK needs an owner"
    config = answer["destinationConfiguration"]
    assert config["Name"] == "dev" and config["Authentication"] == "OAuth2SAMLBearerAssertion"
    assert config["URL"] == f"http://127.0.0.1:{client.ports.echo}"
    assert config["x_user_token.jwks_uri"].endswith("/.well-known/jwks.json")
    for gateway_only in ("tokenServicePasswordEnv", "tokenServicePassword", "tokenServiceCluster",
                         "exposeToClients", "KeyStoreLocation"):
        assert gateway_only not in config
    [entry] = answer["authTokens"]
    assert entry["type"] == "Bearer" and "error" not in entry
    assert entry["http_header"] == {"key": "Authorization", "value": f"Bearer {entry['value']}"}
    # The dev token server issues 1-hour tokens; the gateway keeps a margin before expiry.
    assert 0 < int(entry["expires_in"]) < 3600
    assert upstream_user(client, entry["value"]) == user
    assert client.exchanges(user) == 1

    # Asked again, and then propagated through the gateway: the same token, no exchange.
    again = found(client, "dev", app, client.jwt(user))
    assert again["authTokens"][0]["value"] == entry["value"]
    status, _, body = client.gateway("/hello", client.jwt(user))
    assert status == 200 and body["user"] == user
    assert body["headers"]["authorization"] == f"Bearer {entry['value']}"
    assert client.exchanges(user) == 1


def test_concurrent_calls_for_a_new_user_wait_for_one_exchange(client, app):
    user = unique("carol")
    token = client.jwt(user)
    answers: list = [None] * 12

    def ask(i: int) -> None:
        answers[i] = find(client, "dev", app, token)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(answers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    values = set()
    for status, _, body in answers:
        assert status == 200, body
        values.add(json.loads(body)["authTokens"][0]["value"])
    assert len(values) == 1
    assert client.exchanges(user) == 1


def test_skip_token_retrieval_answers_the_configuration_without_an_exchange(client, app):
    user = unique("dave")
    for query in ("?$skipTokenRetrieval=true", "?%24skipTokenRetrieval=true"):
        answer = found(client, "dev", app, client.jwt(user), query)
        assert "authTokens" not in answer
        assert answer["destinationConfiguration"]["Name"] == "dev"
    assert client.exchanges(user) == 0


def test_a_system_user_destination_gives_the_application_the_technical_users_token(client, app):
    # As SAP's Destination Service: the application's service token is enough (the SAP
    # Cloud SDK sends no X-user-token here); with or without a user, one token for all.
    first = found(client, "api-system", app)
    second = found(client, "api-system", app, client.jwt(unique("hank")))
    assert first["authTokens"][0]["value"] == second["authTokens"][0]["value"]
    assert upstream_user(client, first["authTokens"][0]["value"]) == "TECHNICAL_USER"
    # Propagated requests still need a signed-in user.
    status, _, _ = client.gateway("/t/api-system/x")
    assert status == 401


def test_an_exchange_that_cannot_be_made_is_an_error_entry_without_a_token(client, app):
    # No user for a destination that propagates one: SAP's error entry, which the SDK shows,
    # and expires_in "0" so that it does not keep the failure in its cache.
    answer = found(client, "dev", app)
    [entry] = answer["authTokens"]
    assert (entry["type"], entry["value"]) == ("", "")
    assert "authenticated user is required" in entry["error"]
    assert entry["expires_in"] == "0"
    assert "http_header" not in entry


def test_a_refused_exchange_names_the_token_services_error(client, app):
    user = unique("erin")
    # The token server refuses this destination's exchanges on a path set at run time.
    fault = {"path": "/oauth/token/api-flaky", "mode": "reject"}
    status, _, body = client.call(f"http://127.0.0.1:{client.ports.token}/faults", method="POST",
                                  headers={"Content-Type": "application/json"},
                                  data=json.dumps(fault).encode())
    assert status == 200, body
    try:
        answer = found(client, "api-flaky", app, client.jwt(user))
        [entry] = answer["authTokens"]
        assert (entry["type"], entry["value"]) == ("", "")
        assert "invalid_grant" in entry["error"], entry
        assert stack.CLIENT_SECRET not in json.dumps(answer)
    finally:
        fault["mode"] = "none"
        client.call(f"http://127.0.0.1:{client.ports.token}/faults", method="POST",
                    headers={"Content-Type": "application/json"}, data=json.dumps(fault).encode())


@pytest.mark.parametrize("name", ["nope", "entra", "onprem", "dev%2Fx", "", "x" * 3000])
def test_unknown_or_unexposed_destinations_are_not_found_alike(client, app, name):
    status, _, body = find(client, name, app, client.jwt("alice"))
    assert status == 404
    assert json.loads(body) == {"ErrorMessage": "Configuration with the specified name was not found"}


def test_a_caller_without_a_valid_service_token_is_unauthenticated(client, app):
    user_token = client.jwt("alice")
    forged = app[: app.rindex(".") + 1] + ("A" if app[-1] != "A" else "B") * 10
    for service in (None, "not-a-jwt", forged, user_token):  # a user's token has another audience
        status, headers, body = find(client, "dev", service, user_token)
        assert status == 401, (service, body)
        assert headers.get("www-authenticate") == "Bearer"
        assert "ErrorMessage" in json.loads(body)


def test_a_client_the_destination_is_not_exposed_to_is_forbidden(client):
    other = service_token(client, stack.OTHER_API_CLIENT_ID, stack.OTHER_API_CLIENT_SECRET)
    user = unique("frank")
    status, _, body = find(client, "dev", other, client.jwt(user))
    assert status == 403, body
    assert "ErrorMessage" in json.loads(body)
    assert client.exchanges(user) == 0


def test_only_get_is_answered(client, app):
    status, headers, _ = find(client, "dev", app, client.jwt("alice"), method="POST")
    assert status == 405 and headers.get("allow") == "GET"
