"""Trust lifecycle end to end: IdP metadata and certificates to download, keys from
the environment, a per-destination key, rotation under load without a failed request,
and certificate expiry notices."""

from __future__ import annotations

import datetime
import re
import subprocess
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from saml2 import config as saml2_config
from saml2.attribute_converter import ac_factory
from saml2.mdstore import MetadataStore

import stack
from conftest import Client, decode_assertion
from test_signatures import xmlsec1_verifies

METADATA = "/.well-known/saml-idp-metadata"


def der_of(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def pem_of_base64(b64: str) -> str:
    b64 = "".join(b64.split())
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def load_metadata(xml: str) -> MetadataStore:
    """pysaml2's own metadata loader: an implementation independent of ours."""
    store = MetadataStore(ac_factory(), saml2_config.Config())
    store.load("inline", xml)
    return store


def last_assertion_of(client: Client, user: str) -> tuple[bytes, str]:
    for r in reversed(client.token_requests()):
        if r["outcome"] == "ok" and f">{user}<" in (r.get("assertion_xml") or ""):
            return decode_assertion(r["form"]["assertion"]), r["verified_by"]
    raise AssertionError(f"no accepted assertion for {user}")


def test_idp_metadata_is_accepted_by_pysaml2_and_its_certificate_verifies_a_fresh_assertion(client, tmp_path):
    status, headers, _ = client.gateway(METADATA)
    assert status == 200
    assert headers["content-type"] == "application/samlmetadata+xml"
    xml = client.call(f"http://127.0.0.1:{client.ports.listener}{METADATA}")[2].decode()
    assert "PRIVATE" not in xml

    store = load_metadata(xml)
    certs = store.certs(stack.ISSUER, "idpsso", use="signing")
    active_pem, passive_pem = (pem_of_base64(c[1] if isinstance(c, tuple) else c) for c in certs)
    assert der_of(active_pem) == der_of(stack.key_files("a")[1].read_text())
    assert der_of(passive_pem) == der_of(stack.key_files("b")[1].read_text())

    assert client.gateway("/hello", client.jwt("metadata-user"))[0] == 200
    assertion, _ = last_assertion_of(client, "metadata-user")
    cert = tmp_path / "from-metadata.pem"
    cert.write_text(active_pem)
    assert xmlsec1_verifies(assertion, cert)
    cert.write_text(passive_pem)
    assert not xmlsec1_verifies(assertion, cert)


def test_certificates_download_as_pem_and_only_public_material_is_served(client):
    base = f"http://127.0.0.1:{client.ports.listener}{METADATA}"
    for path, slot in [("/default/active.pem", "a"), ("/default/passive.pem", "b"), ("/second/active.pem", "second")]:
        status, headers, body = client.call(base + path)
        assert status == 200
        assert der_of(body.decode()) == der_of(stack.key_files(slot)[1].read_text())
        assert b"PRIVATE" not in body
    assert client.call(base + "/second/passive.pem")[0] == 404
    assert client.call(base + "/nope")[0] == 404
    second = client.call(base + "/second")[2].decode()
    assert len(load_metadata(second).certs(stack.ISSUER, "idpsso", use="signing")) == 1
    assert client.call(base, method="POST", data=b"x")[0] == 405


def test_keys_come_from_the_environment_and_a_destination_can_name_its_own(client):
    config = stack.plugin_config(stack.Ports(), "test")
    assert all("privateKeyEnv" in slot for key in config["keys"].values() for slot in key.values()
               if isinstance(slot, dict)) and "privateKeyEnv" in config["keys"]["second"]
    status, _, body = client.gateway("/t/own-key/x", client.jwt("own-key-user"))
    assert status == 200 and body["user"] == "own-key-user"
    assertion, verified_by = last_assertion_of(client, "own-key-user")
    assert verified_by == "second-cert"
    assert xmlsec1_verifies(assertion, stack.key_files("second")[1])
    assert not xmlsec1_verifies(assertion, stack.key_files("a")[1])


def test_rotation_under_load_fails_no_request():
    ports = stack.Ports().shifted(12000)  # below the ephemeral port range
    with stack.Stack("test", ports, name="rotation") as gateway:
        client = Client(ports)
        cached = client.jwt("rot-cached")
        assert client.gateway("/hello", cached)[0] == 200
        users = {f"rot-{i}": client.jwt(f"rot-{i}") for i in range(12)}
        results, stop = [], threading.Event()

        def load(names):
            while not stop.is_set():
                for name in names:
                    status, _, body = client.gateway("/t/short/x", users[name])
                    results.append((time.time(), name, status, body.get("user") if body else None))

        names = list(users)
        threads = [threading.Thread(target=load, args=(names[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(3.0)
        swapped_at = time.time()
        assert stack.rotate(gateway.plugin_file) == ["default"]
        time.sleep(5.0)
        stop.set()
        for t in threads:
            t.join(timeout=30)

        failures = [r for r in results if r[2] != 200 or r[3] != r[1]]
        assert not failures, failures[:5]
        assert len(results) > 100

        exchanges = [r for r in client.token_requests() if r["outcome"] == "ok" and r["path"] == "/oauth/token"
                     and r["query"].get("expires_in") == "33"]
        before = {r["verified_by"] for r in exchanges if r["time"] < swapped_at}
        after = {r["verified_by"] for r in exchanges if r["time"] > swapped_at + 2.0}
        assert before == {"a-cert"}
        assert after == {"b-cert"}

        # The token cached before the swap keeps serving; the metadata now leads with b.
        assert client.gateway("/hello", cached)[0] == 200
        assert client.exchanges("rot-cached") == 1
        metadata = client.call(f"http://127.0.0.1:{ports.listener}{METADATA}")[2].decode()
        first = load_metadata(metadata).certs(stack.ISSUER, "idpsso", use="signing")[0]
        first = first[1] if isinstance(first, tuple) else first
        assert der_of(pem_of_base64(first)) == der_of(stack.key_files("b")[1].read_text())


def expired_key_pair() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stack.ISSUER)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now - datetime.timedelta(days=2, hours=1))
            .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode(),
            cert.public_bytes(serialization.Encoding.PEM).decode())


def test_expiry_notices_once_per_day_gauges_and_an_expired_active_certificate_still_signs(tmp_path):
    ports = stack.Ports().shifted(14000)  # below the ephemeral port range
    soon_key, soon_cert = tmp_path / "soon-key.pem", tmp_path / "soon-cert.pem"
    subprocess.run([*stack.PP_KEYS, "generate", "--issuer", stack.ISSUER, "--days", "5",
                    "--key", str(soon_key), "--cert", str(soon_cert)], check=True, capture_output=True)
    old_key, old_cert = expired_key_pair()
    (tmp_path / "old-cert.pem").write_text(old_cert)

    config = stack.plugin_config(ports, "test")
    config["keys"]["default"] = {"privateKeyEnv": "PP_EXTRA_0", "certificateEnv": "PP_EXTRA_1"}
    config["keys"]["old"] = {"privateKeyEnv": "PP_EXTRA_2", "certificateEnv": "PP_EXTRA_3"}
    next(d for d in config["destinations"] if d["Name"] == "own-key")["KeyStoreLocation"] = "old"
    env = {"PP_EXTRA_0": soon_key.read_text(), "PP_EXTRA_1": soon_cert.read_text(),
           "PP_EXTRA_2": old_key, "PP_EXTRA_3": old_cert}
    with stack.Stack("test", ports, name="expiry", config_override=config, extra_env=env,
                     extra_trusted=(soon_cert, tmp_path / "old-cert.pem")) as gateway:
        client = Client(ports)
        assert client.gateway("/hello", client.jwt("soon-user"))[0] == 200
        # Documented behaviour: an expired active certificate keeps signing (targets that
        # pin the key go on working); a target that checks validity, like the development
        # token server (signxml), refuses the assertion, and the client gets 502.
        status, _, body = client.gateway("/t/own-key/x", client.jwt("expired-user"))
        assert status == 502 and "invalid_grant" in body["error_description"]
        refused = [r for r in client.token_requests() if ">expired-user<" in (r.get("assertion_xml") or "")]
        assert [r["outcome"] for r in refused] == ["invalid_grant"]
        assert xmlsec1_verifies(decode_assertion(refused[0]["form"]["assertion"]), tmp_path / "old-cert.pem")

        gauges = dict(line.split(": ", 1) for line in client.call(
            f"http://127.0.0.1:{ports.admin}/stats?filter=certificate_days_left")[2].decode().splitlines())
        prefix = "wasmcustom.principal_propagation.certificate_days_left"
        # Valid 5 days from its creation a moment ago: 4 whole days left (5 within the same second).
        assert gauges[f"{prefix}.default.active"] in ("4", "5")
        assert gauges[f"{prefix}.old.active"] == "0"
        assert int(gauges[f"{prefix}.second.active"]) > 700

        log = gateway.envoy_log.read_text(errors="replace")
        soon = [l for l in log.splitlines()
                if re.search(r'certificate of key "default" \(active\) expires in [45] day\(s\), within 7 days', l)]
        expired = [l for l in log.splitlines() if 'certificate of key "old" (active) has expired 3 day(s) ago' in l]
        assert len(soon) == 1 and "[warning]" in soon[0], "one warning, not one per worker"
        assert len(expired) == 1 and "[error]" in expired[0]
        assert not any("second" in l and "certificate of key" in l for l in log.splitlines())
