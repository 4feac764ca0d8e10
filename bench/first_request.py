"""A new user's first request: X.509 client certificate against SAML bearer (issue 16,
point 8), for `make bench`.

One Envoy worker (`--concurrency 1`, every Envoy thread pinned to one core, the client
to the other) runs the plugin with four destinations (a fifth, `/obo/`, has its own section),
one route prefix each:
`OAuth2SAMLBearerAssertion` with an RSA-2048 and with a P-256 signing key (`/saml-rsa/`,
`/saml-ec/`: an assertion written and signed, then exchanged for a token by an HTTP
callout) and `PrincipalPropagation` with an RSA-2048 and with a P-256 CA (`/x509-rsa/`,
`/x509-ec/`: a client certificate written and signed for the user, no callout). As in
the head-of-line rounds, a Lua filter puts the user named in `x-bench-user` where
`jwt_authn` would put the verified payload, and every route goes to the same
direct-response upstream, so both flows pay the same upstream. The token service is a
direct-response listener of the same Envoy, answering at once: the callout's cost (its
connection, request and answer) is counted in the gateway's CPU, and a real token
server's own time would come on top of the SAML flow's latency.

Each round runs, for every flow in a rotating order and then in the reverse order (A B
C D D C B A), a batch of brand-new users one at a time (sequential, so latency is not
queueing): each user's single request is timed at the client (a new connection each),
and the CPU time of Envoy's worker thread over the batch (the kernel's per-thread run
time, `/proc/<pid>/task/<tid>/schedstat`, in ns; the clock-tick counts of
`/proc/.../stat` are too coarse for a few ms per user) divided by the batch's users is
the CPU per new user. Per round and flow: the latency P50 and P95
over its users, and the CPU per new user; the ratios X.509 / SAML are taken within each
round, per algorithm, then summarised over rounds.
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dev"))

import head_of_line  # noqa: E402
import memory  # noqa: E402
import stack  # noqa: E402

# Not head_of_line's (184xx) nor flood's (18501, 18510-18513, 18521-18522, 18599).
PORTS = stack.Ports(listener=18551, admin=18598, idp=18560, token=18561, echo=18565, onprem=18569, sts=18568)
TOKEN_LISTENER, UPSTREAM_LISTENER = 18571, 18572
ALGORITHMS = {"rsa": "RSA-2048", "ec": "P-256"}
# Flow -> (credential kind, algorithm, key name in the plugin's `keys`).
FLOWS = {"saml-rsa": ("saml", "rsa", "rsa"), "x509-rsa": ("x509", "rsa", "ca"),
         "saml-ec": ("saml", "ec", "ec"), "x509-ec": ("x509", "ec", "ca_ec"),
         "obo": ("obo", "", "")}
# The identity provider of the on-behalf-of flow: a direct-response listener answering every
# call with one assertion (the plugin passes it on unread, so a fixed one measures it).
STS_LISTENER = 18573
OBO_ASSERTION = base64.urlsafe_b64encode(
    b'<saml2:Assertion xmlns:saml2="urn:oasis:names:tc:SAML:2.0:assertion" ID="_bench">'
    b"<saml2:Issuer>https://sts.windows.net/bench/</saml2:Issuer></saml2:Assertion>").rstrip(b"=").decode()
KEY_SLOTS = {"rsa": "a", "ec": "ec", "ca": "ca", "ca_ec": "ca_ec"}
EXCHANGES_OK = "wasmcustom.principal_propagation.token_exchange.ok"  # certificates count here too


def plugin() -> dict:
    destinations = []
    for name, (kind, _, key) in FLOWS.items():
        if kind == "saml":
            destinations.append(stack.destination(PORTS, name, KeyStoreLocation=key))
        elif kind == "obo":
            d = stack.destination(PORTS, name, userIdSource="user_name", **{
                "assertionServiceURL": f"http://127.0.0.1:{STS_LISTENER}/tenant/oauth2/v2.0/token",
                "assertionServiceCluster": "sts", "assertionServiceClientId": "bench-app",
                "assertionServiceClientSecret": "bench-secret"})
            for gateway_signed in ("assertionIssuer", "nameIdFormat", "authnContextClassRef"):
                del d[gateway_signed]
            destinations.append(d)
        else:
            destinations.append(stack.onprem_destination(name, clientCertificateIssuerKey=key,
                                                          clientCertificateValidityMinutes=10))
    return {
        "allowInsecureTokenService": True,  # the token service is a local listener
        "tokenServiceCluster": "token_service",
        "keys": {key: stack.key_ref(slot) for key, slot in KEY_SLOTS.items()},
        "destinations": destinations,
    }


def bootstrap() -> dict:
    """head_of_line's gateway (Lua user, token and upstream listeners), with this plugin
    and its routes; `/check/<flow>/` go to the dev echo server, which shows what arrived."""
    from bench import listener  # noqa: E402 (bench.py imports this module lazily too)

    config = head_of_line.bootstrap(head_of_line.Listeners(PORTS, TOKEN_LISTENER, UPSTREAM_LISTENER))
    config["node"]["id"] = "bench-first-request"
    resources = config["static_resources"]
    hcm = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = hcm["http_filters"][1]
    assert wasm["name"] == "envoy.filters.http.wasm", wasm["name"]
    wasm["typed_config"] = stack.wasm_filter(plugin())
    hcm["route_config"]["virtual_hosts"][0]["routes"] = (
        [stack.route(f"/{flow}/", flow, "upstream") for flow in FLOWS]
        + [stack.route(f"/check/{flow}/", flow, "echo") for flow in FLOWS])
    resources["clusters"].append(stack.cluster("echo", PORTS.echo))
    sts_answer = json.dumps({"token_type": "Bearer", "access_token": OBO_ASSERTION, "expires_in": 3599,
                             "issued_token_type": "urn:ietf:params:oauth:token-type:saml2"})
    resources["listeners"].append(listener("sts", STS_LISTENER, [], memory.direct(200, sts_answer)))
    resources["clusters"].append(stack.cluster("sts", STS_LISTENER))
    return config


def user_token(user: str) -> str:
    """The user's token as the client sends it: its payload is exactly what the Lua filter
    puts where jwt_authn would (the plugin passes it on only then)."""
    def part(value) -> str:
        return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'RS256'})}.{part({'user_name': user})}.c2ln"


def worker_cpu_ns(pid: int) -> int:
    """Run time of Envoy's worker threads (`wrk:worker_N`) in ns (see bench.envoy_cpu_seconds)."""
    total, found = 0, False
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().startswith("wrk:worker"):
            total += int((task / "schedstat").read_text().split()[0])
            found = True
    if not found:
        raise RuntimeError("no Envoy worker thread found")
    return total


def quantile(values: list[float], q: float) -> float:
    """Nearest rank, as head_of_line.percentiles, unrounded."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def check_credentials() -> dict[str, str]:
    """One new user per flow through the echo server: the X.509 flows must deliver a
    certificate for the user, issued and signed by the destination's CA, in
    SSL_CLIENT_CERT; the SAML flows the token service's bearer token."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    checked = {}
    for flow, (kind, _, key) in FLOWS.items():
        user = f"check-{flow}"
        request = urllib.request.Request(f"http://127.0.0.1:{PORTS.listener}/check/{flow}/x",
                                         headers={"x-bench-user": user, "authorization": f"Bearer {user_token(user)}"})
        with urllib.request.urlopen(request, timeout=15) as r:
            headers = json.loads(r.read())["headers"]
        if kind in ("saml", "obo"):
            assert headers.get("authorization") == f"Bearer {memory.TOKEN}", f"{flow}: no bearer token upstream"
            assert "ssl_client_cert" not in headers, flow
            checked[flow] = "bearer token"
        else:
            assert "authorization" not in headers, flow
            certificate = x509.load_der_x509_certificate(base64.b64decode(headers["ssl_client_cert"], validate=True))
            ca = x509.load_pem_x509_certificate(stack.key_files(KEY_SLOTS[key])[1].read_bytes())
            certificate.verify_directly_issued_by(ca)
            assert certificate.subject.rfc4514_string() == f"CN={user}", certificate.subject
            signer = "ECDSA" if isinstance(ca.public_key(), ec.EllipticCurvePublicKey) else "RSA"
            checked[flow] = f"certificate for CN={user}, {signer}-{certificate.signature_hash_algorithm.name}"
    return checked


def measure(rounds: int, users: int = 50, warm_up: int = 20) -> dict:
    """Per round and flow, over `2 * users` new users (two batches of `users`): latency
    P50 and P95 (ms) and Envoy worker CPU per new user (ms); ratios X.509 / SAML per
    round and algorithm."""
    from bench import summary  # noqa: E402

    flows = list(FLOWS)
    statuses: list[int] = []
    p50 = {flow: [] for flow in flows}
    p95 = {flow: [] for flow in flows}
    cpu = {flow: [] for flow in flows}
    sent = Counter()

    def batch(flow: str, n: int, latencies: list[float]) -> int:
        """`n` new users on `flow`, one at a time; the worker's CPU ns they took."""
        pid = gateway.envoy.pid
        before = worker_cpu_ns(pid)
        for _ in range(n):
            sent[flow] += 1
            user = f"{flow}-{sent[flow]}"
            token = {"authorization": f"Bearer {user_token(user)}"} if FLOWS[flow][0] == "obo" else None
            head_of_line.first_request(f"/{flow}/x", user, statuses, latencies, port=PORTS.listener,
                                       headers=token)
        return worker_cpu_ns(pid) - before

    pinned = (os.cpu_count() or 1) >= 2
    affinity = os.sched_getaffinity(0)
    with stack.Stack("demo", PORTS, name="bench-first-request", bootstrap=bootstrap(), concurrency=1) as gateway:
        if pinned:  # Envoy (every thread) on core 0, this client on core 1, as in bench.cpu_per_request
            subprocess.run(["taskset", "-a", "-p", "-c", "0", str(gateway.envoy.pid)], check=True, capture_output=True)
            os.sched_setaffinity(0, {1})
        try:
            for _ in range(warm_up):  # V8's code for every path, the upstream's connections
                for flow in flows:
                    batch(flow, 1, [])
            if any(s != 200 for s in statuses):
                raise RuntimeError(f"warm-up answers: {Counter(statuses)}; see {gateway.envoy_log}")
            checked = check_credentials()
            time.sleep(1.5)  # workers report their counters once a second
            exchanges_before = memory.gauge_of(PORTS.admin, EXCHANGES_OK)
            statuses.clear()
            measured_from = dict(sent)
            for r in range(rounds):
                order = flows[r % len(flows):] + flows[:r % len(flows)]
                latencies = {flow: [] for flow in flows}
                spent = {flow: 0 for flow in flows}
                for flow in order + order[::-1]:
                    spent[flow] += batch(flow, users, latencies[flow])
                for flow in flows:
                    p50[flow].append(quantile(latencies[flow], 0.50))
                    p95[flow].append(quantile(latencies[flow], 0.95))
                    cpu[flow].append(spent[flow] / len(latencies[flow]) / 1e6)
            time.sleep(1.5)
            exchanges = memory.gauge_of(PORTS.admin, EXCHANGES_OK) - exchanges_before
        finally:
            if pinned:
                os.sched_setaffinity(0, affinity)

    new_users = sum(sent.values()) - sum(measured_from.values())
    ratio = {}
    for alg in ALGORITHMS:
        saml, cert = f"saml-{alg}", f"x509-{alg}"
        ratio[alg] = {m: [x / s for x, s in zip(values[cert], values[saml])]
                      for m, values in (("p50", p50), ("p95", p95), ("cpu", cpu))}
    # The on-behalf-of chain (two callouts, no signature) against the gateway-signed flows.
    obo_ratio = {alg: {m: [x / s for x, s in zip(values["obo"], values[f"saml-{alg}"])]
                       for m, values in (("p50", p50), ("p95", p95), ("cpu", cpu))} for alg in ALGORITHMS}
    result = {
        "rounds": rounds, "users_per_batch": users, "new_users_per_round_and_flow": 2 * users,
        "new_users": new_users, "errors": sum(1 for s in statuses if s != 200),
        "answers": {str(k): v for k, v in sorted(Counter(statuses).items())},
        "credentials_issued": exchanges, "pinned": pinned, "checked": checked,
        "p50_ms": p50, "p95_ms": p95, "cpu_ms_per_user": cpu, "ratio_x509_to_saml": ratio,
        "ratio_obo_to_saml": obo_ratio,
    }
    result["summary"] = {
        **{f"{flow} {name}": summary(result[key][flow]) for flow in flows
           for name, key in (("P50 ms", "p50_ms"), ("P95 ms", "p95_ms"), ("CPU ms per user", "cpu_ms_per_user"))},
        **{f"x509/saml {alg} {m}": summary(ratio[alg][m]) for alg in ALGORITHMS for m in ("p50", "p95", "cpu")},
        **{f"obo/saml {alg} {m}": summary(obo_ratio[alg][m]) for alg in ALGORITHMS for m in ("p50", "p95", "cpu")},
    }
    return result


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 3), indent=1, ensure_ascii=False))
