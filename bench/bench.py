"""`make bench`: measures the plugin against its peers and writes BENCHMARKS.md.

Method (brief, section 8): the machine is shared and noisy, so variants are compared,
not quoted: they run side by side in one Envoy process (one listener each), rounds are
interleaved (every round runs every variant, in a rotating order and back), repeated, and each
ratio is reported as the median over rounds with its spread (min–max). Cost is Envoy's
CPU time per request (utime + stime of its worker thread / requests served), which is
steadier than requests per second. Envoy runs pinned to one core and wrk drives the load
from the other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dev"))

import stack  # noqa: E402

MINIMAL_WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "examples" / "minimal_filter.wasm"
CLK_TCK = os.sysconf("SC_CLK_TCK")
UPSTREAM_PORT = 18100
VARIANT_PORTS = {"plain": 18010, "minimal_wasm": 18011, "credential_injector": 18012, "lua": 18013,
                 "jwt_only": 18014, "jwt_minimal": 18017, "jwt_minimal_identity": 18016, "principal_propagation": 18015}
# The minimal filter behind `jwt_authn`, without and with one host call repeated (see
# `MINIMAL_PROBE` in examples/minimal_filter.rs): what each call of a cache hit costs.
PROBE_CALLS = ("metadata", "payload", "route", "header", "headers", "clock", "metric", "shared_data")
PROBE_REPEAT = 50  # examples/minimal_filter.rs
PROBE_PORTS = {"probe_none": 18040, **{f"probe_{call}": 18041 + i for i, call in enumerate(PROBE_CALLS)}}
# Filters behind `jwt_authn`, each STACK_COPIES times in one chain: what one more instance
# costs once the request's first Wasm filter has paid the runtime's fixed cost.
STACK_COPIES = 10
STACKED = {"stacked_minimal": "jwt_minimal", "stacked_minimal_identity": "jwt_minimal_identity",
           "stacked_plugin": "principal_propagation"}
STACK_PORTS = {"jwt_only": VARIANT_PORTS["jwt_only"], **{name: 18050 + i for i, name in enumerate(STACKED)}}
# Filters whose cost is what they add to `jwt_only` (a peer's is what it adds to `plain`).
BEHIND_JWT = ("jwt_minimal", "jwt_minimal_identity", "principal_propagation")
# bench/hit_host.mjs with cold caches: bytes written over between two requests (the L2
# cache of this machine's cores is 512 KiB).
COLD_BYTES = 1 << 20
BENCH_PORTS = stack.Ports(listener=18001, admin=18099, idp=18200, token=18210, echo=18220, onprem=18229, sts=18228)


def router() -> dict:
    return {"name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def listener(name: str, port: int, filters: list[dict], route: dict) -> dict:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
                "http_filters": filters + [router()],
            },
        }]}],
    }


def jwt_filter(ports: stack.Ports) -> dict:
    """The demo's `jwt_authn`, with its cache of verified JWTs (see the README): without
    it every request verifies the JWT's RS256 signature anew, which made `jwt_only` cost
    about 70 µs over `plain` (20–35 µs with it), and its noise swamped the filters behind it."""
    config = stack.envoy_config(ports, "demo", config_override={})
    chain = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    jwt = chain["typed_config"]["http_filters"][0]
    for provider in jwt["typed_config"]["providers"].values():
        provider["jwt_cache_config"] = {"jwt_cache_size": 100}
    return jwt


def bootstrap(ports: stack.Ports) -> dict:
    to_upstream = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
    plugin = stack.plugin_config(ports, "demo")
    minimal = stack.wasm_filter({})
    minimal["config"]["name"] = minimal["config"]["root_id"] = "minimal"
    minimal["config"]["vm_config"]["vm_id"] = "minimal"
    minimal["config"]["vm_config"]["code"]["local"]["filename"] = str(MINIMAL_WASM)
    identity = json.loads(json.dumps(minimal))
    identity["config"]["name"] = identity["config"]["root_id"] = identity["config"]["vm_config"]["vm_id"] = \
        "minimal_identity"
    identity["config"]["vm_config"]["environment_variables"] = {"key_values": {"MINIMAL_READ_IDENTITY": "1"}}
    variants = {
        "plain": [],
        "minimal_wasm": [{"name": "envoy.filters.http.wasm", "typed_config": minimal}],
        "credential_injector": [{
            "name": "envoy.filters.http.credential_injector",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
                "overwrite": True,
                "credential": {
                    "name": "envoy.http.injected_credentials.generic",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic",
                        "credential": {"name": "bench-credential"},
                    },
                },
            },
        }],
        "lua": [{
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string":
                    "function envoy_on_request(h) h:headers():replace('x-bench', 'lua') end"},
            },
        }],
        "jwt_only": [jwt_filter(ports)],
        "jwt_minimal": [jwt_filter(ports), {"name": "envoy.filters.http.wasm", "typed_config": minimal}],
        "jwt_minimal_identity": [jwt_filter(ports), {"name": "envoy.filters.http.wasm", "typed_config": identity}],
        "principal_propagation": [jwt_filter(ports),
                                  {"name": "envoy.filters.http.wasm", "typed_config": stack.wasm_filter(plugin)}],
    }
    for call in ("none",) + PROBE_CALLS:
        probe = json.loads(json.dumps(minimal))
        probe["config"]["name"] = probe["config"]["root_id"] = probe["config"]["vm_config"]["vm_id"] = f"probe_{call}"
        probe["config"]["vm_config"]["environment_variables"] = {"key_values": {"MINIMAL_PROBE": call}}
        variants[f"probe_{call}"] = [jwt_filter(ports), {"name": "envoy.filters.http.wasm", "typed_config": probe}]
    for name, single in STACKED.items():
        jwt, wasm = variants[single]
        variants[name] = [jwt] + [json.loads(json.dumps(wasm)) for _ in range(STACK_COPIES)]
    listener_ports = {**VARIANT_PORTS, **PROBE_PORTS, **STACK_PORTS}
    listeners = [listener(name, listener_ports[name], filters, to_upstream) for name, filters in variants.items()]
    listeners.append(listener("upstream", UPSTREAM_PORT, [], {
        "match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}))
    return {
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.admin}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": [stack.cluster("upstream", UPSTREAM_PORT), stack.cluster("idp", ports.idp),
                         stack.cluster("token_service", ports.token), stack.cluster("token_service_down", ports.closed),
                         stack.cluster("echo", ports.echo)],
            "secrets": [{"name": "bench-credential",
                         "generic_secret": {"secret": {"inline_string": "Bearer static-token"}}}],
        },
    }


def envoy_cpu_seconds(pid: int) -> float:
    """CPU time of Envoy's worker threads (`wrk:worker_N`), which serve the requests; the
    main thread's periodic work (stats flushes) would only add noise."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        if not (task / "comm").read_text().startswith("wrk:worker"):
            continue
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    if not total:
        raise RuntimeError("no Envoy worker thread found")
    return total / CLK_TCK


def wrk(port: int, jwt: str, seconds: float, connections: int = 8, latency: bool = False, path: str = "/",
        headers: dict[str, str] | None = None, pinned: bool = False) -> dict:
    """wrk's figures for requests with `jwt` (or with `headers` instead)."""
    script = ROOT / ".run" / "bench" / "auth.lua"
    script.parent.mkdir(parents=True, exist_ok=True)
    headers = headers or {"Authorization": f"Bearer {jwt}", "x-user": "bench"}
    script.write_text("".join(f'wrk.headers["{name}"] = "{value}"\n' for name, value in headers.items()))
    args = [*(["taskset", "-c", "1"] if pinned else []), "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script)]
    if latency:
        args.append("--latency")
    out = subprocess.run(args + [f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result = {"requests": requests, "errors": int(non_2xx.group(1)) if non_2xx else 0}
    if latency:
        p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
        result["p99_ms"] = float(p99.group(1)) * scale
    return result


def summary(values: list[float]) -> str:
    if not values:  # e.g. a ratio to a peer whose added CPU was within the noise in every round
        return "n/a (no round with a positive denominator)"
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def cpu_per_request(gateway: stack.Stack, jwt: str, rounds: int, seconds: float,
                    ports: dict[str, int] = VARIANT_PORTS) -> dict[str, list[float]]:
    """µs of Envoy CPU per request for every variant in `ports`, per round. A round runs the
    variants in a rotating order and then in the reverse order, `seconds / 2` each time (A B
    C C B A), so that a drift of the machine's speed within the round weighs on all alike.
    wrk takes whole seconds: `seconds` should be even."""
    names = list(ports)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    pid = gateway.envoy.pid
    # Envoy (every thread) on one core, wrk on the other: see PINNED.
    subprocess.run(["taskset", "-a", "-p", "-c", "0", str(pid)], check=True, capture_output=True)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        spent = {name: 0.0 for name in names}
        served = {name: 0 for name in names}
        for name in order + order[::-1]:
            before = envoy_cpu_seconds(pid)
            result = wrk(ports[name], jwt, max(1, round(seconds / 2)), pinned=True)
            spent[name] += envoy_cpu_seconds(pid) - before
            served[name] += result["requests"]
            if result["errors"]:
                raise RuntimeError(f"{name}: {result['errors']} failed requests")
        for name in names:
            per_round[name].append(spent[name] / served[name] * 1e6)
    return per_round


def histogram(admin: int, name: str) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter={name}", timeout=5).read().decode()
    line = next((l for l in body.splitlines() if l.startswith(name + ":")), "")
    # "P0(interval,cumulative) P25(...)": take the cumulative value of each quantile.
    return {q: float(c) for q, c in re.findall(r"P([\d.]+)\([^,]*,([\d.e+-]+)\)", line) if c != "nan"}


def wake_up(crowds: int = 10) -> dict:
    """With 2 workers: the delay from one worker storing an exchange's result to requests
    waiting for it on the other worker picking it up."""
    ports = stack.Ports().shifted(16000)  # 26000.. below the ephemeral range
    with stack.Stack("test", ports, name="bench-workers"):
        sys.path.insert(0, str(ROOT / "tests" / "e2e"))
        from conftest import Client  # noqa: E402
        from test_single_flight import concurrent_first_requests  # noqa: E402

        client = Client(ports)
        for i in range(crowds):
            responses = concurrent_first_requests(client, "/t/lagging/x", client.jwt(f"wake-{i}"), 50)
            assert all(r.status_code == 200 for r in responses)
        time.sleep(6)  # Envoy publishes histograms at its stats flush (every 5 s)
        return histogram(ports.admin, "wasmcustom.principal_propagation.wake_us")


def openssl_rsa2048_sign_ms(seconds: int = 2) -> float:
    out = subprocess.run([*PINNED, "openssl", "speed", "-seconds", str(seconds), "rsa2048"],
                         capture_output=True, text=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("rsa 2048") or l.startswith("rsa  2048"))
    return float(line.split()[3].rstrip("s")) * 1000  # "rsa 2048 bits 0.000xs ..."


# Single-threaded measurements run pinned to one core. Unpinned on this VM, a process
# whose helper threads (Node's, V8's) wake on the other core runs by fits 1.5-2x slower,
# OpenSSL and V8 alike; pinned, both are steady (seen: RSA in V8 2.75 ms pinned to either
# core, 2.8-5.7 ms unpinned).
PINNED = ["taskset", "-c", "0"]


def node_example(example: str, *args: str) -> str:
    """Output of an example built for wasm32-wasip1, run in Node's V8 (bench/sign_v8.mjs)."""
    return subprocess.run([*PINNED, "node", str(ROOT / "bench" / "sign_v8.mjs"), *args], env={**os.environ, "EXAMPLE": example},
                          capture_output=True, text=True, check=True).stdout


def signing_rounds(rounds: int) -> dict[str, list[float]]:
    """Signing in V8 (Node, examples/sign_bench.rs: the plugin's signers and the crates'
    own) and `openssl speed rsa2048`, alternating, ms per signature per round. Each Node
    run signs two rounds and keeps the second: the first one is compiled up meanwhile."""
    per_round: dict[str, list[float]] = {"openssl rsa2048": []}
    for _ in range(rounds):
        for line in node_example("sign_bench", "2", "30").splitlines():
            found = re.match(r"(.+?)\s+round 1: median (\d+) us", line)
            if found:
                per_round.setdefault(found.group(1), []).append(int(found.group(2)) / 1000)
        per_round["openssl rsa2048"].append(openssl_rsa2048_sign_ms(seconds=1))
    return per_round


def memory_verdict(mem: dict) -> str:
    """Growth per phase, against the slot table's expected occupancy: with S slots and
    n users hashed uniformly, S(1 − e^(−n/S)) slots are in use."""
    rows = mem["rows"]
    used = [mem["slots"] * (1 - math.exp(-r["users"] / mem["slots"])) for r in rows]
    parts = []
    for i in range(1, len(rows)):
        grew = rows[i]["allocated_mib"] - rows[i - 1]["allocated_mib"]
        new_slots = used[i] - used[i - 1]
        per_slot = grew * 2**20 / new_slots if new_slots > 0 else float("nan")
        parts.append(f"phase {i}: +{grew:.1f} MiB allocated for ~{new_slots:,.0f} newly used slots "
                     f"(~{per_slot:,.0f} bytes per slot)")
    return ("Heap growth follows slot occupancy, not users: " + "; ".join(parts) + f". The bound is the cap: "
            f"{mem['slots']:,} slots × the per-slot size above.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--memory-users", type=int, default=100_000)
    parser.add_argument("--memory-churn", type=int, default=25_000, help="new users after the first ones")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("at least 5 rounds")

    print("cache-hit CPU per request (1 worker, one listener per variant)...", flush=True)
    with stack.Stack("demo", BENCH_PORTS, name="bench", bootstrap=bootstrap(BENCH_PORTS), concurrency=1) as gateway:
        sys.path.insert(0, str(ROOT / "tests" / "e2e"))
        from conftest import Client  # noqa: E402
        jwt = Client(BENCH_PORTS).jwt("bench-user")
        warm = wrk(VARIANT_PORTS["principal_propagation"], jwt, 1)  # one exchange, then cache hits
        assert warm["errors"] == 0 and warm["requests"] > 0
        cpu = cpu_per_request(gateway, jwt, args.rounds, args.seconds)
        print("host calls, one at a time (same Envoy)...", flush=True)
        for port in PROBE_PORTS.values():
            assert wrk(port, jwt, 1)["errors"] == 0
        probes = cpu_per_request(gateway, jwt, args.rounds, 2, PROBE_PORTS)
        print(f"filters stacked {STACK_COPIES} deep (same Envoy)...", flush=True)
        for port in STACK_PORTS.values():
            assert wrk(port, jwt, 1)["errors"] == 0
        stacked = cpu_per_request(gateway, jwt, args.rounds, 2, STACK_PORTS)
    print("wake-up delay (2 workers)...", flush=True)
    wake = wake_up()
    print("head-of-line blocking (2 workers)...", flush=True)
    import head_of_line  # noqa: E402
    workers = head_of_line.measure(args.rounds, args.seconds)
    print("a flood of new users (1 worker)...", flush=True)
    import flood  # noqa: E402
    flooding = flood.measure(args.rounds)
    print("a new user's first request, X.509 against SAML (1 worker)...", flush=True)
    import first_request  # noqa: E402
    first = first_request.measure(args.rounds)
    print("the find-destination API against a proxied request, both at cache hit (1 worker)...", flush=True)
    import destination_api  # noqa: E402
    api = destination_api.measure(args.rounds, args.seconds)
    print(f"memory with {args.memory_users} distinct users, then {args.memory_churn} more (2 workers)...", flush=True)
    import memory  # noqa: E402
    mem = memory.measure([args.memory_users, args.memory_churn])
    print("signing in V8 (Node) and OpenSSL, alternating...", flush=True)
    signing_v8 = signing_rounds(args.rounds)
    openssl_ms = statistics.median(signing_v8["openssl rsa2048"])
    print("a cache hit's own work in V8 (Node)...", flush=True)
    hit_steps = node_example("hit_bench").strip()
    print("a cache hit's whole Wasm side in V8 (Node, an in-memory host)...", flush=True)

    def hit_host(rounds: int, cold_bytes: int) -> str:
        return subprocess.run(["taskset", "-c", "1", "node", "--no-warnings", str(ROOT / "bench" / "hit_host.mjs"),
                               str(rounds)], capture_output=True, text=True, check=True,
                              env={**os.environ, "COLD_BYTES": str(cold_bytes)}).stdout.strip()
    hit_wasm = hit_host(args.rounds, 0)
    hit_wasm_cold = hit_host(3 * args.rounds, COLD_BYTES)

    rounds = range(args.rounds)
    host_calls = {call: [(probes[f"probe_{call}"][r] - probes["probe_none"][r]) / PROBE_REPEAT for r in rounds]
                  for call in PROBE_CALLS}
    added = {name: [cpu[name][r] - cpu["plain"][r] for r in rounds] for name in cpu if name != "plain"}
    # Filters behind jwt_authn: their own cost is what they add to `jwt_only`.
    for name in BEHIND_JWT:
        added[name] = [cpu[name][r] - cpu["jwt_only"][r] for r in rounds]
    ours = added["principal_propagation"]
    ratio = {peer: [ours[r] / added[peer][r] for r in rounds if added[peer][r] > 0]
             for peer in ("minimal_wasm", "jwt_minimal", "jwt_minimal_identity", "credential_injector", "lua")}
    per_copy = {name: [(stacked[name][r] - stacked["jwt_only"][r]) / STACK_COPIES for r in rounds] for name in STACKED}
    stacked_ratio = {peer: [per_copy["stacked_plugin"][r] / per_copy[peer][r] for r in rounds if per_copy[peer][r] > 0]
                     for peer in ("stacked_minimal", "stacked_minimal_identity")}
    hol = [workers["p99_rsa_ms"][r] / workers["p99_base_ms"][r] for r in rounds]
    hol_ec = [workers["p99_ec_ms"][r] / workers["p99_base_ms"][r] for r in rounds]
    hol_cached = [workers["p99_cached_ms"][r] / workers["p99_base_ms"][r] for r in rounds]
    hol_burnt = [workers["p99_burnt_ms"][r] / workers["p99_base_ms"][r] for r in rounds]
    signing_ms = workers["quiet_signing_us"].get("50", float("nan")) / 1000
    signing_ec_ms = workers["quiet_signing_ec_us"].get("50", float("nan")) / 1000

    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{args.rounds} interleaved rounds of {args.seconds:g} s per variant.",
        "",
        "## Method",
        "",
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        "Variants (one listener each, same Envoy, 1 worker, upstream = a direct-response listener of the same "
        "Envoy): `plain` (router only), `minimal_wasm` (proxy-wasm filter reading one header and one shared-data "
        "key holding an 800-byte token and setting a header to it, `examples/minimal_filter.rs`), `credential_injector` (native, one static "
        "credential), `lua` (sets a header), `jwt_only` (`jwt_authn`, with its cache of verified JWTs), "
        "`principal_propagation` (`jwt_authn` + this plugin, every request a cache hit), `jwt_minimal` "
        "(`jwt_authn` + the minimal filter: the reference in the plugin's place, on the same requests), "
        "`jwt_minimal_identity` (`jwt_authn` + the minimal filter "
        "also reading the two properties the plugin reads on every cache hit: the verified JWT payload from the "
        "request's dynamic metadata, where `jwt_authn` put it (the plugin takes the user id, issuer and origin "
        "from it), and the route's metadata). The cost of a filter behind `jwt_authn` "
        "is `variant − jwt_only`; a peer's is `peer − plain`.",
        "",
        "## CPU per request (µs, median and min–max over rounds)",
        "",
        "| variant | CPU per request | added CPU |",
        "| --- | --- | --- |",
    ]
    for name in VARIANT_PORTS:
        extra = summary(added[name]) if name in added else "—"
        if name in BEHIND_JWT:
            extra += " (over `jwt_only`)"
        lines.append(f"| {name} | {summary(cpu[name])} | {extra} |")
    lines += [
        "",
        "## Ratios",
        "",
        "| ratio | median (min–max) | goal |",
        "| --- | --- | --- |",
        f"| plugin added CPU / minimal proxy-wasm filter added CPU | {summary(ratio['minimal_wasm'])} | ≤ 1.2 |",
        f"| the same, the minimal filter in the plugin's place (behind `jwt_authn`, same requests) | {summary(ratio['jwt_minimal'])} | ≤ 1.2 |",
        f"| plugin added CPU / the minimal filter's when it also reads the verified payload and the route's metadata (both behind `jwt_authn`) | {summary(ratio['jwt_minimal_identity'])} | — |",
        f"| plugin added CPU / credential_injector added CPU | {summary(ratio['credential_injector'])} | — |",
        f"| plugin added CPU / Lua added CPU | {summary(ratio['lua'])} | — |",
        f"| cache-hit p99 with 50 new users/s / without (2 workers; new users signed with RSA-2048) | {summary(hol)} | ≤ 1.5 |",
        f"| the same, new users signed with ECDSA P-256 | {summary(hol_ec)} | ≤ 1.5 |",
        f"| the same, the 50 arrivals/s being users with cached tokens (the arrival traffic alone, no cold path) | {summary(hol_cached)} | — |",
        f"| control: cached users' arrivals plus {workers['burst_ms']:.1f} ms of busy CPU per arrival in another process (a signature's CPU, spent off the gateway's threads) | {summary(hol_burnt)} | — |",
        "",
        "A ratio to a peer leaves out the rounds in which that peer's added CPU was not above zero (within "
        "the noise of plain proxying): " + ", ".join(f"{peer} {len(ratio[peer])} of {args.rounds} rounds counted"
                                                     for peer in ratio) + ".",
        "",
        "## What a cache hit's host calls cost in Envoy",
        "",
        f"The minimal filter behind `jwt_authn`, once as is and once per host call with that call repeated "
        f"{PROBE_REPEAT} times per request (`MINIMAL_PROBE`), in the same Envoy after the rounds above "
        f"({args.rounds} rounds of 2 s per variant, A B C C B A): µs of Envoy CPU per call = (with − without) / "
        f"{PROBE_REPEAT}. Repeated calls run warm, so a single call in a request may cost somewhat more. Per hit "
        "the plugin reads the `payload` and the `route` and the `clock`, all request `headers` at once (the "
        "inbound credentials it removes), sets a header, and reads the response's `:status` (a `header` of the "
        "response: a token the backend refuses is dropped); the token comes from the worker's own copy (no "
        "`shared_data` read, no hashing), and the hit counter is added up in Wasm and reported once a second "
        "(no `metric` call per hit). Only an exchange reads the whole `metadata` and decodes it in Wasm "
        "(see the steps in V8 below).",
        "",
        "| host call | µs per call, median (min–max) |",
        "| --- | --- |",
        *[f"| {call} | {summary(host_calls[call])} |" for call in PROBE_CALLS],
        "",
        f"## One more filter instance ({STACK_COPIES} deep)",
        "",
        f"A single Wasm filter's added CPU is mostly a fixed cost per request that more instances on the same "
        f"request do not pay again: here the minimal filter adds {statistics.median(added['jwt_minimal']):.1f} µs "
        f"alone but {statistics.median(per_copy['stacked_minimal']):.1f} µs per copy in a stack (likely the first "
        f"crossing into V8 on a request finding code and data cold in the CPU's caches). To see what the filters "
        f"themselves do, each is stacked {STACK_COPIES} times behind `jwt_authn` in one chain (the plugin's copies all hit the "
        f"cache; the last one's header stands), in the same Envoy after the rounds above ({args.rounds} rounds "
        f"of 2 s per variant, A B C C B A): µs per copy = (stack − `jwt_only`) / {STACK_COPIES}. Copies after "
        "the first run warm, so this leaves out the fixed cost and any cold-cache cost of a larger module.",
        "",
        "| filter | µs per copy, median (min–max) |",
        "| --- | --- |",
        *[f"| {STACKED[name]} | {summary(per_copy[name])} |" for name in STACKED],
        f"| plugin / minimal filter, per copy | {summary(stacked_ratio['stacked_minimal'])} |",
        f"| plugin / minimal filter reading the payload and the route, per copy | "
        f"{summary(stacked_ratio['stacked_minimal_identity'])} |",
        "",
        "## A cache hit's whole Wasm side in V8",
        "",
        "`bench/hit_host.mjs` runs each request's callbacks (context create, request headers, response "
        "headers, done, log, delete) in Node against an in-memory proxy-wasm host, alternating the modules, "
        "pinned to one core. Its host calls are JavaScript lookups, far cheaper than Envoy's, so this is "
        "what each module does per request: the SDK's dispatch, its own code and the crossings. Warm, "
        f"{args.rounds} rounds of 20,000 requests per module:",
        "",
        "```",
        hit_wasm,
        "```",
        "",
        f"Cold: {3 * args.rounds} rounds of 2,000 requests per module, {COLD_BYTES >> 10} KiB written over "
        "between two requests (more than a core's L2 cache, as Envoy's own work between two Wasm calls "
        "does), only the request timed. Whether the plugin's larger module (about 780 KB against 110 KB) "
        "costs more per request when its code and data are not in the cache:",
        "",
        "```",
        hit_wasm_cold,
        "```",
        "",
        "## Cross-worker exchange and signing (2 workers)",
        "",
        "Wake-up delay: from the result of an exchange being stored by one worker to a request waiting on "
        "another worker picking it up (histogram `wake_us`, 10 crowds of 50 concurrent first requests).",
        "",
        "| measure | P50 | P95 | P99 |",
        "| --- | --- | --- | --- |",
        "| wake-up delay (µs) | " + " | ".join(f"{wake.get(q, float('nan')):.0f}" for q in ("50", "95", "99")) + " |",
        *[f"| assertion build + {alg} signing in V8, time over all slices, {when} (µs) | "
          + " | ".join(f"{workers[key].get(q, float('nan')):.0f}" for q in ("50", "95", "99")) + " |"
          for alg, when, key in (("RSA-2048", "quiet gateway (40 new users, one at a time)", "quiet_signing_us"),
                                 ("ECDSA P-256", "quiet gateway", "quiet_signing_ec_us"),
                                 ("RSA-2048", "all, most during the head-of-line rounds (both cores busy)", "signing_us"),
                                 ("ECDSA P-256", "all, most during the rounds", "signing_ec_us"))],
        "",
        f"RSA-2048 signing (quiet gateway): plugin in Envoy's V8 P50 {signing_ms:.2f} ms; `openssl speed rsa2048` "
        f"on this machine {openssl_ms:.3f} ms (median of the rounds below); ratio {signing_ms / openssl_ms:.1f}×. "
        f"ECDSA P-256 in Envoy's V8: P50 {signing_ec_ms:.2f} ms ({signing_ec_ms / openssl_ms:.1f}× OpenSSL's RSA-2048). "
        "These include building the assertion and the slicing, and a quiet 2-core VM still varies by tens of "
        "percent from minute to minute; the signature alone, alternating with OpenSSL:",
        "",
        "## Signing in V8 against OpenSSL (alternating rounds)",
        "",
        "Each round: Node runs `examples/sign_bench.rs` (30 signatures per signer, the median kept), then "
        "`openssl speed -seconds 1 rsa2048` runs natively, both pinned to one core (`taskset`; unpinned, "
        "this VM runs single-threaded work by fits 1.5–2× slower, see `PINNED` in `bench/bench.py`). "
        "Node's V8 is the engine Envoy embeds.",
        "",
        "| signer | ms per signature, median (min–max) over rounds | / OpenSSL RSA-2048 in the same round |",
        "| --- | --- | --- |",
        *[f"| {name} | {summary(times)} | "
          + summary([t / o for t, o in zip(times, signing_v8['openssl rsa2048'])]) + " |"
          for name, times in signing_v8.items() if name != "openssl rsa2048"],
        f"| `openssl speed rsa2048` (native) | {summary(signing_v8['openssl rsa2048'])} | 1 |",
        "",
        "Goal for the plugin's RSA-2048 (`plugin CRT`) in V8: at most 3 ms; the `rsa` crate as is is the "
        "reference it replaces.",
        "",
        "## A cache hit's own work in V8",
        "",
        "`examples/hit_bench.rs` in Node times the host-independent steps of a hit (median µs over 5 rounds "
        "of 2,000). Per hit the plugin reads the verified payload from the request's dynamic metadata and the "
        "route's metadata (what `jwt_minimal_identity` adds to the minimal filter) and the clock, takes the "
        "principal from the payload's raw root claims, finds the token in the worker's copy and sets the "
        "header (the `hit:` steps below); the `shared:` steps are "
        "what a hit from shared data (a worker without a copy) does instead. Only an exchange (a miss or a refresh) reads the whole metadata "
        "and decodes every claim with its type, for the assertion's attributes (the `miss:` steps).",
        "",
        "```",
        hit_steps,
        "```",
        "",
        "## Head-of-line blocking (2 workers)",
        "",
        head_of_line.__doc__.split("\n\n", 1)[1].strip(),
        "",
        f"Cache-hit p99 (ms): without new users {summary(workers['p99_base_ms'])}; with 50 arrivals/s of "
        f"cached users {summary(workers['p99_cached_ms'])}, the same with busy CPU in another process "
        f"{summary(workers['p99_burnt_ms'])}; of new users signed with RSA-2048 "
        f"{summary(workers['p99_rsa_ms'])}, with P-256 {summary(workers['p99_ec_ms'])} "
        f"({workers['new_users']} new users, {workers['errors']} errors).",
        "",
        "A new user's first request (ms; the token service answers at once, so this is mostly signing "
        "and waiting to sign):",
        "",
        "| arrivals | P50 | P95 | P99 |",
        "| --- | --- | --- | --- |",
        *[f"| {name} | " + " | ".join(f"{workers['first_request_ms'][key][q]:.1f}" for q in ("P50", "P95", "P99")) + " |"
          for name, key in (("cached users", "cached"), ("new users, RSA-2048", "rsa"), ("new users, P-256", "ec"))],
        "",
        "Signatures are computed in slices of 250 µs, one per millisecond tick, and in steps of "
        "four windows (20–40 µs) done by each request the worker serves meanwhile, so a hit waits at most one slice or does one "
        "step; slices grow when the worker is idle or a signature has waited 250 ms, within the worker's signing "
        "share (see `src/flow/scheduler.rs`). "
        "P-256 signatures are computed the same way (64 steps). The arrivals of cached users show "
        "the cost of the arrival traffic alone; beyond it, the new users' signatures take CPU from the hits "
        "(50 RSA-2048 signatures a second are a sixth to a quarter of a core on this 2-core machine, where the "
        "hits already keep both workers busy). The control spends that CPU in another process instead, "
        "scheduled by the kernel: "
        + (f"it holds up the hits more than the plugin's own slices do (p99 ratio {statistics.median(hol_burnt):.2f} "
           f"against {statistics.median(hol):.2f}), so signing on another thread or process of the same cores "
           "would not help; fewer CPU-seconds per signature (P-256) or more cores do."
           if statistics.median(hol_burnt) > statistics.median(hol) else
           f"in this run it held up the hits less than the plugin's own slices (p99 ratio "
           f"{statistics.median(hol_burnt):.2f} against {statistics.median(hol):.2f})."),
        "",
        "## A flood of new users (1 worker)",
        "",
        flood.__doc__.split("\n\n", 1)[1].strip(),
        "",
        f"{args.rounds} rounds of {flooding['seconds']:g} s per window; {flooding['new_users']} new users in all "
        f"({flood.NEW_USERS_PER_SECOND} a second).",
        "",
        "| measure | median (min–max) |",
        "| --- | --- |",
        f"| cached user's p99 without new users (ms) | {summary(flooding['p99_quiet_ms'])} |",
        f"| the same during the flood (ms) | {summary(flooding['p99_flood_ms'])} |",
        f"| the same during the control flood (404s, no exchange) (ms) | {summary(flooding['p99_control_ms'])} |",
        f"| p99 ratio flood / without | {summary([f / q for f, q in zip(flooding['p99_flood_ms'], flooding['p99_quiet_ms'])])} |",
        f"| p99 ratio control / without | {summary([c / q for c, q in zip(flooding['p99_control_ms'], flooding['p99_quiet_ms'])])} |",
        "",
        f"Errors among the cached user's requests: {flooding['hit_errors']}. New users' answers: "
        + ", ".join(f"{status}: {n}" for status, n in flooding["new_user_answers"].items())
        + f". The plugin's counters over the rounds: "
        + ", ".join(f"`{name}` {n}" for name, n in flooding["counters"].items())
        + f". Wasm memory of the worker's VM: {flooding['wasm_mib_before']} MiB before the first flood, "
        + ", ".join(f"{m} MiB" for m in flooding["wasm_mib_after_each_flood"]) + " after each.",
        "",
        "## The find-destination API against a proxied request, both at cache hit",
        "",
        destination_api.__doc__.split("\n\n", 1)[1].strip(),
        "",
        f"{api['rounds']} rounds, {api['calls']} calls in all, 0 errors; token exchanges for the user over the "
        f"whole run: {api['exchanges']} (the one before the rounds).",
        "",
        "| | proxied | API | ratio API / proxied |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {label} | {summary(api['variants']['proxied'][q])} | {summary(api['variants']['api'][q])} | "
          f"{summary(api['ratio_api_to_proxied'][q])} |"
          for q, label in (("cpu_us", "Envoy CPU per call (µs)"), ("p50_ms", "latency P50 (ms)"),
                           ("p99_ms", "latency P99 (ms)"))],
        "",
        "## A new user's first request: X.509 client certificate against SAML bearer",
        "",
        first_request.__doc__.split("\n\n", 1)[1].strip(),
        "",
        f"{args.rounds} rounds, {first['new_users_per_round_and_flow']} new users per flow and round (two batches "
        f"of {first['users_per_batch']}), {first['new_users']} new users in all; answers "
        + ", ".join(f"{status}: {n}" for status, n in first["answers"].items())
        + f" ({first['errors']} errors); credentials issued meanwhile (`token_exchange.ok`, which counts "
        f"certificates too): {first['credentials_issued']}. Before the rounds, one new user per flow through the "
        "dev echo server showed what reaches the upstream: "
        + "; ".join(f"`{flow}` {what}" for flow, what in first["checked"].items())
        + " (each certificate verified against its CA).",
        "",
        "Median (min–max) over rounds; a ratio is X.509 / SAML within each round:",
        "",
        "| algorithm | SAML latency P50 (ms) | X.509 latency P50 (ms) | ratio | SAML CPU per new user (ms) "
        "| X.509 CPU per new user (ms) | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {label} | {summary(first['p50_ms'][f'saml-{alg}'])} | {summary(first['p50_ms'][f'x509-{alg}'])} | "
          f"{summary(first['ratio_x509_to_saml'][alg]['p50'])} | {summary(first['cpu_ms_per_user'][f'saml-{alg}'])} | "
          f"{summary(first['cpu_ms_per_user'][f'x509-{alg}'])} | {summary(first['ratio_x509_to_saml'][alg]['cpu'])} |"
          for alg, label in first_request.ALGORITHMS.items()],
        "",
        "| algorithm | SAML latency P95 (ms) | X.509 latency P95 (ms) | ratio |",
        "| --- | --- | --- | --- |",
        *[f"| {label} | {summary(first['p95_ms'][f'saml-{alg}'])} | {summary(first['p95_ms'][f'x509-{alg}'])} | "
          f"{summary(first['ratio_x509_to_saml'][alg]['p95'])} |" for alg, label in first_request.ALGORITHMS.items()],
        "",
        "Both flows sign once per new user with the same stepwise signer; what differs is the rest: the SAML "
        "flow writes an XML assertion (with its canonical form and digest) and makes the token callout, the "
        "X.509 flow encodes a certificate (DER) and makes no callout. The latency of an RSA-2048 first request "
        "is well above its CPU, in both flows alike: the signature runs in slices on the worker's millisecond "
        "tick within its signing share (see the head-of-line section), so on an idle worker it is paced, not "
        "run in one go.",
        "",
        "## A new user's first request: the assertion from the identity provider (two callouts) against the "
        "gateway-signed flow",
        "",
        "The same run and rounds: a fifth flow, `/obo/`, gets its assertion on behalf of the user from an "
        "identity provider (Entra ID's on-behalf-of call) and exchanges it at the token service: two callouts in "
        "a row, no signature (the client secret in HTTP Basic). Its identity provider is a direct-response "
        "listener of the same Envoy that answers every call with one assertion (the plugin passes it on unread), "
        "so, as for the token service, a real provider's time would come on top; the client sends the user's "
        "token, whose payload is the verified one. Median (min–max) over rounds; a ratio is on-behalf-of / "
        "gateway-signed within each round:",
        "",
        "| against | gateway-signed latency P50 (ms) | on-behalf-of latency P50 (ms) | ratio | gateway-signed CPU per "
        "new user (ms) | on-behalf-of CPU per new user (ms) | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[f"| SAML signed with {label} | {summary(first['p50_ms'][f'saml-{alg}'])} | {summary(first['p50_ms']['obo'])} | "
          f"{summary(first['ratio_obo_to_saml'][alg]['p50'])} | {summary(first['cpu_ms_per_user'][f'saml-{alg}'])} | "
          f"{summary(first['cpu_ms_per_user']['obo'])} | {summary(first['ratio_obo_to_saml'][alg]['cpu'])} |"
          for alg, label in first_request.ALGORITHMS.items()],
        "",
        "The chain costs the gateway a second callout instead of a signature: about what a P-256-signed flow "
        "costs, far less than an RSA-2048 one. A cache hit is the same in every flow (the user's token is read "
        "only for an exchange): see the cache-hit sections above.",
        "",
        "## Memory with many users (2 workers)",
        "",
        memory.__doc__.split("\n\n", 1)[1].strip(),
        "",
        f"Cache: {mem['slots']} slots (the default `tokenCacheSlots`); token {mem['token_bytes']} bytes; "
        f"{mem['exchanges']} exchanges in all, {mem['lock_collisions']} of them while another user's exchange "
        "held the same slot's lock (`lock_collision`: the exchange went ahead without waiting, single-flight "
        "per worker only). A slot holds one user's token: a new user whose slot is taken "
        "evicts the old one, so the table never holds more than the cap and, once every slot is in use, "
        "churn replaces entries instead of adding them.",
        "",
        "| distinct users so far | Envoy RSS (MiB) | tcmalloc allocated (MiB) | Wasm memory of a VM (MiB) | phase time (s) | errors |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {r['users']} | {r['rss_mib']} | {r['allocated_mib']} | {r['wasm_mib']} | "
          f"{r['seconds']} | {r['errors']} |" for r in mem["rows"]],
        "",
        memory_verdict(mem),
        "",
        "## Raw rounds",
        "",
        "```json",
        json.dumps({"cpu_us_per_request": cpu, "probe_cpu_us_per_request": probes,
                    "stacked_cpu_us_per_request": stacked, "head_of_line": workers, "flood": flooding,
                    "first_request": {k: v for k, v in first.items() if k != "summary"}, "wake_us": wake,
                    "destination_api": api,
                    "openssl_rsa2048_sign_ms": openssl_ms, "signing_v8_ms": signing_v8, "memory": mem},
                   indent=1),
        "```",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines[lines.index("## CPU per request (µs, median and min–max over rounds)"):lines.index("## Raw rounds")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
