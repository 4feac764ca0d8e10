"""Hostile user ids: each reaches the token server as exactly the same NameID, byte
for byte, or is refused with 401 and a description; never invalid XML, never a
server error, never a request upstream without the user's own token."""

from __future__ import annotations

import struct

import pytest
from signxml import XMLVerifier

import stack
from conftest import decode_assertion

SAML = "{urn:oasis:names:tc:SAML:2.0:assertion}"

PROPAGATED = {
    "xml-specials": "<a href=\"x\">&'",
    "cdata-end": "]]>",
    "comment-start": "<!--",
    "entity-literal": "&amp;",
    "entity-like": "&lt;script&gt;",
    "combining-marks": "e\u0301\u0302\u0303",
    "right-to-left": "\u202eevil\u202c",
    "hebrew": "\u05e9\u05dc\u05d5\u05dd",
    "four-byte": "\U0001d11e\U0001f600",
    "cjk": "\u7528\u6237",
    "crlf": "line1\r\nline2",
    "lone-cr": "a\rb",
    "tab": "a\tb",
    "spaces": "  padded  ",
    "ten-kb": "x" * 10_240,
    "quotes": "\"double\" 'single'",
    "backslashes": "C:\\Users\\x",
    "percent": "%41%00%0d",
    "json-looking": "{\"user\":\"admin\"}",
    "sql": "' OR '1'='1",
    "header-injection": "a\r\nAuthorization: Bearer stolen",
    "unicode-max": "\U0010fffd",
    "nbsp": "\u00a0",
    "bom": "\ufeffbom",
}

REFUSED = {
    "nul": "a\u0000b",
    "bell": "a\u0007b",
    "escape": "\u001b[31mred",
    "nonchar-fffe": "\ufffe",
    "nonchar-ffff": "a\uffff",
    "number": 12345,
    "float": 1.5,
    "boolean": True,
    "array": ["alice"],
    "object": {"name": "alice"},
    "null": None,
    "empty": "",
    "blank": " \t\r\n ",
}


def verified_name_ids(client, marker: str) -> list[str]:
    """NameIDs as the token server received them, read from the part signxml verified."""
    found = []
    for r in client.token_requests():
        if r["outcome"] != "ok" or marker not in (r.get("assertion_xml") or ""):
            continue
        xml = decode_assertion(r["form"]["assertion"])
        signed = XMLVerifier().verify(xml, x509_cert=stack.trusted_cert(r["verified_by"]).read_text(),
                                      id_attribute="ID", expect_references=1).signed_xml
        found.append(signed.find(f"{SAML}Subject/{SAML}NameID").text)
    return found


@pytest.mark.parametrize("case", PROPAGATED)
def test_representable_user_ids_arrive_byte_for_byte(client, case):
    user = PROPAGATED[case]
    # A unique, otherwise harmless suffix makes the exchange findable among the others.
    user_id = f"{user}#{case}"
    jwt = client.jwt("placeholder", user_name=user_id)
    status, _, body = client.gateway("/hello", jwt)
    assert status == 200, body
    assert body["user"] == user_id and body["token_valid"] is True
    assert user_id in verified_name_ids(client, f"#{case}<")


@pytest.mark.parametrize("case", REFUSED)
def test_unrepresentable_or_non_string_user_ids_get_401(client, case):
    before = len(client.token_requests())
    jwt = client.jwt("placeholder", user_name=REFUSED[case])
    status, headers, body = client.gateway("/hello", jwt)
    assert status == 401, body
    assert headers["www-authenticate"] == "Bearer"
    assert body["error"] == "unauthorized" and body["error_description"]
    assert len(client.token_requests()) == before, "no exchange for a refused user"


def test_a_number_whose_bytes_spell_a_cached_user_is_not_that_user(client):
    """Envoy hands a claim read on its own as raw bytes: the number below as the 8 bytes
    "bobsmith". The plugin must not take it for Bob, whose token is cached."""
    user = "bobsmith"
    status, _, body = client.gateway("/hello", client.jwt(user))
    assert status == 200 and body["user"] == user, body
    number = struct.unpack("<d", user.encode())[0]
    before = len(client.token_requests())
    status, _, body = client.gateway("/hello", client.jwt("placeholder", user_name=number))
    assert status == 401, body
    assert "not a string" in body["error_description"]
    assert len(client.token_requests()) == before


@pytest.mark.parametrize("user", ["b", "P0001234"])
def test_user_ids_as_long_as_a_boolean_or_a_number_still_propagate(client, user):
    for _ in range(2):  # the exchange, then the cache hit
        status, _, body = client.gateway("/hello", client.jwt(user))
        assert status == 200, body
        assert body["user"] == user and body["token_valid"] is True
