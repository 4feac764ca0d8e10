#!/usr/bin/env python3
"""Writes the seed inputs of each fuzz target into fuzz/corpus/<target>/ (run once;
`make fuzz` grows and minimises the corpus from there)."""

import json
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dev"))
import stack  # noqa: E402

CORPUS = ROOT / "fuzz" / "corpus"
HOSTILE = ["alice", "<a&b>\"'", "]]>", "<!--", "&amp;", "e\u0301", "\u202eabc", "\U0001d11e", "x" * 300,
           "a\r\nb", "nul\u0000", "bell\u0007", " ", ""]


def write(target: str, name: str, data: bytes) -> None:
    (CORPUS / target).mkdir(parents=True, exist_ok=True)
    (CORPUS / target / name).write_bytes(data)


# Protobuf, just enough for google.protobuf.Struct inside envoy.config.core.v3.Metadata.
def varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def value(v) -> bytes:
    if v is None:
        return varint(1 << 3) + varint(0)
    if isinstance(v, bool):
        return varint(4 << 3) + varint(int(v))
    if isinstance(v, (int, float)):
        return varint(2 << 3 | 1) + struct.pack("<d", float(v))
    if isinstance(v, str):
        return field(3, v.encode())
    if isinstance(v, dict):
        return field(5, struct_(v))
    return field(6, b"".join(field(1, value(x)) for x in v))


def struct_(d: dict) -> bytes:
    return b"".join(field(1, field(1, k.encode()) + field(2, value(v))) for k, v in d.items())


def metadata(payload: dict) -> bytes:
    jwt = struct_({"payload": payload})
    return field(1, field(1, b"envoy.filters.http.jwt_authn") + field(2, jwt))


def main() -> None:
    ports = stack.Ports()
    for profile in ("demo", "test"):
        write("config", profile, json.dumps(stack.plugin_config(ports, profile)).encode())
    minimal = {"keys": {"k": {"privateKeyEnv": "KEY", "certificateEnv": "CERT"}},
               "destinations": [stack.destination(ports, "d", tokenServiceCluster="ts")]}
    write("config", "minimal", json.dumps(minimal).encode())

    payloads = [{"user_name": u, "email": f"{u}@example.com", "given_name": u, "ext": {"user": u},
                 "groups": [u, "g"], "user_attributes": {"dept": [u]}} for u in HOSTILE]
    payloads += [{"user_name": 17}, {"user_name": True}, {"user_name": ["a"]}, {"user_name": {"a": 1}},
                 {"ext": {"user": None}}, {}]
    for i, p in enumerate(payloads):
        write("metadata_claims", f"payload-{i}", metadata(p))
        write("json_claims", f"payload-{i}", json.dumps(p, ensure_ascii=False).encode())

    answers = {
        "ok": (200, {"access_token": "abc.def", "token_type": "bearer", "expires_in": 3600, "scope": "x"}),
        "ok-string-lifetime": (200, {"access_token": "t", "token_type": "Bearer", "expires_in": "3600"}),
        "no-lifetime": (200, {"access_token": "t", "token_type": "bearer"}),
        "negative": (200, {"access_token": "t", "token_type": "bearer", "expires_in": -1}),
        "mac": (200, {"access_token": "t", "token_type": "mac", "expires_in": 60}),
        "invalid-grant": (400, {"error": "invalid_grant", "error_description": "expired assertion"}),
        "invalid-client": (401, {"error": "invalid_client"}),
    }
    for name, (status, body) in answers.items():
        write("token_response", name, struct.pack(">H", status) + json.dumps(body).encode())
    write("token_response", "html-500", struct.pack(">H", 500) + b"<html><body>down</body></html>")
    write("token_response", "empty-200", struct.pack(">H", 200))

    for kind, text in [(1, b"token-value"), (2, b"invalid_grant"), (3, b""), (4, b""), (9, b"x")]:
        write("cache_entry", f"kind-{kind}", bytes([kind]) + bytes(20) + struct.pack(">QQ", 2**40, 2**39) + text)

    for i, url in enumerate(["https://ts.example/oauth/token?x=1", "http://127.0.0.1:9100/oauth/token",
                             "https://[::1]:8443/a/b?c=d&e", "HTTPS://EXAMPLE.COM", "https://u:p@x/",
                             "ftp://x", "https://x:99999/", "https://x/#frag"]):
        write("http_url", f"url-{i}", url.encode())

    patterns = ["CN=${name}", "CN=${name},O=ACME,C=DE", "CN=${name}, EMAIL=${mail}, OU=Users\\, ext, L=${display_name}",
                "CN=${login_name},ST=${st}", "C=${country}", "CN=", "XX=${name}", "CN=${a b}", "CN=a\\"]
    for i, pattern in enumerate(patterns):
        for j, user in enumerate(HOSTILE + ["#lead", " lead", "trail ", "a,CN=admin", "x" * 64, "x" * 65]):
            claims = {"user_name": user, "email": f"{user}@example.com", "st": user, "country": user[:2]}
            write("subject", f"pattern-{i}-user-{j}", f"{pattern}\n{json.dumps(claims, ensure_ascii=False)}".encode())

    for i, path in enumerate(["", "/", "/default", "/default/active.pem", "/default/passive.pem",
                              "/nope/active.pem", "/default/../x", "?download=1", "/default/active.pem?x"]):
        write("trust_path", f"path-{i}", path.encode())

    for i, path in enumerate(["dev", "dev?$skipTokenRetrieval=true", "%24x", "a%2Fb", "%zz", "a/b", "",
                              "/gw/destination-configuration/v1/destinations/x?%24skipTokenRetrieval=TRUE",
                              "\u00e9\"\\<>&", "x" * 300]):
        write("destination_api", f"path-{i}", path.encode())


if __name__ == "__main__":
    main()
