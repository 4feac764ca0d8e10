"""Destinations chosen by request (Istio and Envoy Gateway cannot set route metadata):
two hosts behind one listener, only the configured one receives tokens."""

from __future__ import annotations

import json

import stack
from conftest import Client

PORTS = stack.Ports().shifted(16000)


def by_host(unmatched: str | None = None) -> dict:
    """The demo's plugin without a default destination, selecting by `:authority`."""
    plugin = stack.plugin_config(PORTS, "demo")
    plugin.pop("defaultDestination")
    plugin["destinationRules"] = [{"authority": "s4.propagated.test", "destination": "dev"}]
    if unmatched:
        plugin["unmatchedRequests"] = unmatched
    return plugin


def call(client: Client, host: str, jwt: str):
    status, _, body = client.call(f"http://127.0.0.1:{PORTS.listener}/hello",
                                  headers={"Host": host, "Authorization": f"Bearer {jwt}"})
    return status, json.loads(body)


def test_only_the_configured_host_receives_tokens():
    with stack.Stack("demo", PORTS, name="select-host", config_override=by_host()) as gateway:
        client = Client(PORTS)
        jwt = client.jwt("selected")
        status, body = call(client, "s4.propagated.test", jwt)
        assert status == 200 and body["user"] == "selected" and body["token_valid"] is True
        status, body = call(client, "S4.Propagated.Test:10000", jwt)
        assert status == 200 and body["user"] == "selected", "host names are case-blind, ports ignored"
        # Another host behind the same listener: untouched, no token from the gateway.
        status, body = call(client, "other.test", jwt)
        assert status == 200, body
        assert body["user"] is None and body["token_valid"] is False
        forwarded = body["headers"].get("authorization", "")
        assert not forwarded or jwt in forwarded, "only the client's own header, if any"
        assert client.exchanges("selected") == 1
        log = gateway.envoy_log.read_text(errors="replace")
        assert ("selects destinations by route metadata, then 1 rule(s) [authority s4.propagated.test -> dev]; "
                "other requests pass through untouched") in log


def test_unmatched_requests_are_refused_when_so_configured():
    with stack.Stack("demo", PORTS, name="select-refuse", config_override=by_host("refuse")):
        client = Client(PORTS)
        jwt = client.jwt("refused-elsewhere")
        status, body = call(client, "other.test", jwt)
        assert status == 403
        assert body == {"error": "access_denied", "error_description": "no destination is configured for this request"}
        assert call(client, "s4.propagated.test", jwt)[0] == 200
        assert client.exchanges("refused-elsewhere") == 1
