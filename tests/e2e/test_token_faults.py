"""A failing token service, end to end: every fault of the dev token server (see
`FAULTS` in dev/servers.py) against the real Envoy with the plugin.

Each fault must map to the error contract (README, "What a client sees when something
is wrong") within the destination's timeout plus a small margin, never reach the
upstream, never be cached, and service must resume within a second of the token
service healing.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
import uuid
from collections import Counter

import pytest

import stack
from conftest import Client

PORTS = stack.Ports().shifted(18000)  # below the ephemeral port range
SWITCHABLE = PORTS.token + 3  # a port the test opens (forwarding to the token server) to heal "refused"
TIMEOUT_S = 1  # tokenServiceURL.SocketReadTimeoutInSeconds of every destination here
MARGIN_S = 1.0  # proves there is no hang; not a performance figure
HEAL_PATH = "/oauth/token/heal"

# fault -> (status, error) of the contract; None: an odd answer the plugin accepts.
FAULTS = {
    "refused": (503, "temporarily_unavailable"),
    "reset": (503, "temporarily_unavailable"),
    "hang": (504, "gateway_timeout"),
    "drip": (504, "gateway_timeout"),
    "html-500": (503, "temporarily_unavailable"),
    "html-503": (503, "temporarily_unavailable"),
    "empty": (503, "temporarily_unavailable"),
    "not-json": (503, "temporarily_unavailable"),
    "huge": (503, "temporarily_unavailable"),
    "no-access-token": (503, "temporarily_unavailable"),
    "expires-negative": (503, "temporarily_unavailable"),
    "expires-string": (503, "temporarily_unavailable"),
    "token-type-mac": (503, "temporarily_unavailable"),
    # Accepted: capped at a day / read as a number / case-insensitive (token cached);
    # no lifetime (token used, not cached).
    "expires-huge": None,
    "expires-digits": None,
    "bearer-uppercase": None,
    "expires-missing": None,
}
ERRORS = [kind for kind, expected in FAULTS.items() if expected]


def fault_destination(name: str, path: str, **extra) -> dict:
    return stack.destination(PORTS, name, path, **{"tokenServiceURL.SocketReadTimeoutInSeconds": str(TIMEOUT_S)},
                             **extra)


def destinations() -> list[dict]:
    result = []
    for kind in FAULTS:
        if kind == "refused":
            result.append(fault_destination("f-refused", "/oauth/token", tokenServiceCluster="token_service_down"))
        else:
            result.append(fault_destination(f"f-{kind}", f"/oauth/token/fault/{kind}"))
    result.append(fault_destination("heal", HEAL_PATH))
    result.append(fault_destination("heal-refused", HEAL_PATH + "-refused", tokenServiceCluster="token_switchable"))
    return result


def bootstrap() -> tuple[dict, dict]:
    """The test profile's Envoy and plugin, plus one route per destination of this module
    and a cluster on SWITCHABLE."""
    plugin = stack.plugin_config(PORTS, "test")
    plugin["destinations"] += destinations()
    config = stack.envoy_config(PORTS, "test", config_override=plugin)
    routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"]
    routes[:0] = [stack.route(f"/f/{d['Name']}/", d["Name"]) for d in destinations()]
    config["static_resources"]["clusters"].append(stack.cluster("token_switchable", SWITCHABLE))
    return config, plugin


@pytest.fixture(scope="module")
def client():
    config, plugin = bootstrap()
    with stack.Stack("test", PORTS, name="faults", config_override=plugin, bootstrap=config):
        yield Client(PORTS)


class Forwarder:
    """A TCP relay from SWITCHABLE to the token server: "the token service is back"."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", SWITCHABLE))
        self.listener.settimeout(0.2)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stopped.is_set():
            try:
                downstream, _ = self.listener.accept()
            except socket.timeout:
                continue
            upstream = socket.create_connection(("127.0.0.1", PORTS.token))
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.stopped.set()
        self.thread.join(timeout=5)
        self.listener.close()


def token_get(client: Client, path: str):
    return json.loads(client.call(f"http://127.0.0.1:{PORTS.token}{path}")[2])


def set_fault(client: Client, path: str, mode: str) -> None:
    status, _, body = client.call(f"http://127.0.0.1:{PORTS.token}/faults", method="POST",
                                  data=json.dumps({"path": path, "mode": mode}).encode())
    assert status == 200, body


def timed(client: Client, path: str, jwt: str):
    started = time.monotonic()
    status, headers, body = client.gateway(path, jwt, timeout=TIMEOUT_S + 10)
    return status, headers, body, time.monotonic() - started


def served_on(client: Client, token_path: str) -> Counter:
    """Token requests the token server served on `token_path`, by mode."""
    return Counter(token_get(client, "/faults")["served"].get(token_path, {}))


def fault_tokens(client: Client) -> set[str]:
    """Every (working) token the token server put into a faulty answer."""
    return {r["fault_token"] for r in client.token_requests() if r["outcome"].startswith("fault:")}


def reached_upstream(client: Client, path: str) -> list[dict]:
    return [r for r in token_get(client, "/upstream") if urllib.parse.urlsplit(r["path"]).path == path]


def assert_contract(status, headers, body, expected, secrets):
    assert (status, body["error"]) == expected, body
    assert headers["content-type"] == "application/json"
    assert set(body) == {"error", "error_description"}
    assert headers.get("retry-after") == "5"
    text = json.dumps(body) + json.dumps(headers)
    for secret in secrets:
        assert secret not in text


@pytest.mark.parametrize("kind", list(FAULTS))
def test_each_fault_maps_to_the_contract_in_time_and_never_reaches_upstream(client, kind):
    user = f"fault-{kind}"
    jwt = client.jwt(user)
    path = f"/f/f-{kind}/{uuid.uuid4().hex}"
    status, headers, body, elapsed = timed(client, path, jwt)
    assert elapsed < TIMEOUT_S + MARGIN_S, f"{kind} answered after {elapsed:.2f}s"
    served = token_get(client, "/faults")["served"]
    if kind != "refused":
        assert served[f"/oauth/token/fault/{kind}"] == {kind: 1}

    expected = FAULTS[kind]
    if expected is None:
        # Odd but usable: the token of the answer is the one that reaches upstream.
        assert status == 200 and body["user"] == user and body["token_valid"] is True
        assert body["headers"]["authorization"].removeprefix("Bearer ") in fault_tokens(client)
        again = client.gateway(path, jwt)
        assert again[0] == 200 and again[2]["user"] == user
        cached = kind != "expires-missing"  # no lifetime: used for the request that waited, not cached
        assert token_get(client, "/faults")["served"][f"/oauth/token/fault/{kind}"] == {kind: 1 if cached else 2}
        return

    assert_contract(status, headers, body, expected,
                    [stack.CLIENT_SECRET, jwt, *fault_tokens(client)])
    assert not reached_upstream(client, path)
    assert not [r for r in token_get(client, "/upstream") if r["token"] in fault_tokens(client)]


@pytest.mark.parametrize("kind", ERRORS)
def test_nothing_wrong_is_cached_and_service_resumes_within_a_second_of_healing(client, kind):
    user = f"heal-{kind}"
    jwt = client.jwt(user)
    refused = kind == "refused"
    destination, token_path = ("heal-refused", HEAL_PATH + "-refused") if refused else ("heal", HEAL_PATH)
    if not refused:
        set_fault(client, HEAL_PATH, kind)
    path = f"/f/{destination}/{uuid.uuid4().hex}"
    served_before = served_on(client, token_path)

    # The fault, then at once a second request: answered from the failure hold, without
    # another token request (a failing token service is not hammered).
    first = timed(client, path, jwt)
    assert first[3] < TIMEOUT_S + MARGIN_S
    assert_contract(*first[:3], FAULTS[kind], [jwt, *fault_tokens(client)])
    held = client.gateway(path, jwt)
    assert (held[0], held[2]["error"]) == FAULTS[kind]
    assert served_on(client, token_path) - served_before == Counter({} if refused else {kind: 1})

    # Heal, then ask until it works.
    forwarder = Forwarder() if refused else None
    try:
        if not refused:
            set_fault(client, HEAL_PATH, "none")
        healed = time.monotonic()
        while True:
            status, _, body = client.gateway(path, jwt)
            if status == 200 or time.monotonic() - healed > 5:
                break
            assert (status, body["error"]) == FAULTS[kind]  # the held failure, nothing else
            time.sleep(0.05)
        resumed_after = time.monotonic() - healed
        print(f"{kind}: resumed {resumed_after:.3f}s after healing")
        assert status == 200, body
        assert resumed_after < 1.0, f"resumed {resumed_after:.2f}s after healing"

        # A fresh, valid token of this user, from a healthy exchange; the bad answer was never used.
        token = body["headers"]["authorization"].removeprefix("Bearer ")
        assert body["user"] == user and body["token_valid"] is True
        assert token not in fault_tokens(client)
        ok = [r for r in client.token_requests() if r["path"] == token_path and r["outcome"] == "ok"
              and f">{user}<" in (r["assertion_xml"] or "")]
        assert len(ok) == 1
        upstream = reached_upstream(client, path)
        assert [r["token"] for r in upstream] == [token]

        # And now it is cached: no further exchange.
        assert client.gateway(path, jwt)[0] == 200
        assert client.exchanges(user) == 1
    finally:
        if forwarder:
            forwarder.close()
        if not refused:
            set_fault(client, HEAL_PATH, "none")
