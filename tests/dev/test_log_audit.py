"""The log audit finds every kind of secret, tolerates header values only in Envoy's own
header dumps, and reports where, never what."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "dev"))

import log_audit  # noqa: E402

PREFIX = "[2026-11-23 01:10:49.687][13877][debug][wasm] [source/extensions/common/wasm/context.cc:1192]"
SIGNATURE = "c2lnbmF0dXJlLXZhbHVlLW9mLXRoZS1hc3NlcnRpb24tdGhhdC1tdXN0LW5vdC1sZWFr"
XML = ('<saml2:Assertion xmlns:saml2="urn:oasis:names:tc:SAML:2.0:assertion" ID="_1"><ds:Signature>'
       f'<ds:SignatureValue>{SIGNATURE}</ds:SignatureValue></ds:Signature></saml2:Assertion>')
SECRETS = {
    "access token": {"tok-0123456789abcdef0123"},
    "user JWT": {"jwtsig-0123456789abcdef"},
    "assertion": {SIGNATURE, log_audit.encoded_signature(base64.urlsafe_b64encode(XML.encode()).decode().rstrip("="))},
}


def scan(tmp_path, lines: list[str]) -> log_audit.Report:
    log = tmp_path / "envoy.log"
    log.write_text("\n".join(lines) + "\n")
    return log_audit.scan(log, SECRETS)


def test_header_values_in_envoy_header_dumps_are_counted_not_failed(tmp_path):
    report = scan(tmp_path, [
        "[2026-11-23 01:10:49.687][13877][debug][router] [source/common/router/router.cc:731] router decoding headers:",
        "':authority', '127.0.0.1'",
        "'authorization', 'Bearer tok-0123456789abcdef0123'",
        f"{PREFIX.replace('[debug][wasm]', '[trace][http]')} completed header: key=Authorization "
        "value=Bearer a.b.jwtsig-0123456789abcdef",
    ])
    assert report.leaks == []
    assert report.in_envoy_header_dumps == {"access token": 1, "user JWT": 1}


def test_a_secret_anywhere_else_fails_with_its_place_not_its_value(tmp_path):
    encoded = base64.b64encode(XML.encode()).decode()  # the standard alphabet, padded
    report = scan(tmp_path, [
        f"{PREFIX} principal-propagation: token tok-0123456789abcdef0123",
        f"{PREFIX} body {encoded}",
        f"'x-debug', '{SIGNATURE}'",  # assertions never travel in headers: no excuse
        f"{PREFIX} {SIGNATURE}",
    ])
    assert report.leaks == [
        "access token in envoy.log line 1: [debug][wasm] source/extensions/common/wasm/context.cc:1192",
        "assertion in envoy.log line 2: [debug][wasm] source/extensions/common/wasm/context.cc:1192",
        "assertion in envoy.log line 3: a line without Envoy's prefix",
        "assertion in envoy.log line 4: [debug][wasm] source/extensions/common/wasm/context.cc:1192",
    ]
    assert all("tok-" not in leak and SIGNATURE not in leak for leak in report.leaks)
