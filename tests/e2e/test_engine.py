"""The exchange engine in real Envoy: a configuration swap while exchanges are in flight
strands nobody, and one exchange per user holds with eight workers and across a code
reload (new VMs), whose stale queues leave the registry."""

from __future__ import annotations

import asyncio
import time

import httpx

import stack
from conftest import Client
from test_single_flight import concurrent_first_requests, counters

SWAP_TIMEOUT_S = 3.0  # the `swap` destination: its token service answers after 2 s


def applied(client: Client, ports: stack.Ports, active_slot: str) -> bool:
    """True once the gateway's metadata leads with the certificate of `active_slot`."""
    body = client.call(f"http://127.0.0.1:{ports.listener}/.well-known/saml-idp-metadata")[2].decode()
    pem = stack.key_files(active_slot)[1].read_text()
    certificate = "".join(line for line in pem.splitlines() if "CERTIFICATE" not in line)
    others = [
        "".join(line for line in stack.key_files(slot)[1].read_text().splitlines() if "CERTIFICATE" not in line)
        for slot in ("a", "b") if slot != active_slot
    ]
    return certificate in body and all(body.index(certificate) < body.index(o) for o in others if o in body)


def test_a_configuration_swap_while_exchanges_run_answers_every_waiter_in_time():
    ports = stack.Ports().shifted(13000)
    with stack.Stack("test", ports, name="swap") as gateway:
        client = Client(ports)
        users = {f"swap-{i}": client.jwt(f"swap-{i}") for i in range(8)}
        url = f"http://127.0.0.1:{ports.listener}/t/swap/x"

        async def request(jwt: str, timeout: float):
            started = time.monotonic()
            try:
                async with httpx.AsyncClient(timeout=timeout) as h:
                    r = await h.get(url, headers={"Authorization": f"Bearer {jwt}"})
                return r.status_code, time.monotonic() - started
            except httpx.TimeoutException:
                return None, time.monotonic() - started

        async def scenario():
            # 1. Each user's first request starts the exchange under the current
            #    configuration; its client gives up at once, so the old configuration's
            #    root context is left with no request of its own, only the callouts.
            abandoned = await asyncio.gather(*[request(jwt, 0.3) for jwt in users.values()])
            assert all(status is None for status, _ in abandoned), abandoned
            # 2. The configuration is replaced (a key rotation) while the callouts run.
            assert stack.rotate(gateway.plugin_file) == ["default"]
            deadline = time.monotonic() + 5
            while not applied(client, ports, "b") and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert applied(client, ports, "b"), "the new configuration is in use"
            # 3. The same users ask again, several times each, under the new configuration.
            return await asyncio.gather(*[request(jwt, 15) for jwt in users.values() for _ in range(3)])

        waited = asyncio.run(scenario())
        assert all(status == 200 for status, _ in waited), waited
        slowest = max(took for _, took in waited)
        assert slowest <= SWAP_TIMEOUT_S + 1.0, f"a waiter took {slowest:.2f} s"
        # 4. Right after, the same users are served from the cache, one exchange each.
        for name, jwt in users.items():
            status, _, body = client.gateway("/t/swap/x", jwt, timeout=2)
            assert (status, body["user"]) == (200, name)
            assert client.exchanges(name) == 1, name


def registered_workers(client: Client) -> int:
    return int(counters(client).get("wasmcustom.principal_propagation.workers_registered", "0"))


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_eight_workers_and_a_code_reload_keep_one_exchange_per_user():
    ports = stack.Ports().shifted(14000)
    with stack.Stack("test", ports, name="eight", concurrency=8) as gateway:
        client = Client(ports)
        jwt = client.jwt("eight-crowd")
        responses = concurrent_first_requests(client, "/t/lagging/x", jwt, 200)
        assert [r.status_code for r in responses] == [200] * 200
        assert client.exchanges("eight-crowd") == 1
        # Eight workers' VMs and the main thread's (Envoy runs the plugin there too).
        assert wait_for(lambda: registered_workers(client) == 9, 15), registered_workers(client)

        # A code reload: new VMs on every worker (another VM configuration), same vm_id.
        created = "wasm.envoy.wasm.runtime.v8.created"
        before = int(counters(client, "wasm.envoy").get(created, "0"))
        stack.write_plugin_file(gateway.plugin_file, stack.read_plugin_file(gateway.plugin_file),
                                vm_configuration="reload-1")
        assert wait_for(lambda: int(counters(client, "wasm.envoy").get(created, "0")) >= before + 8, 15)
        # The new VMs registered their queues beside the old ones, not yet stale.
        assert wait_for(lambda: registered_workers(client) > 9, 10), registered_workers(client)

        jwt = client.jwt("eight-after-reload")
        responses = concurrent_first_requests(client, "/t/lagging/x", jwt, 200)
        assert [r.status_code for r in responses] == [200] * 200
        assert all(r.json()["user"] == "eight-after-reload" for r in responses)
        assert client.exchanges("eight-after-reload") == 1

        # The old VMs' queues (and the configuration check's) are not renewed: they leave
        # the registry, which then lists the nine live VMs again.
        assert wait_for(lambda: registered_workers(client) == 9, 30), registered_workers(client)
