"""A flood of new users against one worker (issue 13, point 4), for `make bench`.

One Envoy worker (`--concurrency 1`) runs the plugin with its defaults
(`maxExchangesPerWorker` 256, `maxSigningSharePercent` 50) and an RSA-2048 key. Envoy
plays the rest, as in the head-of-line rounds: a Lua filter puts the user named in
`x-bench-user` where `jwt_authn` would put the verified payload, and direct-response
listeners are the token service (answering at once) and the upstream. Each round runs
wrk on one cached user three times, interleaved: alone; while 500 new users a second
arrive for the whole window, each on a connection of its own; and, as a control, while
the same 500 connections a second ask for a path no route serves (Envoy answers 404
without the plugin: the cost of the arrival traffic itself). Signing takes at most half
the worker, so most of the flood cannot be signed in time: beyond the cap a new user is
refused at once (503, `Retry-After: 1`), never queued, and the cached user keeps being
served. Reported: the cached user's p99 with and without the flood and its errors (none
allowed); the new users' answers; the VM's Wasm memory after each flood (bounded by the
cap, however long it lasts); and the plugin's counters.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dev"))

import head_of_line  # noqa: E402
import memory  # noqa: E402
import stack  # noqa: E402

PORTS = stack.Ports(listener=18501, admin=18599, idp=18510, token=18511, echo=18512, onprem=18519, sts=18518)
TOKEN_LISTENER, UPSTREAM_LISTENER = 18521, 18522
NEW_USERS_PER_SECOND = 500
HIT_USER = "flood-cached"
COUNTERS = ("admission_refused", "exchange_deadline_passed", "lock_collision", "token_exchange.ok",
            "token_exchange.failed", "cache_hit")


async def _flood(seconds: float, first: int, answers: Counter, path: str = "/rsa/x") -> int:
    """`NEW_USERS_PER_SECOND` new users for `seconds` on `path`, paced from the start, each
    with its own connection; waits for every answer (bounded). Returns the number sent."""
    async def one(n: int) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", PORTS.listener), 10)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: gateway\r\nx-bench-user: flood-{n}\r\n"
                         f"Connection: close\r\n\r\n".encode())
            status = int((await asyncio.wait_for(reader.readline(), 30)).split()[1])
            writer.close()
            answers[status] += 1
        except (OSError, asyncio.TimeoutError, IndexError, ValueError):
            answers["no answer"] += 1

    start, tasks, n = time.monotonic(), [], 0
    while time.monotonic() - start < seconds:
        tasks.append(asyncio.create_task(one(first + n)))
        n += 1
        await asyncio.sleep(max(0.0, start + n / NEW_USERS_PER_SECOND - time.monotonic()))
    await asyncio.gather(*tasks)
    return n


def counters() -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{PORTS.admin}/stats?filter=wasmcustom", timeout=10) as r:
        lines = r.read().decode().splitlines()
    values = dict(line.split(": ", 1) for line in lines)
    return {name: int(values.get(f"wasmcustom.principal_propagation.{name}", 0)) for name in COUNTERS}


def measure(rounds: int, seconds: float = 10.0) -> dict:
    from bench import wrk  # noqa: E402

    # Every new user holds a connection while it waits: more than the default 1024 files.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    hits = {"x-bench-user": HIT_USER}
    ports = head_of_line.Listeners(PORTS, TOKEN_LISTENER, UPSTREAM_LISTENER)
    quiet, flooded, control, hit_errors, memory_mib = [], [], [], [], []
    answers, control_answers = Counter(), Counter()
    sent = 0
    with stack.Stack("demo", PORTS, name="bench-flood", bootstrap=head_of_line.bootstrap(ports), concurrency=1):
        statuses: list[int] = []
        head_of_line.first_request("/rsa/hit", HIT_USER, statuses, port=PORTS.listener)
        assert statuses == [200], statuses
        time.sleep(1.5)
        memory_before = memory.gauge_of(PORTS.admin, "wasmcustom.principal_propagation.wasm_memory_bytes") / 2**20
        before = counters()

        def hits_while(flood) -> float:
            holder: dict = {}
            thread = threading.Thread(target=lambda: holder.update(
                wrk(PORTS.listener, "", seconds, connections=4, latency=True, path="/rsa/hit", headers=hits)))
            thread.start()
            flood()
            thread.join()
            hit_errors.append(holder["errors"])
            return holder["p99_ms"]

        for _ in range(rounds):
            quiet.append(hits_while(lambda: time.sleep(seconds)))
            counted: list[int] = []
            flooded.append(hits_while(lambda: counted.append(asyncio.run(_flood(seconds, sent, answers)))))
            sent += counted[0]
            control.append(hits_while(lambda: asyncio.run(_flood(seconds, 0, control_answers, "/unrouted"))))
            time.sleep(1.5)  # the plugin reports its VM's memory every second
            memory_mib.append(round(
                memory.gauge_of(PORTS.admin, "wasmcustom.principal_propagation.wasm_memory_bytes") / 2**20, 1))
        time.sleep(1.5)  # the last counters
        after = counters()
    return {"p99_quiet_ms": quiet, "p99_flood_ms": flooded, "p99_control_ms": control,
            "hit_errors": sum(hit_errors), "new_users": sent,
            "new_user_answers": {str(k): v for k, v in sorted(answers.items(), key=str)},
            "control_answers": {str(k): v for k, v in sorted(control_answers.items(), key=str)},
            "wasm_mib_before": round(memory_before, 1), "wasm_mib_after_each_flood": memory_mib,
            "counters": {name: after[name] - before[name] for name in COUNTERS}, "seconds": seconds}


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 3), indent=1))
