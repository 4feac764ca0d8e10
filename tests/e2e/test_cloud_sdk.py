"""The find-destination API as an application on SAP BTP uses it: the real SAP Cloud SDK
for JavaScript (tests/sdk/client.mjs, `executeHttpRequest` of @sap-cloud-sdk/http-client
at the versions of tests/sdk/package-lock.json, installed by `make test-e2e`) with a
`destination` service binding whose `uri` is the gateway and whose `url` / `uaadomain`
are the development identity provider (client credentials in form fields; the
subscriber token over https with `x-zid`, trusted through NODE_EXTRA_CA_CERTS).

The SDK takes the user's token from the gateway's answer and calls the destination's URL
(the echo upstream) itself, so what reaches the upstream is what the gateway handed out.
Several calls run in one Node process, so the SDK's own caches take part, as they do in
an application."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import local_ca
import servers
import stack
from conftest import PORTS, ROOT, Client

SDK_DIR = ROOT / "tests" / "sdk"
CLIENT = SDK_DIR / "client.mjs"
STEP_TIMEOUT_S = 45.0  # a step's answer (the Node side gives up on a call after 30 s)
FLAKY, FLAKY_PATH = "api-flaky", "/oauth/token/api-flaky"
# Not inherited by the Node process: proxies (the SDK sends even localhost through one),
# debug switches (its libraries would print what they send, tokens among it), and any
# binding or destination but the test's own.
UNSET = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
         "no_proxy", "DEBUG", "NODE_DEBUG", "NODE_OPTIONS", "VCAP_SERVICES", "SERVICE_BINDING_ROOT",
         "VCAP_SERVICES_FILE_PATH", "destinations")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def binding(client_id: str = stack.API_CLIENT_ID, secret: str = stack.API_CLIENT_SECRET) -> dict:
    """VCAP_SERVICES with one `destination` binding, as Cloud Foundry gives it to the app."""
    return {"destination": [{
        "label": "destination", "name": "destination", "tags": ["destination", "conn", "connsvc"],
        "credentials": {
            "clientid": client_id, "clientsecret": secret,
            "uri": f"http://127.0.0.1:{PORTS.listener}",  # the find-destination API
            "url": f"http://127.0.0.1:{PORTS.idp}",  # the provider's service token
            "uaadomain": f"127.0.0.1:{PORTS.idp_tls}",  # the subscriber's: https://<uaadomain>/oauth/token
        },
    }]}


class SdkApp:
    """One Node process running tests/sdk/client.mjs: steps go in on stdin one line at a
    time, each answer is read back (bounded) before the next step is sent."""

    def __init__(self, log: Path, vcap: dict):
        node = shutil.which("node")
        assert node, "node is not on PATH"
        assert (SDK_DIR / "node_modules" / "@sap-cloud-sdk" / "http-client").is_dir(), \
            "the SAP Cloud SDK is not installed: run `make .make/sdk-node` (make test-e2e does)"
        env = {k: v for k, v in os.environ.items() if k not in UNSET}
        env.update(VCAP_SERVICES=json.dumps(vcap), NODE_EXTRA_CA_CERTS=str(local_ca.ensure(stack.TLS_DIR).ca))
        self.log = log
        with open(log, "wb") as stderr:
            self.proc = subprocess.Popen([node, str(CLIENT)], cwd=SDK_DIR, env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr)
        self.buffer = b""

    def step(self, step: dict) -> dict:
        self.proc.stdin.write(json.dumps(step).encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + STEP_TIMEOUT_S
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self.buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    raise AssertionError(f"no answer within {STEP_TIMEOUT_S} s; see {self.log}")
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"the SDK client exited ({self.proc.poll()}); see {self.log}")
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        answer = json.loads(line)
        assert "step" in answer, answer
        return answer

    def call(self, destination: str, jwt: str | None, label: str | None = None) -> dict:
        return self.step({"call": {"destination": destination, "jwt": jwt, "path": "/hello", "label": label}})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc.stdout.close()


@pytest.fixture
def sdk_app(gateway, tmp_path):
    """Starts SDK applications (default: demo-app's binding); stops them after the test."""
    apps = []

    def start(vcap: dict | None = None) -> SdkApp:
        app = SdkApp(tmp_path / f"node-{len(apps)}.log", vcap or binding())
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.close()


def user_jwt(client: Client, user: str) -> str:
    """A user token as the SDK needs it: a tenant (`zid`, the IdP's development zone) and a
    user id (`user_uuid`: without one the SDK caches destinations per tenant, not per user)."""
    return client.jwt(user, zid=servers.DEV_ZONE_ID, user_uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, user)))


def api_requests(answer: dict) -> list[dict]:
    """The find-destination requests the SDK sent to the gateway during a step."""
    prefix = f"http://127.0.0.1:{PORTS.listener}/destination-configuration/v1/destinations/"
    return [r for r in answer["requests"] if r["url"].startswith(prefix)]


def error_text(answer: dict) -> str:
    assert not answer["ok"], answer
    return "\n".join(answer["error"]["messages"])


def upstream_for(client: Client, user: str) -> list[dict]:
    return [r for r in json.loads(client.call(f"http://127.0.0.1:{PORTS.token}/upstream")[2]) if r["user"] == user]


def set_fault(client: Client, path: str, mode: str) -> None:
    status, _, body = client.call(f"http://127.0.0.1:{PORTS.token}/faults", method="POST",
                                  headers={"Content-Type": "application/json"},
                                  data=json.dumps({"path": path, "mode": mode}).encode())
    assert status == 200, body


def served(client: Client, path: str) -> dict:
    faults = json.loads(client.call(f"http://127.0.0.1:{PORTS.token}/faults")[2])
    return faults["served"].get(path, {})


def test_each_user_gets_their_own_token_through_the_sdk(client, sdk_app):
    alice, bob = unique("alice"), unique("bob")
    app = sdk_app()
    answers = {user: app.call("dev", user_jwt(client, user), user) for user in (alice, bob)}
    for user, answer in answers.items():
        assert answer["ok"], answer
        assert answer["status"] == 200 and answer["body"]["user"] == user and answer["body"]["token_valid"] is True
        # The SDK read the destination with the user's token in X-user-token, then called
        # the destination's URL (the echo upstream) itself with what the gateway gave it.
        (find,) = [r for r in api_requests(answer) if "?" not in r["url"]]
        assert {"authorization", "x-user-token"} <= set(find["headers"])
        assert answer["requests"][-1]["url"] == f"http://127.0.0.1:{PORTS.echo}/hello"
        assert client.exchanges(user) == 1
        assert len(upstream_for(client, user)) == 1
    assert answers[alice]["body"]["headers"]["authorization"] != answers[bob]["body"]["headers"]["authorization"]


def test_the_sdk_fetches_its_service_tokens_from_the_identity_provider(client, sdk_app):
    """The binding works as on BTP: the provider's token from `url`, the subscriber's
    (the user's tenant) from https://<uaadomain> with x-zid; credentials in form fields."""
    before = len(json.loads(client.call(f"http://127.0.0.1:{PORTS.idp}/token-requests")[2]))
    answer = sdk_app().call("dev", user_jwt(client, unique("carol")))
    assert answer["ok"], answer
    token_urls = [r["url"] for r in answer["requests"] if r["method"] == "POST"]
    assert sorted(token_urls) == sorted([f"https://127.0.0.1:{PORTS.idp_tls}/oauth/token",
                                         f"http://127.0.0.1:{PORTS.idp}/oauth/token"])
    records = json.loads(client.call(f"http://127.0.0.1:{PORTS.idp}/token-requests")[2])[before:]
    assert sorted((r["scheme"], r["client_id"], r["client_auth"], r["x_zid"], r["outcome"]) for r in records) == [
        ("http", stack.API_CLIENT_ID, "form", None, "ok"),
        ("https", stack.API_CLIENT_ID, "form", servers.DEV_ZONE_ID, "ok")]


def test_a_second_call_within_the_tokens_life_exchanges_nothing(client, sdk_app):
    user = unique("dana")
    jwt = user_jwt(client, user)
    app = sdk_app()
    first, second = app.call("dev", jwt), app.call("dev", jwt)
    for answer in (first, second):
        assert answer["ok"], answer
        assert answer["body"]["user"] == user and answer["body"]["token_valid"] is True
    assert second["body"]["headers"]["authorization"] == first["body"]["headers"]["authorization"]
    # The SDK kept the destination for the answer's expires_in: it did not ask again.
    assert len(api_requests(first)) == 2 and api_requests(second) == []
    assert client.exchanges(user) == 1
    # Another application instance (its own SDK cache, empty) gets the gateway's cached token.
    third = sdk_app().call("dev", jwt)
    assert third["ok"], third
    assert len(api_requests(third)) == 2
    assert third["body"]["headers"]["authorization"] == first["body"]["headers"]["authorization"]
    assert client.exchanges(user) == 1


def test_a_refused_exchange_reaches_the_application_and_heals_in_the_same_process(client, sdk_app):
    user = unique("erin")
    jwt = user_jwt(client, user)
    hold = stack.plugin_config(PORTS, "test").get("failedExchangeHoldSeconds", 5)
    app = sdk_app()
    before = served(client, FLAKY_PATH)
    set_fault(client, FLAKY_PATH, "reject")
    try:
        failed = app.call(FLAKY, jwt)
        failed_at = time.monotonic()
    finally:
        set_fault(client, FLAKY_PATH, "none")
    text = error_text(failed)
    # The SDK's own words around the gateway's `error` text, which names the refusal.
    assert "failed in all cases" in text and "invalid_grant" in text, text
    assert upstream_for(client, user) == [] and client.exchanges(user) == 0
    # Healed: the same process (same SDK cache) gets through once the gateway's hold of the
    # failure (the entry's expires_in, which the SDK caches the failure for) is over.
    deadline = failed_at + hold + 10.0
    while True:
        answer = app.call(FLAKY, jwt)
        if answer["ok"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert answer["ok"], f"still failing {time.monotonic() - failed_at:.1f} s after the refusal: {answer}"
    assert answer["body"]["user"] == user and answer["body"]["token_valid"] is True
    assert client.exchanges(user) == 1
    # One refused exchange and one good one: the held failure was not retried meanwhile.
    after = served(client, FLAKY_PATH)
    assert after.get("reject", 0) - before.get("reject", 0) == 1
    assert after.get("none", 0) - before.get("none", 0) == 1


def test_an_application_not_allowed_the_destination_gets_a_clear_error(client, sdk_app):
    user = unique("frank")
    answer = sdk_app(binding(stack.OTHER_API_CLIENT_ID, stack.OTHER_API_CLIENT_SECRET)).call(
        "dev", user_jwt(client, user))
    text = error_text(answer)
    assert "status code 403" in text, text
    assert answer["error"]["response"]["status"] == 403
    assert client.exchanges(user) == 0 and upstream_for(client, user) == []


def test_wrong_client_credentials_stop_at_the_identity_provider(client, sdk_app):
    user = unique("gina")
    answer = sdk_app(binding(stack.API_CLIENT_ID, "not-the-secret")).call("dev", user_jwt(client, user))
    assert "invalid_client" in error_text(answer)
    assert api_requests(answer) == [] and client.exchanges(user) == 0


def test_an_unknown_destination_is_not_found_for_the_sdk(client, sdk_app):
    """The 404 body is the Destination Service's: the SDK then reports the destination as
    not found (any other body makes it a failed request)."""
    answer = sdk_app().call("no-such-destination", user_jwt(client, unique("hank")))
    text = error_text(answer)
    assert "Failed to resolve the destination 'name: no-such-destination'" in text, text
    assert "Failed to fetch destination" not in text
    assert len(api_requests(answer)) >= 1


def test_a_system_user_destination_gives_the_technical_users_token(client, sdk_app):
    """`SystemUser` on a destination makes the SDK ask with its service token alone (no
    X-user-token, whatever JWT it was given); as SAP's Destination Service, the gateway
    exchanges for the technical user, and the upstream sees that user."""
    user = unique("ivan")
    answer = sdk_app().call("api-system", user_jwt(client, user))
    (find,) = [r for r in api_requests(answer) if "?" not in r["url"]]
    assert "authorization" in find["headers"] and "x-user-token" not in find["headers"]
    assert answer["ok"] and answer["status"] == 200, answer
    assert answer["body"]["user"] == "TECHNICAL_USER" and answer["body"]["token_valid"] is True, answer
