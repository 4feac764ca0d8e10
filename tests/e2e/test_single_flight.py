"""One token exchange per user across all Envoy workers (--concurrency 2): concurrent
first requests on separate connections land on both workers and still cause exactly
one exchange; a failed exchange reaches every waiter and is retried after a backoff."""

from __future__ import annotations

import asyncio
import time

import httpx


def counters(client, prefix: str = "wasmcustom") -> dict[str, str]:
    body = client.call(f"http://127.0.0.1:{client.ports.admin}/stats?filter={prefix}")[2].decode()
    return dict(line.split(": ", 1) for line in body.splitlines())


def concurrent_first_requests(client, path: str, jwt: str, n: int) -> list[httpx.Response]:
    """`n` requests at once, each on its own HTTP/1.1 connection (Envoy spreads
    connections over its workers)."""
    url = f"http://127.0.0.1:{client.ports.listener}{path}"

    async def one() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as h1:
            return await h1.get(url, headers={"Authorization": f"Bearer {jwt}"})

    async def all_of_them():
        return await asyncio.gather(*[one() for _ in range(n)])

    return asyncio.run(all_of_them())


def test_200_concurrent_first_requests_over_all_workers_cause_one_exchange(client):
    joined = "wasmcustom.principal_propagation.joined_other_worker"
    before = int(counters(client).get(joined, "0"))
    jwt = client.jwt("crowd")
    responses = concurrent_first_requests(client, "/t/lagging/x", jwt, 200)
    assert [r.status_code for r in responses] == [200] * 200
    assert all(r.json()["user"] == "crowd" for r in responses)
    assert client.exchanges("crowd") == 1
    # Workers report their counters once a second: wait for the next report (bounded).
    deadline = time.monotonic() + 3
    while int(counters(client).get(joined, "0")) <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert int(counters(client)[joined]) > before, "requests waited on the other worker's exchange"


def test_a_failed_exchange_reaches_every_waiter_once(client):
    jwt = client.jwt("crowd-rejected")
    responses = concurrent_first_requests(client, "/t/lagging-reject/x", jwt, 60)
    assert {r.status_code for r in responses} == {502}
    assert all("invalid_grant" in r.json()["error_description"] for r in responses)
    sent = [r for r in client.token_requests() if ">crowd-rejected<" in (r.get("assertion_xml") or "")]
    assert len(sent) == 1


def test_a_transport_failure_is_retried_after_the_backoff(client):
    jwt = client.jwt("crowd-timeout")
    responses = concurrent_first_requests(client, "/t/lagging-timeout/x", jwt, 40)
    assert {r.status_code for r in responses} == {504}
    # Within the backoff (0.5 s) the answer comes without a new exchange.
    status, _, _ = client.gateway("/t/lagging-timeout/x", jwt)
    assert status == 504
    time.sleep(2.0)  # backoff over, and the token server has logged the slow request
    def sent():
        return len([r for r in client.token_requests() if ">crowd-timeout<" in (r.get("assertion_xml") or "")])
    assert sent() == 1
    status, _, _ = client.gateway("/t/lagging-timeout/x", jwt)
    assert status == 504
    time.sleep(1.0)
    assert sent() == 2


def test_short_lived_tokens_are_refreshed_ahead_without_an_exchange_per_request(client):
    # expires_in=33 s with the 30 s margin: each token is reused for at most 3 s and
    # refreshed in the background from half-way.
    refresh = "wasmcustom.principal_propagation.refresh_ahead"
    before = int(counters(client).get(refresh, "0"))
    jwt = client.jwt("refresher")
    statuses = []
    deadline = time.monotonic() + 6.0
    while time.monotonic() < deadline:
        status, _, body = client.gateway("/t/short/x", jwt)
        statuses.append((status, body["user"]))
        time.sleep(0.1)
    assert set(statuses) == {(200, "refresher")}
    exchanges = client.exchanges("refresher")
    assert 2 <= exchanges <= 8, f"{exchanges} exchanges for {len(statuses)} requests"
    deadline = time.monotonic() + 3  # counters are reported once a second
    while int(counters(client).get(refresh, "0")) <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert int(counters(client)[refresh]) > before
