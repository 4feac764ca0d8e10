"""Target profiles end to end, in the real Envoy: each profile's destination (configured
as the profile wants, the rest from its defaults) exchanges at the development token
server's endpoint that plays that target (dev/servers.py, which enforces the target's
rules and answers in its words), and the user reaches the backend with the token. Each
destination that breaks one rule of its target (without a profile, which would have
refused it at load) is refused by that target, and the client sees the target's error."""

from __future__ import annotations

import uuid

import pytest

import servers


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("destination, claims", [
    ("p-s4", {}),
    ("p-abap", {}),
    ("p-sf", {}),
    # XSUAA's default NameID format is the e-mail address.
    ("p-xsuaa", {"email": "{user}@example.com"}),
    ("p-salesforce", {}),
])
def test_each_profiles_destination_exchanges_at_its_target(client, destination, claims):
    user = unique(destination)
    extra = {k: v.format(user=user) for k, v in claims.items()}
    status, _, body = client.gateway(f"/t/{destination}/hello", client.jwt(user, **extra))
    assert status == 200, body
    expected_user = extra.get("email", user)
    assert body["user"] == expected_user and body["token_valid"] is True
    assert client.exchanges(expected_user) == 1


SF_AUTH = "SuccessFactors: Unable to authenticate the client"


@pytest.mark.parametrize("destination, says", [
    # S/4HANA Cloud: the Issuer is not the provider name (the certificate's CN); the
    # audience has -api; the Recipient is not the endpoint; the client is not the
    # communication user; no Basic authentication.
    ("p-s4-issuer", "invalid_grant"),
    ("p-s4-audience", "invalid_grant"),
    ("p-s4-recipient", "invalid_grant"),
    ("p-s4-client", "invalid_client"),
    ("p-s4-no-basic", "invalid_client"),
    # AS ABAP: neither Audience nor Recipient is the token endpoint; an unknown provider.
    ("p-abap-recipient", "invalid_grant"),
    ("p-abap-issuer", "invalid_grant"),
    # SuccessFactors (its own error JSON, its words through to the client): no api_key
    # attribute; another company; another audience; an e-mail NameID without use_email.
    ("p-sf-no-api-key", f"{SF_AUTH} (the assertion's api_key attribute"),
    ("p-sf-company", f"{SF_AUTH} (invalid company_id"),
    ("p-sf-audience", "SuccessFactors: Unable to validate the SAML assertion"),
    ("p-sf-email", f"{SF_AUTH} (Login failed - invalid user)"),
    # XSUAA: the Recipient is not the alias URL; another audience; an unknown issuer; no Basic.
    ("p-xsuaa-recipient", "invalid_grant"),
    ("p-xsuaa-audience", "invalid_grant"),
    ("p-xsuaa-issuer", "invalid_grant"),
    ("p-xsuaa-no-basic", "invalid_client"),
    # Salesforce: standard base64; the Issuer not the consumer key; a My Domain audience;
    # the sandbox Recipient with the production audience; an ECDSA signature.
    ("p-salesforce-base64", "invalid_grant"),
    ("p-salesforce-issuer", "invalid_grant"),
    ("p-salesforce-audience", "invalid_grant"),
    ("p-salesforce-recipient", "invalid_grant"),
    ("p-salesforce-ecdsa", "invalid_grant"),
])
def test_a_rule_broken_is_refused_by_the_target_in_its_words(client, destination, says):
    user = unique(destination)
    status, _, body = client.gateway(f"/t/{destination}/hello", client.jwt(user, email=f"{user}@example.com"))
    assert status == 502, body
    assert body["error"] == "bad_gateway"
    assert says in body["error_description"], body
    assert client.exchanges(user) == 0
    # What the target said, as the token server recorded it (its own words).
    refused = [r for r in client.token_requests() if r.get("target") and f">{user}" in (r["assertion_xml"] or "")]
    assert refused and all(r["outcome"] != "ok" for r in refused), "the target endpoint refused the exchange"


def test_abap_refuses_a_user_id_with_a_colon(client):
    user = "corp:" + unique("abap")
    status, _, body = client.gateway("/t/p-abap/hello", client.jwt(user))
    assert status == 502 and "invalid_grant" in body["error_description"], body
    assert client.exchanges(user) == 0


def test_successfactors_gets_its_api_key_company_and_audience(client):
    user = unique("sf")
    status, _, _ = client.gateway("/t/p-sf/hello", client.jwt(user))
    assert status == 200
    [request] = [r for r in client.token_requests() if r.get("target") == "successfactors"
                 and f">{user}<" in (r["assertion_xml"] or "")]
    assert request["outcome"] == "ok"
    assert request["target_details"]["company_id"] == servers.SF_COMPANY_ID
    assert request["form"]["client_id"] == servers.SF_API_KEY
    xml = request["assertion_xml"]
    assert f">{servers.SF_API_KEY}</saml2:AttributeValue>" in xml and 'Name="api_key"' in xml
    assert "<saml2:Audience>www.successfactors.com</saml2:Audience>" in xml
