"""A local certificate authority for the development parties that speak TLS: a CA the
test configuration trusts, a server certificate it signs for `localhost` and
`127.0.0.1`, and a second, unrelated CA (a configuration that trusts only that one must
refuse the server). Made once into a directory and reused.

Two TLS *client* certificates signed by that CA play the on-premise scenario
(dev/onprem.py): the gateway's own system certificate, which the backend trusts as
its reverse proxy (like ICM's icm/trusted_reverse_proxy_<x>), and a stranger's, which
passes the TLS handshake but must not be trusted to forward a user's certificate."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import astuple, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class TlsFiles:
    ca: Path            # the CA the gateway trusts
    other_ca: Path      # a CA that did not sign the server's certificate
    server_cert: Path   # localhost / 127.0.0.1, signed by `ca`
    server_key: Path
    gateway_cert: Path  # the gateway's system client certificate, signed by `ca`
    gateway_key: Path
    stranger_cert: Path  # another client certificate signed by `ca`, not a trusted proxy
    stranger_key: Path


GATEWAY_CN = "principal-propagation gateway system"
STRANGER_CN = "some other client"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str, now: datetime.datetime):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _client(common_name: str, ca_key, ca_cert: x509.Certificate, now: datetime.datetime):
    """A TLS client certificate (EC P-256, clientAuth) signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def ensure(directory: Path) -> TlsFiles:
    """The files in `directory`, made afresh (all of them, with a new CA) unless every one
    exists: a directory from before a file was added is regenerated, not half used."""
    files = TlsFiles(directory / "ca.pem", directory / "other-ca.pem", directory / "server.pem",
                     directory / "server-key.pem", directory / "gateway.pem", directory / "gateway-key.pem",
                     directory / "stranger.pem", directory / "stranger-key.pem")
    if all(p.exists() for p in astuple(files)):
        return files
    directory.mkdir(parents=True, exist_ok=True)
    files.ca.unlink(missing_ok=True)  # incomplete until it is written again, last
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, ca_cert = _ca("principal-propagation development CA", now)
    _, other_cert = _ca("an unrelated CA", now)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name("localhost")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files.server_key.write_bytes(_key_pem(key))
    files.server_cert.write_bytes(_pem(cert))
    for (key_path, cert_path), common_name in (((files.gateway_key, files.gateway_cert), GATEWAY_CN),
                                               ((files.stranger_key, files.stranger_cert), STRANGER_CN)):
        client_key, client_cert = _client(common_name, ca_key, ca_cert, now)
        key_path.write_bytes(_key_pem(client_key))
        cert_path.write_bytes(_pem(client_cert))
    files.other_ca.write_bytes(_pem(other_cert))
    files.ca.write_bytes(_pem(ca_cert))  # last: its presence means the set is complete
    return files
