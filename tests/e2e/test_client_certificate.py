"""`PrincipalPropagation` in the real Envoy: each user reaches the on-premise backend
(dev/onprem.py, which plays ABAP ICM) with a short-lived client certificate in
SSL_CLIENT_CERT, over a TLS connection on which Envoy presents the gateway's system
certificate. The backend trusts the header only on that connection and verifies the
certificate itself with `openssl verify` and Python `cryptography`; these tests check the
certificate once more, and that a client can never bring its own."""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
import subprocess
import threading
import urllib.request
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import local_ca
import stack

FORGED = "MIIBsjCCAVmgAwIBAgIUforgedforgedforged"
# Every header a forwarded client certificate may arrive in, in several spellings.
CLIENT_CERT_HEADERS = {
    "SSL_CLIENT_CERT": FORGED,
    "ssl_client_cert_chain_0": FORGED,
    "SSL-Client-Cert": FORGED,
    "X-SSL-Client-Cert": FORGED,
    "X-Forwarded-Client-Cert": f"Hash=abc;Cert=\"{FORGED}\"",
}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def onprem_call(client, path: str, token: str | None, extra: dict | None = None):
    headers = dict(extra or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    status, headers, body = client.call(f"http://127.0.0.1:{client.ports.listener}{path}", headers=headers)
    return status, {k.lower(): v for k, v in headers.items()}, json.loads(body) if body else None


def seen(client) -> list[dict]:
    """What reached the backend, asked over TLS with a client certificate of the local CA
    (not the gateway's: the backend answers any TLS client on this path)."""
    tls = local_ca.ensure(stack.TLS_DIR)
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.load_cert_chain(str(tls.stranger_cert), str(tls.stranger_key))
    with urllib.request.urlopen(f"https://localhost:{client.ports.onprem}/_onprem/seen", context=context,
                                timeout=10) as r:
        return json.loads(r.read())


def certificate_for(client, path: str) -> x509.Certificate:
    """The certificate the request to `path` carried, as the backend received it."""
    records = [r for r in seen(client) if r["path"] == path]
    assert len(records) == 1, records
    (value,) = records[0]["ssl_client_cert_headers"]
    return x509.load_der_x509_certificate(base64.b64decode(value, validate=True))


def users_ca() -> x509.Certificate:
    return x509.load_pem_x509_certificate(stack.key_files("ca")[1].read_bytes())


def test_a_user_arrives_as_the_subject_of_a_certificate_the_backend_verified(client):
    user = unique("alice")
    path = f"/onprem/{user}"
    status, _, body = onprem_call(client, path, client.jwt(user))
    assert status == 200, body
    assert body["user"] == user
    assert body["subject"] == f"CN={user}"
    assert body["authorization"] is False, "the gateway sends no Authorization"
    assert [h for h in body["headers"] if "cert" in h] == ["ssl_client_cert"]

    certificate = certificate_for(client, path)
    ca = users_ca()
    certificate.verify_directly_issued_by(ca)
    assert certificate.version == x509.Version.v3
    assert certificate.issuer == ca.subject
    assert certificate.serial_number.bit_length() >= 64
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    # Ten minutes (the stack's setting) from issue, notBefore backdated by the clock skew.
    assert lifetime == dt.timedelta(minutes=11), lifetime
    now = dt.datetime.now(dt.timezone.utc)
    assert certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_openssl_verifies_the_certificate_for_client_authentication(client, tmp_path):
    user = unique("openssl")
    path = f"/onprem/{user}"
    assert onprem_call(client, path, client.jwt(user))[0] == 200
    pem = tmp_path / "user.pem"
    pem.write_bytes(certificate_for(client, path).public_bytes(serialization.Encoding.PEM))
    ca = stack.key_files("ca")[1]
    verify = subprocess.run(["openssl", "verify", "-no-CApath", "-no-CAstore", "-CAfile", str(ca),
                             "-purpose", "sslclient", "-x509_strict", str(pem)],
                            capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0 and verify.stdout.strip().endswith(": OK"), verify.stdout + verify.stderr
    other = subprocess.run(["openssl", "verify", "-no-CApath", "-no-CAstore", "-CAfile",
                            str(stack.key_files("a")[1]), str(pem)], capture_output=True, text=True, timeout=30)
    assert other.returncode != 0, "another certificate is no issuer of it"


# Representable user ids reach the backend as exactly that CN; the subject text is
# compared with `cryptography`'s own RFC 4514 rendering of that value.
REPRESENTABLE = {
    "dn-specials": 'a,b+c=d"e\\f<g>h;i',
    "leading-hash": "#hash",
    "leading-space": " lead",
    "trailing-space": "trail ",
    "equals-and-comma": "CN=admin,O=evil",
    "cjk": "\u7528\u6237",
    "right-to-left": "\u202eevil\u202c",
    "four-byte": "\U0001d11e\U0001f600",
    "combining": "e\u0301\u0302",
    "sixty-four": "x" * 64,
}

REFUSED = {
    "ten-kb": "x" * 10_240,
    "sixty-five": "y" * 65,
    "nul": "a\u0000b",
    "crlf": "a\r\nb",
    "escape": "\u001b[31m",
    "blank": "   ",
}


@pytest.mark.parametrize("case", REPRESENTABLE)
def test_hostile_user_ids_arrive_as_exactly_the_intended_subject(client, case):
    user = REPRESENTABLE[case]
    path = f"/onprem/hostile-{case}-{uuid.uuid4().hex[:6]}"
    status, _, body = onprem_call(client, path, client.jwt("placeholder", user_name=user))
    assert status == 200, body
    assert body["user"] == user
    expected = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]).rfc4514_string()
    assert body["subject"] == expected
    certificate = certificate_for(client, path)
    assert [a.value for a in certificate.subject] == [user], "one attribute, the whole value"


@pytest.mark.parametrize("case", REFUSED)
def test_user_ids_a_dn_cannot_carry_are_refused_with_401(client, case):
    before = len(seen(client))
    status, headers, body = onprem_call(client, f"/onprem/refused-{case}",
                                        client.jwt("placeholder", user_name=REFUSED[case]))
    assert status == 401, body
    assert headers["www-authenticate"] == "Bearer"
    assert body["error"] == "unauthorized"
    # A blank id names nobody before any subject is made (as for SAML).
    reason = "is empty" if case == "blank" else "certificate subject"
    assert reason in body["error_description"], body
    assert REFUSED[case].strip() == "" or REFUSED[case][:8] not in body["error_description"]
    assert len(seen(client)) == before, "nothing reached the backend"


def test_a_client_supplied_certificate_never_reaches_the_backend(client):
    user = unique("forger")
    path = f"/onprem/{user}"
    status, _, body = onprem_call(client, path, client.jwt(user), CLIENT_CERT_HEADERS)
    assert status == 200, body
    assert body["user"] == user
    (record,) = [r for r in seen(client) if r["path"] == path]
    assert FORGED not in json.dumps(record), record
    assert len(record["ssl_client_cert_headers"]) == 1, "only the gateway's"

    # Without a user there is no request upstream at all, forged header or not.
    anonymous = f"/onprem/{unique('anonymous')}"
    status, _, body = onprem_call(client, anonymous, None, CLIENT_CERT_HEADERS)
    assert status == 401, body
    assert not [r for r in seen(client) if r["path"] == anonymous]

    # A forged header on the token route is removed as well.
    status, _, echoed = client.gateway("/hello", client.jwt(unique("saml")))
    assert status == 200
    forged = client.call(f"http://127.0.0.1:{client.ports.listener}/hello",
                         headers={"Authorization": f"Bearer {client.jwt(unique('saml'))}", **CLIENT_CERT_HEADERS})
    assert forged[0] == 200
    assert FORGED not in forged[2].decode()


def test_concurrent_first_requests_share_one_certificate_that_is_then_reused(client):
    user = unique("crowd")
    token = client.jwt(user)
    results: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        outcome = onprem_call(client, f"/onprem/{user}/{i}", token)
        with lock:
            results.append((outcome[0], outcome[2]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 20 and all(status == 200 for status, _ in results), results
    serials = {body["serial"] for _, body in results}
    assert len(serials) == 1, f"one certificate for the user across workers: {serials}"
    status, _, later = onprem_call(client, f"/onprem/{user}/later", token)
    assert status == 200 and later["serial"] in serials, "reused within its validity"


def test_the_trust_download_serves_the_users_ca_for_strust(client):
    status, headers, body = client.call(
        f"http://127.0.0.1:{client.ports.listener}/.well-known/saml-idp-metadata/users-ca/active.pem")
    assert status == 200
    served = x509.load_pem_x509_certificate(body)
    assert served == users_ca()
    usage = served.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert served.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_pp_keys_makes_a_sample_certificate_like_the_runtime_ones(tmp_path):
    key, cert = stack.key_files("ca")
    out = tmp_path / "sample.pem"
    made = subprocess.run([*stack.PP_KEYS, "sample-certificate", "--key", str(key), "--cert", str(cert),
                           "--user", "P1234567890", "--subject-pattern", "CN=${name},O=ACME,C=DE",
                           "--out", str(out)], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    sample = x509.load_pem_x509_certificate(out.read_bytes())
    assert sample.subject.rfc4514_string() == "CN=P1234567890,O=ACME,C=DE"
    verify = subprocess.run(["openssl", "verify", "-no-CApath", "-no-CAstore", "-CAfile", str(cert),
                             "-purpose", "sslclient", "-x509_strict", str(out)],
                            capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0, verify.stdout + verify.stderr


GOLDEN_TIME = 1_800_000_100  # within the golden certificates' validity (tests/common/sample.rs)


@pytest.mark.parametrize("algorithm", ["rsa", "ec"])
def test_the_golden_user_certificates_verify_with_openssl_and_cryptography(algorithm, tmp_path):
    """The bytes the plugin makes natively and in wasm (tests/golden.rs, wasm_core.rs)."""
    fixtures = stack.ROOT / "tests" / "fixtures"
    der = base64.b64decode((fixtures / f"golden-user-certificate-{algorithm}.b64").read_text(), validate=True)
    certificate = x509.load_der_x509_certificate(der)
    ca_path = fixtures / f"ca-{algorithm}-cert.pem"
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    certificate.verify_directly_issued_by(ca)
    user = '#a,b+c="d"\\<e>;\u00fc '
    expected = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ACME"),
        x509.NameAttribute(NameOID.EMAIL_ADDRESS, "a@example.com"),
        x509.NameAttribute(NameOID.COMMON_NAME, user),
    ])
    assert certificate.subject == expected
    assert certificate.subject.rfc4514_string() == expected.rfc4514_string()
    pem = tmp_path / "user.pem"
    pem.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    verify = subprocess.run(["openssl", "verify", "-no-CApath", "-no-CAstore", "-attime", str(GOLDEN_TIME),
                             "-CAfile", str(ca_path), "-purpose", "sslclient", "-x509_strict", str(pem)],
                            capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    late = subprocess.run(["openssl", "verify", "-no-CApath", "-no-CAstore", "-attime", str(GOLDEN_TIME + 3600),
                           "-CAfile", str(ca_path), str(pem)], capture_output=True, text=True, timeout=30)
    assert late.returncode != 0 and "expired" in late.stdout + late.stderr
