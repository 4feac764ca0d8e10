"""`pp check` on assertions made by an independent signer (signxml, not the gateway's),
each broken in one way: the rule that covers it fails (exit 1) with the actual and the
expected value, and an intact one passes every rule (exit 0). The signature itself is
xmlsec1's verdict. Inputs as XML, base64url on stdin, base64, and a captured token
request's form body."""

from __future__ import annotations

import base64
import datetime
import subprocess
import urllib.parse
import uuid

import pytest
from lxml import etree
from signxml import XMLSigner, methods

import stack

SAML_NS = "urn:oasis:names:tc:SAML:2.0:assertion"
DS_NS = "http://www.w3.org/2000/09/xmldsig#"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
# Now, so that the stack's certificates (made with its keys) are valid at the clock.
T0 = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
ISSUER, AUDIENCE, RECIPIENT = "my-idp", "https://target.example", "https://target.example/oauth/token"
def at(seconds: float) -> str:
    return (T0 + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


EXPECT = ["--issuer", ISSUER, "--audience", AUDIENCE, "--recipient", RECIPIENT, "--at", at(30)]


def assertion(*, issuer=ISSUER, audience=AUDIENCE, recipient=RECIPIENT, issued=0, not_before=-10,
              not_on_or_after=300, scd_not_before=False, extra_condition=None, key_slot="a",
              name_id_format="urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified") -> bytes:
    """An assertion signed by signxml with the key of `key_slot` (stack key files)."""
    key, cert = stack.key_files(key_slot)
    assertion_id = "_" + uuid.uuid4().hex
    root = etree.Element(f"{{{SAML_NS}}}Assertion", nsmap={"saml": SAML_NS}, ID=assertion_id, Version="2.0",
                         IssueInstant=at(issued))

    def sub(parent, tag, text=None, **attrs):
        el = etree.SubElement(parent, f"{{{SAML_NS}}}{tag}", **attrs)
        el.text = text
        return el

    sub(root, "Issuer", issuer)
    root.append(etree.Element(f"{{{DS_NS}}}Signature", Id="placeholder", nsmap={"ds": DS_NS}))
    subject = sub(root, "Subject")
    sub(subject, "NameID", "alice", Format=name_id_format)
    confirmation = sub(subject, "SubjectConfirmation", Method="urn:oasis:names:tc:SAML:2.0:cm:bearer")
    data = sub(confirmation, "SubjectConfirmationData", NotOnOrAfter=at(not_on_or_after), Recipient=recipient)
    if scd_not_before:
        data.set("NotBefore", at(not_before))
    conditions = sub(root, "Conditions", NotBefore=at(not_before), NotOnOrAfter=at(not_on_or_after))
    sub(sub(conditions, "AudienceRestriction"), "Audience", audience)
    if extra_condition:
        sub(conditions, extra_condition)
    authn = sub(root, "AuthnStatement", AuthnInstant=at(issued))
    sub(sub(authn, "AuthnContext"), "AuthnContextClassRef", "urn:oasis:names:tc:SAML:2.0:ac:classes:Password")
    signer = XMLSigner(method=methods.enveloped, signature_algorithm="rsa-sha256", digest_algorithm="sha256",
                       c14n_algorithm=EXC_C14N)
    signed = signer.sign(root, key=key.read_bytes(), cert=cert.read_text(), reference_uri=f"#{assertion_id}",
                         id_attribute="ID")
    return etree.tostring(signed)


def check(data: bytes, *args: str, stdin: bool = False, cert_slot: str = "a", tmp_path=None):
    cert = stack.key_files(cert_slot)[1]
    target = "-"
    if not stdin:
        target = str(tmp_path / f"{uuid.uuid4().hex}.txt")
        with open(target, "wb") as f:
            f.write(data)
    result = subprocess.run([str(stack.PP), "check", "--cert", str(cert), *args, target], input=data if stdin else None,
                            capture_output=True, timeout=60)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def failed_rules(report: str) -> set[str]:
    return {line[6:].split(":", 1)[0] for line in report.splitlines() if line.startswith("FAIL  ")}


def test_an_intact_assertion_passes_every_rule_in_every_input_form(tmp_path):
    xml = assertion()  # signxml's serialization, not the gateway's canonical one
    b64url = base64.urlsafe_b64encode(xml).rstrip(b"=")
    form = urllib.parse.urlencode({"grant_type": "urn:ietf:params:oauth:grant-type:saml2-bearer",
                                   "assertion": b64url.decode(), "client_id": "x"}).encode()
    for data, stdin in ((xml, False), (b64url, True), (base64.b64encode(xml), False), (form, True)):
        status, report, err = check(data, *EXPECT, stdin=stdin, tmp_path=tmp_path)
        assert status == 0, report + err
        assert "all 17 rules pass" in report
        assert "pass  signature: valid for the certificate (xmlsec1)" in report


@pytest.mark.parametrize("kwargs, args, rules", [
    ({"issuer": "someone-else"}, [], {"Issuer"}),
    ({"audience": "https://target.example/"}, [], {"Audience"}),
    ({"recipient": "https://target.example/oauth/token/alias/x"}, [], {"Recipient"}),
    ({"scd_not_before": True}, [], {"SubjectConfirmationData without NotBefore"}),
    ({"extra_condition": "OneTimeUse"}, [], {"no other conditions"}),
    ({"name_id_format": "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress"},
     ["--name-id-format", "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified"], {"NameID Format"}),
    # The clock: after expiry (plus skew), before NotBefore (minus skew), and an old IssueInstant.
    ({}, ["--at", at(361)], {"Conditions NotOnOrAfter", "SubjectConfirmationData NotOnOrAfter"}),
    ({"not_before": 100, "issued": 100}, [], {"Conditions NotBefore", "IssueInstant"}),
    ({"issued": -4000}, [], {"IssueInstant"}),
    ({"issued": -4000}, ["--max-age", "5000"], set()),
    ({}, ["--skew", "0", "--at", at(300)], {"Conditions NotOnOrAfter",
                                                           "SubjectConfirmationData NotOnOrAfter"}),
])
def test_each_broken_rule_fails_with_actual_and_expected(tmp_path, kwargs, args, rules):
    # The case's own flags replace the defaults of the same name.
    merged = dict(zip(EXPECT[::2], EXPECT[1::2])) | dict(zip(args[::2], args[1::2]))
    flags = [x for pair in merged.items() for x in pair]
    status, report, err = check(assertion(**kwargs), *flags, tmp_path=tmp_path)
    assert failed_rules(report) == rules, report + err
    assert status == (1 if rules else 0)


def test_a_changed_assertion_fails_the_digest_and_another_key_the_signature(tmp_path):
    xml = assertion()
    changed = xml.replace(b">alice<", b">admin<")
    status, report, _ = check(changed, *EXPECT, tmp_path=tmp_path)
    assert status == 1 and failed_rules(report) == {"digest", "signature"}
    assert "signature: not valid while the digest differs" in report
    # Signed by key b, checked against a's certificate: the content is intact, the signature not.
    status, report, _ = check(assertion(key_slot="b"), *EXPECT, tmp_path=tmp_path)
    assert status == 1 and failed_rules(report) == {"signature"}, report


def test_an_expired_certificate_fails_its_rule(tmp_path):
    key, cert = tmp_path / "short-key.pem", tmp_path / "short-cert.pem"
    made = subprocess.run([*stack.PP_KEYS, "generate", "--issuer", ISSUER, "--days", "1", "--key", str(key),
                           "--cert", str(cert)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    xml = assertion()
    later = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = subprocess.run([str(stack.PP), "check", "--cert", str(cert), "--issuer", ISSUER, "--audience", AUDIENCE,
                             "--recipient", RECIPIENT, "--at", later, "-"], input=xml, capture_output=True, timeout=60)
    report = result.stdout.decode()
    assert result.returncode == 1
    assert "certificate validity" in failed_rules(report)
    assert "signature" in failed_rules(report), "another key than the certificate's"


@pytest.mark.parametrize("args, data, problem", [
    ([], b"<saml2:Assertion", "the assertion's file (or -) comes last"),
    (["--cert", "/nonexistent.pem"], b"x", "/nonexistent.pem"),
    (["--cert", "CERT"], b"%%% not base64 %%%", "neither XML nor base64"),
    (["--cert", "CERT"], b"<!DOCTYPE x [<!ENTITY a 'b'>]><x/>", "DOCTYPE is not allowed"),
    (["--cert", "CERT", "--at", "tomorrow"], b"<x/>", "is not an RFC 3339 time"),
])
def test_what_cannot_be_checked_is_said_plainly(args, data, problem):
    cert = str(stack.key_files("a")[1])
    args = [cert if a == "CERT" else a for a in args]
    result = subprocess.run([str(stack.PP), "check", *args, *(["-"] if args else [])], input=data,
                            capture_output=True, timeout=60)
    assert result.returncode == 2, result
    assert problem in result.stderr.decode()


def resigned(xml: bytes, change=lambda root: None, key_slot: str = "a", algorithm: str = "rsa-sha256") -> bytes:
    """`xml` changed by `change` (on its root element), then signed again by signxml."""
    root = etree.fromstring(xml)
    root.remove(root.find(f"{{{DS_NS}}}Signature"))
    root.insert(1, etree.Element(f"{{{DS_NS}}}Signature", Id="placeholder", nsmap={"ds": DS_NS}))
    change(root)
    key, cert = stack.key_files(key_slot)
    signer = XMLSigner(method=methods.enveloped, signature_algorithm=algorithm, digest_algorithm="sha256",
                       c14n_algorithm=EXC_C14N)
    return etree.tostring(signer.sign(root, key=key.read_bytes(), cert=cert.read_text(),
                                      reference_uri=f"#{root.get('ID')}", id_attribute="ID"))


def with_attribute(xml: bytes, name: str, value: str) -> bytes:
    """`xml` re-signed with an AttributeStatement carrying `name` = `value`."""
    def add(root):
        statement = etree.SubElement(root, f"{{{SAML_NS}}}AttributeStatement")
        attribute = etree.SubElement(statement, f"{{{SAML_NS}}}Attribute", Name=name)
        etree.SubElement(attribute, f"{{{SAML_NS}}}AttributeValue").text = value
    return resigned(xml, add)


SALESFORCE = {"audience": "https://login.salesforce.com",
              "recipient": "https://login.salesforce.com/services/oauth2/token"}


@pytest.mark.parametrize("profile, kwargs, transform, failing", [
    # S/4HANA Cloud: the Issuer is the certificate's CN (slot a's: the gateway's issuer).
    ("s4hana-cloud", {"issuer": stack.ISSUER}, None, set()),
    ("s4hana-cloud", {}, None, {"s4hana-cloud Issuer is the certificate's CN"}),
    ("s4hana-cloud", {"issuer": stack.ISSUER, "audience": "https://my1-api.s4hana.ondemand.com"}, None,
     {"s4hana-cloud Audience without -api"}),
    ("abap", {}, None, set()),
    ("xsuaa", {"recipient": "https://sub.authentication.eu10.hana.ondemand.com/oauth/token/alias/sub.aws"}, None,
     set()),
    ("xsuaa", {}, None, {"xsuaa Recipient is the alias URL"}),
    ("successfactors", {"audience": "www.successfactors.com"}, lambda x: with_attribute(x, "api_key", "K"), set()),
    ("successfactors", {"audience": "www.successfactors.com"}, None, {"successfactors api_key attribute"}),
    ("successfactors", {}, lambda x: with_attribute(x, "api_key", "K"), {"successfactors Audience"}),
    ("salesforce", SALESFORCE, None, set()),
    ("salesforce", {**SALESFORCE, "audience": "https://acme.my.salesforce.com"}, None,
     {"salesforce Audience", "salesforce Recipient matches the audience"}),
    ("salesforce", SALESFORCE, lambda x: base64.b64encode(x), {"salesforce base64url"}),
])
def test_a_profile_adds_its_targets_rules(tmp_path, profile, kwargs, transform, failing):
    xml = assertion(**kwargs)
    data = transform(xml) if transform else xml
    # The common expectations follow the assertion's own values: only the profile's rules speak.
    flags = ["--profile", profile, "--at", at(30)]
    status, report, err = check(data, *flags, tmp_path=tmp_path)
    assert failed_rules(report) == failing, report + err
    assert status == (1 if failing else 0)
    assert sum(line.startswith(("pass  " + profile, "FAIL  " + profile)) for line in report.splitlines()) >= 1


def test_abap_refuses_a_name_id_with_a_colon_and_salesforce_an_ecdsa_signature(tmp_path):
    signed = resigned(assertion().replace(b">alice<", b">corp:alice<"))
    status, report, _ = check(signed, "--profile", "abap", "--at", at(30), tmp_path=tmp_path)
    assert failed_rules(report) == {"abap NameID without a colon"} and status == 1, report

    signed = resigned(assertion(**SALESFORCE), key_slot="ec", algorithm="ecdsa-sha256")
    status, report, _ = check(signed, "--profile", "salesforce", "--at", at(30), cert_slot="ec",
                              tmp_path=tmp_path)
    assert failed_rules(report) == {"salesforce RSA signature"} and status == 1, report
