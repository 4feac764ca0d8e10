"""Every assertion the token server received verifies with two independent
implementations (xmlsec1 and signxml), and one changed byte makes both fail."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
from signxml import XMLVerifier

import stack
from conftest import ROOT, decode_assertion

SAML = "{urn:oasis:names:tc:SAML:2.0:assertion}"


def xmlsec1_verifies(xml: bytes, cert: Path) -> bool:
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        f.write(xml)
        f.flush()
        result = subprocess.run(
            ["xmlsec1", "--verify", "--pubkey-cert-pem", str(cert),
             "--id-attr:ID", "urn:oasis:names:tc:SAML:2.0:assertion:Assertion", f.name],
            capture_output=True, timeout=30,
        )
    return result.returncode == 0


def signxml_verified_name_id(xml: bytes, cert: Path) -> str | None:
    """The NameID as signxml vouches for it (read from the signed part), or None."""
    try:
        result = XMLVerifier().verify(xml, x509_cert=cert.read_text(), id_attribute="ID", expect_references=1)
    except Exception:
        return None
    return result.signed_xml.find(f"{SAML}Subject/{SAML}NameID").text


def mutations(xml: bytes, count: int):
    """`count` copies of `xml`, each with one alphanumeric byte changed, spread over
    the whole document (markup, values, digest and signature alike). Not a character
    right before `=`: in base64 that is the last one before the padding, part of whose
    bits decoding drops, so changing it can leave the value as it was (seen: xmlsec1
    rightly accepting a signature "changed" that way)."""
    positions = [i for i, b in enumerate(xml) if chr(b).isalnum() and xml[i + 1:i + 2] != b"="]
    step = max(1, len(positions) // count)
    for i in positions[::step][:count]:
        b = xml[i]
        changed = ord("x") if b != ord("x") else ord("y")
        yield i, xml[:i] + bytes([changed]) + xml[i + 1:]


@pytest.fixture(scope="module")
def received(client):
    users = ["sig-alice", "sig <&\"'> ]]> é 𝄞", "sig\ttab"]
    for user in users:
        assert client.gateway("/hello", client.jwt(user))[0] == 200
    # Each with the certificate of the key that signed it, as the token server found it:
    # a gateway key's, or the development Entra ID's (assertions issued on behalf of a user).
    status, _, sts_pem = client.call(f"http://127.0.0.1:{client.ports.sts}/_sts/certificate")
    assert status == 200
    sts_cert = stack.ROOT / ".run" / "sts-signing.pem"
    sts_cert.write_bytes(sts_pem)

    def certificate(label: str) -> Path:
        return sts_cert if label == "sts" else stack.trusted_cert(label)

    assertions = [(decode_assertion(r["form"]["assertion"]), certificate(r["verified_by"]))
                  for r in client.token_requests() if r["outcome"] == "ok" and r["form"].get("assertion")]
    assert len(assertions) >= len(users)
    return users, assertions


def test_every_received_assertion_verifies_with_xmlsec1_and_signxml(received):
    users, assertions = received
    seen = set()
    for xml, cert in assertions:
        assert xmlsec1_verifies(xml, cert)
        name_id = signxml_verified_name_id(xml, cert)
        assert name_id is not None
        seen.add(name_id)
    assert set(users) <= seen, "NameIDs arrive byte for byte as the users' ids"


def test_one_changed_byte_fails_both_verifiers(received):
    _, assertions = received
    xml, cert = next((a, c) for a, c in assertions if b"X509Certificate" not in a)
    checked = 0
    for position, mutated in mutations(xml, 40):
        assert not xmlsec1_verifies(mutated, cert), f"xmlsec1 accepted a change at byte {position}"
        assert signxml_verified_name_id(mutated, cert) is None, f"signxml accepted a change at byte {position}"
        checked += 1
    assert checked == 40


def test_assertion_signed_by_another_key_fails_both():
    other = ROOT / "tests" / "fixtures" / "other-cert.pem"
    golden = (ROOT / "tests" / "fixtures" / "golden-assertion.xml").read_bytes()
    assert not xmlsec1_verifies(golden, other)
    assert signxml_verified_name_id(golden, other) is None


@pytest.mark.parametrize("golden, cert, other", [
    ("golden-assertion.xml", "signing-cert.pem", "ec-cert.pem"),
    ("golden-assertion-ec.xml", "ec-cert.pem", "signing-cert.pem"),
])
def test_golden_assertions_of_the_unit_tests_verify_independently(golden, cert, other):
    # The same bytes are produced natively and under wasm (tests/golden.rs, tests/wasm_core.rs).
    fixtures = ROOT / "tests" / "fixtures"
    xml = (fixtures / golden).read_bytes()
    assert xmlsec1_verifies(xml, fixtures / cert)
    assert signxml_verified_name_id(xml, fixtures / cert) == "<ä&b>\r\n\"x\" ]]> 𝄞"
    assert not xmlsec1_verifies(xml, fixtures / other)


def test_ecdsa_p256_assertions_verify_with_both_verifiers(client):
    status, _, body = client.gateway("/t/ec/x", client.jwt("ec-user"))
    assert status == 200 and body["user"] == "ec-user"
    sent = [r for r in client.token_requests() if r["outcome"] == "ok" and ">ec-user<" in (r.get("assertion_xml") or "")]
    assert [r["verified_by"] for r in sent] == ["ec-cert"]
    xml = decode_assertion(sent[0]["form"]["assertion"])
    assert b'Algorithm="http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256"' in xml
    cert = stack.key_files("ec")[1]
    assert xmlsec1_verifies(xml, cert)
    assert signxml_verified_name_id(xml, cert) == "ec-user"
    for _, mutated in mutations(xml, 10):
        assert not xmlsec1_verifies(mutated, cert)
        assert signxml_verified_name_id(mutated, cert) is None

