"""The on-premise backend (dev/onprem.py) behaves like ABAP ICM behind Cloud Connector:
it trusts the forwarded SSL_CLIENT_CERT header only from the gateway's system
certificate, verifies the forwarded certificate strictly, maps its one CN to the user,
and records what arrived. Also the local CA's client certificates (dev/local_ca.py)."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import http.client
import json
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "dev"))

import local_ca  # noqa: E402
import onprem  # noqa: E402
from test_servers import wait_ready  # noqa: E402  (the same start-up wait)

USER_CA_NAME = "principal-propagation user CA"
# Every character RFC 4514 escapes, a leading '#', a trailing space, and non-ASCII.
HOSTILE_CN = r'#a,b+c="d"\<e>;#f ü€😀 '
HOSTILE_RFC4514 = r'CN=\#a\,b\+c=\"d\"\\\<e\>\;#f ü€😀\ '
LEADING_SPACE_CN = " Ωmega user"


# ------------------------------------------------------------------ certificates


def now():
    return dt.datetime.now(dt.timezone.utc)


def cn(*values, **others):
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, others["c"])] if "c" in others else []
    attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, others["o"])] if "o" in others else []
    return x509.Name(attrs + [x509.NameAttribute(NameOID.COMMON_NAME, v) for v in values])


def key_usage(**flags):
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


@dataclasses.dataclass
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def make_ca(name=USER_CA_NAME, key=None, *, cert_sign=True) -> Ca:
    key = key or ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(cn(name)).issuer_name(cn(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now() - dt.timedelta(days=1)).not_valid_after(now() + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(key_usage(key_cert_sign=cert_sign, crl_sign=True, digital_signature=not cert_sign),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Ca(key, cert)


DEFAULT = object()


def leaf(ca: Ca, subject=None, *, valid=(-60, 240), ku=DEFAULT, eku=DEFAULT, aki=DEFAULT,
         signer: Ca | None = None) -> x509.Certificate:
    """A user certificate as the gateway mints it (5 minutes, KU digitalSignature critical,
    EKU clientAuth, AKI = the CA's SKI), with any part overridden or (None) left out."""
    signer = signer or ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(subject or cn("alice")).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now() + dt.timedelta(seconds=valid[0]))
               .not_valid_after(now() + dt.timedelta(seconds=valid[1])))
    ku = key_usage(digital_signature=True) if ku is DEFAULT else ku
    if ku is not None:
        builder = builder.add_extension(ku, critical=True)
    eku = [ExtendedKeyUsageOID.CLIENT_AUTH] if eku is DEFAULT else eku
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()) if aki is DEFAULT else aki
    if aki is not None:
        builder = builder.add_extension(aki, critical=False)
    return builder.sign(signer.key, hashes.SHA256())


def header(cert: x509.Certificate) -> str:
    """The plugin's encoding: single-line standard base64 of the DER."""
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# ------------------------------------------------------------------- fixtures


@dataclasses.dataclass
class Backend:
    port: int
    tls: local_ca.TlsFiles
    ca: Ca

    def request(self, headers=(), *, identity="gateway", path="/sap/bc/ping?sap-client=001", method="GET",
                body=None, timeout=10.0):
        """(status, JSON body) of one request on a new TLS connection that authenticates
        as `identity` (a local_ca client name, a (cert, key) pair, or None)."""
        conn = connect(self.port, self.tls, identity, timeout)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def seen(self):
        status, body = self.request(identity="stranger", path="/_onprem/seen")
        assert status == 200
        return body


def client_context(tls: local_ca.TlsFiles, identity) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(tls.ca))
    if identity in ("gateway", "stranger"):
        ctx.load_cert_chain(getattr(tls, f"{identity}_cert"), getattr(tls, f"{identity}_key"))
    elif identity is not None:
        ctx.load_cert_chain(*identity)
    return ctx


def connect(port, tls, identity, timeout=10.0, ctx=None):
    return http.client.HTTPSConnection("localhost", port, context=ctx or client_context(tls, identity),
                                       timeout=timeout)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return local_ca.ensure(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def user_ca(tmp_path_factory):
    ca = make_ca()
    path = tmp_path_factory.mktemp("user-ca") / "user-ca.pem"
    path.write_bytes(ca.pem())
    return ca, path


@pytest.fixture(scope="module")
def backend(tls, user_ca):
    server = onprem.start(0, tls, user_ca[1])
    try:
        yield Backend(server.server_address[1], tls, user_ca[0])
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def reset(request):
    if "backend" in request.fixturenames:
        backend = request.getfixturevalue("backend")
        assert backend.request(identity="stranger", method="POST", path="/_onprem/reset", body=b"")[0] == 200


# ------------------------------------------------------------ forwarded users


@pytest.mark.parametrize("subject, user, rfc4514", [
    (cn("alice"), "alice", "CN=alice"),
    (cn("alice", o="ACME, Inc.", c="DE"), "alice", "CN=alice,O=ACME\\, Inc.,C=DE"),
    (cn(HOSTILE_CN), HOSTILE_CN, HOSTILE_RFC4514),
    (cn(LEADING_SPACE_CN), LEADING_SPACE_CN, "CN=\\ Ωmega user"),
], ids=["plain", "with-o-and-c", "hostile", "leading-space"])
def test_a_good_certificate_from_the_trusted_proxy_names_the_user(backend, subject, user, rfc4514):
    cert = leaf(backend.ca, subject)
    status, body = backend.request([("SSL_CLIENT_CERT", header(cert)), ("Authorization", "Bearer x")],
                                   method="POST", body=b"{}")
    assert status == 200, body
    assert body["user"] == user
    assert body["subject"] == rfc4514
    assert body["serial"] == format(cert.serial_number, "x")
    assert body["not_before"] == cert.not_valid_before_utc.isoformat()
    assert body["not_after"] == cert.not_valid_after_utc.isoformat()
    assert body["key_usage"] == ["digital_signature"]
    assert (body["path"], body["method"], body["authorization"]) == ("/sap/bc/ping?sap-client=001", "POST", True)
    assert body["headers"] == sorted(body["headers"])
    assert {"ssl_client_cert", "authorization", "host"} <= set(body["headers"])


def test_the_header_name_is_case_insensitive_and_optional_whitespace_is_dropped(backend):
    status, body = backend.request([("ssl_client_cert", f" {header(leaf(backend.ca))}\t")])
    assert (status, body["user"], body["authorization"]) == (200, "alice", False)


@pytest.mark.parametrize("value", [None, "", "   "], ids=["missing", "empty", "blank"])
def test_no_certificate_is_401(backend, value):
    status, body = backend.request([] if value is None else [("SSL_CLIENT_CERT", value)])
    assert (status, body) == (401, {"error": "no user certificate"})


def other_same_name(ca):
    """A CA with the user CA's name but another key."""
    return make_ca(USER_CA_NAME)


def unpadded(ca):
    for _ in range(50):  # an ECDSA signature's length varies: find a DER that needs padding
        value = header(leaf(ca))
        if value.endswith("="):
            return value.rstrip("=")
    raise AssertionError("no certificate needing base64 padding in 50 tries")


def folded(text, width=64):
    """A multi-line value as HTTP/1.1 obs-fold carries it (http.client allows CRLF + space)."""
    return "\r\n ".join(text[i:i + width] for i in range(0, len(text), width))


BAD = {
    "expired": (lambda ca: header(leaf(ca, valid=(-3600, -600))), "certificate expired"),
    "not-yet-valid": (lambda ca: header(leaf(ca, valid=(600, 900))), "not yet valid"),
    "other-ca-same-name": (lambda ca: header(leaf(other_same_name(ca))), "not issued by the user CA"),
    "other-ca": (lambda ca: header(leaf(make_ca("another CA"))), "not issued by the user CA"),
    "signed-by-other-key": (lambda ca: header(leaf(ca, signer=make_ca())), "not issued by the user CA"),
    "no-eku": (lambda ca: header(leaf(ca, eku=None)), "ExtendedKeyUsage missing"),
    "eku-server-auth-only": (lambda ca: header(leaf(ca, eku=[ExtendedKeyUsageOID.SERVER_AUTH])),
                             "ExtendedKeyUsage lacks clientAuth"),
    "no-ku": (lambda ca: header(leaf(ca, ku=None)), "KeyUsage missing"),
    "ku-without-digital-signature": (lambda ca: header(leaf(ca, ku=key_usage(key_encipherment=True))),
                                     "KeyUsage lacks digitalSignature"),
    "no-aki": (lambda ca: header(leaf(ca, aki=None)), "AuthorityKeyIdentifier missing"),
    "aki-of-another-key": (lambda ca: header(leaf(ca, aki=x509.AuthorityKeyIdentifier.from_issuer_public_key(
        ec.generate_private_key(ec.SECP256R1()).public_key()))), "AuthorityKeyIdentifier does not name"),
    "two-cns": (lambda ca: header(leaf(ca, cn("alice", "bob"))), "exactly one CN, has 2"),
    "no-cn": (lambda ca: header(leaf(ca, x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ACME")]))),
              "exactly one CN, has 0"),
    "pem-folded": (lambda ca: pem(leaf(ca)).strip().replace("\n", "\r\n "), "base64"),
    "pem-one-line": (lambda ca: pem(leaf(ca)).strip().replace("\n", " "), "base64"),
    "pem-url-encoded": (lambda ca: urllib.parse.quote(pem(leaf(ca))), "base64"),
    "base64-of-pem": (lambda ca: base64.b64encode(pem(leaf(ca)).encode()).decode(), "not a DER X.509"),
    "base64-with-newline": (lambda ca: folded(header(leaf(ca))), "base64"),
    "base64-with-space": (lambda ca: header(leaf(ca))[:40] + " " + header(leaf(ca))[40:], "base64"),
    "base64url": (lambda ca: base64.urlsafe_b64encode(leaf(ca).public_bytes(serialization.Encoding.DER)).decode(),
                  "base64"),
    "unpadded": (unpadded, "base64"),
    "garbage": (lambda ca: "not a certificate", "base64"),
    "base64-garbage": (lambda ca: base64.b64encode(b"\x30\x03\x02\x01\x01 trailing").decode(), "not a DER X.509"),
    "truncated": (lambda ca: base64.b64encode(leaf(ca).public_bytes(serialization.Encoding.DER)[:-20]).decode(),
                  "not a DER X.509"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_certificate_is_403_with_a_reason(backend, case):
    make, reason = BAD[case]
    value = make(backend.ca)
    status, body = backend.request([("SSL_CLIENT_CERT", value)])
    assert status == 403, body
    assert body["error"] == "invalid user certificate"
    assert reason in body["reason"]
    assert value not in body["reason"] and "MII" not in body["reason"]


def test_base64url_differs_from_base64_in_that_case(backend):
    # Guards "base64url": its value is only a test if it has '-' or '_' in it.
    der = leaf(backend.ca).public_bytes(serialization.Encoding.DER)
    assert base64.urlsafe_b64encode(der) != base64.b64encode(der)


def test_two_headers_are_refused(backend):
    value = header(leaf(backend.ca))
    status, body = backend.request([("SSL_CLIENT_CERT", value), ("ssl_client_cert", value)])
    assert status == 403 and "more than one" in body["reason"]


def test_the_user_ca_is_read_at_each_request_and_openssl_checks_too(tls, tmp_path):
    """Only openssl finds that the CA may not sign certificates (KeyUsage without
    keyCertSign): proof that its check runs. A new CA file counts at the next request."""
    ca = make_ca()
    ca_file = tmp_path / "user-ca.pem"
    ca_file.write_bytes(ca.pem())
    server = onprem.start(0, tls, ca_file)
    try:
        backend = Backend(server.server_address[1], tls, ca)
        cert = leaf(ca)
        assert backend.request([("SSL_CLIENT_CERT", header(cert))])[0] == 200
        ca_file.write_bytes(make_ca(key=ca.key, cert_sign=False).pem())
        status, body = backend.request([("SSL_CLIENT_CERT", header(cert))])
        assert status == 403 and body["reason"].startswith("openssl verify: error "), body
        ca_file.write_bytes(make_ca().pem())
        status, body = backend.request([("SSL_CLIENT_CERT", header(cert))])
        assert status == 403 and "not issued by the user CA" in body["reason"]
        ca_file.unlink()
        status, body = backend.request([("SSL_CLIENT_CERT", header(cert))])
        assert (status, body["error"]) == (500, "user CA unusable")
    finally:
        server.shutdown()
        server.server_close()


def test_a_configured_header_name_is_the_one_read(tls, user_ca):
    server = onprem.start(0, tls, user_ca[1], header="X-Client-Cert")
    try:
        backend = Backend(server.server_address[1], tls, user_ca[0])
        value = header(leaf(user_ca[0]))
        assert backend.request([("SSL_CLIENT_CERT", value)])[0] == 401
        status, body = backend.request([("x-client-cert", value)])
        assert (status, body["user"]) == (200, "alice")
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------- other connections


@pytest.mark.parametrize("name", ["SSL_CLIENT_CERT", "ssl_client_cert_chain_0", "X-Forwarded-Client-Cert",
                                  "X-SSL-Client-Cert", "SSL-Client-Cert"])
def test_a_client_that_is_not_the_trusted_proxy_has_its_header_ignored(backend, name):
    value = header(leaf(backend.ca))
    status, body = backend.request([(name, value)], identity="stranger")
    assert (status, body) == (200, {"user": None, "connection_subject": f"CN={local_ca.STRANGER_CN}",
                                    "header_ignored": True, "headers": sorted(["host", name.lower()])})
    assert backend.seen() == [{"path": "/sap/bc/ping?sap-client=001", "from_trusted_proxy": False,
                               "ssl_client_cert_headers": [value], "outcome": 200}]


def test_a_stranger_without_the_header_is_answered_too(backend):
    status, body = backend.request(identity="stranger")
    assert (status, body["user"], body["header_ignored"]) == (200, None, False)


def test_the_trusted_proxy_is_matched_on_issuer_as_well_as_subject(tls, user_ca, tmp_path):
    """A proxy configured with the gateway's subject under another issuer does not make
    the gateway's own certificate trusted."""
    key = ec.generate_private_key(ec.SECP256R1())
    lookalike = (x509.CertificateBuilder().subject_name(cn(local_ca.GATEWAY_CN)).issuer_name(cn("an unrelated CA"))
                 .public_key(key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now() - dt.timedelta(days=1)).not_valid_after(now() + dt.timedelta(days=1))
                 .sign(key, hashes.SHA256()))
    (tmp_path / "lookalike.pem").write_text(pem(lookalike))
    server = onprem.start(0, dataclasses.replace(tls, gateway_cert=tmp_path / "lookalike.pem"), user_ca[1])
    try:
        backend = Backend(server.server_address[1], tls, user_ca[0])
        status, body = backend.request([("SSL_CLIENT_CERT", header(leaf(user_ca[0])))])
        assert (status, body["user"], body["header_ignored"]) == (200, None, True)
        assert body["connection_subject"] == f"CN={local_ca.GATEWAY_CN}"
    finally:
        server.shutdown()
        server.server_close()


def refused(backend, ctx):
    conn = connect(backend.port, backend.tls, None, ctx=ctx)
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            conn.request("GET", "/")
            conn.getresponse().read()
    finally:
        conn.close()


def test_a_client_without_a_certificate_is_refused_in_the_handshake(backend):
    refused(backend, client_context(backend.tls, None))  # TLS 1.3: the alert follows the handshake
    tls12 = client_context(backend.tls, None)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    conn = connect(backend.port, backend.tls, None, ctx=tls12)
    try:
        with pytest.raises(ssl.SSLError):
            conn.connect()
    finally:
        conn.close()
    assert backend.seen() == []


def test_a_user_certificate_presented_directly_is_refused_in_the_handshake(backend, tmp_path):
    """The user CA is not the TLS clients' CA: a user's certificate cannot log on itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(cn("alice")).issuer_name(backend.ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now() - dt.timedelta(minutes=1)).not_valid_after(now() + dt.timedelta(minutes=4))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(backend.ca.key, hashes.SHA256()))
    (tmp_path / "alice.pem").write_text(pem(cert))
    (tmp_path / "alice-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    refused(backend, client_context(backend.tls, (tmp_path / "alice.pem", tmp_path / "alice-key.pem")))
    assert backend.seen() == []


# ----------------------------------------------------------------- the record


def test_seen_records_every_request_and_reset_clears_it(backend):
    good = header(leaf(backend.ca))
    backend.request([("SSL_CLIENT_CERT", good)], path="/a")
    backend.request([("SSL_CLIENT_CERT", "")], path="/b")
    backend.request([("SSL_CLIENT_CERT", "garbage")], path="/c")
    backend.request([("X-Forwarded-Client-Cert", "Hash=1"), ("x-unrelated", "1")], identity="stranger", path="/d")
    assert backend.seen() == [
        {"path": "/a", "from_trusted_proxy": True, "ssl_client_cert_headers": [good], "outcome": 200},
        {"path": "/b", "from_trusted_proxy": True, "ssl_client_cert_headers": [""], "outcome": 401},
        {"path": "/c", "from_trusted_proxy": True, "ssl_client_cert_headers": ["garbage"], "outcome": 403},
        {"path": "/d", "from_trusted_proxy": False, "ssl_client_cert_headers": ["Hash=1"], "outcome": 200},
    ]
    assert backend.request(identity="gateway", method="POST", path="/_onprem/reset", body=b"")[0] == 200
    assert backend.seen() == []


def test_the_record_keeps_the_latest_ten_thousand():
    state = onprem.Onprem(Path("unused"), "SSL_CLIENT_CERT", cn("p"), cn("i"))
    for i in range(onprem.MAX_RECORDS + 5):
        state.record({"path": f"/{i}"})
    seen = state.seen()
    assert len(seen) == onprem.MAX_RECORDS and seen[0] == {"path": "/5"}


# ------------------------------------------------------------------- local CA


def openssl_verify(ca: Path, cert: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "verify", "-CAfile", str(ca), "-no-CApath", "-no-CAstore",
                           "-purpose", "sslclient", "-x509_strict", str(cert)],
                          capture_output=True, text=True, timeout=30)


def test_the_local_ca_makes_strict_client_certificates(tls):
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    for path, key_path, common_name in ((tls.gateway_cert, tls.gateway_key, local_ca.GATEWAY_CN),
                                        (tls.stranger_cert, tls.stranger_key, local_ca.STRANGER_CN)):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        assert cert.subject == cn(common_name) and cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
            [ExtendedKeyUsageOID.CLIENT_AUTH]
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
        assert key.public_key() == cert.public_key()
        done = openssl_verify(tls.ca, path)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_local_ca_is_remade_whole_when_a_file_is_missing(tmp_path):
    first = local_ca.ensure(tmp_path)
    files = dataclasses.astuple(first)
    before = {p: p.read_bytes() for p in files}
    assert local_ca.ensure(tmp_path) == first and {p: p.read_bytes() for p in files} == before
    first.gateway_key.unlink()
    first.stranger_cert.unlink()  # as in a directory made before the client certificates existed
    second = local_ca.ensure(tmp_path)
    assert all(p.exists() for p in files)
    assert second.ca.read_bytes() != before[first.ca]
    done = openssl_verify(second.ca, second.gateway_cert)
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------- standalone, servers.py


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise
    finally:
        proc.stdout.close()


def test_standalone_serves_until_sigterm_and_logs_no_certificate(tls, user_ca, tmp_path):
    port, log = free_port(), tmp_path / "onprem.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(ROOT / "dev" / "onprem.py"), "--port", str(port),
                                 "--tls-dir", str(tls.ca.parent), "--user-ca", str(user_ca[1])],
                                stdout=subprocess.PIPE, stderr=stderr)
    try:
        wait_ready(proc, log)
        value = header(leaf(user_ca[0]))
        status, body = Backend(port, tls, user_ca[0]).request([("SSL_CLIENT_CERT", value)], path="/x?q=secret")
        assert (status, body["user"]) == (200, "alice")
    finally:
        assert stop(proc) == 0
    text = log.read_text()
    assert "onprem GET /x 200" in text
    assert value[:40] not in text and "secret" not in text and "alice" not in text


def test_servers_py_runs_the_backend_when_asked(tls, user_ca, tmp_path):
    ports, log = [free_port() for _ in range(4)], tmp_path / "servers.log"
    common = [sys.executable, str(ROOT / "dev" / "servers.py"), "--idp-port", str(ports[0]),
              "--token-port", str(ports[1]), "--echo-port", str(ports[2]), "--trusted-cert", str(user_ca[1]),
              "--trusted-issuer", "i", "--entity-id", "e", "--client-id", "c", "--client-secret", "s"]
    half = subprocess.run(common + ["--onprem-port", str(ports[3])], capture_output=True, text=True, timeout=30)
    assert half.returncode == 2 and "go together" in half.stderr
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(common + ["--onprem-port", str(ports[3]), "--onprem-user-ca", str(user_ca[1]),
                                          "--tls-dir", str(tls.ca.parent)], stdout=subprocess.PIPE, stderr=stderr)
    try:
        wait_ready(proc, log)
        status, body = Backend(ports[3], tls, user_ca[0]).request([("SSL_CLIENT_CERT", header(leaf(user_ca[0])))])
        assert (status, body["user"]) == (200, "alice")
    finally:
        assert stop(proc) == 0
