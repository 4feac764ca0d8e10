"""No user ever receives another user's token: concurrent load of many distinct users
over all Envoy workers, with tokens that expire (and are renewed) during the run. Every
request names its user in `X-Expected-User` (percent-encoded); the echo upstream counts
whether the token it received belongs to that user."""

from __future__ import annotations

import random
from collections import Counter

import load
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

    outcomes = load.run(client.ports.listener, plan, CONNECTIONS)
    assert outcomes == Counter(own=REQUESTS), outcomes

    counted = Counter(client.stats().get("deliveries", {})) - before
    assert counted == Counter(own=REQUESTS), f"echo upstream counted {dict(counted)}"

    renewing = [r for r in client.token_requests()
                if r["outcome"] == "ok" and r["query"].get("expires_in") == RENEWING_LIFETIME]
    assert len(renewing) > 2 * USERS, f"tokens were renewed mid-run: {len(renewing)} exchanges for {USERS} users"
