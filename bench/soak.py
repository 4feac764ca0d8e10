#!/usr/bin/env python3
"""`make soak`: steady load with user churn and token expiry for ten minutes (SOAK_SECONDS),
sampling Envoy's memory and the error count every interval; writes SOAK.md.

Load: every interval (10 s) sends RATE requests per second over CONNECTIONS keep-alive
connections, from a window of ACTIVE users that slides by CHURN new users per interval
(the oldest leave). Half the requests go to a destination whose tokens are usable for
8 s (renewed all the time), half to the default one (an hour). The token cache has
CACHE_SLOTS slots, fewer than the distinct users of the run, so it fills early and is
then recycled: after that, memory must stay flat. An error is any answer other than
200 with the user's own token (counted by the client and by the echo upstream).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dev"))

import load  # noqa: E402
import stack  # noqa: E402

PORTS = stack.Ports().shifted(8500)  # below the ephemeral port range
INTERVAL = 10.0
RATE = 200
CONNECTIONS = 32
ACTIVE = 300
CHURN = 50
CACHE_SLOTS = 1000
WARM_UP = 120.0  # the cache fills and V8 settles; flatness is judged after this


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sample(gateway: stack.Stack, elapsed: float, outcomes: Counter) -> dict:
    memory = get_json(f"http://127.0.0.1:{gateway.ports.admin}/memory")
    token_stats = get_json(f"http://127.0.0.1:{gateway.ports.token}/stats")
    return {
        "t": round(elapsed),
        "requests": sum(outcomes.values()),
        "errors": sum(n for k, n in outcomes.items() if k != "own"),
        "echo_other_or_invalid": sum(n for k, n in token_stats["deliveries"].items() if k != "own"),
        "exchanges": sum(token_stats["exchanges"].values()),
        "rss_mib": round(rss_mib(gateway.envoy.pid), 1),
        "allocated_mib": round(int(memory["allocated"]) / 2**20, 1),
        "heap_mib": round(int(memory["heap_size"]) / 2**20, 1),
    }


async def paced(port: int, plan: list[tuple[str, str, str]], seconds: float, outcomes: Counter) -> None:
    """Sends `plan` evenly over `seconds` on CONNECTIONS connections."""
    gap = seconds * CONNECTIONS / max(1, len(plan))

    async def one(share):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            start = time.monotonic()
            for i, (user, path, jwt) in enumerate(share):
                await asyncio.sleep(max(0.0, start + i * gap - time.monotonic()))
                outcomes[await load.request(reader, writer, path, user, jwt)] += 1
        finally:
            writer.close()

    await asyncio.gather(*[one(plan[i::CONNECTIONS]) for i in range(CONNECTIONS)])


def slope_mib_per_min(samples: list[dict], key: str) -> float:
    """Least-squares growth of `key` over the samples after the warm-up."""
    after = [s for s in samples if s["t"] >= WARM_UP]
    if len(after) < 2:
        return float("nan")
    return statistics.linear_regression([s["t"] / 60 for s in after], [s[key] for s in after]).slope


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)))
    parser.add_argument("--out", default=str(ROOT / "SOAK.md"))
    args = parser.parse_args()

    config = stack.plugin_config(PORTS, "test")
    config["tokenCacheSlots"] = CACHE_SLOTS
    samples: list[dict] = []
    outcomes: Counter = Counter()
    with stack.Stack("test", PORTS, name="soak", config_override=config) as gateway:
        client_idp = f"http://127.0.0.1:{PORTS.idp}/token?user="
        jwts: dict[str, str] = {}

        def jwt(user: str) -> str:
            if user not in jwts:
                with urllib.request.urlopen(client_idp + user, timeout=10) as r:
                    jwts[user] = r.read().decode()
            return jwts[user]

        start = time.monotonic()
        samples.append(sample(gateway, 0, outcomes))
        interval = 0
        while time.monotonic() - start < args.seconds:
            first = interval * CHURN
            users = [f"soak-{n:05d}" for n in range(first, first + ACTIVE)]
            for user in users:
                jwt(user)
            for user in [u for u in jwts if u < users[0]]:
                del jwts[user]  # left for good
            n = int(RATE * INTERVAL)
            plan = [(users[(i * 7919) % ACTIVE], "/t/renewing/soak" if i % 2 else "/soak", jwts[users[(i * 7919) % ACTIVE]])
                    for i in range(interval * n, (interval + 1) * n)]
            asyncio.run(paced(PORTS.listener, plan, INTERVAL, outcomes))
            interval += 1
            samples.append(sample(gateway, time.monotonic() - start, outcomes))
            s = samples[-1]
            print(f"t={s['t']:4d}s requests={s['requests']:6d} errors={s['errors']} exchanges={s['exchanges']:5d} "
                  f"rss={s['rss_mib']} MiB allocated={s['allocated_mib']} MiB", flush=True)
        distinct_users = first + ACTIVE

    errors = samples[-1]["errors"] + samples[-1]["echo_other_or_invalid"]
    rss_slope = slope_mib_per_min(samples, "rss_mib")
    allocated_slope = slope_mib_per_min(samples, "allocated_mib")
    after = [s for s in samples if s["t"] >= WARM_UP]
    lines = [
        "# Soak",
        "",
        f"Written by `make soak` ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}), "
        f"{args.seconds:.0f} s. Method: see `bench/soak.py`. Envoy --concurrency 2, one Envoy, dev servers on 127.0.0.1.",
        "",
        f"- Load: {RATE} requests/s paced over {CONNECTIONS} keep-alive connections (achieved "
        f"{samples[-1]['requests'] / samples[-1]['t']:.0f}/s: an interval runs long when the machine is busy); "
        f"{ACTIVE} active users, "
        f"{CHURN} new every {INTERVAL:.0f} s ({distinct_users} distinct users in all); half the requests on a destination "
        "whose tokens are usable for 8 s, half on one whose tokens live an hour.",
        f"- Token cache: {CACHE_SLOTS} slots (fewer than the users), so it is full and recycled after the warm-up.",
        f"- Requests: {samples[-1]['requests']}; token exchanges: {samples[-1]['exchanges']}.",
        f"- **Errors: {samples[-1]['errors']}** (client: any answer but 200 with the user's own token); "
        f"echo upstream: {samples[-1]['echo_other_or_invalid']} requests with another user's or an invalid token.",
        f"- **Memory after the {WARM_UP:.0f} s warm-up**: Envoy RSS {min(s['rss_mib'] for s in after)}–"
        f"{max(s['rss_mib'] for s in after)} MiB, growth {rss_slope:+.3f} MiB/min (least squares); "
        f"allocated (tcmalloc) {min(s['allocated_mib'] for s in after)}–{max(s['allocated_mib'] for s in after)} MiB, "
        f"growth {allocated_slope:+.3f} MiB/min." if after else "- Memory: run shorter than the warm-up.",
        "",
        "| t (s) | requests | errors | exchanges | Envoy RSS (MiB) | allocated (MiB) | heap (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    every = max(1, round(60 / INTERVAL))
    for s in samples[::every] + ([samples[-1]] if (len(samples) - 1) % every else []):
        lines.append(f"| {s['t']} | {s['requests']} | {s['errors']} | {s['exchanges']} | {s['rss_mib']} | "
                     f"{s['allocated_mib']} | {s['heap_mib']} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
