"""The development token server's target profiles (dev/servers.py, docs/target-profiles.md):
one endpoint each for S/4HANA Cloud, AS ABAP, SuccessFactors, XSUAA and Salesforce. For each,
a correct assertion is exchanged for a token the echo upstream and /stats know, and an
assertion or request broken in exactly one of the target's rules is refused in that target's
shape and words. dev/servers.py runs as a subprocess on free local ports, as in test_servers."""

import base64
import datetime as dt
import json
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml import XMLSigner, methods

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "dev"))

import servers  # noqa: E402
from servers import (ABAP_TOKEN_PATH, S4_AUDIENCE, S4_TOKEN_PATH, SALESFORCE_CONSUMER_KEY,  # noqa: E402
                     SALESFORCE_TOKEN_PATH, SF_API_KEY, SF_COMPANY_ID, SF_TOKEN_PATH, XSUAA_ENTITY_ID,
                     XSUAA_TOKEN_PATH, XSUAA_TOKEN_PREFIX)
from test_servers import (CLIENT_ID, CLIENT_SECRET, ENTITY_ID, GRANT, ISSUER, JWT_AUDIENCE,  # noqa: E402
                          free_port, http, saml_time, stop_servers, wait_ready)

SAML_NS = "urn:oasis:names:tc:SAML:2.0:assertion"
DS_NS = "http://www.w3.org/2000/09/xmldsig#"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
SECOND_PROVIDER = "s4-provider-b"  # CN of a second trusted certificate (S/4HANA Cloud's provider name)
SF_ISSUER = "www.successfactors.com"  # SAP's sample generator's Issuer (SuccessFactors does not check it)
SF_LOGIN = "https://login.salesforce.com"
SF_LOGIN_TOKEN = "https://login.salesforce.com/services/oauth2/token"
SF_TEST = "https://test.salesforce.com"
SF_TEST_TOKEN = "https://test.salesforce.com/services/oauth2/token"
ABAP_NOTE = ". For more information, consult the kernel traces or the OAuth 2.0 trouble shooting SAP note 1688545"
SF_SIGNATURE_TEXT = ("Unable to verify the signature of the SAML assertion. Please ensure that the assertion has "
                     "a signature and the key pairs match the client ID")
SF_INVALID_USER = "Unable to authenticate the client (Login failed - invalid user)"


# ------------------------------------------------------------------ helpers


class AnyAlgorithmSigner(XMLSigner):
    """signxml refuses to sign with SHA-1; Salesforce documents RSA-SHA1 as accepted."""

    def check_deprecated_methods(self):
        pass


class Identity:
    """A key and its self-signed certificate (RSA or P-256) with subject CN `cn`."""

    def __init__(self, cn=ISSUER, kind="rsa"):
        self.kind = kind
        key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa"
               else ec.generate_private_key(ec.SECP256R1()))
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                .sign(key, hashes.SHA256()))
        self.key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)


def make_assertion(identity, *, issuer, recipient, audience, name_id="alice", attributes=None,
                   scd_not_before=False, scd_not_on_or_after=True, issue_offset=0.0, extra_condition=None,
                   issuer_format=None, signed=True, algorithm=None, digest="sha256"):
    """A signed assertion shaped like the gateway's (Signature right after Issuer), every part
    adjustable so that one rule at a time can be broken."""
    assertion_id = "_" + uuid.uuid4().hex
    root = etree.Element(f"{{{SAML_NS}}}Assertion", nsmap={"saml": SAML_NS},
                         ID=assertion_id, Version="2.0", IssueInstant=saml_time(issue_offset))

    def sub(parent, tag, text=None, **attrs):
        el = etree.SubElement(parent, f"{{{SAML_NS}}}{tag}", **attrs)
        el.text = text
        return el

    issuer_el = sub(root, "Issuer", issuer)
    if issuer_format:
        issuer_el.set("Format", issuer_format)
    if signed:
        root.append(etree.Element(f"{{{DS_NS}}}Signature", Id="placeholder", nsmap={"ds": DS_NS}))
    subject = sub(root, "Subject")
    sub(subject, "NameID", name_id, Format="urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified")
    confirmation = sub(subject, "SubjectConfirmation", Method="urn:oasis:names:tc:SAML:2.0:cm:bearer")
    scd = sub(confirmation, "SubjectConfirmationData", Recipient=recipient)
    if scd_not_on_or_after:
        scd.set("NotOnOrAfter", saml_time(300))
    if scd_not_before:
        scd.set("NotBefore", saml_time(-10))
    conditions = sub(root, "Conditions", NotBefore=saml_time(-10), NotOnOrAfter=saml_time(300))
    sub(sub(conditions, "AudienceRestriction"), "Audience", audience)
    if extra_condition:
        sub(conditions, extra_condition)
    authn = sub(root, "AuthnStatement", AuthnInstant=saml_time(-5))
    sub(sub(authn, "AuthnContext"), "AuthnContextClassRef",
        "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession")
    if attributes:
        statement = sub(root, "AttributeStatement")
        for name, value in attributes.items():
            sub(sub(statement, "Attribute", Name=name), "AttributeValue", value)
    if not signed:
        return etree.tostring(root)
    algorithm = algorithm or ("rsa-sha256" if identity.kind == "rsa" else "ecdsa-sha256")
    signer = AnyAlgorithmSigner(method=methods.enveloped, signature_algorithm=algorithm,
                                digest_algorithm=digest, c14n_algorithm=EXC_C14N)
    signed_root = signer.sign(root, key=identity.key_pem, cert=identity.cert_pem.decode(),
                              reference_uri=f"#{assertion_id}", id_attribute="ID")
    return etree.tostring(signed_root)


def b64url(xml_bytes):
    return base64.urlsafe_b64encode(xml_bytes).rstrip(b"=").decode()


def b64(xml_bytes):
    return base64.b64encode(xml_bytes).decode()


def basic(user=CLIENT_ID, password=CLIENT_SECRET):
    credentials = f"{urllib.parse.quote_plus(user)}:{urllib.parse.quote_plus(password)}"
    return "Basic " + base64.b64encode(credentials.encode()).decode()


class Env:
    def __init__(self, ports, gateway, second, gateway_ec, stranger):
        self.token = f"http://127.0.0.1:{ports[1]}"
        self.echo = f"http://127.0.0.1:{ports[2]}"
        self.gateway, self.second, self.gateway_ec, self.stranger = gateway, second, gateway_ec, stranger

    def post(self, path, fields, authorization=None, query=""):
        """POST a form to the token server: (status, headers-less JSON body)."""
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if authorization:
            headers["Authorization"] = authorization
        url = self.token + path + (f"?{query}" if query else "")
        status, body = http("POST", url, urllib.parse.urlencode(
            {k: v for k, v in fields.items() if v is not None}).encode(), headers)
        return status, json.loads(body)

    def get_json(self, base, path, headers=None):
        status, body = http("GET", base + path, headers=headers)
        assert status == 200
        return json.loads(body)

    def echo_user(self, token):
        return self.get_json(self.echo, "/", {"Authorization": f"Bearer {token}"})

    def last_request(self):
        return self.get_json(self.token, "/requests")[-1]

    # One correct assertion and request per target; keyword arguments break one thing.

    def s4(self, identity=None, form=None, authorization=basic(), **kwargs):
        kwargs = {"issuer": ISSUER, "recipient": self.token + S4_TOKEN_PATH, "audience": S4_AUDIENCE, **kwargs}
        fields = {"grant_type": GRANT, "assertion": b64url(make_assertion(identity or self.gateway, **kwargs)),
                  "client_id": CLIENT_ID, **(form or {})}
        return self.post(S4_TOKEN_PATH, fields, authorization)

    def abap(self, identity=None, form=None, authorization=basic(), xml=None, **kwargs):
        endpoint = self.token + ABAP_TOKEN_PATH
        kwargs = {"issuer": ISSUER, "recipient": endpoint, "audience": endpoint, **kwargs}
        xml = xml or make_assertion(identity or self.gateway, **kwargs)
        fields = {"grant_type": GRANT, "assertion": b64url(xml), "client_id": CLIENT_ID, **(form or {})}
        return self.post(ABAP_TOKEN_PATH, fields, authorization)

    def sf(self, identity=None, form=None, query="", encode=b64, attributes=None, **kwargs):
        kwargs = {"issuer": SF_ISSUER, "recipient": self.token + SF_TOKEN_PATH, "audience": "www.successfactors.com",
                  "attributes": {"api_key": SF_API_KEY} if attributes is None else attributes, **kwargs}
        fields = {"grant_type": GRANT, "assertion": encode(make_assertion(identity or self.gateway, **kwargs)),
                  "client_id": SF_API_KEY, "company_id": SF_COMPANY_ID, **(form or {})}
        return self.post(SF_TOKEN_PATH, fields, query=query)

    def xsuaa(self, identity=None, form=None, authorization=basic(), path=XSUAA_TOKEN_PATH, **kwargs):
        kwargs = {"issuer": ISSUER, "recipient": self.token + XSUAA_TOKEN_PATH, "audience": XSUAA_ENTITY_ID,
                  **kwargs}
        fields = {"grant_type": GRANT, "assertion": b64url(make_assertion(identity or self.gateway, **kwargs)),
                  "client_id": CLIENT_ID, **(form or {})}
        return self.post(path, fields, authorization)

    def salesforce_xml(self, identity=None, **kwargs):
        kwargs = {"issuer": SALESFORCE_CONSUMER_KEY, "recipient": SF_LOGIN_TOKEN, "audience": SF_LOGIN, **kwargs}
        return make_assertion(identity or self.gateway, **kwargs)

    def salesforce(self, identity=None, form=None, authorization=None, assertion=None, **kwargs):
        assertion = assertion or b64url(self.salesforce_xml(identity, **kwargs))
        return self.post(SALESFORCE_TOKEN_PATH, {"grant_type": GRANT, "assertion": assertion, **(form or {})},
                         authorization)


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("targets")
    gateway, second = Identity(ISSUER), Identity(SECOND_PROVIDER)
    gateway_ec, stranger = Identity(ISSUER, "ec"), Identity(ISSUER)  # stranger's certificate is not trusted
    trusted = []
    for label, identity in (("gateway", gateway), ("second", second), ("gateway-ec", gateway_ec)):
        (tmp / f"{label}.pem").write_bytes(identity.cert_pem)
        trusted += ["--trusted-cert", str(tmp / f"{label}.pem")]
    ports = [free_port() for _ in range(3)]
    log = tmp / "servers.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "dev" / "servers.py"), "--idp-port", str(ports[0]),
             "--token-port", str(ports[1]), "--echo-port", str(ports[2]), *trusted,
             "--trusted-issuer", ISSUER, "--entity-id", ENTITY_ID, "--client-id", CLIENT_ID,
             "--client-secret", CLIENT_SECRET, "--jwt-audience", JWT_AUDIENCE],
            stdout=subprocess.PIPE, stderr=stderr)
    try:
        wait_ready(proc, log)
        yield Env(ports, gateway, second, gateway_ec, stranger)
    finally:
        stop_servers(proc)


@pytest.fixture(autouse=True)
def reset(env):
    assert http("POST", env.token + "/reset", b"")[0] == 200


def assert_exchanged(env, answer, user, target):
    """A 200 token answer for `user`, usable upstream, recorded for `target`."""
    status, body = answer
    assert status == 200, body
    assert body["token_type"] == "bearer" and body["access_token"] and "refresh_token" not in body
    echo = env.echo_user(body["access_token"])
    assert echo["user"] == user and echo["token_valid"] is True
    record = env.last_request()
    assert (record["outcome"], record["target"]) == ("ok", target)
    return record


def assert_rfc_refusal(answer, status, error, description):
    """An RFC 6749 refusal whose description contains `description` (or equals it, given as
    a one-element tuple)."""
    got_status, body = answer
    assert (got_status, body.get("error")) == (status, error), body
    assert set(body) == {"error", "error_description"}
    if isinstance(description, tuple):
        assert body["error_description"] == description[0]
    else:
        assert description in body["error_description"], body


def abap_text(text):
    return (f"Provided authorization grant is invalid. Exception was {text}{ABAP_NOTE}",)


def assert_sf_refusal(answer, status, message):
    """SuccessFactors' own shape: {"errorHttpCode": "<status>", "errorMessage": ...}, nothing else."""
    got_status, body = answer
    assert got_status == status, body
    assert set(body) == {"errorHttpCode", "errorMessage"}, body
    assert body["errorHttpCode"] == str(status)
    if isinstance(message, tuple):
        assert body["errorMessage"] == message[0]
    else:
        assert message in body["errorMessage"], body


# ----------------------------------------------------------------- S/4HANA Cloud


def test_s4hana_cloud_exchanges_and_counts_the_user(env):
    record = assert_exchanged(env, env.s4(), "alice", "s4hana-cloud")
    assert record["target_details"] == {"provider_name": ISSUER} and record["verified_by"] == "gateway"
    # The provider name is the signing certificate's CN, whichever registered certificate it is.
    record = assert_exchanged(env, env.s4(env.second, issuer=SECOND_PROVIDER, name_id="bob"), "bob", "s4hana-cloud")
    assert record["target_details"] == {"provider_name": SECOND_PROVIDER}
    assert env.get_json(env.token, "/stats")["exchanges"] == {"alice": 1, "bob": 1}


@pytest.mark.parametrize("call, expected", [
    (lambda env: env.s4(issuer=SECOND_PROVIDER), (400, "invalid_grant", "is not the provider name 'principal-")),
    (lambda env: env.s4(env.second), (400, "invalid_grant", f"is not the provider name '{SECOND_PROVIDER}'")),
    (lambda env: env.s4(audience="https://my300117-api.s4hana.ondemand.com"),
     (400, "invalid_grant", f"audience does not include {S4_AUDIENCE}")),
    (lambda env: env.s4(recipient=env.token + "/oauth/token"), (400, "invalid_grant", "Recipient must be")),
    (lambda env: env.s4(env.stranger), (400, "invalid_grant", "signature invalid")),
    (lambda env: env.s4(authorization=basic(password="wrong")), (401, "invalid_client", "bad client credentials")),
    (lambda env: env.s4(authorization=None), (401, "invalid_client", "HTTP Basic")),
    (lambda env: env.s4(form={"client_id": None}), (400, "invalid_request", "client_id")),
    (lambda env: env.s4(form={"client_id": "someone-else"}), (401, "invalid_client", "client_id does not match")),
], ids=["issuer-not-cn", "cn-not-issuer", "audience-with-api", "recipient", "untrusted-key", "wrong-secret",
        "no-basic", "no-client-id", "client-id-not-user"])
def test_s4hana_cloud_refuses(env, call, expected):
    assert_rfc_refusal(call(env), *expected)
    assert env.get_json(env.token, "/stats")["exchanges"] == {}


def test_s4hana_cloud_refuses_an_assertion_id_twice(env):
    xml = make_assertion(env.gateway, issuer=ISSUER, recipient=env.token + S4_TOKEN_PATH, audience=S4_AUDIENCE)
    fields = {"grant_type": GRANT, "assertion": b64url(xml), "client_id": CLIENT_ID}
    assert env.post(S4_TOKEN_PATH, fields, basic())[0] == 200
    assert_rfc_refusal(env.post(S4_TOKEN_PATH, fields, basic()), 400, "invalid_grant", "already been consumed")


# ----------------------------------------------------------------- AS ABAP


def test_abap_accepts_audience_or_recipient_as_the_token_endpoint(env):
    record = assert_exchanged(env, env.abap(), "alice", "abap")
    assert record["target_details"] == {"provider": ISSUER}
    assert_exchanged(env, env.abap(audience="some-other-audience", name_id="bob"), "bob", "abap")
    assert_exchanged(env, env.abap(recipient="https://elsewhere.example/token", name_id="carol"), "carol", "abap")
    # The client_id attribute, when sent, equals the client_id parameter.
    assert_exchanged(env, env.abap(attributes={"client_id": CLIENT_ID}, name_id="dave"), "dave", "abap")
    assert env.get_json(env.token, "/stats")["exchanges"] == {"alice": 1, "bob": 1, "carol": 1, "dave": 1}


@pytest.mark.parametrize("call, expected", [
    (lambda env: env.abap(audience="some-other-audience", recipient="https://elsewhere.example/token"),
     (400, "invalid_grant", "Exception was Neither the AudienceRestriction nor the Recipient is the token endpoint")),
    (lambda env: env.abap(issuer="someone-else"),
     (400, "invalid_grant", abap_text('The provided OAuth 2.0 SAML IdP "someone-else" is invalid'))),
    (lambda env: env.abap(signed=False),
     (400, "invalid_grant", abap_text("Message Assertion is not signed"))),
    (lambda env: env.abap(env.stranger), (400, "invalid_grant", "Exception was signature invalid")),
    (lambda env: env.abap(name_id="DOMAIN:alice"), (400, "invalid_grant", "contains a colon")),
    (lambda env: env.abap(attributes={"client_id": "another-client"}),
     (400, "invalid_grant", "Exception was SAML attribute client_id does not equal the client_id parameter")),
    (lambda env: env.abap(audience=ENTITY_ID, scd_not_on_or_after=False),
     (400, "invalid_grant", "Provided authorization grant is invalid. Exception was SubjectConfirmationData")),
    (lambda env: env.abap(authorization=basic(password="wrong")), (401, "invalid_client", "bad client credentials")),
    (lambda env: env.abap(authorization=None), (401, "invalid_client", "HTTP Basic")),
], ids=["neither-audience-nor-recipient", "untrusted-issuer", "unsigned", "untrusted-key", "colon-in-name-id",
        "client-id-attribute", "generic-check-in-abap-shape", "wrong-secret", "no-basic"])
def test_abap_refuses(env, call, expected):
    answer = call(env)
    assert_rfc_refusal(answer, *expected)
    if answer[0] == 400:  # every assertion refusal in ABAP's description shape
        assert answer[1]["error_description"].startswith("Provided authorization grant is invalid. Exception was ")
        assert answer[1]["error_description"].endswith(ABAP_NOTE)
    assert env.get_json(env.token, "/stats")["exchanges"] == {}


def test_abap_refuses_a_consumed_assertion(env):
    endpoint = env.token + ABAP_TOKEN_PATH
    xml = make_assertion(env.gateway, issuer=ISSUER, recipient=endpoint, audience=endpoint)
    assert env.abap(xml=xml)[0] == 200
    assert_rfc_refusal(env.abap(xml=xml), 400, "invalid_grant", abap_text("The assertion has already been consumed"))


def test_the_replay_table_forgets_an_abap_assertion_once_it_expired():
    state = servers.SharedState()
    now = time.time()
    assert state.claim_assertion_id(("abap", ISSUER, "_a"), until=now + 60)
    assert not state.claim_assertion_id(("abap", ISSUER, "_a"), until=now + 60)
    assert state.claim_assertion_id(("abap", "another-issuer", "_a"), until=now + 60)  # (Issuer, ID)
    assert state.claim_assertion_id(("abap", ISSUER, "_old"), until=now - 1)
    assert state.claim_assertion_id(("abap", ISSUER, "_old"), until=now + 60)  # expired: accepted once more
    assert state.claim_assertion_id("_b") and not state.claim_assertion_id("_b")  # /oauth/token: for ever
    scd_end, cond_end = now + 100, now + 300
    stamp = lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    assertion = etree.fromstring(
        f'<saml:Assertion xmlns:saml="{SAML_NS}"><saml:Subject><saml:SubjectConfirmation>'
        f'<saml:SubjectConfirmationData NotOnOrAfter="{stamp(scd_end)}"/></saml:SubjectConfirmation></saml:Subject>'
        f'<saml:Conditions NotOnOrAfter="{stamp(cond_end)}"/></saml:Assertion>'.encode())
    assert abs(servers.until_expiry(assertion) - (int(cond_end) + servers.CLOCK_SKEW)) < 1


# ----------------------------------------------------------------- SuccessFactors


def test_successfactors_exchanges_base64_and_base64url_and_company_in_the_query(env):
    record = assert_exchanged(env, env.sf(), "alice", "successfactors")
    assert record["target_details"] == {"company_id": SF_COMPANY_ID, "user_id_mode": "user_id"}
    assert_exchanged(env, env.sf(encode=b64url, name_id="bob"), "bob", "successfactors")
    assert_exchanged(env, env.sf(form={"company_id": None}, query=f"company_id={SF_COMPANY_ID}", name_id="carol"),
                     "carol", "successfactors")
    # No client authentication is needed; the Issuer and Recipient are not checked.
    assert_exchanged(env, env.sf(issuer="anything", recipient="https://api.example/odata/v2", name_id="dave"),
                     "dave", "successfactors")
    assert env.get_json(env.token, "/stats")["exchanges"] == {"alice": 1, "bob": 1, "carol": 1, "dave": 1}


def test_successfactors_maps_the_name_id_by_use_email_or_use_username(env):
    attributes = {"api_key": SF_API_KEY, "use_email": "true"}
    record = assert_exchanged(env, env.sf(name_id="alice@example.com", attributes=attributes),
                              "alice@example.com", "successfactors")
    assert record["target_details"]["user_id_mode"] == "email"
    attributes = {"api_key": SF_API_KEY, "use_username": "true"}
    record = assert_exchanged(env, env.sf(name_id="alice.smith", attributes=attributes), "alice.smith",
                              "successfactors")
    assert record["target_details"]["user_id_mode"] == "username"
    assert env.get_json(env.token, "/stats")["exchanges"] == {"alice@example.com": 1, "alice.smith": 1}


@pytest.mark.parametrize("call, expected", [
    (lambda env: env.sf(env.stranger), (401, (SF_SIGNATURE_TEXT,))),
    (lambda env: env.sf(signed=False), (401, (SF_SIGNATURE_TEXT,))),
    (lambda env: env.sf(name_id="alice@example.com"), (401, (SF_INVALID_USER,))),
    (lambda env: env.sf(form={"client_id": None}), (400, "client_id")),
    (lambda env: env.sf(form={"client_id": "another-api-key"}), (401, "Unable to authenticate the client")),
    (lambda env: env.sf(form={"company_id": None}), (400, "company_id")),
    (lambda env: env.sf(form={"company_id": "OTHERCO"}), (401, "company_id")),
    (lambda env: env.sf(attributes={}), (401, "api_key")),
    (lambda env: env.sf(attributes={"api_key": "another-api-key"}), (401, "api_key")),
    (lambda env: env.sf(audience="https://api.successfactors.eu"),
     (401, "audience does not include www.successfactors.com")),
    (lambda env: env.sf(name_id="a.smith", attributes={"api_key": SF_API_KEY, "use_email": "true",
                                                       "use_username": "true"}), (401, "both true")),
    (lambda env: env.sf(form={"grant_type": "client_credentials"}), (400, "grant_type")),
    (lambda env: env.sf(scd_not_before=True), (401, "Unable to validate the SAML assertion")),
], ids=["untrusted-key", "unsigned", "email-without-use-email", "no-client-id", "unknown-api-key", "no-company",
        "unknown-company", "no-api-key-attribute", "api-key-attribute-differs", "audience", "both-flags",
        "grant-type", "generic-check"])
def test_successfactors_refuses_in_its_own_shape(env, call, expected):
    assert_sf_refusal(call(env), *expected)
    assert env.get_json(env.token, "/stats")["exchanges"] == {}


def test_successfactors_keeps_what_its_fixed_texts_do_not_say(env):
    assert env.sf(env.stranger)[0] == 401
    assert "signature invalid" in env.last_request()["detail"]


# ----------------------------------------------------------------- XSUAA


def test_xsuaa_exchanges_at_the_alias_url(env):
    record = assert_exchanged(env, env.xsuaa(), "alice", "xsuaa")
    assert record["target_details"] == {"alias": servers.XSUAA_ALIAS, "idp": ISSUER}
    # client_id in the form is optional; an IssueInstant 3000 s old is within the 60 s skew.
    assert_exchanged(env, env.xsuaa(form={"client_id": None}, issue_offset=-3030, name_id="bob"), "bob", "xsuaa")
    # ECDSA is not refused here (Salesforce's rule only).
    assert_exchanged(env, env.xsuaa(env.gateway_ec, name_id="carol"), "carol", "xsuaa")


@pytest.mark.parametrize("call, expected", [
    (lambda env: env.xsuaa(recipient=env.token + "/oauth/token"),
     (400, "invalid_grant", "Assertion invalidated by subject confirmation - can't be confirmed by the bearer method")),
    (lambda env: env.xsuaa(path=XSUAA_TOKEN_PREFIX + "other-subaccount",
                           recipient=env.token + XSUAA_TOKEN_PREFIX + "other-subaccount"),
     (400, "invalid_grant", "alias 'other-subaccount'")),
    (lambda env: env.xsuaa(audience=env.token + XSUAA_TOKEN_PATH),
     (400, "invalid_grant", "Local entity is not the intended audience of the assertion in at least one")),
    (lambda env: env.xsuaa(issuer="https://unknown-idp.example"),
     (400, "invalid_grant", ("Issuer invalidated by issuer value https://unknown-idp.example",))),
    (lambda env: env.xsuaa(issuer_format="urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified"),
     (400, "invalid_grant", "Issuer invalidated by issuer type urn:oasis:names:tc:SAML:1.1:nameid-format:unspec")),
    (lambda env: env.xsuaa(issuer=""), (400, "invalid_grant", "Missing issuer in bearer assertion")),
    (lambda env: env.xsuaa(env.stranger), (400, "invalid_grant", "Error validating SAML message signature")),
    (lambda env: env.xsuaa(signed=False), (400, "invalid_grant", "Assertion is missing a signature.")),
    (lambda env: env.xsuaa(scd_not_before=True),
     (400, "invalid_grant", "can't be confirmed by the bearer method (SubjectConfirmationData must not carry")),
    (lambda env: env.xsuaa(scd_not_on_or_after=False),
     (400, "invalid_grant", "can't be confirmed by the bearer method (SubjectConfirmationData NotOnOrAfter")),
    (lambda env: env.xsuaa(issue_offset=-3100),
     (400, "invalid_grant", "Assertion is too old to be used, value can be customized by setting maxAssertionTime")),
    (lambda env: env.xsuaa(extra_condition="OneTimeUse"),
     (400, "invalid_grant", "System cannot honor OneTimeUse condition of the Assertion for WebSSO")),
    (lambda env: env.xsuaa(authorization=basic(password="wrong")), (401, "invalid_client", "bad client credentials")),
    (lambda env: env.xsuaa(authorization=None), (401, "invalid_client", "HTTP Basic")),
    (lambda env: env.xsuaa(form={"client_id": "another-client"}), (401, "invalid_client", "client_id does not")),
], ids=["plain-token-recipient", "unknown-alias", "audience-is-token-url", "untrusted-issuer", "issuer-format",
        "no-issuer", "untrusted-key", "unsigned", "scd-not-before", "scd-no-not-on-or-after", "issued-too-long-ago",
        "one-time-use", "wrong-secret", "no-basic", "client-id-differs"])
def test_xsuaa_refuses(env, call, expected):
    assert_rfc_refusal(call(env), *expected)
    assert env.get_json(env.token, "/stats")["exchanges"] == {}


# ----------------------------------------------------------------- Salesforce


def test_salesforce_exchanges_login_and_test_with_rsa_sha256_or_sha1(env):
    assert_exchanged(env, env.salesforce(), "alice", "salesforce")
    assert env.last_request()["target_details"] == {"audience": SF_LOGIN}
    assert_exchanged(env, env.salesforce(audience=SF_TEST, recipient=SF_TEST_TOKEN, name_id="bob"), "bob",
                     "salesforce")
    assert env.last_request()["target_details"] == {"audience": SF_TEST}
    assert_exchanged(env, env.salesforce(algorithm="rsa-sha1", digest="sha1", name_id="carol"), "carol", "salesforce")
    # No client secret is needed, and one sent is not held against the request.
    assert_exchanged(env, env.salesforce(authorization=basic("x", "y"), form={"client_id": "x"}, name_id="dave"),
                     "dave", "salesforce")
    assert env.get_json(env.token, "/stats")["exchanges"] == {"alice": 1, "bob": 1, "carol": 1, "dave": 1}


def standard_base64_only(env):
    """An assertion whose standard base64 has `+` or `/` (so it is not base64url)."""
    for _ in range(20):
        encoded = b64(env.salesforce_xml())
        if "+" in encoded or "/" in encoded:
            return encoded
    raise AssertionError("no + or / in 20 encodings")


def padded_base64url(env):
    """A base64url assertion with its `=` padding kept."""
    xml = env.salesforce_xml()
    while len(xml) % 3 == 0:
        xml += b"\n"  # after the root element: outside what the signature covers
    return base64.urlsafe_b64encode(xml).decode()


@pytest.mark.parametrize("call, expected", [
    (lambda env: env.salesforce(audience="https://mydomain.my.salesforce.com"),
     (400, "invalid_grant", ("Audience validation failed",))),
    (lambda env: env.salesforce(recipient=SF_TEST_TOKEN),
     (400, "invalid_grant", f"Recipient must be {SF_LOGIN_TOKEN}")),
    (lambda env: env.salesforce(recipient=env.token + SALESFORCE_TOKEN_PATH),
     (400, "invalid_grant", "invalid assertion: Recipient must be")),
    (lambda env: env.salesforce(issuer=ISSUER), (400, "invalid_grant", "is not the consumer key")),
    (lambda env: env.salesforce(env.gateway_ec), (400, "invalid_grant", "ecdsa-sha256 is not accepted")),
    (lambda env: env.salesforce(algorithm="rsa-sha512", digest="sha512"), (400, "invalid_grant", "not accepted")),
    (lambda env: env.salesforce(env.stranger), (400, "invalid_grant", "invalid assertion: signature invalid")),
    (lambda env: env.salesforce(assertion=standard_base64_only(env)), (400, "invalid_grant", "not base64url")),
    (lambda env: env.salesforce(assertion=padded_base64url(env)), (400, "invalid_grant", "not base64url")),
    (lambda env: env.salesforce(scd_not_before=True),
     (400, "invalid_grant", "invalid assertion: SubjectConfirmationData must not carry NotBefore")),
    (lambda env: env.salesforce(form={"grant_type": "password"}),
     (400, "unsupported_grant_type", ("grant type not supported",))),
], ids=["audience", "recipient-of-the-other-audience", "recipient-dev-server", "issuer-not-consumer-key", "ecdsa",
        "rsa-sha512", "untrusted-key", "standard-base64", "padded-base64url", "generic-check", "grant-type"])
def test_salesforce_refuses(env, call, expected):
    assert_rfc_refusal(call(env), *expected)
    assert env.get_json(env.token, "/stats")["exchanges"] == {}


def test_salesforce_audience_refusal_is_exactly_salesforces_body(env):
    status, body = env.salesforce(audience=ENTITY_ID)
    assert (status, body) == (400, {"error": "invalid_grant", "error_description": "Audience validation failed"})


# ----------------------------------------------------------------- shared behaviour


def test_faults_work_on_target_paths_and_tokens_are_ordinary(env):
    status, _ = http("POST", env.token + "/faults", json.dumps({"path": S4_TOKEN_PATH, "mode": "reject"}).encode())
    assert status == 200
    assert_rfc_refusal(env.s4(), 400, "invalid_grant", "fault mode reject")
    http("POST", env.token + "/faults", json.dumps({"path": S4_TOKEN_PATH, "mode": "none"}).encode())
    assert_exchanged(env, env.s4(), "alice", "s4hana-cloud")
    assert env.get_json(env.token, "/faults")["served"][S4_TOKEN_PATH] == {"reject": 1, "none": 1}
    assert http("POST", env.token + "/faults", b'{"path": "/s4/elsewhere", "mode": "reject"}')[0] == 400
    # The generic endpoint is unchanged beside the targets.
    assert http("POST", env.token + "/sf/elsewhere", b"")[0] == 404
    assert_exchanged(env, env.salesforce(name_id="alice"), "alice", "salesforce")
    assert env.get_json(env.token, "/stats")["exchanges"] == {"alice": 2}
