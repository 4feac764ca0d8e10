"""Memory with many distinct users cached (issue 4, point 3), for `make bench`.

One Envoy (2 workers) runs the plugin with the default cache (`tokenCacheSlots`
100,000) and a P-256 key. Envoy itself plays the identity provider and the token
service, so 100,000 first requests take seconds, not the dev servers' minutes: a Lua
filter puts the user named in `x-bench-user` where `jwt_authn` would put the verified
payload, and a direct-response listener answers every token request with an 800-byte
bearer token (about the size of an XSUAA JWT). The upstream is a direct response too.

Phases of distinct new users follow each other; after each, Envoy's memory is read:
process RSS; tcmalloc's allocated bytes (Envoy's heap, where shared data lives); and
the plugin's `wasm_memory_bytes` gauge, the linear memory of a worker's Wasm VM.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dev"))

import load  # noqa: E402
import stack  # noqa: E402

PORTS = stack.Ports(listener=18301, admin=18399, idp=18310, token=18311, echo=18312, onprem=18319, sts=18318)  # the dev servers'
TOKEN_LISTENER, UPSTREAM_LISTENER = 18321, 18322  # Envoy's stand-ins
TOKEN = "b" * 800
LUA_USER = """
function envoy_on_request(h)
  local user = h:headers():get("x-bench-user")
  if user then
    h:streamInfo():dynamicMetadata():set("envoy.filters.http.jwt_authn", "payload", {user_name = user})
  end
end
"""


def direct(status: int, body: str) -> dict:
    return {"match": {"prefix": "/"}, "direct_response": {"status": status, "body": {"inline_string": body}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}]}


def bootstrap() -> dict:
    from bench import listener  # noqa: E402 (bench.py imports this module lazily too)

    plugin = {
        "allowInsecureTokenService": True,  # the token service is a local listener
        "tokenServiceCluster": "token_service",
        "keys": {"default": stack.key_ref("ec")},
        "destinations": [stack.destination(PORTS, "memory")],
        "defaultDestination": "memory",
    }
    lua = {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": LUA_USER}}}
    wasm = {"name": "envoy.filters.http.wasm", "typed_config": stack.wasm_filter(plugin)}
    token = json.dumps({"access_token": TOKEN, "token_type": "bearer", "expires_in": 3600})
    echo = json.dumps({"user": None})
    return {
        "node": {"id": "bench-memory", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": PORTS.admin}}},
        "static_resources": {
            "listeners": [
                listener("gateway", PORTS.listener, [lua, wasm], {"match": {"prefix": "/"}, "route": {"cluster": "echo"}}),
                listener("token", TOKEN_LISTENER, [], direct(200, token)),
                listener("echo", UPSTREAM_LISTENER, [], direct(200, echo)),
            ],
            "clusters": [stack.cluster("token_service", TOKEN_LISTENER), stack.cluster("echo", UPSTREAM_LISTENER),
                         stack.cluster("idp", PORTS.idp), stack.cluster("token_service_down", PORTS.closed)],
        },
    }


def gauge(name: str) -> int:
    return gauge_of(PORTS.admin, name)


def gauge_of(admin: int, name: str) -> int:
    """A stat's value from Envoy's admin port (0 if it has none yet)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter={name}$", timeout=10) as r:
        line = r.read().decode().strip()
    return int(line.rsplit(": ", 1)[1]) if line else 0


def memory_mib(gateway: stack.Stack) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{PORTS.admin}/memory", timeout=10) as r:
        memory = json.loads(r.read())
    rss = next(int(l.split()[1]) for l in Path(f"/proc/{gateway.envoy.pid}/status").read_text().splitlines()
               if l.startswith("VmRSS:")) / 1024
    time.sleep(1.5)  # the plugin reports its VM's memory every second
    return {"rss_mib": round(rss, 1), "allocated_mib": round(int(memory["allocated"]) / 2**20, 1),
            "wasm_mib": round(gauge("wasmcustom.principal_propagation.wasm_memory_bytes") / 2**20, 1)}


async def _send(users: range, connections: int):
    import asyncio

    async def one(share):
        reader, writer = await asyncio.open_connection("127.0.0.1", PORTS.listener)
        errors = 0
        try:
            for n in share:
                status, _ = await load.get(reader, writer, "/", {"x-bench-user": f"mem-{n}"})
                errors += status != 200
        finally:
            writer.close()
        return errors

    return sum(await asyncio.gather(*[one(users[i::connections]) for i in range(connections)]))


def measure(phases: list[int], connections: int = 32) -> dict:
    """Memory before and after each phase; `phases` holds each phase's number of new users."""
    import asyncio

    with stack.Stack("demo", PORTS, name="bench-memory", bootstrap=bootstrap(), concurrency=2) as gateway:
        asyncio.run(_send(range(-1000, 0), connections))  # warm-up: VMs, connections, first growth
        rows = [{"users": 0, **memory_mib(gateway), "seconds": 0.0, "errors": 0}]
        sent = 0
        for new_users in phases:
            start = time.monotonic()
            errors = asyncio.run(_send(range(sent, sent + new_users), connections))
            sent += new_users
            rows.append({"users": sent, **memory_mib(gateway), "seconds": round(time.monotonic() - start, 1),
                         "errors": errors})
            print(f"memory: {rows[-1]}", flush=True)
        time.sleep(1.5)  # workers report their counters once a second
        exchanges = gauge("wasmcustom.principal_propagation.token_exchange.ok")  # a counter, read alike
        collisions = gauge("wasmcustom.principal_propagation.lock_collision")
    return {"rows": rows, "exchanges": exchanges, "lock_collisions": collisions, "token_bytes": len(TOKEN),
            "slots": 100_000}


if __name__ == "__main__":
    print(json.dumps(measure([int(a) for a in sys.argv[1:]] or [100_000, 50_000]), indent=1))
