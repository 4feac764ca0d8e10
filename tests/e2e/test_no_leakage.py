"""No user ever receives another user's token: concurrent load of many distinct users
over all Envoy workers, with tokens that expire (and are renewed) during the run. Every
request names its user in `X-Expected-User` (percent-encoded); the echo upstream counts
whether the token it received belongs to that user."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from urllib.parse import quote

import pytest

import stack
from conftest import Client

USERS = 200
REQUESTS = 24_000
CONNECTIONS = 64
RENEWING_LIFETIME = "38"  # expires_in of destination `renewing` (dev/stack.py)


@pytest.fixture(scope="module")
def load_client():
    """Its own stack with Envoy at info level: this many requests at trace level would
    write gigabytes of log (the log audit still runs over it)."""
    ports = stack.Ports().shifted(2000)
    with stack.Stack("test", ports, name="leakage", envoy_log_level="info"):
        yield Client(ports)


def user_ids() -> list[str]:
    """Mostly plain ids, plus ids that differ only in case, Unicode normalisation or a
    trailing character, so a cache key that folds or truncates them would mix them up."""
    tricky = ["leak-Case", "leak-case", "leak-caf\u00e9", "leak-cafe\u0301", "leak-x", "leak-x ", "leak-x\u00a0"]
    return tricky + [f"leak-{i:03d}" for i in range(USERS - len(tricky))]


async def keep_alive_connection(port: int, requests: list[tuple[str, str, str]], outcomes: Counter) -> None:
    """Sends `requests` (user, path, jwt) one after another on one HTTP/1.1 connection
    (a plain client: httpx's pool is far slower than Envoy here) and counts whose token
    the echo upstream saw."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for user, path, jwt in requests:
            writer.write((f"GET {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {jwt}\r\n"
                          f"X-Expected-User: {quote(user)}\r\n\r\n").encode())
            status = int((await asyncio.wait_for(reader.readline(), 30)).split()[1])
            length = 0
            while (line := await asyncio.wait_for(reader.readline(), 30)) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            body = await asyncio.wait_for(reader.readexactly(length), 30)
            if status != 200:
                outcomes[f"status {status}"] += 1
            else:
                outcomes["own" if json.loads(body)["user"] == user else "other_user"] += 1
    finally:
        writer.close()


def test_every_upstream_request_carries_its_own_users_token(load_client):
    client = load_client
    users = user_ids()
    jwts = {user: client.jwt(user) for user in users}
    # Half the traffic on a destination whose tokens are usable for 8 s, so each user's
    # token is renewed several times mid-run; the other half on the default destination.
    paths = ["/t/renewing/leak", "/leak"]
    rng = random.Random(7)
    plan = [(user, path, jwts[user]) for user, path in
            ((rng.choice(users), rng.choice(paths)) for _ in range(REQUESTS))]
    before = Counter(client.stats().get("deliveries", {}))

    async def run() -> Counter:
        outcomes: Counter = Counter()
        await asyncio.gather(*[keep_alive_connection(client.ports.listener, plan[i::CONNECTIONS], outcomes)
                               for i in range(CONNECTIONS)])
        return outcomes

    outcomes = asyncio.run(run())
    assert outcomes == Counter(own=REQUESTS), outcomes

    counted = Counter(client.stats().get("deliveries", {})) - before
    assert counted == Counter(own=REQUESTS), f"echo upstream counted {dict(counted)}"

    renewing = [r for r in client.token_requests()
                if r["outcome"] == "ok" and r["query"].get("expires_in") == RENEWING_LIFETIME]
    assert len(renewing) > 2 * USERS, f"tokens were renewed mid-run: {len(renewing)} exchanges for {USERS} users"
