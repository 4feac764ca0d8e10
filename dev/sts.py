#!/usr/bin/env python3
"""A development Microsoft Entra ID token service: the v2.0 token endpoint
``POST /<tenant>/oauth2/v2.0/token`` for the on-behalf-of grant that returns a SAML 2.0
assertion (Microsoft's "nonstandard extension" of OBO, as Azure API Management uses it
for SAP principal propagation). The gateway plugin redeems a user's Entra access token
here and hands the assertion to the token server (dev/servers.py) as an RFC 7522
saml2-bearer grant, so that this path is tested against something built from
Microsoft's documentation rather than against the plugin's own idea of it.

Request (form-urlencoded): ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``,
``assertion=<the user's JWT>``, ``client_id``, and ``client_secret`` (or HTTP Basic, or
``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`` +
``client_assertion``: an RFC 7523 JWT, RS256/PS256/ES256, by a key whose certificate is
registered), ``scope=<entity id>/.default`` (or ``spn:<entity id>/.default``),
``requested_token_use=on_behalf_of``,
``requested_token_type=urn:ietf:params:oauth:token-type:saml2``.

The checks run in the order of `Sts.exchange`, each failing with Entra's error JSON
(``error``, ``error_description`` starting ``AADSTSnnnnn:``, ``error_codes``,
``timestamp``, ``trace_id``, ``correlation_id``, ``error_uri``; see `ERRORS` below for
the codes). Users whose id starts with ``noconsent`` (or whose token has
``"dev_consent": "missing"``) get the consent error AADSTS65001, users whose id starts
with ``mfa`` (or ``"dev_mfa": "required"``) the MFA interaction error AADSTS50076.

On success: 200 with ``token_type`` "Bearer", ``scope``, ``expires_in``/``ext_expires_in``
3599, ``expires_on`` (epoch seconds, a string), ``resource`` (the entity id),
``access_token`` (the signed assertion's UTF-8 bytes, base64url without padding),
``issued_token_type`` ``urn:ietf:params:oauth:token-type:saml2`` and a ``refresh_token``
(opaque; this STS has no refresh grant). The assertion is shaped like Entra's (Issuer
``https://sts.windows.net/<tenant>/``, Recipient = the entity's first reply URL,
Audience = the entity id) and signed by signxml (enveloped, exclusive c14n, rsa-sha256,
X509Certificate in KeyInfo) with a key and self-signed certificate made at start-up.

Faults for end-to-end tests, on ``/<tenant>/oauth2/v2.0/token/fault/<kind>`` (nothing is
validated; `STS_FAULTS`): ``garbage`` (200, not JSON), ``html-500``, ``html-503``,
``empty``, ``reset`` (TCP reset, no answer at all), ``reset-mid-response``, ``hang``,
``drip``; and ``slow``, which answers normally after ``?delay=`` seconds (default 5, at
most 60; ``?delay=`` works on the plain path too). They reuse the token server's code.

Test hooks: ``GET /_sts/requests`` lists every token request with its raw form, client
secret and user token included, on purpose, as the token server's ``/requests`` does;
``GET /_sts/stats`` counts assertions issued per user and failures per outcome
(``AADSTSnnnnn`` or ``fault:<kind>``); ``GET /_sts/certificate`` is the signing
certificate (PEM); ``POST /_sts/reset`` forgets requests, counts and used client-assertion
ids. Dev/test only: secrets and keys live in memory, and the log has one line per request
(method, path, status, outcome), never a token or an assertion.

Run it with dev/servers.py ``--sts-port`` (which also makes the token server trust it);
`make_server` builds it for other callers.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import json
import re
import secrets
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, unquote_plus, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml import XMLSigner, methods

from servers import (BEARER_METHOD, DS_NS, FAULTS, FORM_CONTENT_TYPE, HOST, IDP_KID, SAML_NS, BaseHandler,
                     OAuthError, Server, TokenHandler, entra_issuer, flatten, slow_delay)

# Development values (dev/servers.py's defaults; dev/stack.py may import them).
DEV_TENANT_ID = "8f3c0f3e-2b7a-4c1d-9a55-0d5e2f1a7b11"
DEV_GATEWAY_CLIENT_ID = "5b6c3a1e-7d2f-4e8a-b1c9-2a4d6e8f0a13"  # the gateway's app registration
DEV_GATEWAY_CLIENT_SECRET = "dev8Q~gateway.obo_secret-2f1a7b11"  # Entra secrets use [A-Za-z0-9~._-]
DEV_FRONTEND_CLIENT_ID = "0c7e4a2b-9d1f-4b3a-8e6c-5f2a1d9b7c34"  # the app users sign in to (azp)
GATEWAY_APP_NAME = "principal-propagation-gateway"

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SAML2_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:saml2"
SAML1_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:saml1"
ON_BEHALF_OF = "on_behalf_of"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
NAMEID_UNSPECIFIED = "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified"
PASSWORD_CONTEXT = "urn:oasis:names:tc:SAML:2.0:ac:classes:Password"
MFA_CONTEXT = "http://schemas.microsoft.com/claims/multipleauthn"
OIDC_SCOPES = {"openid", "profile", "email", "offline_access"}  # may come along with the resource's
CLIENT_ASSERTION_ALGORITHMS = ("RS256", "PS256", "ES256")

CLOCK_SKEW = 300  # Entra tolerates five minutes either way
EXPIRES_IN = 3599
SCD_LIFETIME = 300  # SubjectConfirmationData NotOnOrAfter: five minutes
CONDITIONS_BEFORE, CONDITIONS_AFTER = 300, 4200  # Conditions: from now - 5 min to now + 70 min
MAX_RECORDS = 10000
TOKEN_PATH = re.compile(r"/([^/]+)/oauth2/v2\.0/token(?:/fault/([^/]*))?")


def sts_issuer(tenant: str) -> str:
    """The Issuer of Entra's SAML assertions for `tenant`."""
    return f"https://sts.windows.net/{tenant}/"


def token_path(tenant: str) -> str:
    return f"/{tenant}/oauth2/v2.0/token"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def saml_time(epoch: float) -> str:
    """xs:dateTime in UTC with milliseconds, as Entra writes them."""
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def entra_time(epoch: float) -> str:
    """Times in Entra's error messages and `timestamp`: 2016-01-09 02:02:12Z."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch))


# ------------------------------------------------------------------------ errors


class EntraError(Exception):
    """An error answer of Entra's token endpoint; `message` follows ``AADSTS<code>: ``."""

    def __init__(self, status: int, error: str, code: int, message: str, **extra):
        super().__init__(f"AADSTS{code}: {message}")
        self.status, self.error, self.code, self.message, self.extra = status, error, code, message, extra

    def body(self, trace_id: str, correlation_id: str, now: float) -> dict:
        stamp = entra_time(now)
        description = (f"AADSTS{self.code}: {self.message}\r\nTrace ID: {trace_id}\r\n"
                       f"Correlation ID: {correlation_id}\r\nTimestamp: {stamp}")
        return dict({"error": self.error, "error_description": description, "error_codes": [self.code],
                     "timestamp": stamp, "trace_id": trace_id, "correlation_id": correlation_id,
                     "error_uri": f"https://login.microsoftonline.com/error?code={self.code}"}, **self.extra)


def missing(name: str) -> EntraError:
    return EntraError(400, "invalid_request", 900144,
                      f"The request body must contain the following parameter: '{name}'.")


def bad_parameter(name: str, detail: str = "") -> EntraError:
    return EntraError(400, "invalid_request", 90100,
                      f"The '{name}' parameter is empty or not valid.{' ' + detail if detail else ''}")


def bad_client_assertion(reason: str, code: int = 700027) -> EntraError:
    lead = {700027: "Client assertion failed signature validation.",
            700024: "Client assertion is not within its valid time range.",
            700021: "Client assertion application identifier doesn't match 'client_id' parameter.",
            50048: "Subject mismatches Issuer claim in the client assertion."}[code]
    return EntraError(401, "invalid_client", code, f"{lead} [Reason - {reason}]")


def bad_user_assertion(reason: str) -> EntraError:
    return EntraError(400, "invalid_grant", 50013, f"Assertion failed signature validation. [Reason - {reason}]")


# The errors this STS answers with, in the order its checks run (the report and tests
# use this table): (case, HTTP status, error, AADSTS code).
ERRORS = [
    ("unknown tenant in the path", 400, "invalid_request", 90002),
    ("a parameter given twice", 400, "invalid_request", 9000411),
    ("client_id missing", 400, "invalid_request", 900144),
    ("client_id not the gateway app", 400, "unauthorized_client", 700016),
    ("two client authentication methods / malformed Basic", 400, "invalid_request", 9002313),
    ("no client credentials", 401, "invalid_client", 7000218),
    ("wrong client secret (form or Basic)", 401, "invalid_client", 7000215),
    ("client_assertion without client_assertion_type or the reverse", 400, "invalid_request", 900144),
    ("client_assertion_type not jwt-bearer", 400, "invalid_request", 90100),
    ("client assertion: malformed, algorithm, certificate not registered or expired, bad signature, "
     "aud not the token URL, exp or jti missing, jti reused", 401, "invalid_client", 700027),
    ("client assertion: expired or not yet valid", 401, "invalid_client", 700024),
    ("client assertion: iss != sub", 401, "invalid_client", 50048),
    ("client assertion: iss/sub != client_id", 401, "invalid_client", 700021),
    ("grant_type missing", 400, "invalid_request", 900144),
    ("grant_type not jwt-bearer", 400, "unsupported_grant_type", 70003),
    ("requested_token_use missing", 400, "invalid_request", 900144),
    ("requested_token_use not on_behalf_of", 400, "invalid_request", 90100),
    ("assertion missing", 400, "invalid_request", 900144),
    ("user assertion: not a JWT, not RS256, unknown kid, bad signature, wrong iss, "
     "no scp (not a user token)", 400, "invalid_grant", 50013),
    ("user assertion: aud not the gateway app", 400, "invalid_grant", 500131),
    ("user assertion: expired, not yet valid, no exp", 400, "invalid_grant", 500133),
    ("scope missing", 400, "invalid_request", 900144),
    ("scope: no resource, or not <id>/.default", 400, "invalid_scope", 70011),
    ("scope: two resources", 400, "invalid_scope", 700022),
    ("scope: entity id not registered", 400, "invalid_resource", 500011),
    ("requested_token_type missing (Entra would issue a JWT)", 400, "invalid_request", 900144),
    ("requested_token_type saml1 (not supported here) or other", 400, "invalid_request", 90100),
    ("user has no preferred_username/upn/unique_name", 400, "invalid_grant", 50034),
    ("consent missing (user noconsent*, dev_consent=missing)", 400, "invalid_grant", 65001),
    ("MFA required (user mfa*, dev_mfa=required)", 400, "interaction_required", 50076),
    ("a claim value XML cannot carry", 400, "invalid_request", 90107),
    ("GET (any method but POST) on the token endpoint", 400, "invalid_request", 900561),
]


# --------------------------------------------------------------------- the service


def load_certificate(item) -> x509.Certificate:
    if isinstance(item, x509.Certificate):
        return item
    if isinstance(item, (bytes, bytearray)):
        return x509.load_pem_x509_certificate(bytes(item))
    return x509.load_pem_x509_certificate(Path(item).read_bytes())


def make_signing_identity(tenant: str):
    """RSA-2048 and a self-signed certificate named like Entra's SAML signing certificates."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Microsoft Azure Federated SSO Certificate")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3 * 365))
            .sign(key, hashes.SHA256()))
    return key, cert


def form_value(form: dict, name: str) -> str | None:
    """One form parameter; empty counts as missing (as at Entra), twice is an error."""
    values = form.get(name, [])
    if len(values) > 1:
        raise EntraError(400, "invalid_request", 9000411,
                         f"The request is not properly formatted. The parameter '{name}' is duplicated.")
    return values[0] if values and values[0] != "" else None


def numeric_claim(claims: dict, name: str) -> float | None:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class Sts:
    """Configuration and state of the development Entra token service, shared by the
    handler threads.

    tenant, client_id, client_secret: the tenant and the one confidential client (the
    gateway's app registration); client_certs: certificates (PEM paths, PEM bytes or
    x509 objects) registered for client assertions; user_token_key / user_token_kid /
    user_token_issuer: what user tokens (``assertion``) must be signed with and issued by
    (the dev IdP's key; the Entra v2.0 issuer of the tenant); entities: SAML enterprise
    applications, entity id -> first reply URL (the assertion's Recipient);
    public_urls: token URLs besides the one posted to that a client assertion's ``aud``
    may name; signing_identity: (RSA private key, certificate) to sign with instead of
    a fresh one (tests)."""

    def __init__(self, *, user_token_key, entities: dict, tenant: str = DEV_TENANT_ID,
                 client_id: str = DEV_GATEWAY_CLIENT_ID, client_secret: str = DEV_GATEWAY_CLIENT_SECRET,
                 client_certs=(), user_token_kid: str = IDP_KID, user_token_issuer: str | None = None,
                 public_urls=(), signing_identity=None):
        self.tenant, self.client_id, self.client_secret = tenant, client_id, client_secret
        self.client_certs = []
        for item in client_certs:
            cert = load_certificate(item)
            der = cert.public_bytes(serialization.Encoding.DER)
            self.client_certs.append({"cert": cert, "x5t": b64url(hashlib.sha1(der).digest()),
                                      "x5t#S256": b64url(hashlib.sha256(der).digest())})
        self.user_token_key, self.user_token_kid = user_token_key, user_token_kid
        self.user_token_issuer = user_token_issuer or entra_issuer(tenant)
        self.entities = dict(entities)
        self.public_urls = list(public_urls)
        self.issuer = sts_issuer(tenant)
        self._key, self.certificate = signing_identity or make_signing_identity(tenant)
        self.certificate_pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self._lock = threading.Lock()
        self.reset()

    # ---- state

    def reset(self) -> None:
        with self._lock:
            self._requests: list[dict] = []
            self._issued: Counter = Counter()
            self._failures: Counter = Counter()
            self._jtis: dict[str, float] = {}

    def record(self, entry: dict, outcome: str, user: str | None = None) -> None:
        with self._lock:
            if len(self._requests) < MAX_RECORDS:
                self._requests.append(dict(entry, outcome=outcome, user=user))
            if outcome == "ok":
                self._issued[user] += 1
            else:
                self._failures[outcome] += 1

    def requests(self) -> list[dict]:
        with self._lock:
            return list(self._requests)

    def stats(self) -> dict:
        with self._lock:
            return {"issued": dict(self._issued), "failures": dict(self._failures)}

    def claim_jti(self, jti: str, expires: float, now: float) -> bool:
        """Remember a client assertion's jti until it expires; False if already used."""
        with self._lock:
            for old in [k for k, exp in self._jtis.items() if exp + CLOCK_SKEW < now]:
                del self._jtis[old]
            if jti in self._jtis:
                return False
            self._jtis[jti] = expires
            return True

    # ---- the grant

    def exchange(self, headers, form: dict, token_urls: list[str], now: float | None = None) -> tuple[dict, str, str]:
        """Run every check in order; return (the 200 JSON, the user, the client
        authentication method) or raise EntraError. `token_urls` are the URLs a client
        assertion's aud may name (the one posted to first)."""
        now = time.time() if now is None else now
        method = self.authenticate_client(headers, form, token_urls + self.public_urls, now)
        self.check_grant(form)
        claims = self.check_user_assertion(form, now)
        entity_id, scope = self.check_scope(form)
        self.check_token_type(form)
        user = self.user_of(claims)
        self.check_consent(claims, user, entity_id)
        xml = self.assertion(claims, user, entity_id, now)
        body = {"token_type": "Bearer", "scope": scope, "expires_in": EXPIRES_IN, "ext_expires_in": EXPIRES_IN,
                "expires_on": str(int(now) + EXPIRES_IN), "resource": entity_id, "access_token": b64url(xml),
                "issued_token_type": SAML2_TOKEN_TYPE, "refresh_token": f"dev-refresh-{secrets.token_urlsafe(24)}"}
        return body, user, method

    def authenticate_client(self, headers, form: dict, token_urls: list[str], now: float) -> str:
        """The confidential client: secret (form or Basic) or a certificate's client assertion."""
        basic = None
        scheme, _, encoded = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            user, sep, password = decoded.partition(":")
            if not sep:
                raise EntraError(400, "invalid_request", 9002313,
                                 "Request is malformed or invalid. [Reason - malformed Basic credentials.]")
            basic = (unquote_plus(user), unquote_plus(password))  # RFC 6749 §2.3.1: form-encoded first
        client_id = form_value(form, "client_id")
        if basic is not None:
            if client_id is not None and client_id != basic[0]:
                raise EntraError(400, "invalid_request", 9002313, "Request is malformed or invalid. [Reason - "
                                 "client_id in the body differs from the one in the Authorization header.]")
            client_id = basic[0]
        secret, assertion = form_value(form, "client_secret"), form_value(form, "client_assertion")
        assertion_type = form_value(form, "client_assertion_type")
        if client_id is None:
            raise missing("client_id")
        if not hmac.compare_digest(client_id.encode(), self.client_id.encode()):
            raise EntraError(400, "unauthorized_client", 700016,
                             f"Application with identifier '{client_id}' was not found in the directory "
                             f"'{self.tenant}'. This can happen if the application has not been installed by the "
                             "administrator of the tenant or consented to by any user in the tenant. You may have "
                             "sent your authentication request to the wrong tenant.")
        used = [name for name, present in (("basic", basic is not None), ("client_secret", secret is not None),
                                           ("client_assertion", assertion is not None)) if present]
        if len(used) > 1:
            raise EntraError(400, "invalid_request", 9002313, "Request is malformed or invalid. [Reason - more "
                             f"than one client authentication method: {', '.join(used)}.]")
        if assertion_type is not None and assertion is None:
            raise missing("client_assertion")
        if not used:
            raise EntraError(401, "invalid_client", 7000218,
                             "The request body must contain the following parameter: 'client_assertion' or "
                             "'client_secret'.")
        if assertion is not None:
            if assertion_type is None:
                raise missing("client_assertion_type")
            if assertion_type != CLIENT_ASSERTION_TYPE:
                raise bad_parameter("client_assertion_type", f"It must be '{CLIENT_ASSERTION_TYPE}'.")
            self.verify_client_assertion(assertion, client_id, token_urls, now)
            return "client_assertion"
        given = basic[1] if basic is not None else secret
        if not hmac.compare_digest(given.encode(), self.client_secret.encode()):
            raise EntraError(401, "invalid_client", 7000215,
                             "Invalid client secret provided. Ensure the secret being sent in the request is the "
                             f"client secret value, not the client secret ID, for a secret added to app "
                             f"'{self.client_id}'.")
        return used[0]

    def verify_client_assertion(self, token: str, client_id: str, token_urls: list[str], now: float) -> None:
        """RFC 7523 client authentication as Entra's certificate credentials define it."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise bad_client_assertion("The client assertion is not a well-formed signed JWT.") from None
        alg = header.get("alg")
        if alg not in CLIENT_ASSERTION_ALGORITHMS:
            raise bad_client_assertion(f"The algorithm '{alg}' is not supported.")
        if header.get("x5t#S256") is not None or header.get("x5t") is not None:
            name = "x5t#S256" if header.get("x5t#S256") is not None else "x5t"
            candidates = [c for c in self.client_certs if c[name] == header[name]]
            if not candidates:
                raise bad_client_assertion(
                    "The certificate with identifier used to sign the client assertion is not registered on "
                    f"application. The key was not found., Thumbprint of key used by client: '{header[name]}'")
        else:
            candidates = self.client_certs  # no thumbprint: try every registered certificate
        if not candidates:
            raise bad_client_assertion("The key was not found: no certificate is registered on application.")
        claims, problem = None, "The provided signature value did not match the expected signature value."
        for candidate in candidates:
            cert = candidate["cert"]
            if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
                problem = "The key used is expired or not yet valid."
                continue
            try:
                claims = jwt.decode(token, cert.public_key(), algorithms=[alg], options=SIGNATURE_ONLY)
                break
            except jwt.InvalidSignatureError:
                continue
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                problem = ("The client assertion could not be verified with the registered key "
                           f"({type(exc).__name__}).")
        if claims is None:
            raise bad_client_assertion(problem)
        if claims.get("iss") != claims.get("sub"):
            raise bad_client_assertion("'iss' and 'sub' must both be the client id.", 50048)
        if claims.get("iss") != client_id:
            raise bad_client_assertion(f"'iss' and 'sub' are '{claims.get('iss')}', the client_id is "
                                       f"'{client_id}'.", 700021)
        audiences = claims.get("aud")
        audiences = [audiences] if isinstance(audiences, str) else audiences if isinstance(audiences, list) else []
        if not any(aud in token_urls for aud in audiences):
            raise bad_client_assertion(f"The audience '{claims.get('aud')}' is not the token endpoint "
                                       f"'{token_urls[0]}'.")
        exp, nbf = numeric_claim(claims, "exp"), numeric_claim(claims, "nbf")
        if exp is None:
            raise bad_client_assertion("The client assertion has no valid 'exp' claim.")
        if exp + CLOCK_SKEW < now or (nbf is not None and nbf - CLOCK_SKEW > now):
            raise bad_client_assertion(f"Current time: {entra_time(now)}, expiry time of assertion "
                                       f"{entra_time(exp)}.", 700024)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise bad_client_assertion("The client assertion has no 'jti' claim.")
        if not self.claim_jti(jti, exp, now):
            raise bad_client_assertion(f"The client assertion's 'jti' '{jti}' was already used.")

    def check_grant(self, form: dict) -> None:
        grant_type = form_value(form, "grant_type")
        if grant_type is None:
            raise missing("grant_type")
        if grant_type != JWT_BEARER_GRANT:
            raise EntraError(400, "unsupported_grant_type", 70003,
                             f"The app requested an unsupported grant type '{grant_type}'.")
        use = form_value(form, "requested_token_use")
        if use is None:
            raise missing("requested_token_use")
        if use != ON_BEHALF_OF:
            raise bad_parameter("requested_token_use", f"It must be '{ON_BEHALF_OF}'.")

    def check_user_assertion(self, form: dict, now: float) -> dict:
        """The user's access token: the IdP's key, the tenant's v2.0 issuer, issued to the
        gateway app, in its lifetime, a delegated (user) token."""
        token = form_value(form, "assertion")
        if token is None:
            raise missing("assertion")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise bad_user_assertion("The assertion is malformed: not a signed JWT.") from None
        if header.get("alg") != "RS256":
            raise bad_user_assertion(f"The algorithm '{header.get('alg')}' is not supported.")
        if header.get("kid") != self.user_token_kid:
            raise bad_user_assertion(f"The key was not found., Key identifier used by client: '{header.get('kid')}'")
        try:
            claims = jwt.decode(token, self.user_token_key, algorithms=["RS256"], options=SIGNATURE_ONLY)
        except jwt.InvalidSignatureError:
            raise bad_user_assertion("The provided signature value did not match the expected signature "
                                     "value.") from None
        except jwt.PyJWTError:
            raise bad_user_assertion("The assertion is malformed.") from None
        if claims.get("iss") != self.user_token_issuer:
            raise bad_user_assertion(f"The token issuer '{claims.get('iss')}' doesn't match the expected issuer "
                                     f"'{self.user_token_issuer}'.")
        audiences = claims.get("aud")
        audiences = [audiences] if isinstance(audiences, str) else audiences if isinstance(audiences, list) else []
        if not any(aud in (self.client_id, f"api://{self.client_id}") for aud in audiences):
            raise EntraError(400, "invalid_grant", 500131,
                             "Assertion audience does not match the Client app presenting the assertion. The "
                             f"audience in the assertion was '{claims.get('aud')}' and the expected audience is "
                             f"'{self.client_id}' or one of the Application Uris of this application with App ID "
                             f"'{self.client_id}'({GATEWAY_APP_NAME}). The downstream client must request a token "
                             "for the expected audience (the application that made the OBO request) and this "
                             "application should use that token as the assertion.")
        exp, nbf = numeric_claim(claims, "exp"), numeric_claim(claims, "nbf")
        if exp is None or exp + CLOCK_SKEW <= now or (nbf is not None and nbf - CLOCK_SKEW > now):
            expiry = entra_time(exp) if exp is not None else "(none)"
            raise EntraError(400, "invalid_grant", 500133,
                             "Assertion is not within its valid time range. Ensure that the access token is not "
                             "expired before using it for user assertion, or request a new token. Current time: "
                             f"{entra_time(now)}, expiry time of assertion {expiry}.")
        if not claims.get("scp"):
            raise bad_user_assertion("The assertion is not a delegated user token (no 'scp' claim): "
                                     "on-behalf-of works for user principals only.")
        return claims

    def check_scope(self, form: dict) -> tuple[str, str]:
        """``<entity id>/.default`` or ``spn:<entity id>/.default`` of a registered SAML
        application, optionally with OpenID scopes. (Microsoft's documentation asks for
        the spn: form when the entity id has no URI scheme; both are accepted.)"""
        raw = form_value(form, "scope")
        if raw is None:
            raise missing("scope")
        resources = [part for part in raw.split() if part not in OIDC_SCOPES]
        if len(resources) > 1:
            raise EntraError(400, "invalid_scope", 700022,
                             "The provided value for the input parameter scope is not valid because it contains "
                             f"more than one resource. Scope {raw} is not valid.")
        if not resources or not resources[0].endswith("/.default"):
            raise EntraError(400, "invalid_scope", 70011,
                             f"The provided value for the input parameter 'scope' is not valid. The scope {raw} "
                             "is not valid. A SAML application is requested as '<entity id>/.default'.")
        scope = resources[0]
        entity_id = scope[:-len("/.default")]
        entity_id = entity_id[len("spn:"):] if entity_id.startswith("spn:") else entity_id
        if entity_id not in self.entities:
            raise EntraError(400, "invalid_resource", 500011,
                             f"The resource principal named {entity_id} was not found in the tenant named "
                             f"{self.tenant}. This can happen if the application has not been installed by the "
                             "administrator of the tenant or consented to by any user in the tenant. You might "
                             "have sent your authentication request to the wrong tenant.")
        return entity_id, scope

    def check_token_type(self, form: dict) -> None:
        token_type = form_value(form, "requested_token_type")
        if token_type is None:
            # Entra would answer with a JWT access token for the resource here.
            raise EntraError(400, "invalid_request", 900144,
                             "The request body must contain the following parameter: 'requested_token_type'. "
                             f"(This development STS only issues SAML 2.0 assertions: '{SAML2_TOKEN_TYPE}'.)")
        if token_type == SAML1_TOKEN_TYPE:
            raise bad_parameter("requested_token_type", "SAML 1.1 assertions are not supported by this "
                                f"development STS; request '{SAML2_TOKEN_TYPE}'.")
        if token_type != SAML2_TOKEN_TYPE:
            raise bad_parameter("requested_token_type", f"This development STS issues '{SAML2_TOKEN_TYPE}' only.")

    @staticmethod
    def user_of(claims: dict) -> str:
        """The NameID: the user's sign-in name from the token (this STS has no directory)."""
        for name in ("preferred_username", "upn", "unique_name"):
            value = claims.get(name)
            if isinstance(value, str) and value:
                return value
        raise EntraError(400, "invalid_grant", 50034, "The user account does not exist in the directory: the "
                         "assertion names no user (preferred_username, upn or unique_name).")

    def check_consent(self, claims: dict, user: str, entity_id: str) -> None:
        """Provoked on purpose: consent (AADSTS65001) and Conditional Access MFA (AADSTS50076)."""
        if claims.get("dev_consent") == "missing" or user.startswith("noconsent"):
            raise EntraError(400, "invalid_grant", 65001,
                             "The user or administrator has not consented to use the application with ID "
                             f"'{self.client_id}' named '{GATEWAY_APP_NAME}'. Send an interactive authorization "
                             "request for this user and resource.", suberror="consent_required")
        if claims.get("dev_mfa") == "required" or user.startswith("mfa"):
            challenge = {"access_token": {"capolids": {"essential": True,
                                                       "values": [str(uuid.uuid5(uuid.NAMESPACE_URL, entity_id))]}}}
            raise EntraError(400, "interaction_required", 50076,
                             "Due to a configuration change made by your administrator, or because you moved to a "
                             f"new location, you must use multi-factor authentication to access '{entity_id}'.",
                             claims=json.dumps(challenge, separators=(",", ":")))

    # ---- the assertion

    def assertion(self, claims: dict, user: str, entity_id: str, now: float) -> bytes:
        """A signed SAML 2.0 assertion shaped like Entra's OBO answer (UTF-8 bytes)."""
        assertion_id = f"_{uuid.uuid4()}"

        def el(parent, tag, text=None, **attrs):
            node = etree.SubElement(parent, f"{{{SAML_NS}}}{tag}", **attrs)
            if text is not None:
                node.text = text
            return node

        try:
            root = etree.Element(f"{{{SAML_NS}}}Assertion", nsmap={None: SAML_NS}, ID=assertion_id,
                                 IssueInstant=saml_time(now), Version="2.0")
            el(root, "Issuer", self.issuer)
            root.append(etree.Element(f"{{{DS_NS}}}Signature", Id="placeholder", nsmap={"ds": DS_NS}))
            subject = el(root, "Subject")
            # Entra's default NameID is the user's UPN with format persistent, and an
            # enterprise application can configure both; here it is the token's
            # preferred_username, format unspecified, as SAP-style targets usually map it.
            el(subject, "NameID", user, Format=NAMEID_UNSPECIFIED)
            confirmation = el(subject, "SubjectConfirmation", Method=BEARER_METHOD)
            # No InResponseTo (there is no AuthnRequest) and no NotBefore, as at Entra.
            el(confirmation, "SubjectConfirmationData", NotOnOrAfter=saml_time(now + SCD_LIFETIME),
               Recipient=self.entities[entity_id])
            conditions = el(root, "Conditions", NotBefore=saml_time(now - CONDITIONS_BEFORE),
                            NotOnOrAfter=saml_time(now + CONDITIONS_AFTER))
            el(el(conditions, "AudienceRestriction"), "Audience", entity_id)
            attributes = el(root, "AttributeStatement")
            for name, value in (
                    ("http://schemas.microsoft.com/identity/claims/tenantid", self.tenant),
                    ("http://schemas.microsoft.com/identity/claims/objectidentifier", claims.get("oid")),
                    ("http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name", user),
                    ("http://schemas.microsoft.com/identity/claims/displayname", claims.get("name")),
                    ("http://schemas.microsoft.com/identity/claims/identityprovider", self.issuer)):
                if value is not None:
                    el(el(attributes, "Attribute", Name=name), "AttributeValue", str(value))
            authn_time = numeric_claim(claims, "auth_time") or numeric_claim(claims, "iat") or now
            amr = claims.get("amr") if isinstance(claims.get("amr"), list) else []
            statement = el(root, "AuthnStatement", AuthnInstant=saml_time(min(authn_time, now)),
                           SessionIndex=assertion_id)
            el(el(statement, "AuthnContext"), "AuthnContextClassRef",
               MFA_CONTEXT if "mfa" in amr else PASSWORD_CONTEXT)
        except ValueError:  # lxml: a claim with characters XML cannot carry
            raise EntraError(400, "invalid_request", 90107, "The request isn't valid. Make sure your data doesn't "
                             "have invalid characters.") from None
        return self.sign(root)

    def sign(self, root) -> bytes:
        """Sign an Assertion whose ds:Signature placeholder follows the Issuer: enveloped,
        exclusive c14n, rsa-sha256/sha256, the certificate in KeyInfo (as Entra does)."""
        signer = XMLSigner(method=methods.enveloped, signature_algorithm="rsa-sha256",
                           digest_algorithm="sha256", c14n_algorithm=EXC_C14N)
        signed = signer.sign(root, key=self._key, cert=[self.certificate],
                             reference_uri=f"#{root.get('ID')}", id_attribute="ID")
        return etree.tostring(signed, encoding="utf-8", xml_declaration=False)


SIGNATURE_ONLY = {"verify_signature": True, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
                  "verify_aud": False, "verify_iss": False, "verify_sub": False, "verify_jti": False}


# ------------------------------------------------------------------------- faults

# A body shaped like a success, for the faults that cut one short; its access_token is
# no usable assertion.
PLACEHOLDER_ANSWER = json.dumps({
    "token_type": "Bearer", "scope": "spn:dev/.default", "expires_in": EXPIRES_IN, "ext_expires_in": EXPIRES_IN,
    "expires_on": "0", "resource": "dev", "access_token": b64url(b"<Assertion xmlns=\"" + SAML_NS.encode() + b"\"/>"),
    "issued_token_type": SAML2_TOKEN_TYPE}).encode()

# Faults by name: each takes the handler and answers (or does not); the token server's
# own (servers.FAULTS and its socket-level methods) where they fit.
STS_FAULTS = {
    "garbage": lambda h: h.send_body(200, b'{"token_type": "Bearer", access_token: <not json>', "application/json"),
    "html-500": lambda h: FAULTS["html-500"](h, None),
    "html-503": lambda h: FAULTS["html-503"](h, None),
    "empty": lambda h: FAULTS["empty"](h, None),
    "hang": lambda h: FAULTS["hang"](h, None),
    "reset": lambda h: h.abort(),
    "reset-mid-response": lambda h: h.reset_mid_response(PLACEHOLDER_ANSWER),
    "drip": lambda h: h.drip(PLACEHOLDER_ANSWER),
}


# -------------------------------------------------------------------------- HTTP


class StsHandler(BaseHandler):
    label = "sts"
    NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    # The token server's socket-level faults, shared rather than copied.
    reset_mid_response = TokenHandler.reset_mid_response
    drip = TokenHandler.drip
    hang = TokenHandler.hang
    outcome = "-"

    def log_request(self, code="-", size="-"):
        """One line per request: method, path (the tenant, no query), status, outcome."""
        path = urlsplit(getattr(self, "path", "") or "").path
        code = getattr(code, "value", code)
        sys.stderr.write(f"{self.label} {getattr(self, 'command', None) or '-'} {path} {code} {self.outcome}\n")

    def abort(self):
        """Close the connection with a TCP reset, without a byte of answer."""
        raw = socket.socket(fileno=self.connection.detach())
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()

    def do_GET(self):
        self.outcome = "-"
        path = urlsplit(self.path).path
        if path == "/_sts/requests":
            self.send_json(200, self.app.requests())
        elif path == "/_sts/stats":
            self.send_json(200, self.app.stats())
        elif path == "/_sts/certificate":
            self.send_body(200, self.app.certificate_pem, "application/x-pem-file")
        elif path == "/_sts/healthz":
            self.send_json(200, {"status": "ok"})
        elif TOKEN_PATH.fullmatch(path):
            self.entra_error(EntraError(400, "invalid_request", 900561, "The endpoint only accepts POST, OPTIONS "
                                        f"requests. Received a {self.command} request."), None)
        else:
            self.not_found()

    def do_POST(self):
        self.outcome = "-"
        url = urlsplit(self.path)
        body = self.body_or_refusal()
        if body is None:
            return
        match = TOKEN_PATH.fullmatch(url.path)
        if url.path == "/_sts/reset":
            self.app.reset()
            self.send_json(200, {})
        elif match:
            self.token_endpoint(url, body, match.group(1), match.group(2))
        else:
            self.not_found()

    def entra_error(self, exc: EntraError, entry: dict | None, correlation_id: str | None = None):
        trace_id = str(uuid.uuid4())
        correlation_id = correlation_id or str(uuid.uuid4())
        self.outcome = f"AADSTS{exc.code}"
        if entry is not None:
            self.app.record(dict(entry, status=exc.status, error=exc.error), self.outcome)
        self.send_json(exc.status, exc.body(trace_id, correlation_id, time.time()),
                       dict(self.NO_STORE, **{"x-ms-request-id": trace_id, "client-request-id": correlation_id}))

    def token_endpoint(self, url, body: bytes, tenant: str, fault: str | None):
        query = parse_qs(url.query)
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        form = {}
        if content_type == FORM_CONTENT_TYPE:  # anything else reads as an empty form, as at Entra
            try:
                form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
            except UnicodeDecodeError:
                pass
        entry = {"path": url.path, "query": flatten(query), "headers": self.lower_headers(), "form": flatten(form),
                 "time": time.time()}
        requested = self.headers.get("client-request-id", "")
        correlation_id = requested if re.fullmatch(r"[0-9a-fA-F-]{36}", requested) else None
        if fault is not None and fault != "slow":
            if fault not in STS_FAULTS:
                self.send_json(404, {"error": "not_found", "error_description": "unknown fault"})
                return
            self.outcome = f"fault:{fault}"
            self.app.record(entry, self.outcome)
            self.close_connection = True
            if fault in ("reset", "hang"):
                self.log_request("-")  # no status line will be sent: log the request now
            try:
                STS_FAULTS[fault](self)
            except OSError:
                pass  # the client hung up on a fault: that is its business
            return
        try:
            if fault == "slow" or "delay" in query:
                try:
                    time.sleep(slow_delay(query))
                except OAuthError:
                    raise bad_parameter("delay", "It must be a number of seconds.") from None
            if tenant != self.app.tenant:
                raise EntraError(400, "invalid_request", 90002,
                                 f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
                                 "and are signing into the correct cloud. Check with your subscribed "
                                 "company/organization if the tenant is registered.")
            host = self.headers.get("Host") or f"{HOST}:{self.server.server_address[1]}"
            token_urls = [f"http://{host}{url.path}", f"http://{host}{token_path(tenant)}",
                          f"{self.server.base_url}{token_path(tenant)}"]
            answer, user, method = self.app.exchange(self.headers, form, token_urls)
        except EntraError as exc:
            self.entra_error(exc, entry, correlation_id)
            return
        self.outcome = "ok"
        self.app.record(dict(entry, status=200, client_auth=method, resource=answer["resource"]), "ok", user)
        self.send_json(200, answer, dict(self.NO_STORE, **{"client-request-id": correlation_id or str(uuid.uuid4())}))


def make_server(port: int, sts: Sts) -> Server:
    """The STS bound to 127.0.0.1:`port` (0: any free port), not yet serving. Its token
    URL is ``server.base_url + token_path(sts.tenant)``."""
    server = Server((HOST, port), StsHandler)
    server.app = sts
    return server


def start(port: int, sts: Sts) -> Server:
    """make_server, serving in a daemon thread; stop it with server.shutdown() and
    server.server_close()."""
    server = make_server(port, sts)
    threading.Thread(target=server.serve_forever, name="sts", daemon=True).start()
    return server


if __name__ == "__main__":
    sys.exit("run the STS with dev/servers.py --sts-port (it needs the identity provider's key)")
