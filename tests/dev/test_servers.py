"""End-to-end tests for dev/servers.py, run as a subprocess on free local ports."""

import base64
import datetime as dt
import json
import re
import selectors
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml import XMLSigner, methods

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ROOT / "dev" / "servers.py"
sys.path.insert(0, str(ROOT / "dev"))

import local_ca  # noqa: E402
SAML_NS = "urn:oasis:names:tc:SAML:2.0:assertion"
DS_NS = "http://www.w3.org/2000/09/xmldsig#"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
GRANT = "urn:ietf:params:oauth:grant-type:saml2-bearer"
ISSUER = "principal-propagation-gateway"
ENTITY_ID = "dev-token-server"
CLIENT_ID, CLIENT_SECRET = "gateway-client", "gateway-secret"
JWT_AUDIENCE = "principal-propagation-demo"
# The identity provider's OAuth clients (client credentials grant) and their tokens' audience.
API_CLIENTS = {"demo-app": "demo-app-secret", "other-app": "other+app:secret"}
SERVICE_AUDIENCE = "test-destinations-api"
ZONE_ID = "8d1e55aa-0c6b-4b43-a3a4-3f0f6b1e2c77"
READY_TIMEOUT = 20.0


# ------------------------------------------------------------------ helpers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_signing_identity():
    """Throwaway RSA key and self-signed certificate standing in for the plugin's."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def http(method, url, data=None, headers=None, timeout=15):
    """Tiny urllib wrapper returning (status, body bytes) for any status code."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def saml_time(offset=0.0):
    stamp = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=offset)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def build_assertion(identity, recipient, *, name_id="alice", audience=ENTITY_ID,
                    scd_not_before=False, extra_condition=None):
    """A signed assertion shaped like the plugin's: Signature right after Issuer."""
    key_pem, cert_pem = identity
    assertion_id = "_" + uuid.uuid4().hex
    root = etree.Element(f"{{{SAML_NS}}}Assertion", nsmap={"saml": SAML_NS},
                         ID=assertion_id, Version="2.0", IssueInstant=saml_time())

    def sub(parent, tag, text=None, **attrs):
        el = etree.SubElement(parent, f"{{{SAML_NS}}}{tag}", **attrs)
        el.text = text
        return el

    sub(root, "Issuer", ISSUER)
    root.append(etree.Element(f"{{{DS_NS}}}Signature", Id="placeholder", nsmap={"ds": DS_NS}))
    subject = sub(root, "Subject")
    sub(subject, "NameID", name_id, Format="urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified")
    confirmation = sub(subject, "SubjectConfirmation", Method="urn:oasis:names:tc:SAML:2.0:cm:bearer")
    scd = sub(confirmation, "SubjectConfirmationData", NotOnOrAfter=saml_time(300), Recipient=recipient)
    if scd_not_before:
        scd.set("NotBefore", saml_time(-10))
    conditions = sub(root, "Conditions", NotBefore=saml_time(-10), NotOnOrAfter=saml_time(300))
    sub(sub(conditions, "AudienceRestriction"), "Audience", audience)
    if extra_condition:
        sub(conditions, extra_condition)
    authn = sub(root, "AuthnStatement", AuthnInstant=saml_time(-5))
    sub(sub(authn, "AuthnContext"), "AuthnContextClassRef",
        "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport")

    signer = XMLSigner(method=methods.enveloped, signature_algorithm="rsa-sha256",
                       digest_algorithm="sha256", c14n_algorithm=EXC_C14N)
    signed = signer.sign(root, key=key_pem, cert=cert_pem.decode(),
                         reference_uri=f"#{assertion_id}", id_attribute="ID")
    return etree.tostring(signed)


def b64(xml_bytes, urlsafe=True):
    if urlsafe:
        return base64.urlsafe_b64encode(xml_bytes).rstrip(b"=").decode()
    return base64.b64encode(xml_bytes).decode()


# ----------------------------------------------------------------- fixtures


class Env:
    def __init__(self, idp, token, echo, idp_tls, identity, tls):
        self.idp = f"http://127.0.0.1:{idp}"
        self.token = f"http://127.0.0.1:{token}"
        self.echo = f"http://127.0.0.1:{echo}"
        self.idp_tls = f"https://127.0.0.1:{idp_tls}"
        self.identity = identity
        self.tls = tls  # local_ca.TlsFiles: the IdP's TLS port has its server certificate

    def assertion(self, path="/oauth/token", **kwargs):
        return build_assertion(self.identity, self.token + path, **kwargs)

    def exchange(self, xml_bytes=None, *, path="/oauth/token", secret=CLIENT_SECRET, form=None,
                 urlsafe=True):
        fields = {"grant_type": GRANT, "assertion": b64(xml_bytes or self.assertion(), urlsafe)}
        fields.update(form or {})
        basic = base64.b64encode(
            f"{urllib.parse.quote_plus(CLIENT_ID)}:{urllib.parse.quote_plus(secret)}".encode()).decode()
        status, body = http("POST", self.token + path, urllib.parse.urlencode(fields).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded",
                             "Authorization": f"Basic {basic}"})
        return status, json.loads(body)

    def get_json(self, base, path, headers=None):
        status, body = http("GET", base + path, headers=headers)
        assert status == 200
        return json.loads(body)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    identity = make_signing_identity()
    cert_path = tmp_path_factory.mktemp("certs") / "trusted.pem"
    cert_path.write_bytes(identity[1])
    ports = [free_port() for _ in range(4)]
    tls = local_ca.ensure(tmp_path_factory.mktemp("tls"))
    stderr_path = cert_path.parent / "servers.log"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(SERVERS), "--idp-port", str(ports[0]), "--token-port", str(ports[1]),
             "--echo-port", str(ports[2]), "--trusted-cert", str(cert_path),
             "--trusted-issuer", ISSUER, "--entity-id", ENTITY_ID, "--client-id", CLIENT_ID,
             "--client-secret", CLIENT_SECRET, "--jwt-audience", JWT_AUDIENCE,
             "--idp-tls-port", str(ports[3]), "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key),
             *[arg for client in API_CLIENTS.items() for arg in ("--idp-client", "=".join(client))],
             "--service-token-audience", SERVICE_AUDIENCE, "--zone-id", ZONE_ID],
            stdout=subprocess.PIPE, stderr=stderr)
    try:
        wait_ready(proc, stderr_path)
        yield Env(*ports, identity, tls)
    finally:
        stop_servers(proc)


def stop_servers(proc):
    """Stops a servers.py process (bounded), closing its pipe."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    proc.stdout.close()


def wait_ready(proc, stderr_path):
    deadline = time.monotonic() + READY_TIMEOUT
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                line = proc.stdout.readline()
                if line.strip() == b"ready":
                    return
                if not line:
                    break  # EOF: the process died
    raise RuntimeError(f"servers not ready: {stderr_path.read_text(errors='replace')}")


@pytest.fixture(autouse=True)
def reset(env):
    status, _ = http("POST", env.token + "/reset", b"")
    assert status == 200


# -------------------------------------------------------------------- tests


def test_jwks_verifies_minted_jwt(env):
    query = urllib.parse.urlencode({"user": "alice@example.com", "email": "a@b.c",
                                    "claims": json.dumps({"roles": ["admin"], "user_name": None})})
    status, token = http("GET", f"{env.idp}/token?{query}")
    assert status == 200
    jwks = env.get_json(env.idp, "/.well-known/jwks.json")
    (jwk,) = jwks["keys"]
    assert jwk["kid"] == "dev-idp-1" and jwk["kty"] == "RSA" and "=" not in jwk["n"]
    assert jwt.get_unverified_header(token)["kid"] == "dev-idp-1"
    claims = jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["RS256"], audience=JWT_AUDIENCE,
                        issuer=env.idp)
    assert claims["sub"] == "alice@example.com"
    assert claims["email"] == "a@b.c" and claims["roles"] == ["admin"]
    assert "user_name" not in claims
    assert claims["exp"] - claims["iat"] == 3600


def test_idp_requires_user_or_claims(env):
    assert http("GET", env.idp + "/token")[0] == 400


def test_valid_assertion_accepted_and_echo_reports_user(env):
    status, body = env.exchange(form={"scope": "openid profile"})
    assert status == 200, body
    assert body["token_type"] == "bearer" and body["expires_in"] == 3600
    assert body["scope"] == "openid profile"
    echo = env.get_json(env.echo, "/some/path?x=1",
                        headers={"Authorization": f"Bearer {body['access_token']}"})
    assert echo["user"] == "alice" and echo["token_valid"] is True
    assert echo["method"] == "GET" and echo["path"] == "/some/path?x=1"
    assert echo["headers"]["authorization"] == f"Bearer {body['access_token']}"


def test_echo_with_unknown_token(env):
    echo = env.get_json(env.echo, "/", headers={"Authorization": "Bearer nope"})
    assert echo["user"] is None and echo["token_valid"] is False


def test_echo_counts_deliveries_by_expected_user(env):
    status, body = env.exchange()
    assert status == 200, body
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    env.get_json(env.echo, "/", headers=dict(bearer, **{"X-Expected-User": "al%69ce"}))
    env.get_json(env.echo, "/", headers=dict(bearer, **{"X-Expected-User": "bob"}))
    env.get_json(env.echo, "/", headers={"Authorization": "Bearer nope", "X-Expected-User": "al%69ce"})
    env.get_json(env.echo, "/", headers=bearer)  # names no user: not counted
    assert env.get_json(env.token, "/stats")["deliveries"] == {"own": 1, "other_user": 1, "invalid": 1}


def test_standard_base64_and_slow_endpoint(env):
    xml = env.assertion(path="/oauth/token/slow")
    status, body = env.exchange(xml, path="/oauth/token/slow?delay=0.1&expires_in=5", urlsafe=False)
    assert status == 200, body
    assert body["expires_in"] == 5 and body["scope"] == "openid"


def test_replay_rejected(env):
    xml = env.assertion()
    assert env.exchange(xml)[0] == 200
    status, body = env.exchange(xml)
    assert (status, body["error"]) == (400, "invalid_grant")
    assert "replayed" in body["error_description"]


def tamper(xml):
    assert b">victim<" in xml
    return xml.replace(b">victim<", b">mallory<")


@pytest.mark.parametrize("make, needle", [
    (lambda env: env.assertion(audience="someone-else"), "audience"),
    (lambda env: build_assertion(env.identity, env.token + "/elsewhere"), "Recipient"),
    (lambda env: env.assertion(scd_not_before=True), "NotBefore"),
    (lambda env: env.assertion(extra_condition="OneTimeUse"), "OneTimeUse"),
    (lambda env: tamper(env.assertion(name_id="victim")), "signature invalid"),
], ids=["audience", "recipient", "scd-notbefore", "onetimeuse", "tampered"])
def test_bad_assertions_rejected(env, make, needle):
    status, body = env.exchange(make(env))
    assert (status, body["error"]) == (400, "invalid_grant"), body
    assert needle in body["error_description"]


def test_wrong_client_secret(env):
    status, body = env.exchange(secret="wrong")
    assert (status, body["error"]) == (401, "invalid_client")


def test_wrong_grant_type(env):
    status, body = env.exchange(form={"grant_type": "client_credentials"})
    assert (status, body["error"]) == (400, "unsupported_grant_type")


def test_reject_endpoint(env):
    status, body = env.exchange(path="/oauth/token/reject")
    assert status == 400
    assert body == {"error": "invalid_grant", "error_description": "rejected by test endpoint"}


def test_stats_and_recorded_requests(env):
    assert env.exchange()[0] == 200
    assert env.exchange(env.assertion(name_id="bob"))[0] == 200
    assert env.exchange(env.assertion(name_id="bob"))[0] == 200
    assert env.exchange(secret="wrong")[0] == 401
    assert env.exchange(path="/oauth/token/reject")[0] == 400
    stats = env.get_json(env.token, "/stats")
    assert stats == {"exchanges": {"alice": 1, "bob": 2},
                     "failures": {"invalid_client": 1, "invalid_grant": 1}, "deliveries": {}}
    requests = env.get_json(env.token, "/requests")
    assert [r["outcome"] for r in requests] == ["ok", "ok", "ok", "invalid_client", "invalid_grant"]
    first = requests[0]
    assert first["path"] == "/oauth/token" and first["form"]["grant_type"] == GRANT
    assert first["headers"]["authorization"].startswith("Basic ")
    assert "<saml:NameID" in first["assertion_xml"]
    assert http("GET", env.token + "/healthz")[0] == 200


# -------------------------------------------------------------- fault injection


def raw_post(port, path, body, read_timeout=5.0):
    """POST a form on a raw socket; returns (bytes received, how the read ended)."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    received, deadline = b"", time.monotonic() + read_timeout
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head + body)
        try:
            while True:
                s.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    return received, "eof"
                received += chunk
        except ConnectionResetError:
            return received, "reset"
        except socket.timeout:
            return received, "timeout"


def raw_exchange(env, path, read_timeout=5.0):
    """A grant request on a raw socket (see `raw_post`)."""
    port = int(env.token.rsplit(":", 1)[1])
    body = urllib.parse.urlencode({"grant_type": GRANT, "assertion": b64(env.assertion(path=path))}).encode()
    return raw_post(port, path, body, read_timeout)


def test_faults_by_path_answer_without_validating_and_carry_a_working_token(env):
    # No client authentication at all: faults validate nothing they do not need.
    status, body = http("POST", env.token + "/oauth/token/fault/html-503", b"x=1")
    assert status == 503 and body.startswith(b"<html>")
    status, body = env.exchange(env.assertion(name_id="carol"), path="/oauth/token/fault/token-type-mac")
    assert status == 200 and body["token_type"] == "mac"
    echo = env.get_json(env.echo, "/x", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert echo["user"] == "carol" and echo["token_valid"] is True
    status, body = env.exchange(path="/oauth/token/fault/no-access-token")
    assert status == 200 and "access_token" not in body and body["token_type"] == "bearer"
    status, raw = http("POST", env.token + "/oauth/token/fault/huge", b"")
    assert status == 200 and len(raw) == 10 * 1024 * 1024 and json.loads(raw)["access_token"]
    assert http("POST", env.token + "/oauth/token/fault/no-such-fault", b"")[0] == 404
    assert env.get_json(env.token, "/stats")["failures"] == {
        "fault:html-503": 1, "fault:token-type-mac": 1, "fault:no-access-token": 1, "fault:huge": 1}
    assert env.get_json(env.token, "/upstream")[-1]["user"] == "carol"


def test_socket_faults_reset_mid_response_and_drip(env):
    received, ended = raw_exchange(env, "/oauth/token/fault/reset")
    assert ended == "reset" and received.startswith(b"HTTP/1.1 200 OK\r\n")
    head, _, partial = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    assert 0 < len(partial) < length
    received, ended = raw_exchange(env, "/oauth/token/fault/drip", read_timeout=1.0)
    assert ended == "timeout" and received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(received.partition(b"\r\n\r\n")[2]) <= 12  # about 10 bytes a second
    received, ended = raw_exchange(env, "/oauth/token/fault/hang", read_timeout=0.5)
    assert (received, ended) == (b"", "timeout")


def test_a_fault_switched_on_and_healed_at_run_time_is_counted_per_mode(env):
    path = "/oauth/token/heal-me"
    assert http("POST", env.token + "/faults", b'{"path": "/elsewhere", "mode": "hang"}')[0] == 400
    assert http("POST", env.token + "/faults", b'{"path": "/oauth/token/x", "mode": "nope"}')[0] == 400
    status, _ = http("POST", env.token + "/faults", json.dumps({"path": path, "mode": "no-access-token"}).encode())
    assert status == 200
    for _ in range(2):
        status, body = env.exchange(env.assertion(path=path), path=path)
        assert status == 200 and "access_token" not in body
    assert env.exchange()[0] == 200  # other paths are not affected
    http("POST", env.token + "/faults", json.dumps({"path": path, "mode": "none"}).encode())
    status, body = env.exchange(env.assertion(path=path, name_id="dave"), path=path)
    assert status == 200 and body["expires_in"] == 3600
    faults = env.get_json(env.token, "/faults")
    assert faults["modes"] == {}
    assert faults["served"][path] == {"no-access-token": 2, "none": 1}
    assert env.get_json(env.token, "/stats")["exchanges"] == {"alice": 1, "dave": 1}


# ------------------------------------------------- identity provider: client credentials


def client_credentials(env, form=None, *, basic=None, headers=None, base=None, context=None):
    """POST /oauth/token on the identity provider: (status, headers, JSON body)."""
    fields = {"grant_type": "client_credentials"}
    fields.update(form or {})
    sent = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
    if basic:
        user, password = (urllib.parse.quote_plus(part) for part in basic)
        sent["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    req = urllib.request.Request((base or env.idp) + "/oauth/token", method="POST", headers=sent,
                                 data=urllib.parse.urlencode({k: v for k, v in fields.items() if v is not None}).encode())
    try:
        with urllib.request.urlopen(req, timeout=15, context=context) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())


def verified_service_token(env, token):
    """The claims of a service token, verified against the IdP's JWKS, audience and issuer."""
    (jwk,) = env.get_json(env.idp, "/.well-known/jwks.json")["keys"]
    return jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["RS256"], audience=SERVICE_AUDIENCE,
                      issuer=env.idp)


def test_client_credentials_with_form_fields_or_basic(env):
    before = len(env.get_json(env.idp, "/token-requests"))
    form = {"client_id": "demo-app", "client_secret": "demo-app-secret"}
    status, headers, body = client_credentials(env, form)  # as the SAP Cloud SDK sends them
    assert status == 200, body
    assert body["token_type"] == "bearer" and body["expires_in"] == 3600 and body["scope"] == "uaa.resource"
    assert headers["Cache-Control"] == "no-store"
    assert jwt.get_unverified_header(body["access_token"])["kid"] == "dev-idp-1"
    claims = verified_service_token(env, body["access_token"])
    assert {k: claims[k] for k in ("sub", "client_id", "cid", "azp", "aud", "zid", "grant_type", "scope")} == {
        "sub": "demo-app", "client_id": "demo-app", "cid": "demo-app", "azp": "demo-app",
        "aud": [SERVICE_AUDIENCE], "zid": ZONE_ID, "grant_type": "client_credentials", "scope": ["uaa.resource"]}
    assert claims["exp"] - claims["iat"] == 3600 and claims["jti"] == body["jti"]
    # HTTP Basic, with a secret that needs form-encoding (RFC 6749 §2.3.1).
    status, _, other = client_credentials(env, basic=("other-app", API_CLIENTS["other-app"]))
    assert status == 200, other
    assert verified_service_token(env, other["access_token"])["client_id"] == "other-app"
    # The log audit finds service tokens too; the recorded requests name fields, not secrets.
    minted = env.get_json(env.idp, "/minted")
    assert body["access_token"] in minted and other["access_token"] in minted
    records = env.get_json(env.idp, "/token-requests")[before:]
    assert [(r["scheme"], r["client_id"], r["client_auth"], r["form_fields"], r["outcome"]) for r in records] == [
        ("http", "demo-app", "form", ["client_id", "client_secret", "grant_type"], "ok"),
        ("http", "other-app", "basic", ["grant_type"], "ok")]
    assert not any(secret in json.dumps(records) for secret in API_CLIENTS.values())


@pytest.mark.parametrize("form, basic, headers, expected", [
    ({"client_id": "demo-app", "client_secret": "wrong"}, None, None, (401, "invalid_client")),
    ({"client_id": "nobody", "client_secret": "demo-app-secret"}, None, None, (401, "invalid_client")),
    (None, ("demo-app", "other+app:secret"), None, (401, "invalid_client")),  # another client's secret
    ({"client_id": "demo-app"}, None, None, (401, "invalid_client")),
    ({"client_secret": "demo-app-secret"}, ("demo-app", "demo-app-secret"), None, (400, "invalid_request")),
    ({"client_id": "other-app"}, ("demo-app", "demo-app-secret"), None, (401, "invalid_client")),
    ({"grant_type": "password", "client_id": "demo-app", "client_secret": "demo-app-secret"}, None, None,
     (400, "unsupported_grant_type")),
    ({"grant_type": None, "client_id": "demo-app", "client_secret": "demo-app-secret"}, None, None,
     (400, "unsupported_grant_type")),
    ({"client_id": "demo-app", "client_secret": "demo-app-secret"}, None, {"Content-Type": "application/json"},
     (400, "invalid_request")),
    ({"client_id": "demo-app", "client_secret": "demo-app-secret"}, None, {"x-zid": "another-zone"},
     (401, "invalid_client")),
], ids=["wrong-secret", "unknown-client", "secret-of-another", "no-secret", "two-methods", "id-mismatch",
        "password-grant", "no-grant", "json-body", "unknown-zone"])
def test_client_credentials_refused(env, form, basic, headers, expected):
    status, answer_headers, body = client_credentials(env, form, basic=basic, headers=headers)
    assert (status, body["error"]) == expected, body
    assert "access_token" not in body and body["error_description"]
    if status == 401:
        assert answer_headers["WWW-Authenticate"].startswith("Basic ")
    assert env.get_json(env.idp, "/token-requests")[-1]["outcome"] == expected[1]


def test_subscriber_token_over_tls_with_zone_header(env):
    """The SAP Cloud SDK's subscriber token: https://<uaadomain>/oauth/token with x-zid."""
    trusting = ssl.create_default_context(cafile=str(env.tls.ca))
    form = {"client_id": "demo-app", "client_secret": "demo-app-secret"}
    status, _, body = client_credentials(env, form, headers={"x-zid": ZONE_ID}, base=env.idp_tls, context=trusting)
    assert status == 200, body
    assert verified_service_token(env, body["access_token"])["zid"] == ZONE_ID
    record = env.get_json(env.idp, "/token-requests")[-1]
    assert (record["scheme"], record["x_zid"], record["outcome"]) == ("https", ZONE_ID, "ok")
    # A client that trusts another CA does not get through the handshake.
    with pytest.raises(urllib.error.URLError) as refused:
        client_credentials(env, form, base=env.idp_tls,
                           context=ssl.create_default_context(cafile=str(env.tls.other_ca)))
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)


def test_reject_fault_refuses_as_an_oauth_server_and_heals(env):
    path = "/oauth/token/refusing"
    status, _ = http("POST", env.token + "/faults", json.dumps({"path": path, "mode": "reject"}).encode())
    assert status == 200
    status, body = env.exchange(env.assertion(path=path), path=path)
    assert (status, body) == (400, {"error": "invalid_grant",
                                    "error_description": "the assertion was refused (fault mode reject)"})
    status, body = env.exchange(env.assertion(), path="/oauth/token/fault/reject")
    assert (status, body["error"]) == (400, "invalid_grant")
    http("POST", env.token + "/faults", json.dumps({"path": path, "mode": "none"}).encode())
    status, body = env.exchange(env.assertion(path=path, name_id="erin"), path=path)
    assert status == 200, body
    assert env.get_json(env.token, "/faults")["served"][path] == {"reject": 1, "none": 1}
    assert env.get_json(env.token, "/stats")["failures"] == {"fault:reject": 2}
