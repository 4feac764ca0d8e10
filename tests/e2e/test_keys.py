"""`pp keys` (behind `make keys`, `make renew`, `make regenerate`): the files it writes
are read by openssl and by the plugin, renew keeps the key, regenerate replaces it."""

from __future__ import annotations

import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import stack


def pp_keys(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*stack.PP_KEYS, *args], capture_output=True, text=True, timeout=120)


def openssl_x509(cert, *fields: str) -> str:
    return subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", *fields],
                          capture_output=True, text=True, check=True, timeout=30).stdout


def public_key(cert) -> bytes:
    return x509.load_pem_x509_certificate(cert.read_bytes()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("bits", ["2048", "3072"])
def test_generate_writes_a_key_and_a_two_year_certificate_named_after_the_issuer(tmp_path, bits):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    result = pp_keys("generate", "--issuer", "gateway.example.com", "--bits", bits, "--key", str(key), "--cert", str(cert))
    assert result.returncode == 0, result.stderr
    assert openssl_x509(cert, "-subject").strip() == "subject=CN = gateway.example.com"
    text = openssl_x509(cert, "-text")
    assert f"Public-Key: ({bits} bit)" in text
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    lifetime = parsed.not_valid_after_utc - parsed.not_valid_before_utc
    assert 729 <= lifetime.days <= 731
    assert key.stat().st_mode & 0o077 == 0, "private key readable by its owner only"
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")


def test_renew_keeps_the_key_and_regenerate_replaces_it(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    assert pp_keys("generate", "--issuer", "gw", "--days", "30", "--key", str(key), "--cert", str(cert)).returncode == 0
    first_serial, first_key = openssl_x509(cert, "-serial"), public_key(cert)
    key_bytes = key.read_bytes()

    assert pp_keys("renew", "--key", str(key), "--cert", str(cert)).returncode == 0
    assert key.read_bytes() == key_bytes
    assert public_key(cert) == first_key
    assert openssl_x509(cert, "-serial") != first_serial
    assert openssl_x509(cert, "-subject").strip() == "subject=CN = gw", "renew keeps the CN"
    renewed = x509.load_pem_x509_certificate(cert.read_bytes())
    assert (renewed.not_valid_after_utc - renewed.not_valid_before_utc).days >= 729

    assert pp_keys("generate", "--issuer", "gw", "--key", str(key), "--cert", str(cert)).returncode == 0
    assert public_key(cert) != first_key


def test_bad_requests_are_refused_with_a_reason(tmp_path):
    result = pp_keys("generate", "--issuer", "gw", "--bits", "1024", "--key", str(tmp_path / "k"), "--cert", str(tmp_path / "c"))
    assert result.returncode == 2 and "--bits must be 2048, 3072 or 4096" in result.stderr
    result = pp_keys("renew", "--key", str(tmp_path / "missing.pem"), "--cert", str(tmp_path / "c.pem"))
    assert result.returncode == 2 and "missing.pem" in result.stderr
    assert pp_keys("generate", "--key", "k").returncode == 2


def test_generate_ca_makes_a_certificate_authority_for_the_users_certificates(tmp_path):
    key, cert = tmp_path / "ca-key.pem", tmp_path / "ca.pem"
    result = pp_keys("generate", "--ca", "true", "--issuer", "Users CA", "--bits", "4096",
                     "--key", str(key), "--cert", str(cert))
    assert result.returncode == 0, result.stderr
    assert "CA certificate" in result.stdout
    text = openssl_x509(cert, "-text")
    assert "Public-Key: (4096 bit)" in text
    ca = x509.load_pem_x509_certificate(cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days in (365, 366), "a year, as SAP's"
    # openssl takes it as an issuer: a sample user certificate verifies against it.
    sample = tmp_path / "sample.pem"
    made = pp_keys("sample-certificate", "--key", str(key), "--cert", str(cert), "--user", "alice", "--out", str(sample))
    assert made.returncode == 0, made.stderr
    verify = subprocess.run(["openssl", "verify", "-no-CApath", "-no-CAstore", "-CAfile", str(cert),
                             "-purpose", "sslclient", "-x509_strict", str(sample)],
                            capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Renewing keeps it a CA.
    assert pp_keys("renew", "--key", str(key), "--cert", str(cert)).returncode == 0
    renewed = x509.load_pem_x509_certificate(cert.read_bytes())
    assert renewed.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    # An end-entity certificate cannot sign users' certificates.
    leaf_key, leaf = tmp_path / "k.pem", tmp_path / "c.pem"
    assert pp_keys("generate", "--issuer", "gw", "--key", str(leaf_key), "--cert", str(leaf)).returncode == 0
    refused = pp_keys("sample-certificate", "--key", str(leaf_key), "--cert", str(leaf), "--user", "alice")
    assert refused.returncode == 2 and "not a CA" in refused.stderr
    too_long = pp_keys("sample-certificate", "--key", str(key), "--cert", str(cert), "--user", "x" * 65)
    assert too_long.returncode == 2 and "longer than 64" in too_long.stderr
