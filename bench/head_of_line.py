"""Head-of-line blocking (issue 4, point 5), for `make bench`.

Cache hits of one user while new users arrive at 50 per second, against the same hits
with no new users: the p99 ratio shows how much the new users' cold path (writing and
signing an assertion, the token callout, storing the result) holds up requests that
need none of it. One Envoy (2 workers) plays everything else, so that only the gateway's
own work is on the machine's two cores: a Lua filter puts the user named in
`x-bench-user` where `jwt_authn` would put the verified payload, a direct-response
listener is the token service and another the upstream. (With the Python dev servers
on the same cores, minting JWTs and verifying every XML signature, their CPU use
dominated the ratio, whatever the plugin did.)

A control spends the same CPU outside the gateway: the cached users' arrivals plus, per
arrival, a burst of busy CPU as long as a signature on the quiet gateway, in another
process that the kernel schedules preemptively. Whether the hits suffer less from it
than from the plugin's own sliced signing tells whether signing elsewhere (another
thread or process on the same cores) would help.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dev"))

import memory  # noqa: E402
import stack  # noqa: E402

PORTS = stack.Ports(listener=18401, admin=18499, idp=18410, token=18411, echo=18412, onprem=18419, sts=18418)
TOKEN_LISTENER, UPSTREAM_LISTENER = 18421, 18422
ARRIVALS_PER_SECOND = 50
HIT_USER = "hol-cached"
# A burst of busy CPU of argv[1] ms, argv[2] times a second, paced from the start.
BURNER = """
import sys, time
burst, per_second = float(sys.argv[1]) / 1000, float(sys.argv[2])
start, n = time.monotonic(), 0
while True:
    n += 1
    began = time.monotonic()
    while time.monotonic() - began < burst:
        pass
    time.sleep(max(0.0, start + n / per_second - time.monotonic()))
"""


@dataclass(frozen=True)
class Listeners:
    """Where a gateway of this kind listens: the dev servers' ports (only the IdP's
    cluster is named), and Envoy's own token service and upstream."""
    ports: stack.Ports
    token: int
    upstream: int


DEFAULT = Listeners(PORTS, TOKEN_LISTENER, UPSTREAM_LISTENER)


def bootstrap(listeners: Listeners = DEFAULT) -> dict:
    """The gateway: the plugin with an RSA and a P-256 destination (`/rsa/...`, `/ec/...`)."""
    from bench import listener  # noqa: E402

    ports = listeners.ports
    plugin = {
        "allowInsecureTokenService": True,  # the token service is a local listener
        "tokenServiceCluster": "token_service",
        "keys": {"rsa": stack.key_ref("a"), "ec": stack.key_ref("ec")},
        "destinations": [stack.destination(ports, "rsa", KeyStoreLocation="rsa"),
                         stack.destination(ports, "ec", KeyStoreLocation="ec")],
    }
    lua = {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": memory.LUA_USER}}}
    wasm = {"name": "envoy.filters.http.wasm", "typed_config": stack.wasm_filter(plugin)}
    gateway = listener("gateway", ports.listener, [lua, wasm], {})
    routes = [stack.route(f"/{name}", name) for name in ("rsa", "ec")]
    for r in routes:
        r["route"] = {"cluster": "upstream", "timeout": "15s"}
    hcm = gateway["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["routes"] = routes
    token = json.dumps({"access_token": memory.TOKEN, "token_type": "bearer", "expires_in": 3600})
    return {
        "node": {"id": "bench-hol", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.admin}}},
        "static_resources": {
            "listeners": [
                gateway,
                listener("token", listeners.token, [], memory.direct(200, token)),
                listener("upstream", listeners.upstream, [], memory.direct(200, "{}")),
            ],
            "clusters": [stack.cluster("token_service", listeners.token), stack.cluster("upstream", listeners.upstream),
                         stack.cluster("idp", ports.idp), stack.cluster("token_service_down", ports.closed)],
        },
    }


def first_request(path: str, user: str, statuses: list[int], latencies: list[float] | None = None,
                  port: int = PORTS.listener, headers: dict | None = None) -> None:
    """A new user's first request: its status, and its latency in ms into `latencies`."""
    started = time.monotonic()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        connection.request("GET", path, headers={"x-bench-user": user, **(headers or {})})
        statuses.append(connection.getresponse().status)
        connection.close()
    except OSError:
        statuses.append(0)
    if latencies is not None:
        latencies.append((time.monotonic() - started) * 1000)


def measure(rounds: int, seconds: float) -> dict:
    """p99 of cache hits per round: without new users, with new users signed with
    RSA-2048, with new users signed with P-256 (interleaved within each round)."""
    from bench import histogram, wrk  # noqa: E402

    hits = {"x-bench-user": HIT_USER}
    counter = [0]
    statuses: list[int] = []

    first = {"/rsa/x": [], "/ec/x": [], "/ec/cached": []}

    def with_arrivals(path: str, burst_ms: float | None = None) -> float:
        """p99 of the hits while new users arrive on `path` (on `/ec/cached`: users
        whose tokens are cached already, the arrival traffic without a cold path), with
        `burst_ms` of busy CPU per arrival in another process."""
        stop = threading.Event()
        cached = path == "/ec/cached"

        def arrivals():
            start, sent = time.monotonic(), 0
            while not stop.is_set():
                sent += 1
                if cached:
                    user = f"cached-{sent}"
                else:
                    counter[0] += 1
                    user = f"new-{counter[0]}"
                threading.Thread(target=first_request, args=(path, user, statuses, None if burst_ms else first[path]),
                                 daemon=True).start()
                # Paced from the start, so a slow thread start does not lower the rate.
                time.sleep(max(0.0, start + sent / ARRIVALS_PER_SECOND - time.monotonic()))

        burner = None
        if burst_ms:
            burner = subprocess.Popen([sys.executable, "-c", BURNER, f"{burst_ms:.3f}", str(ARRIVALS_PER_SECOND)])
        t = threading.Thread(target=arrivals)
        t.start()
        try:
            return wrk(PORTS.listener, "", seconds, connections=4, latency=True, path="/rsa/hit",
                       headers=hits)["p99_ms"]
        finally:
            stop.set()
            t.join()
            if burner:
                burner.kill()
                burner.wait()

    with stack.Stack("demo", PORTS, name="bench-hol", bootstrap=bootstrap(), concurrency=2):
        for i in range(40):  # warm-up: VMs, both keys; one new user at a time
            first_request("/rsa/x", f"warm-rsa-{i}", statuses)
            first_request("/ec/x", f"warm-ec-{i}", statuses)
        # Signing on a quiet gateway: what a signature costs in Envoy's V8, without the
        # other processes of the rounds below competing for the two cores.
        time.sleep(6)  # Envoy publishes histograms at its stats flush (every 5 s)
        quiet_signing = histogram(PORTS.admin, "wasmcustom.principal_propagation.signing_us")
        quiet_signing_ec = histogram(PORTS.admin, "wasmcustom.principal_propagation.signing_ec_us")
        first_request("/rsa/hit", HIT_USER, statuses)
        for i in range(int(seconds * ARRIVALS_PER_SECOND * 1.2) + 10):  # the cached arrivals' tokens
            first_request("/ec/cached", f"cached-{i + 1}", statuses)
        burst_ms = quiet_signing.get("50", 3000.0) / 1000
        base, cached, burnt, rsa, ec = [], [], [], [], []
        for _ in range(rounds):
            base.append(wrk(PORTS.listener, "", seconds, connections=4, latency=True, path="/rsa/hit",
                            headers=hits)["p99_ms"])
            cached.append(with_arrivals("/ec/cached"))
            burnt.append(with_arrivals("/ec/cached", burst_ms))
            rsa.append(with_arrivals("/rsa/x"))
            ec.append(with_arrivals("/ec/x"))
        time.sleep(2)  # the last first requests
        time.sleep(6)  # Envoy publishes histograms at its stats flush (every 5 s)
        signing = histogram(PORTS.admin, "wasmcustom.principal_propagation.signing_us")
        signing_ec = histogram(PORTS.admin, "wasmcustom.principal_propagation.signing_ec_us")
    errors = sum(1 for s in statuses if s != 200)
    return {"p99_base_ms": base, "p99_cached_ms": cached, "p99_burnt_ms": burnt, "burst_ms": burst_ms,
            "p99_rsa_ms": rsa, "p99_ec_ms": ec, "new_users": counter[0],
            "errors": errors, "signing_us": signing, "signing_ec_us": signing_ec,
            "quiet_signing_us": quiet_signing, "quiet_signing_ec_us": quiet_signing_ec,
            "first_request_ms": {"rsa": percentiles(first["/rsa/x"]), "ec": percentiles(first["/ec/x"]),
                                 "cached": percentiles(first["/ec/cached"])}}


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values) or [float("nan")]
    return {f"P{q}": round(ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))], 1) for q in (50, 95, 99)}


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 5, 3.0), indent=1))
