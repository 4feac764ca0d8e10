"""Shared fixtures: one real Envoy (with the built .wasm) and the dev servers."""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "dev"))

import stack  # noqa: E402

# Another shift (PP_E2E_PORT_SHIFT) lets two checkouts run the shared-stack tests at once.
PORTS = stack.Ports().shifted(int(os.environ.get("PP_E2E_PORT_SHIFT", "10000")))


class Client:
    """Small HTTP helpers against the test stack."""

    def __init__(self, ports: stack.Ports):
        self.ports = ports

    def call(self, url: str, method: str = "GET", headers: dict | None = None, data: bytes | None = None,
             timeout: float = 20.0):
        req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def jwt(self, user: str | None = None, **claims) -> str:
        query = {} if user is None else {"user": user}
        query.update({k: v for k, v in claims.items() if isinstance(v, str)})
        extra = {k: v for k, v in claims.items() if not isinstance(v, str)}
        if extra:
            query["claims"] = json.dumps(extra)
        status, _, body = self.call(
            f"http://127.0.0.1:{self.ports.idp}/token?{urllib.parse.urlencode(query)}")
        assert status == 200, body
        return body.decode()

    def gateway(self, path: str, token: str | None = None, timeout: float = 20.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        status, headers, body = self.call(f"http://127.0.0.1:{self.ports.listener}{path}", headers=headers,
                                          timeout=timeout)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        return status, {k.lower(): v for k, v in headers.items()}, parsed

    def stats(self) -> dict:
        return json.loads(self.call(f"http://127.0.0.1:{self.ports.token}/stats")[2])

    def exchanges(self, user: str) -> int:
        return self.stats()["exchanges"].get(user, 0)

    def token_requests(self) -> list[dict]:
        return json.loads(self.call(f"http://127.0.0.1:{self.ports.token}/requests")[2])


@pytest.fixture(scope="session")
def gateway():
    # The plugin logs at every level (trace), so the log scan covers all of its lines.
    with stack.Stack("test", PORTS, plugin_log_level="trace") as s:
        yield s


@pytest.fixture(scope="session")
def client(gateway) -> Client:
    return Client(PORTS)


def decode_assertion(value: str) -> bytes:
    """Either base64 alphabet, with or without padding."""
    value = value.replace("-", "+").replace("_", "/")
    return base64.b64decode(value + "=" * (-len(value) % 4))
