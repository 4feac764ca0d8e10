"""Searches an Envoy log for every secret a run of the stack handled.

The secrets are fetched from the dev servers while they still run: the private keys
and client password the stack passed to Envoy, every Basic client credential and
assertion the token server received, every access token it issued, and every JWT the
identity provider minted. One Aho-Corasick pass finds all of them at once.

Envoy itself prints HTTP headers at debug level and below, Authorization included
(an open upstream issue: https://github.com/envoyproxy/envoy/issues/9652). No filter
can stop that, so header values in Envoy's own header dumps are counted and reported,
not failed; a secret anywhere else — in the plugin's lines, in a configuration dump,
in a request or response body — fails the audit, and so does any trace of a private
key, the client password in clear, or an assertion, wherever it is.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import ahocorasick

# Lines in which Envoy prints header values: the multi-line header map dumps
# ("'authorization', 'Bearer …'"), the HTTP/1 codec's trace of each header, and
# jwt_authn's debug line with the JWT it parses.
ENVOY_HEADER_DUMP = re.compile(r"^\s*'[^']*', '|completed header: key=|: Parse Jwt ")
# What travels in headers, and so shows up in those dumps.
HEADER_VALUES = frozenset({"user JWT", "access token", "client credentials (Basic)"})
SIGNATURE_VALUE = re.compile(r"<ds:SignatureValue>([^<]+)</ds:SignatureValue>")
MIN_NEEDLE = 12  # shorter fragments would match by chance


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def encoded_signature(assertion: str) -> str:
    """The part of an encoded assertion (base64 or base64url) that encodes the start of
    its signature value: 3 bytes become 4 characters, so the offsets line up."""
    padded = assertion.replace("-", "+").replace("_", "/") + "=" * (-len(assertion) % 4)
    try:
        xml = base64.b64decode(padded)
    except ValueError:
        return ""
    at = xml.find(b"<ds:SignatureValue>") + len(b"<ds:SignatureValue>")
    start = at // 3 * 4 + 4  # the first whole group inside the value
    return assertion[start:start + 48] if at >= len(b"<ds:SignatureValue>") else ""


def collect(idp_url: str, token_url: str, pems: list[str], client_secret: str) -> dict[str, set[str]]:
    """Every secret of the run, by kind, fetched from the running dev servers."""
    requests = _get_json(f"{token_url}/requests")
    minted = _get_json(f"{idp_url}/minted")
    assertions = {r["form"]["assertion"] for r in requests if r["form"].get("assertion")}
    xml = [r["assertion_xml"] for r in requests if r.get("assertion_xml")]
    secrets = {
        "private key": {line for pem in pems if "PRIVATE KEY" in pem
                        for line in pem.splitlines() if not line.startswith("-----")},
        "client password": {client_secret},
        "client credentials (Basic)": {r["headers"]["authorization"].split(" ", 1)[1] for r in requests
                                       if r["headers"].get("authorization", "").startswith("Basic ")},
        "access token": {r["access_token"] for r in requests if r.get("access_token")},
        # Each signature value, in the XML and in the encoded assertion (the rest of an
        # assertion repeats what the JWT carried), and the XML's element names.
        "assertion": {m for x in xml for m in SIGNATURE_VALUE.findall(x)}
        | {encoded_signature(a) for a in assertions} | {"<saml2:Assertion", "<ds:SignatureValue>"},
        "user JWT": {jwt.rsplit(".", 1)[1] for jwt in minted},
    }
    return {kind: {s for s in values if len(s) >= MIN_NEEDLE} for kind, values in secrets.items()}


@dataclass
class Report:
    """Where secrets were found: `leaks` must stay empty; `in_envoy_header_dumps` counts
    header values Envoy printed itself."""
    log_bytes: int = 0
    secrets: dict[str, int] = field(default_factory=dict)
    in_envoy_header_dumps: dict[str, int] = field(default_factory=dict)
    leaks: list[str] = field(default_factory=list)


ENVOY_LINE_TAGS = re.compile(r"^\[[^\]]*\]\[\d+\]\[(\w+)\]\[(\w+)\] \[([^\]]+)\]")
MAX_REPORTED = 20


def where(text: str, start: int, line: str) -> str:
    """Line number, level, component and source of a log line: never its content."""
    tags = ENVOY_LINE_TAGS.match(line)
    source = "[{}][{}] {}".format(*tags.groups()) if tags else "a line without Envoy's prefix"
    return f"line {text.count(chr(10), 0, start) + 1}: {source}"


def scan(log: Path, secrets: dict[str, set[str]]) -> Report:
    text = log.read_text(errors="replace")
    report = Report(log_bytes=len(text), secrets={kind: len(v) for kind, v in secrets.items()})
    automaton = ahocorasick.Automaton()
    for kind, values in secrets.items():
        for value in values:
            automaton.add_word(value, kind)
    if len(automaton) == 0:
        return report
    automaton.make_automaton()
    for end, kind in automaton.iter(text):
        start = text.rfind("\n", 0, end) + 1
        stop = text.find("\n", end)
        line = text[start:stop if stop >= 0 else len(text)]
        if kind in HEADER_VALUES and ENVOY_HEADER_DUMP.search(line):
            report.in_envoy_header_dumps[kind] = report.in_envoy_header_dumps.get(kind, 0) + 1
        elif len(report.leaks) < MAX_REPORTED:
            report.leaks.append(f"{kind} in {log.name} {where(text, start, line)}")
        else:
            report.leaks.append(f"{kind} (more)")
    return report
