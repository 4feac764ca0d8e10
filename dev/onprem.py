#!/usr/bin/env python3
"""An on-premise backend that plays SAP ABAP ICM behind Cloud Connector, for the plugin's
certificate mode: the gateway mints a short-lived X.509 certificate per user and forwards
it in a header (``SSL_CLIENT_CERT``: single-line base64 of the DER, no PEM armour) over a
TLS connection on which it authenticates with its own *system* client certificate.

Like ICM, this server

* requires a TLS client certificate signed by the local CA (dev/local_ca.py);
* trusts the header only when that connection certificate's subject and issuer are the
  configured reverse proxy's (icm/trusted_reverse_proxy_<x> = SUBJECT=..., ISSUER=...),
  here the gateway system certificate's; from anyone else the header is ignored;
* verifies the forwarded certificate on its own, twice (``openssl verify`` and
  ``cryptography``), against the user CA the operator gave the gateway, and maps its
  subject to a user like a CERTRULE rule on CN: the user is the one CN's value.

Answers are JSON so tests see exactly which user arrived (see ``OnpremHandler``).
``GET /_onprem/seen`` lists every request served with any client-certificate header it
carried (tests prove with it that a client's own header never got through);
``POST /_onprem/reset`` forgets them.

Dev/test only. Certificates and keys are never logged: one line per request with method,
path and status.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import datetime
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import local_ca
from servers import HOST, BaseHandler, Server

DEFAULT_HEADER = "SSL_CLIENT_CERT"
MAX_RECORDS = 10000
MAX_CERT_BYTES = 16 * 1024  # far more than a user certificate needs
OPENSSL_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0  # a client that stalls (in the handshake or a request) is dropped
BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
KEY_USAGES = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
              "key_agreement", "key_cert_sign", "crl_sign")


class Refused(Exception):
    """The forwarded certificate is not acceptable; the message is the 403 `reason`."""


def is_client_cert_header(name: str) -> bool:
    """Headers that carry a client certificate in one proxy convention or another. The
    dash spelling is included because CGI-style servers fold it into the underscore one."""
    name = name.lower()
    return (name.startswith(("ssl_client_cert", "ssl-client-cert"))
            or name in ("x-ssl-client-cert", "x-forwarded-client-cert"))


# ----------------------------------------------------------------- verification


def decode_header(value: str) -> bytes:
    """Strict single-line standard base64 (padded, canonical) of a DER certificate.

    Only the optional whitespace HTTP allows around a field value is dropped; anything
    else that is not base64 (PEM armour, folded lines, base64url, spaces) is refused."""
    value = value.strip(" \t")
    if not BASE64.fullmatch(value) or len(value) % 4:
        raise Refused("header is not single-line padded base64")
    try:
        der = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise Refused("header is not single-line padded base64") from None
    if base64.b64encode(der).decode("ascii") != value:
        raise Refused("header is not canonical base64")
    if len(der) > MAX_CERT_BYTES:
        raise Refused("certificate too large")
    return der


def expected_key_id(ca: x509.Certificate) -> bytes:
    """The key identifier a certificate issued by `ca` must name: the CA's SKI, or the
    RFC 5280 method 1 SHA-1 of its key when it has none."""
    try:
        return ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest


def check_with_cryptography(cert: x509.Certificate, cas: list[x509.Certificate],
                            now: datetime.datetime) -> None:
    """The checks ICM makes of a forwarded certificate, each with its own reason."""
    if cert.version != x509.Version.v3:
        raise Refused("certificate is not X.509 v3")
    if cert.serial_number <= 0:
        raise Refused("serial number is not positive")
    issuer = None
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        issuer = ca
        break
    if issuer is None:
        raise Refused("not issued by the user CA (issuer name or signature)")
    if now < cert.not_valid_before_utc:
        raise Refused("certificate not yet valid (notBefore)")
    if now > cert.not_valid_after_utc:
        raise Refused("certificate expired (notAfter)")
    try:
        key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise Refused("KeyUsage missing") from None
    if not key_usage.digital_signature:
        raise Refused("KeyUsage lacks digitalSignature")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise Refused("ExtendedKeyUsage missing") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise Refused("ExtendedKeyUsage lacks clientAuth")
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise Refused("AuthorityKeyIdentifier missing") from None
    if aki.key_identifier != expected_key_id(issuer):
        raise Refused("AuthorityKeyIdentifier does not name the user CA's key")


def check_with_openssl(cert: x509.Certificate, ca_pem: bytes) -> None:
    """`openssl verify` as a second, independent implementation: strict X.509, purpose
    sslclient, and only the user CA as trust anchor (-no-CApath/-no-CAstore keep the
    system's CAs out, which -CAfile alone would not)."""
    with tempfile.TemporaryDirectory(prefix="onprem-") as tmp:
        ca_file, cert_file = Path(tmp) / "user-ca.pem", Path(tmp) / "cert.pem"
        ca_file.write_bytes(ca_pem)
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        try:
            done = subprocess.run(
                ["openssl", "verify", "-CAfile", str(ca_file), "-no-CApath", "-no-CAstore",
                 "-purpose", "sslclient", "-x509_strict", str(cert_file)],
                capture_output=True, text=True, timeout=OPENSSL_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Refused("openssl verify timed out") from None
        except OSError:
            raise Refused("openssl verify could not run") from None
    if done.returncode != 0:
        # Only openssl's "error N at D depth lookup: ..." lines: never the certificate.
        errors = [line.strip() for line in (done.stdout + done.stderr).splitlines()
                  if re.match(r"error \d+ at \d+ depth lookup:", line.strip())]
        raise Refused("openssl verify: " + ("; ".join(errors) or f"exit status {done.returncode}"))


def user_of(cert: x509.Certificate) -> str:
    """CERTRULE on CN: the user is the value of the subject's one and only CN."""
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common_names) != 1:
        raise Refused(f"subject must have exactly one CN, has {len(common_names)}")
    value = common_names[0].value
    if not isinstance(value, str) or not value:
        raise Refused("CN is empty")
    return value


def key_usage_names(cert: x509.Certificate) -> list[str]:
    key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    names = [name for name in KEY_USAGES if getattr(key_usage, name)]
    if key_usage.key_agreement:  # only then are these two defined
        names += [name for name in ("encipher_only", "decipher_only") if getattr(key_usage, name)]
    return names


def verify_forwarded(value: str, user_ca: Path) -> dict:
    """Decode and verify a forwarded certificate; the 200 answer's user fields, or Refused."""
    der = decode_header(value)
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise Refused("not a DER X.509 certificate") from None
    # Read afresh for every request: tests may replace it. OSError/ValueError: unusable.
    ca_pem = user_ca.read_bytes()
    cas = x509.load_pem_x509_certificates(ca_pem)
    try:
        check_with_cryptography(cert, cas, datetime.datetime.now(datetime.timezone.utc))
        user = user_of(cert)
        subject = cert.subject.rfc4514_string()
    except ValueError as exc:  # a field that cryptography cannot parse
        raise Refused(f"malformed certificate: {type(exc).__name__}") from None
    check_with_openssl(cert, ca_pem)
    return {"user": user, "subject": subject, "serial": format(cert.serial_number, "x"),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(), "key_usage": key_usage_names(cert)}


# ------------------------------------------------------------------------ server


@dataclass
class Onprem:
    """Configuration and the record of requests served, shared by the handler threads."""

    user_ca: Path
    header: str
    proxy_subject: x509.Name  # the trusted reverse proxy, as icm/trusted_reverse_proxy_<x>
    proxy_issuer: x509.Name

    def __post_init__(self):
        self._lock = threading.Lock()
        self._seen = collections.deque(maxlen=MAX_RECORDS)

    def record(self, entry: dict) -> None:
        with self._lock:
            self._seen.append(entry)

    def seen(self) -> list[dict]:
        with self._lock:
            return list(self._seen)

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()


class OnpremHandler(BaseHandler):
    """Every path and method; answers (all JSON):

    * from the trusted proxy, with a valid forwarded certificate: 200 {"user", "subject",
      "serial", "not_before", "not_after", "key_usage", "path", "method",
      "authorization", "headers"};
    * from the trusted proxy, certificate refused: 403 {"error", "reason"}; header
      missing or empty (Cloud Connector's "no principal"): 401 {"error"};
    * from any other client: 200 {"user": null, "connection_subject", "header_ignored",
      "headers"}.
    """

    label = "onprem"
    timeout = REQUEST_TIMEOUT

    def handle_any(self):
        try:
            self.read_body()
        except ValueError:
            self.close_connection = True
        path = urlsplit(self.path).path
        if path == "/_onprem/seen" and self.command == "GET":
            self.send_json(200, self.app.seen())
            return
        if path == "/_onprem/reset" and self.command == "POST":
            self.app.reset()
            self.send_json(200, {})
            return
        peer = self.connection.getpeercert(binary_form=True)
        connection_cert = x509.load_der_x509_certificate(peer) if peer else None
        trusted = (connection_cert is not None and connection_cert.subject == self.app.proxy_subject
                   and connection_cert.issuer == self.app.proxy_issuer)
        names = sorted({name.lower() for name in self.headers.keys()})
        forwarded = [value for name, value in self.headers.items() if is_client_cert_header(name)]
        if trusted:
            status, body = self.from_proxy(names)
        else:
            status, body = 200, {
                "user": None,
                "connection_subject": connection_cert.subject.rfc4514_string() if connection_cert else None,
                "header_ignored": bool(forwarded), "headers": names}
        self.app.record({"path": self.path, "from_trusted_proxy": trusted,
                         "ssl_client_cert_headers": forwarded, "outcome": status})
        self.send_json(status, body)

    def from_proxy(self, names: list[str]) -> tuple[int, dict]:
        values = self.headers.get_all(self.app.header) or []
        if len(values) > 1:
            return 403, {"error": "invalid user certificate", "reason": f"more than one {self.app.header} header"}
        if not values or not values[0].strip(" \t"):
            return 401, {"error": "no user certificate"}
        try:
            fields = verify_forwarded(values[0], self.app.user_ca)
        except Refused as exc:
            return 403, {"error": "invalid user certificate", "reason": str(exc)}
        except (OSError, ValueError) as exc:
            return 500, {"error": "user CA unusable", "reason": type(exc).__name__}
        return 200, dict(fields, path=self.path, method=self.command,
                         authorization="authorization" in names, headers=names)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = handle_any


def make_server(port: int, tls_files: local_ca.TlsFiles, user_ca: Path,
                header: str = DEFAULT_HEADER) -> Server:
    """The backend bound to 127.0.0.1:`port` (0: any free port), not yet serving.

    TLS: the local CA's server certificate; a client certificate signed by the local CA
    is required. The trusted proxy is whoever has the gateway system certificate's
    subject and issuer."""
    gateway = x509.load_pem_x509_certificate(Path(tls_files.gateway_cert).read_bytes())
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    tls.load_cert_chain(tls_files.server_cert, tls_files.server_key)
    tls.load_verify_locations(cafile=tls_files.ca)
    tls.verify_mode = ssl.CERT_REQUIRED
    server = Server((HOST, port), OnpremHandler, tls=tls, host_name="localhost")
    server.app = Onprem(Path(user_ca), header, gateway.subject, gateway.issuer)
    return server


def start(port: int, tls_files: local_ca.TlsFiles, user_ca: Path, header: str = DEFAULT_HEADER) -> Server:
    """make_server, serving in a daemon thread; stop it with server.shutdown() and
    server.server_close(). The port it got is server.server_address[1]."""
    server = make_server(port, tls_files, user_ca, header)
    threading.Thread(target=server.serve_forever, name="onprem", daemon=True).start()
    return server


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls-dir", type=Path, required=True,
                   help="the local CA's directory (dev/local_ca.py; made if incomplete)")
    p.add_argument("--user-ca", type=Path, required=True,
                   help="PEM CA that signs the forwarded user certificates (read at each request)")
    p.add_argument("--header", default=DEFAULT_HEADER, help="the forwarded certificate's header")
    args = p.parse_args(argv)
    if not args.user_ca.is_file():
        p.error(f"--user-ca {args.user_ca} is not a file")
    try:
        server = make_server(args.port, local_ca.ensure(args.tls_dir), args.user_ca, args.header)
    except OSError as exc:
        print(f"cannot listen: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print("ready", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
