"""The development Microsoft Entra ID token service (dev/sts.py): on-behalf-of returning a
SAML 2.0 assertion that signxml verifies and the dev token server accepts, Entra's errors
with their AADSTS codes, faults, and the token server binding each SAML issuer to its own
certificates. dev/servers.py runs as a subprocess on free local ports, as in test_servers."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml import XMLSigner, XMLVerifier, methods

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "dev"))

import servers  # noqa: E402
import sts  # noqa: E402
from test_servers import (CLIENT_ID, CLIENT_SECRET, ENTITY_ID, GRANT, ISSUER, JWT_AUDIENCE,  # noqa: E402
                          build_assertion, free_port, http, make_signing_identity, raw_post, stop_servers, wait_ready)

TENANT = sts.DEV_TENANT_ID
GATEWAY_APP = sts.DEV_GATEWAY_CLIENT_ID
GATEWAY_APP_SECRET = sts.DEV_GATEWAY_CLIENT_SECRET
SAML_NS = "urn:oasis:names:tc:SAML:2.0:assertion"
DS_NS = "http://www.w3.org/2000/09/xmldsig#"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def q(tag):
    return f"{{{SAML_NS}}}{tag}"


# ------------------------------------------------------------------ helpers


class ClientKey:
    """A key whose self-signed certificate is (or is not) registered for client assertions."""

    def __init__(self, kind):
        self.key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa"
                    else ec.generate_private_key(ec.SECP256R1()))
        self.alg = "RS256" if kind == "rsa" else "ES256"
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"gateway client assertion {kind}")])
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                     .sign(self.key, hashes.SHA256()))
        der = self.cert.public_bytes(serialization.Encoding.DER)
        self.x5t_s256 = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
        self.x5t = base64.urlsafe_b64encode(hashlib.sha1(der).digest()).rstrip(b"=").decode()

    def pem(self):
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def assertion(self, aud, *, thumbprint="x5t#S256", alg=None, **claims):
        """An RFC 7523 client assertion as the gateway makes it; `claims` override (None drops)."""
        now = int(time.time())
        payload = {"iss": GATEWAY_APP, "sub": GATEWAY_APP, "aud": aud, "iat": now, "nbf": now,
                   "exp": now + 300, "jti": str(uuid.uuid4())}
        payload.update(claims)
        header = {"x5t#S256": self.x5t_s256} if thumbprint == "x5t#S256" else \
            {"x5t": self.x5t} if thumbprint == "x5t" else {}
        return jwt.encode({k: v for k, v in payload.items() if v is not None}, self.key,
                          algorithm=alg or self.alg, headers=header)


class Stack:
    def __init__(self, ports, identity, rsa_key, ec_key, log):
        self.idp, self.token, self.echo, self.sts = (f"http://127.0.0.1:{p}" for p in ports)
        self.sts_port = ports[3]
        self.identity, self.rsa_key, self.ec_key, self.log = identity, rsa_key, ec_key, log
        self.token_url = f"{self.sts}/{TENANT}/oauth2/v2.0/token"

    def get_json(self, url):
        status, body = http("GET", url)
        assert status == 200, body
        return json.loads(body)

    def user_token(self, user="alice@example.com", **claims):
        """An Entra v2.0 access token for the gateway app from the dev IdP (idp=entra)."""
        query = {"user": user, "idp": "entra"}
        if claims:
            query["claims"] = json.dumps(claims)
        status, token = http("GET", f"{self.idp}/token?{urllib.parse.urlencode(query)}")
        assert status == 200, token
        return token.decode()

    def obo(self, *, user="alice@example.com", auth="secret", path=None, headers=None, raw_suffix="", **fields):
        """POST an on-behalf-of request; `fields` override the form (None drops one) and
        `raw_suffix` is appended to the encoded form as it is."""
        form = {"grant_type": sts.JWT_BEARER_GRANT, "client_id": GATEWAY_APP,
                "assertion": self.user_token(user) if "assertion" not in fields else None,
                "scope": f"spn:{ENTITY_ID}/.default", "requested_token_use": "on_behalf_of",
                "requested_token_type": sts.SAML2_TOKEN_TYPE}
        headers = dict(FORM, **(headers or {}))
        if auth == "secret":
            form["client_secret"] = GATEWAY_APP_SECRET
        elif auth == "basic":
            basic = f"{urllib.parse.quote_plus(GATEWAY_APP)}:{urllib.parse.quote_plus(GATEWAY_APP_SECRET)}"
            headers["Authorization"] = "Basic " + base64.b64encode(basic.encode()).decode()
        elif auth in ("rs256", "es256"):
            key = self.rsa_key if auth == "rs256" else self.ec_key
            form["client_assertion_type"] = sts.CLIENT_ASSERTION_TYPE
            form["client_assertion"] = key.assertion(self.token_url)
        form.update(fields)
        body = (urllib.parse.urlencode({k: v for k, v in form.items() if v is not None}) + raw_suffix).encode()
        status, raw = http("POST", path or self.token_url, body, headers)
        return status, json.loads(raw)

    def redeem(self, access_token):
        """The STS's assertion at the token server (saml2-bearer, the token server's client)."""
        basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        body = urllib.parse.urlencode({"grant_type": GRANT, "assertion": access_token}).encode()
        status, raw = http("POST", self.token + "/oauth/token", body, dict(FORM, Authorization=f"Basic {basic}"))
        return status, json.loads(raw)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sts")
    identity = make_signing_identity()
    (tmp / "gateway.pem").write_bytes(identity[1])
    rsa_key, ec_key = ClientKey("rsa"), ClientKey("ec")
    (tmp / "client-rsa.pem").write_bytes(rsa_key.pem())
    (tmp / "client-ec.pem").write_bytes(ec_key.pem())
    ports = [free_port() for _ in range(4)]
    log = tmp / "servers.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "dev" / "servers.py"), "--idp-port", str(ports[0]),
             "--token-port", str(ports[1]), "--echo-port", str(ports[2]), "--trusted-cert", str(tmp / "gateway.pem"),
             "--trusted-issuer", ISSUER, "--entity-id", ENTITY_ID, "--client-id", CLIENT_ID,
             "--client-secret", CLIENT_SECRET, "--jwt-audience", JWT_AUDIENCE, "--sts-port", str(ports[3]),
             "--sts-client-cert", str(tmp / "client-rsa.pem"), "--sts-client-cert", str(tmp / "client-ec.pem")],
            stdout=subprocess.PIPE, stderr=stderr)
    try:
        wait_ready(proc, log)
        yield Stack(ports, identity, rsa_key, ec_key, log)
    finally:
        stop_servers(proc)


@pytest.fixture(autouse=True)
def reset(request):
    if "stack" in request.fixturenames:
        stack = request.getfixturevalue("stack")
        assert http("POST", stack.sts + "/_sts/reset", b"")[0] == 200
        assert http("POST", stack.token + "/reset", b"")[0] == 200


def decode_assertion(access_token):
    assert "=" not in access_token and "+" not in access_token and "/" not in access_token
    return base64.urlsafe_b64decode(access_token + "=" * (-len(access_token) % 4))


# ----------------------------------------------------------------- the IdP


def test_idp_mints_entra_v2_tokens_with_the_same_key(stack):
    token = stack.user_token("alice@example.com")
    (jwk,) = stack.get_json(stack.idp + "/.well-known/jwks.json")["keys"]
    assert jwt.get_unverified_header(token)["kid"] == jwk["kid"] == "dev-idp-1"
    claims = jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["RS256"], audience=GATEWAY_APP,
                        issuer=f"https://login.microsoftonline.com/{TENANT}/v2.0")
    assert claims["ver"] == "2.0" and claims["tid"] == TENANT and claims["scp"] == "access_as_user"
    assert claims["preferred_username"] == "alice@example.com" and claims["name"] == "Alice"
    assert claims["azp"] == sts.DEV_FRONTEND_CLIENT_ID and "idp" not in claims
    assert str(uuid.UUID(claims["oid"])) == claims["oid"] and len(claims["sub"]) == 43
    assert claims["exp"] - claims["iat"] == 3600 and claims["nbf"] == claims["iat"]
    again = jwt.decode(stack.user_token("alice@example.com"), options={"verify_signature": False})
    other = jwt.decode(stack.user_token("bob@example.com"), options={"verify_signature": False})
    assert (again["oid"], again["sub"]) == (claims["oid"], claims["sub"])  # stable per user
    assert other["oid"] != claims["oid"] and other["sub"] != claims["sub"]
    # Query parameters and claims override, as for the IdP's own tokens.
    query = urllib.parse.urlencode({"user": "x", "idp": "entra", "aud": "api://other", "claims": '{"scp": null}'})
    status, raw = http("GET", f"{stack.idp}/token?{query}")
    changed = jwt.decode(raw.decode(), options={"verify_signature": False})
    assert status == 200 and changed["aud"] == "api://other" and "scp" not in changed
    plain = jwt.decode(http("GET", f"{stack.idp}/token?user=x")[1].decode(), options={"verify_signature": False})
    assert plain["sub"] == "x" and plain["aud"] == JWT_AUDIENCE and "ver" not in plain


# ---------------------------------------------------------------- happy path


@pytest.mark.parametrize("auth", ["secret", "basic", "rs256", "es256"])
def test_obo_returns_an_entra_shaped_signed_assertion_the_token_server_accepts(stack, auth):
    before = time.time()
    status, body = stack.obo(user="alice@example.com", auth=auth)
    assert status == 200, body
    assert body["token_type"] == "Bearer" and body["scope"] == f"spn:{ENTITY_ID}/.default"
    assert body["expires_in"] == body["ext_expires_in"] == 3599 and body["resource"] == ENTITY_ID
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:saml2"
    assert body["refresh_token"].startswith("dev-refresh-")
    assert int(before) + 3599 <= int(body["expires_on"]) <= int(time.time()) + 3599
    xml = decode_assertion(body["access_token"])

    # An independent XML-DSig implementation verifies it with the STS's certificate.
    status, pem = http("GET", stack.sts + "/_sts/certificate")
    cert = x509.load_pem_x509_certificate(pem)
    signed = XMLVerifier().verify(xml, x509_cert=cert, id_attribute="ID").signed_xml
    root = etree.fromstring(xml)
    assert signed.get("ID") == root.get("ID") and root.get("ID").startswith("_")
    assert [etree.QName(c).localname for c in root][:2] == ["Issuer", "Signature"]
    sig = root.find(f"{{{DS_NS}}}Signature")
    assert sig.find(f"{{{DS_NS}}}SignedInfo/{{{DS_NS}}}CanonicalizationMethod").get("Algorithm") == EXC_C14N
    assert sig.find(f"{{{DS_NS}}}SignedInfo/{{{DS_NS}}}SignatureMethod").get("Algorithm").endswith("rsa-sha256")
    assert sig.find(f".//{{{DS_NS}}}X509Certificate") is not None
    assert signed.findtext(q("Issuer")) == f"https://sts.windows.net/{TENANT}/"
    name_id = signed.find(f"{q('Subject')}/{q('NameID')}")
    assert name_id.text == "alice@example.com"
    assert name_id.get("Format") == "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified"
    scd = signed.find(f"{q('Subject')}/{q('SubjectConfirmation')}/{q('SubjectConfirmationData')}")
    assert scd.get("Recipient") == stack.token + "/oauth/token"
    assert scd.get("InResponseTo") is None and scd.get("NotBefore") is None
    assert signed.findtext(f"{q('Conditions')}/{q('AudienceRestriction')}/{q('Audience')}") == ENTITY_ID
    attributes = {a.get("Name").rsplit("/", 1)[1]: a.findtext(q("AttributeValue"))
                  for a in signed.iter(q("Attribute"))}
    claims = jwt.decode(stack.user_token("alice@example.com"), options={"verify_signature": False})
    assert attributes["tenantid"] == TENANT and attributes["objectidentifier"] == claims["oid"]
    assert attributes["name"] == "alice@example.com" and attributes["displayname"] == "Alice"
    statement = signed.find(q("AuthnStatement"))
    assert statement.get("SessionIndex") and statement.get("AuthnInstant")

    # RFC 7522 at the dev token server, with its own client authentication.
    status, token = stack.redeem(body["access_token"])
    assert status == 200, token
    status, raw = http("GET", stack.echo + "/x", headers={"Authorization": f"Bearer {token['access_token']}"})
    assert json.loads(raw)["user"] == "alice@example.com" and json.loads(raw)["token_valid"] is True
    assert stack.get_json(stack.token + "/requests")[-1]["verified_by"] == "sts"
    assert stack.get_json(stack.token + "/stats")["exchanges"] == {"alice@example.com": 1}
    (record,) = stack.get_json(stack.sts + "/_sts/requests")
    expected_method = {"secret": "client_secret", "basic": "basic", "rs256": "client_assertion",
                       "es256": "client_assertion"}[auth]
    assert record["outcome"] == "ok" and record["client_auth"] == expected_method
    assert stack.get_json(stack.sts + "/_sts/stats") == {"issued": {"alice@example.com": 1}, "failures": {}}


def test_accepted_variants(stack):
    """Plain <id>/.default with OpenID scopes, an api:// audience, x5t or no thumbprint,
    a client assertion without nbf/iat, and the form's client_id along with Basic."""
    status, body = stack.obo(scope=f"openid offline_access {ENTITY_ID}/.default",
                             assertion=stack.user_token("bob", aud=f"api://{GATEWAY_APP}"))
    assert status == 200 and body["scope"] == f"{ENTITY_ID}/.default", body
    for thumbprint in ("x5t", None):
        assertion = stack.rsa_key.assertion(stack.token_url, thumbprint=thumbprint, nbf=None, iat=None)
        status, body = stack.obo(auth=None, client_assertion_type=sts.CLIENT_ASSERTION_TYPE,
                                 client_assertion=assertion)
        assert status == 200, body
    status, body = stack.obo(auth="basic", client_id=GATEWAY_APP)
    assert status == 200, body


def test_a_hostile_user_id_round_trips(stack):
    user = 'o\'brien & <co> "ü€😀"@example.com'
    status, body = stack.obo(user=user)
    assert status == 200, body
    status, token = stack.redeem(body["access_token"])
    assert status == 200, token
    assert stack.get_json(stack.token + "/stats")["exchanges"] == {user: 1}


# -------------------------------------------------------------------- errors


def entra_error_shape(body, code, error):
    assert body["error"] == error, body
    assert body["error_codes"] == [code], body
    assert body["error_description"].startswith(f"AADSTS{code}: "), body
    assert f"Trace ID: {body['trace_id']}" in body["error_description"]
    assert body["error_uri"] == f"https://login.microsoftonline.com/error?code={code}"
    dt.datetime.strptime(body["timestamp"], "%Y-%m-%d %H:%M:%SZ")
    uuid.UUID(body["trace_id"]), uuid.UUID(body["correlation_id"])


def expired_client_assertion(s):
    return s.rsa_key.assertion(s.token_url, exp=int(time.time()) - 3600, nbf=int(time.time()) - 7200)


def with_assertion(make):
    return lambda s: {"auth": None, "client_assertion_type": sts.CLIENT_ASSERTION_TYPE, "client_assertion": make(s)}


def tampered(token):
    head, payload, sig = token.split(".")
    return ".".join([head, payload, ("A" if sig[0] != "A" else "B") + sig[1:]])


ERROR_CASES = [
    # (id, form overrides from the stack, status, error, code, text in the description)
    ("unknown-tenant", lambda s: {"path": s.token_url.replace(TENANT, "contoso.onmicrosoft.com")},
     400, "invalid_request", 90002, "contoso.onmicrosoft.com"),
    ("duplicated-parameter", lambda s: {"scope": None, "raw_suffix": "&scope=a%2F.default&scope=b%2F.default"},
     400, "invalid_request", 9000411, "'scope' is duplicated"),
    ("no-client-id", lambda s: {"client_id": None}, 400, "invalid_request", 900144, "'client_id'"),
    ("unknown-client", lambda s: {"client_id": str(uuid.UUID(int=1))}, 400, "unauthorized_client", 700016,
     "was not found in the directory"),
    ("secret-and-assertion", lambda s: {"client_assertion_type": sts.CLIENT_ASSERTION_TYPE,
                                        "client_assertion": s.rsa_key.assertion(s.token_url)},
     400, "invalid_request", 9002313, "more than one client authentication method"),
    ("no-credentials", lambda s: {"auth": None}, 401, "invalid_client", 7000218, "'client_secret'"),
    ("bad-secret", lambda s: {"client_secret": "nope"}, 401, "invalid_client", 7000215, "Invalid client secret"),
    ("bad-basic-secret", lambda s: {"auth": "basic-wrong"}, 401, "invalid_client", 7000215, "Invalid client secret"),
    ("assertion-type-missing", lambda s: {"auth": None, "client_assertion": s.rsa_key.assertion(s.token_url)},
     400, "invalid_request", 900144, "'client_assertion_type'"),
    ("assertion-type-wrong", lambda s: {"auth": None, "client_assertion_type": "urn:x",
                                        "client_assertion": s.rsa_key.assertion(s.token_url)},
     400, "invalid_request", 90100, "client_assertion_type"),
    ("client-assertion-unregistered-cert", with_assertion(lambda s: ClientKey("rsa").assertion(s.token_url)),
     401, "invalid_client", 700027, "not registered"),
    ("client-assertion-unregistered-no-thumbprint",
     with_assertion(lambda s: ClientKey("rsa").assertion(s.token_url, thumbprint=None)),
     401, "invalid_client", 700027, "signature"),
    ("client-assertion-tampered", with_assertion(lambda s: tampered(s.ec_key.assertion(s.token_url))),
     401, "invalid_client", 700027, "did not match"),
    ("client-assertion-hs256", with_assertion(lambda s: jwt.encode({"iss": GATEWAY_APP}, "k" * 32, "HS256")),
     401, "invalid_client", 700027, "'HS256' is not supported"),
    ("client-assertion-garbage", with_assertion(lambda s: "not-a-jwt"), 401, "invalid_client", 700027,
     "not a well-formed"),
    ("client-assertion-audience", with_assertion(lambda s: s.rsa_key.assertion("https://login.example/token")),
     401, "invalid_client", 700027, "audience"),
    ("client-assertion-expired", with_assertion(expired_client_assertion), 401, "invalid_client", 700024,
     "valid time range"),
    ("client-assertion-no-exp", with_assertion(lambda s: s.rsa_key.assertion(s.token_url, exp=None)),
     401, "invalid_client", 700027, "'exp'"),
    ("client-assertion-no-jti", with_assertion(lambda s: s.rsa_key.assertion(s.token_url, jti=None)),
     401, "invalid_client", 700027, "'jti'"),
    ("client-assertion-iss-not-sub", with_assertion(lambda s: s.rsa_key.assertion(s.token_url, sub="other")),
     401, "invalid_client", 50048, "Subject mismatches Issuer"),
    ("client-assertion-other-client", with_assertion(
        lambda s: s.rsa_key.assertion(s.token_url, iss=str(uuid.UUID(int=2)), sub=str(uuid.UUID(int=2)))),
     401, "invalid_client", 700021, "doesn't match 'client_id'"),
    ("no-grant-type", lambda s: {"grant_type": None}, 400, "invalid_request", 900144, "'grant_type'"),
    ("saml2-bearer-grant", lambda s: {"grant_type": GRANT}, 400, "unsupported_grant_type", 70003, GRANT),
    ("no-requested-token-use", lambda s: {"requested_token_use": None}, 400, "invalid_request", 900144,
     "'requested_token_use'"),
    ("requested-token-use-wrong", lambda s: {"requested_token_use": "on_behalf"}, 400, "invalid_request", 90100,
     "on_behalf_of"),
    ("no-assertion", lambda s: {"assertion": None}, 400, "invalid_request", 900144, "'assertion'"),
    ("assertion-garbage", lambda s: {"assertion": "garbage"}, 400, "invalid_grant", 50013, "not a signed JWT"),
    ("assertion-tampered", lambda s: {"assertion": tampered(s.user_token())}, 400, "invalid_grant", 50013,
     "signature value did not match"),
    ("assertion-other-issuer", lambda s: {"assertion": http("GET", s.idp + "/token?user=alice")[1].decode()},
     400, "invalid_grant", 50013, "issuer"),
    ("assertion-audience", lambda s: {"assertion": s.user_token(aud="api://someone-else")},
     400, "invalid_grant", 500131, "Assertion audience does not match the Client app presenting the assertion"),
    ("assertion-expired", lambda s: {"assertion": s.user_token(exp=int(time.time()) - 3600)},
     400, "invalid_grant", 500133, "not within its valid time range"),
    ("assertion-not-yet-valid", lambda s: {"assertion": s.user_token(nbf=int(time.time()) + 3600)},
     400, "invalid_grant", 500133, "not within its valid time range"),
    ("assertion-app-only", lambda s: {"assertion": s.user_token(scp=None, roles=["x"])},
     400, "invalid_grant", 50013, "user principals"),
    ("no-scope", lambda s: {"scope": None}, 400, "invalid_request", 900144, "'scope'"),
    ("scope-unknown-entity", lambda s: {"scope": "spn:other-system/.default"}, 400, "invalid_resource", 500011,
     "other-system"),
    ("scope-not-default", lambda s: {"scope": f"{ENTITY_ID}/read"}, 400, "invalid_scope", 70011, "scope"),
    ("scope-only-openid", lambda s: {"scope": "openid profile"}, 400, "invalid_scope", 70011, "scope"),
    ("scope-two-resources", lambda s: {"scope": f"{ENTITY_ID}/.default spn:x/.default"},
     400, "invalid_scope", 700022, "more than one resource"),
    ("no-requested-token-type", lambda s: {"requested_token_type": None}, 400, "invalid_request", 900144,
     "only issues SAML"),
    ("saml1", lambda s: {"requested_token_type": "urn:ietf:params:oauth:token-type:saml1"},
     400, "invalid_request", 90100, "not supported by this development STS"),
    ("jwt-token-type", lambda s: {"requested_token_type": "urn:ietf:params:oauth:token-type:jwt"},
     400, "invalid_request", 90100, "requested_token_type"),
    ("no-user-name", lambda s: {"assertion": s.user_token(preferred_username=None)},
     400, "invalid_grant", 50034, "names no user"),
    ("consent-by-user-id", lambda s: {"user": "noconsent-bob@example.com"}, 400, "invalid_grant", 65001,
     "has not consented"),
    ("consent-by-claim", lambda s: {"assertion": s.user_token("carol", dev_consent="missing")},
     400, "invalid_grant", 65001, "has not consented"),
    ("mfa-by-user-id", lambda s: {"user": "mfa-dave@example.com"}, 400, "interaction_required", 50076,
     "multi-factor authentication"),
    ("mfa-by-claim", lambda s: {"assertion": s.user_token("erin", dev_mfa="required")},
     400, "interaction_required", 50076, "multi-factor authentication"),
    ("xml-incompatible-user", lambda s: {"user": "eve\x01@example.com"}, 400, "invalid_request", 90107,
     "invalid characters"),
]


@pytest.mark.parametrize("make, status, error, code, needle",
                         [case[1:] for case in ERROR_CASES], ids=[case[0] for case in ERROR_CASES])
def test_entra_errors(stack, make, status, error, code, needle):
    fields = make(stack)
    if fields.get("auth") == "basic-wrong":
        basic = base64.b64encode(f"{GATEWAY_APP}:wrong".encode()).decode()
        fields = dict(fields, auth=None, headers={"Authorization": f"Basic {basic}"})
    headers = dict(fields.pop("headers", {}), **{"client-request-id": str(uuid.UUID(int=9))})
    got_status, body = stack.obo(headers=headers, **fields)
    assert got_status == status, body
    entra_error_shape(body, code, error)
    assert needle in body["error_description"], body
    assert body["correlation_id"] == str(uuid.UUID(int=9))
    if code == 65001:
        assert body["suberror"] == "consent_required"
    if code == 50076:
        assert "capolids" in json.loads(body["claims"])["access_token"]
    (record,) = stack.get_json(stack.sts + "/_sts/requests")
    assert record["outcome"] == f"AADSTS{code}" and record["status"] == status
    assert stack.get_json(stack.sts + "/_sts/stats") == {"issued": {}, "failures": {f"AADSTS{code}": 1}}


def test_the_error_table_is_what_the_tests_provoke():
    table = {(status, error, code) for _, status, error, code in sts.ERRORS}
    provoked = {(status, error, code) for _, _, status, error, code, _ in ERROR_CASES}
    provoked.add((400, "invalid_request", 900561))  # test_get_on_the_token_endpoint_and_unknown_paths
    assert provoked == table


def test_client_assertion_jti_is_single_use(stack):
    assertion = stack.ec_key.assertion(stack.token_url)
    fields = {"auth": None, "client_assertion_type": sts.CLIENT_ASSERTION_TYPE, "client_assertion": assertion}
    assert stack.obo(**fields)[0] == 200
    status, body = stack.obo(**fields)
    assert status == 401 and body["error_codes"] == [700027] and "already used" in body["error_description"]


def test_checks_run_in_order(stack):
    """Client authentication before the grant, the grant before the user token, the user
    token before the scope, the scope before the token type."""
    s = stack
    assert s.obo(client_secret="nope", grant_type=GRANT)[1]["error_codes"] == [7000215]
    assert s.obo(grant_type=GRANT, assertion="garbage")[1]["error_codes"] == [70003]
    assert s.obo(assertion="garbage", scope="nope")[1]["error_codes"] == [50013]
    assert s.obo(scope="nope", requested_token_type=None)[1]["error_codes"] == [70011]
    assert s.obo(user="noconsent-x", requested_token_type=None)[1]["error_codes"] == [900144]


def test_get_on_the_token_endpoint_and_unknown_paths(stack):
    status, raw = http("GET", stack.token_url)
    assert status == 400
    entra_error_shape(json.loads(raw), 900561, "invalid_request")
    assert http("POST", stack.sts + "/elsewhere", b"")[0] == 404
    status, raw = http("POST", stack.token_url, b'{"grant_type": "x"}', {"Content-Type": "application/json"})
    assert status == 400 and json.loads(raw)["error_codes"] == [900144]  # JSON is no form


# ------------------------------------------------------------------- issuers


def resign(xml, identity):
    """The same assertion signed by another key (the STS's Signature replaced)."""
    key_pem, cert_pem = identity
    root = etree.fromstring(xml)
    old = root.find(f"{{{DS_NS}}}Signature")
    old.getparent().replace(old, etree.Element(f"{{{DS_NS}}}Signature", Id="placeholder", nsmap={"ds": DS_NS}))
    signer = XMLSigner(method=methods.enveloped, signature_algorithm="rsa-sha256", digest_algorithm="sha256",
                       c14n_algorithm=EXC_C14N)
    signed = signer.sign(root, key=key_pem, cert=cert_pem.decode(), reference_uri=f"#{root.get('ID')}",
                         id_attribute="ID")
    return etree.tostring(signed)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_the_token_server_refuses_the_gateway_key_signing_for_the_sts(stack):
    status, body = stack.obo(user="mallory@example.com")
    assert status == 200, body
    forged = resign(decode_assertion(body["access_token"]), stack.identity)
    status, token = stack.redeem(b64url(forged))
    assert (status, token["error"]) == (400, "invalid_grant")
    assert "signature invalid" in token["error_description"]
    # The gateway's own assertions still verify with the gateway's certificate.
    xml = build_assertion(stack.identity, stack.token + "/oauth/token", name_id="gina")
    status, token = stack.redeem(b64url(xml))
    assert status == 200, token
    assert stack.get_json(stack.token + "/requests")[-1]["verified_by"] == "gateway"


def in_process_sts(identity, recipient):
    key = serialization.load_pem_private_key(identity[0], None)
    cert = x509.load_pem_x509_certificate(identity[1])
    idp = servers.IdentityProvider("http://idp", JWT_AUDIENCE,
                                   servers.EntraApp(TENANT, GATEWAY_APP, sts.DEV_FRONTEND_CLIENT_ID))
    return idp, sts.Sts(user_token_key=idp.public_key(), entities={ENTITY_ID: recipient},
                        signing_identity=(key, cert))


def test_each_issuer_is_bound_to_its_own_certificates():
    """validate_exchange in-process: an STS whose key the test holds signs an assertion
    that names the gateway as its issuer; the token server must not accept it."""
    endpoint = "http://127.0.0.1:1/oauth/token"
    gateway, sts_identity = make_signing_identity(), make_signing_identity()
    idp, service = in_process_sts(sts_identity, endpoint)
    cfg = servers.Config(0, 0, 0, [("gateway", x509.load_pem_x509_certificate(gateway[1]))], ISSUER, ENTITY_ID,
                         CLIENT_ID, CLIENT_SECRET, JWT_AUDIENCE,
                         ((service.issuer, [("sts", service.certificate)]),))
    state = servers.SharedState()
    basic = {"Authorization": "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()}

    def validate(xml):
        form = {"grant_type": [GRANT], "assertion": [b64url(xml)]}
        return servers.validate_exchange(basic, form, endpoint, cfg, state)

    token = idp.mint({"user": ["henry@example.com"], "idp": ["entra"]})
    claims = jwt.decode(token, options={"verify_signature": False})
    genuine = service.assertion(claims, "henry@example.com", ENTITY_ID, time.time())
    assert validate(genuine) == ("henry@example.com", "sts")
    assert validate(build_assertion(gateway, endpoint, name_id="ivy")) == ("ivy", "gateway")
    with pytest.raises(servers.OAuthError, match="signature invalid"):
        validate(build_assertion(sts_identity, endpoint, name_id="ivy"))  # STS key, gateway Issuer
    with pytest.raises(servers.OAuthError, match="signature invalid"):
        validate(resign(genuine, gateway))  # gateway key, STS Issuer
    # Without the STS trusted, its assertions are refused as before.
    plain = servers.Config(*[getattr(cfg, f) for f in ("idp_port", "token_port", "echo_port", "trusted_certs",
                                                        "trusted_issuer", "entity_id", "client_id",
                                                        "client_secret", "jwt_audience")])
    with pytest.raises(servers.OAuthError, match="signature invalid"):
        servers.validate_exchange(basic, {"grant_type": [GRANT], "assertion": [b64url(genuine)]}, endpoint, plain,
                                  servers.SharedState())


# -------------------------------------------------------------------- faults


def test_faults(stack):
    fault = stack.token_url + "/fault/"
    status, raw = http("POST", fault + "garbage", b"")
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(raw)
    status, raw = http("POST", fault + "html-500", b"")
    assert status == 500 and raw.startswith(b"<html>")
    received, ended = raw_post(stack.sts_port, f"/{TENANT}/oauth2/v2.0/token/fault/reset", b"grant_type=x", 5)
    assert received == b"" and ended in ("reset", "eof")
    assert http("POST", fault + "no-such-fault", b"")[0] == 404
    # slow answers normally after ?delay= ...
    started = time.monotonic()
    status, body = stack.obo(path=fault + "slow?delay=0.3")
    assert status == 200 and time.monotonic() - started >= 0.3, body
    # ... later than a client waits (its answer, to a bad form, comes after it gave up).
    received, ended = raw_post(stack.sts_port, f"/{TENANT}/oauth2/v2.0/token/fault/slow?delay=1.5", b"grant_type=x", 0.5)
    assert (received, ended) == (b"", "timeout")
    deadline = time.monotonic() + 10
    while "AADSTS900144" not in stack.get_json(stack.sts + "/_sts/stats")["failures"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    stats = stack.get_json(stack.sts + "/_sts/stats")
    assert stats["failures"] == {"fault:garbage": 1, "fault:html-500": 1, "fault:reset": 1, "AADSTS900144": 1}
    assert stats["issued"] == {"alice@example.com": 1}


# ------------------------------------------------------------- records, log


def test_requests_are_recorded_raw_and_the_log_has_no_secrets(stack):
    token = stack.user_token("judy@example.com")
    assert stack.obo(assertion=token)[0] == 200
    assert stack.obo(assertion=token, client_secret="wrong-secret-value")[0] == 401
    ok, failed = stack.get_json(stack.sts + "/_sts/requests")
    assert ok["form"]["assertion"] == token and ok["form"]["client_secret"] == GATEWAY_APP_SECRET  # on purpose
    assert ok["user"] == "judy@example.com" and failed["outcome"] == "AADSTS7000215"
    assert http("POST", stack.sts + "/_sts/reset", b"")[0] == 200
    assert stack.get_json(stack.sts + "/_sts/requests") == []
    deadline = time.monotonic() + 5
    while "401 AADSTS7000215" not in stack.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = stack.log.read_text()
    assert f"sts POST /{TENANT}/oauth2/v2.0/token 200 ok" in log
    assert f"sts POST /{TENANT}/oauth2/v2.0/token 401 AADSTS7000215" in log
    for secret in (token, token.split(".")[1], GATEWAY_APP_SECRET, "wrong-secret-value", "PEFzc2VydGlvbi"):
        assert secret not in log


def test_cli_checks_the_sts_arguments():
    base = ["--idp-port", "1", "--token-port", "2", "--echo-port", "3", "--trusted-cert", "x.pem",
            "--trusted-issuer", ISSUER, "--entity-id", ENTITY_ID, "--client-id", CLIENT_ID,
            "--client-secret", CLIENT_SECRET]
    args = servers.parse_args(base + ["--sts-port", "4"])
    assert args.sts_entities == {ENTITY_ID: "http://127.0.0.1:2/oauth/token"}
    assert (args.sts_tenant, args.sts_client_id, args.sts_client_secret, args.sts_client_cert) == (
        TENANT, GATEWAY_APP, GATEWAY_APP_SECRET, [])
    entities = ["--sts-entity", "https://a.example/sp=https://a.example/t?x=1", "--sts-entity", "b=http://b/token"]
    args = servers.parse_args(base + ["--sts-port", "4"] + entities)
    assert args.sts_entities == {"https://a.example/sp": "https://a.example/t?x=1", "b": "http://b/token"}
    for bad in (["--sts-client-cert", "c.pem"], ["--sts-port", "4", "--sts-entity", "no-reply-url"],
                ["--sts-port", "4", "--sts-tenant", "t", "--trusted-issuer", "https://sts.windows.net/t/"]):
        with pytest.raises(SystemExit):
            servers.parse_args(base + bad)
