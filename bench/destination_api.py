"""The find-destination API at cache hit against a proxied request at cache hit (issue 18,
point 5), for `make bench`.

One Envoy worker (`--concurrency 1`, every Envoy thread pinned to one core, wrk to the
other) runs the test stack's real configuration: `jwt_authn` (the IdP's RS256 keys) and
the plugin, destination `dev`. Both variants are answered by the gateway itself, so no
upstream's time is in the figures: the proxied request goes to the `/direct` route (the
default destination in front of a direct response: the plugin injects the cached token,
Envoy answers), the API call (`GET /destination-configuration/v1/destinations/dev`, the
application's client-credentials token in `Authorization`, the user's in `X-user-token`)
is answered by the plugin with the JSON of the cached token. The API call verifies two
JWTs in `jwt_authn` where the proxied request verifies one: that is part of its cost.
Before the rounds one call of each makes the user's token (one exchange); every measured
call is a cache hit.

Each round runs both variants for `seconds / 2`, in one order and then in the reverse
order (A B B A, starting with the other one in the next round), with wrk (8 connections,
keep-alive); per variant and round: the µs of Envoy worker CPU per call (the kernel's
per-thread counters over the run, divided by the calls wrk counted), and wrk's latency
P50 and P99. The ratios API / proxied are taken within each round, then summarised over
rounds (median, min–max).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dev"))

import stack  # noqa: E402

# Apart from the other bench modules' ports (180xx-182xx, 184xx, 185xx).
PORTS = stack.Ports(listener=18601, admin=18698, idp=18610, token=18620, echo=18630, onprem=18640, sts=18650)
API_PATH = "/destination-configuration/v1/destinations/dev"
USER = "bench-api-user"


def _http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wrk(path: str, headers: dict[str, str], seconds: int) -> dict:
    script = ROOT / ".run" / "bench" / "api.lua"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items()))
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c8", f"-d{seconds}s", "--latency", "-s", str(script),
                          f"http://127.0.0.1:{PORTS.listener}{path}"],
                         capture_output=True, text=True, check=True).stdout
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def percentile(p: str) -> float:
        m = re.search(rf"{p}%\s+([\d.]+)(us|ms|s)", out)
        return float(m.group(1)) * scale[m.group(2)]

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "errors": int(non_2xx.group(1)) if non_2xx else 0,
            "p50_ms": percentile("50"), "p99_ms": percentile("99")}


def measure(rounds: int, seconds: float = 4.0) -> dict:
    import bench  # noqa: E402  (its CPU reader; bench.py runs this module from main())

    with stack.Stack("test", PORTS, name="bench-api", concurrency=1) as gateway:
        idp = f"http://127.0.0.1:{PORTS.idp}"
        status, body = _http(f"{idp}/oauth/token", urllib.parse.urlencode({
            "grant_type": "client_credentials", "client_id": stack.API_CLIENT_ID,
            "client_secret": stack.API_CLIENT_SECRET}).encode())
        assert status == 200, body
        service = json.loads(body)["access_token"]
        user = _http(f"{idp}/token?user={USER}")[1].decode()
        variants = {
            "proxied": ("/direct", {"Authorization": f"Bearer {user}"}),
            "api": (API_PATH, {"Authorization": f"Bearer {service}", "X-user-token": user}),
        }
        # The user's token, once; then both variants serve it from the cache.
        status, body = _http(f"http://127.0.0.1:{PORTS.listener}{API_PATH}", headers=variants["api"][1])
        answer = json.loads(body)
        assert status == 200 and answer["authTokens"][0]["value"], body
        assert _http(f"http://127.0.0.1:{PORTS.listener}/direct", headers=variants["proxied"][1])[0] == 200
        stats = json.loads(_http(f"http://127.0.0.1:{PORTS.token}/stats")[1])
        assert stats["exchanges"].get(USER) == 1, stats
        pid = gateway.envoy.pid
        subprocess.run(["taskset", "-a", "-p", "-c", "0", str(pid)], check=True, capture_output=True)
        names = list(variants)
        result = {name: {"cpu_us": [], "p50_ms": [], "p99_ms": []} for name in names}
        calls = 0
        for r in range(rounds):
            order = names[r % 2:] + names[:r % 2]
            spent = {name: 0.0 for name in names}
            served = {name: 0 for name in names}
            latency = {name: [] for name in names}
            for name in order + order[::-1]:
                path, headers = variants[name]
                before = bench.envoy_cpu_seconds(pid)
                run = _wrk(path, headers, max(1, round(seconds / 2)))
                spent[name] += bench.envoy_cpu_seconds(pid) - before
                if run["errors"]:
                    raise RuntimeError(f"{name}: {run['errors']} failed calls")
                served[name] += run["requests"]
                latency[name].append(run)
            for name in names:
                result[name]["cpu_us"].append(spent[name] / served[name] * 1e6)
                # The two half-runs' percentiles, averaged (each is over thousands of calls).
                for q in ("p50_ms", "p99_ms"):
                    result[name][q].append(sum(x[q] for x in latency[name]) / len(latency[name]))
                calls += served[name]
        stats = json.loads(_http(f"http://127.0.0.1:{PORTS.token}/stats")[1])
        exchanges_after = stats["exchanges"].get(USER)
    ratios = {q: [a / p for a, p in zip(result["api"][q], result["proxied"][q])] for q in ("cpu_us", "p50_ms", "p99_ms")}
    return {"rounds": rounds, "calls": calls, "exchanges": exchanges_after, "variants": result,
            "ratio_api_to_proxied": ratios}
