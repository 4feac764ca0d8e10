"""A small load generator for the gateway: plain HTTP/1.1 keep-alive connections on
asyncio (httpx's pool is far slower than Envoy here), each request naming its user in
`X-Expected-User` so the echo upstream can count whose token arrived."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from urllib.parse import quote

TIMEOUT = 30.0


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
              headers: dict[str, str]) -> tuple[int, bytes]:
    """One GET on a kept-alive connection: status and body (answers carry Content-Length)."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(f"GET {path} HTTP/1.1\r\nHost: gateway\r\n{lines}\r\n".encode())
    status = int((await asyncio.wait_for(reader.readline(), TIMEOUT)).split()[1])
    length = 0
    while (line := await asyncio.wait_for(reader.readline(), TIMEOUT)) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, await asyncio.wait_for(reader.readexactly(length), TIMEOUT)


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, user: str,
                  jwt: str) -> str:
    """One request; the outcome: `own` (200 with the user's own token), `other_user`
    (200 with someone else's) or `status <n>`."""
    status, body = await get(reader, writer, path,
                             {"Authorization": f"Bearer {jwt}", "X-Expected-User": quote(user)})
    if status != 200:
        return f"status {status}"
    return "own" if json.loads(body)["user"] == user else "other_user"


async def connection(port: int, requests: list[tuple[str, str, str]], outcomes: Counter) -> None:
    """Sends `requests` (user, path, jwt) one after another on one connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for user, path, jwt in requests:
            outcomes[await request(reader, writer, path, user, jwt)] += 1
    finally:
        writer.close()


def run(port: int, plan: list[tuple[str, str, str]], connections: int) -> Counter:
    """All of `plan`, spread over `connections` concurrent connections."""
    async def all_connections() -> Counter:
        outcomes: Counter = Counter()
        await asyncio.gather(*[connection(port, plan[i::connections], outcomes) for i in range(connections)])
        return outcomes

    return asyncio.run(all_connections())
