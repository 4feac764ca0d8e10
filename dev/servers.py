#!/usr/bin/env python3
"""Development and test counterparts for the principal-propagation Envoy Wasm plugin.

One process runs three HTTP servers (more with ``--onprem-port`` and ``--sts-port``), all
bound to 127.0.0.1:

* identity provider: mints RS256 JWTs for any user and publishes its JWKS, so the
  plugin has an authenticated user to propagate; ``POST /oauth/token`` is XSUAA's client
  credentials grant for the clients given with ``--idp-client`` (service tokens for the
  find-destination API), also over TLS with ``--idp-tls-port`` (the SAP Cloud SDK's
  subscriber token is fetched from ``https://<uaadomain>/oauth/token`` only);
* token server: a UAA/XSUAA-like OAuth token endpoint for the RFC 7522
  ``saml2-bearer`` grant that is deliberately strict about the SAML assertion, so
  mistakes in the plugin show up here and not in production;
* echo upstream: reports which user the forwarded bearer token belongs to, so
  tests can see end to end what arrived upstream; requests that name their user
  (``X-Expected-User``) are counted as carrying that user's token or not;
* on-premise backend (optional: ``--onprem-port`` with ``--onprem-user-ca`` and
  ``--tls-dir``): HTTPS that plays ABAP ICM behind Cloud Connector for the certificate
  mode, trusting the ``SSL_CLIENT_CERT`` header only on connections authenticated with
  the gateway's system certificate (dev/onprem.py);
* development Microsoft Entra ID token service (optional: ``--sts-port``): the v2.0 token
  endpoint's on-behalf-of grant returning SAML 2.0 (dev/sts.py). It redeems the IdP's
  Entra-style tokens (``GET /token?user=<id>&idp=entra``), and the token server trusts its
  assertions (Issuer ``https://sts.windows.net/<tenant>/``, its certificate only) beside
  the gateway's.

The token server also plays five real targets, one endpoint each on the same port, each
enforcing what docs/target-profiles.md found that target checks and refusing in its words
and shape (see "target profiles" below and ``TARGET_PROFILES``): S/4HANA Cloud
(``S4_TOKEN_PATH``), AS ABAP (``ABAP_TOKEN_PATH``), SuccessFactors (``SF_TOKEN_PATH``, with
SuccessFactors' own error JSON), XSUAA (``XSUAA_TOKEN_PATH``) and Salesforce
(``SALESFORCE_TOKEN_PATH``). Their tokens are ordinary tokens of the shared state.

The token server can also fail on purpose (see ``FAULTS``): per request with the path
``/oauth/token/fault/<kind>``, or for any token path at run time with
``POST /faults {"path": ..., "mode": ...}`` (mode ``none`` heals it). ``GET /faults``
shows the modes set and how many token requests each path served in each mode;
``GET /upstream`` lists what reached the echo upstream.

Dev/test only: keys and state live in memory. Tokens, assertions, passwords and
keys are never logged (``GET /requests`` on the token server, ``GET /minted`` on the
identity provider and ``GET /_sts/requests`` on the STS do expose them, on purpose, to tests;
the identity provider's ``GET /token-requests`` lists its client credentials requests
without secrets).
"""

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import secrets
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from html import unescape
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml import DigestAlgorithm, SignatureMethod, XMLVerifier
from signxml.exceptions import SignXMLException
from signxml.verifier import SignatureConfiguration

HOST = "127.0.0.1"
SAML_NS = "urn:oasis:names:tc:SAML:2.0:assertion"
DS_NS = "http://www.w3.org/2000/09/xmldsig#"
SAML2_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:saml2-bearer"
BEARER_METHOD = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # headers of every token answer

CLOCK_SKEW = 60  # seconds tolerated in either direction
MAX_ISSUE_AGE = 3000  # IssueInstant may be at most this old (plus skew)
MAX_AUTHN_AGE = 864000  # AuthnInstant may be at most ten days old
DEFAULT_TOKEN_LIFETIME = 3600
DEFAULT_SLOW_DELAY = 5.0
MAX_SLOW_DELAY = 60.0  # keeps /oauth/token/slow bounded whatever a test asks for
MAX_BODY = 1 << 20
HUGE_BODY = 10 * 1024 * 1024  # the `huge` fault's answer: larger than any token response
HANG_MAX = 30.0  # the `hang` fault holds a connection at most this long
DRIP_BYTES, DRIP_INTERVAL = 3, 0.3  # the `drip` fault: 10 bytes/s, far slower than a read timeout
IDP_KID = "dev-idp-1"
CLIENT_CREDENTIALS_GRANT = "client_credentials"
# The development tenant (XSUAA's zone id, `zid`): the one zone the identity provider's
# clients are registered in, and the tenant of its service tokens.
DEV_ZONE_ID = "6b1c3f0e-7d2a-4c5e-9f81-0a2b3c4d5e6f"
SERVICE_TOKEN_SCOPES = ("uaa.resource",)


def saml(tag):
    """Qualified name of a SAML 2.0 assertion element."""
    return f"{{{SAML_NS}}}{tag}"


def flatten(params):
    """Collapse parse_qs output: single values become strings, repeated ones stay lists."""
    return {k: v[0] if len(v) == 1 else v for k, v in params.items()}


def b64url_uint(value):
    """Unsigned big-endian integer as base64url without padding (RFC 7518 §6.3)."""
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Config:
    """Command-line settings shared by all three servers."""

    idp_port: int
    token_port: int
    echo_port: int
    trusted_certs: list  # (label, x509.Certificate): any of them may sign
    trusted_issuer: str
    entity_id: str
    client_id: str
    client_secret: str
    jwt_audience: str
    # More SAML issuers, each with the only certificates its assertions may be signed with:
    # ((issuer, [(label, x509.Certificate), ...]), ...). The development STS (dev/sts.py)
    # is one. The assertion's Issuer picks the certificates, so no issuer's key can sign
    # for another.
    other_issuers: tuple = ()


class SharedState:
    """Everything the token server learns, shared with the echo server under one lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        """Forget tokens, replay cache, statistics, recorded requests and faults (POST /reset)."""
        with self._lock:
            self._tokens = {}
            self._seen_ids = {}  # replay table: key -> until (epoch seconds), None = for ever
            self._exchanges = Counter()
            self._failures = Counter()
            self._requests = []
            self._echo = Counter()
            self._fault_modes = {}
            self._served = {}
            self._upstream = []
            self._revoked = set()

    def claim_assertion_id(self, assertion_id, until=None):
        """Atomically remember an assertion ID (or any key, such as a target's (Issuer, ID));
        False if it was seen before (replay). With `until` (epoch seconds) the key is
        remembered only until then, as AS ABAP keeps used assertions until they expire."""
        now = time.time()
        with self._lock:
            if assertion_id in self._seen_ids:
                expiry = self._seen_ids[assertion_id]
                if expiry is None or expiry > now:
                    return False
            self._seen_ids[assertion_id] = until
            return True

    def issue_token(self, user, lifetime, scope, path):
        """Create an opaque access token the echo server can later resolve to a user."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = {
                "user": user,
                "expires_at": time.time() + lifetime,
                "scope": scope,
                "path": path,
            }
        return token

    def lookup_token(self, token):
        """Return (user, valid); unknown or expired tokens give (None, False)."""
        with self._lock:
            entry = self._tokens.get(token)
        if entry is None or entry["expires_at"] <= time.time():
            return None, False
        return entry["user"], True

    def revoke(self, token):
        """The backend no longer accepts `token` (the echo answers it with 401)."""
        with self._lock:
            self._revoked.add(token)

    def revoked(self, token):
        with self._lock:
            return token in self._revoked

    def record(self, entry, outcome, user=None):
        """Record one token-endpoint POST and count it as exchange or failure."""
        with self._lock:
            self._requests.append(dict(entry, outcome=outcome))
            if outcome == "ok":
                self._exchanges[user] += 1
            else:
                self._failures[outcome] += 1

    def count_delivery(self, expected_user, user, valid):
        """Count one upstream request that named its user (X-Expected-User): whether it
        carried that user's valid token, someone else's, or none that is valid."""
        outcome = "invalid" if not valid else ("own" if user == expected_user else "other_user")
        with self._lock:
            self._echo[outcome] += 1

    def set_fault(self, path, mode):
        """Make token path `path` answer with fault `mode` from now on (`none` heals it)."""
        with self._lock:
            if mode == "none":
                self._fault_modes.pop(path, None)
            else:
                self._fault_modes[path] = mode

    def serve(self, path):
        """The mode a token request on `path` is served in, counted per path and mode."""
        with self._lock:
            if path.startswith(FAULT_PREFIX):
                mode = path[len(FAULT_PREFIX):]
            else:
                mode = self._fault_modes.get(path, "none")
            served = self._served.setdefault(path, Counter())
            served[mode] += 1
            return mode

    def faults(self):
        with self._lock:
            return {"modes": dict(self._fault_modes),
                    "served": {path: dict(modes) for path, modes in self._served.items()}}

    def record_upstream(self, path, token, user, valid):
        """What reached the echo upstream (tests check that failed requests did not)."""
        with self._lock:
            self._upstream.append({"path": path, "token": token, "user": user, "token_valid": valid,
                                   "time": time.time()})

    def upstream(self):
        with self._lock:
            return list(self._upstream)

    def stats(self):
        with self._lock:
            return {"exchanges": dict(self._exchanges), "failures": dict(self._failures),
                    "deliveries": dict(self._echo)}

    def requests(self):
        with self._lock:
            return list(self._requests)


# --------------------------------------------------------------- identity provider


ENTRA_LOGIN = "https://login.microsoftonline.com"


def entra_issuer(tenant):
    """`iss` of a Microsoft Entra ID v2.0 access token for `tenant`."""
    return f"{ENTRA_LOGIN}/{tenant}/v2.0"


@dataclass(frozen=True)
class EntraApp:
    """What the identity provider needs to mint Microsoft Entra ID v2.0 access tokens
    (``GET /token?idp=entra``): the tenant, the gateway's app registration (the token's
    audience, the app that redeems it on behalf of the user) and the front-end app the
    user signed in to (``azp``). dev/sts.py has the development values."""

    tenant: str
    client_id: str
    frontend_client_id: str

    def claims(self, user, now):
        """The claims Entra puts in a v2.0 access token for the gateway's API."""
        payload = {"aud": self.client_id, "iss": entra_issuer(self.tenant), "iat": now, "nbf": now,
                   "exp": now + 3600, "azp": self.frontend_client_id, "azpacr": "0",
                   "scp": "access_as_user", "tid": self.tenant, "uti": secrets.token_urlsafe(16),
                   "ver": "2.0"}
        if user is not None:
            # Stable per user like Entra's: `oid` is the user's object id in the tenant,
            # `sub` a pairwise id (per user and app, 43 base64url characters).
            pairwise = hashlib.sha256(f"{self.tenant}\0{self.client_id}\0{user}".encode()).digest()
            payload.update(
                oid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ENTRA_LOGIN}/{self.tenant}/users/{user}")),
                sub=base64.urlsafe_b64encode(pairwise).rstrip(b"=").decode("ascii"),
                preferred_username=user,
                name=user.split("@")[0].replace(".", " ").title())
        return payload


class IdentityProvider:
    """Mints RS256 JWTs with an in-memory key generated at start-up.

    ``GET /token?user=<id>`` gives this IdP's own tokens; with ``&idp=entra`` the same key
    (and kid, so the same JWKS verifies it) signs a Microsoft Entra ID v2.0 access token
    for the gateway app instead (see `EntraApp`; dev/sts.py redeems it). Other query
    parameters and ``claims`` (JSON) add to or override the payload either way."""

    def __init__(self, issuer, audience, entra=None, clients=None, service_audience=None,
                 zone_id=DEV_ZONE_ID):
        self.issuer = issuer
        self.audience = audience
        self.entra = entra  # EntraApp or None (then idp=entra is refused)
        # OAuth clients of `POST /oauth/token` (client credentials grant): id -> secret.
        self.clients = dict(clients or {})
        self.service_audience = service_audience
        self.zone_id = zone_id
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._minted = []  # every JWT issued, for the tests' log audit (GET /minted)
        self._token_requests = []  # POST /oauth/token, without secrets (GET /token-requests)
        self._lock = threading.Lock()

    def minted(self):
        with self._lock:
            return list(self._minted)

    def token_requests(self):
        with self._lock:
            return list(self._token_requests)

    def record_token_request(self, entry):
        with self._lock:
            self._token_requests.append(entry)

    def authenticate(self, headers, form):
        """The registered client a token request authenticates as (RFC 6749 §2.3.1: HTTP
        Basic, or `client_id` and `client_secret` form fields as the SAP Cloud SDK sends
        them; never both); OAuthError otherwise. Returns (client id, method)."""
        basic = basic_credentials(headers)
        if basic is not None and "client_secret" in form:
            raise OAuthError("invalid_request", "more than one client authentication method used")
        if basic is not None:
            client_id, secret = basic
            method = "basic"
            if "client_id" in form and form["client_id"] != [client_id]:
                raise invalid_client("client_id does not match the authenticated client")
        elif "client_secret" in form:
            if len(form["client_secret"]) != 1 or len(form.get("client_id", [])) != 1:
                raise OAuthError("invalid_request", "exactly one client_id and client_secret are required")
            client_id, secret, method = form["client_id"][0], form["client_secret"][0], "form"
        else:
            raise invalid_client("client authentication required")
        expected = self.clients.get(client_id)
        # Digests of equal length: the comparison takes the same time whatever the secret.
        same = hmac.compare_digest(hashlib.sha256(secret.encode()).digest(),
                                   hashlib.sha256((expected or "").encode()).digest())
        if expected is None or not same:
            raise invalid_client("bad client credentials")
        return client_id, method

    def client_credentials_token(self, client_id, lifetime=DEFAULT_TOKEN_LIFETIME):
        """An XSUAA-like service token for `client_id` and its claims, signed like the user
        tokens (same key and kid, so jwt_authn verifies it with the same JWKS)."""
        now = int(time.time())
        payload = {"iss": self.issuer, "sub": client_id, "client_id": client_id, "cid": client_id,
                   "azp": client_id, "aud": [self.service_audience], "zid": self.zone_id,
                   "grant_type": CLIENT_CREDENTIALS_GRANT, "scope": list(SERVICE_TOKEN_SCOPES),
                   "iat": now, "exp": now + lifetime, "jti": uuid.uuid4().hex}
        token = jwt.encode(payload, self._key, algorithm="RS256", headers={"kid": IDP_KID})
        with self._lock:
            self._minted.append(token)
        return token, payload

    def public_key(self):
        """The key the JWKS publishes (for in-process verifiers such as dev/sts.py)."""
        return self._key.public_key()

    def jwks(self):
        numbers = self._key.public_key().public_numbers()
        return {"keys": [{"kty": "RSA", "kid": IDP_KID, "alg": "RS256", "use": "sig",
                          "n": b64url_uint(numbers.n), "e": b64url_uint(numbers.e)}]}

    def mint(self, params):
        """Build and sign a JWT from query parameters (see module docs); ValueError → 400."""
        user = params.get("user", [None])[0]
        raw_claims = params.get("claims", [None])[0]
        if user is None and raw_claims is None:
            raise ValueError("user or claims query parameter required")
        now = int(time.time())
        consumed = ("user", "claims")
        if params.get("idp", [None])[0] == "entra":
            if self.entra is None:
                raise ValueError("this identity provider has no Entra ID profile")
            payload = self.entra.claims(user, now)
            consumed += ("idp",)
        else:
            payload = {"iss": self.issuer, "aud": self.audience, "iat": now, "exp": now + 3600}
            if user is not None:
                payload.update(sub=user, user_name=user)
        for name, values in params.items():
            if name not in consumed:
                payload[name] = values[0]
        if raw_claims is not None:
            try:
                extra = json.loads(raw_claims)
            except json.JSONDecodeError as exc:
                raise ValueError(f"claims is not valid JSON: {exc.msg}") from None
            if not isinstance(extra, dict):
                raise ValueError("claims must be a JSON object")
            payload.update(extra)
            payload = {k: v for k, v in payload.items() if v is not None}
        token = jwt.encode(payload, self._key, algorithm="RS256", headers={"kid": IDP_KID})
        with self._lock:
            self._minted.append(token)
        return token


# -------------------------------------------------------------------- token server


class OAuthError(Exception):
    """An RFC 6749 §5.2 error response.

    `reason` names the check that failed (for example ``audience`` or ``subject``), so that
    a target profile can answer it in its own words (see TargetProfile); `detail` is what
    the development server found, kept in GET /requests when the answer itself does not
    say it (SuccessFactors' fixed KBA texts)."""

    def __init__(self, error, description, status=400, reason=None, detail=None):
        super().__init__(description)
        self.error, self.description, self.status = error, description, status
        self.reason, self.detail = reason, detail


def invalid_grant(description, reason=None):
    return OAuthError("invalid_grant", description, reason=reason)


def invalid_client(description):
    return OAuthError("invalid_client", description, status=401)


def parse_saml_time(value, what):
    """Parse an xs:dateTime in UTC ('Z', optional fraction) to epoch seconds.

    SAML requires UTC without offsets; anything else is a plugin bug worth reporting.
    """
    match = re.fullmatch(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d+)?Z", (value or "").strip())
    if not match:
        raise invalid_grant(f"{what} is missing or not an xs:dateTime in UTC")
    try:
        stamp = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise invalid_grant(f"{what} is not a valid date/time") from None
    return stamp.replace(tzinfo=timezone.utc).timestamp() + float(match.group(2) or 0)


def safe_parser():
    """A fresh lxml parser that never expands entities or touches the network."""
    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, load_dtd=False)


def basic_credentials(headers):
    """(user, password) of an HTTP Basic Authorization header, None without one.

    RFC 6749 §2.3.1 says user and password are form-urlencoded before base64, so
    they are unquoted after splitting on the first ':'.
    """
    scheme, _, encoded = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise invalid_client("malformed Basic credentials") from None
    user, sep, password = decoded.partition(":")
    if not sep:
        raise invalid_client("malformed Basic credentials")
    return unquote_plus(user), unquote_plus(password)


def authenticate_client(headers, form, cfg):
    """Client authentication with HTTP Basic, as UAA/XSUAA expect it. Sending the secret
    in the body as well would be a second authentication method, which §2.3 forbids.
    """
    credentials = basic_credentials(headers)
    if credentials is None:
        raise invalid_client("HTTP Basic client authentication required")
    user, password = credentials
    user_ok = hmac.compare_digest(user.encode(), cfg.client_id.encode())
    password_ok = hmac.compare_digest(password.encode(), cfg.client_secret.encode())
    if not (user_ok and password_ok):
        raise invalid_client("bad client credentials")
    if "client_id" in form and form["client_id"] != [user]:
        raise invalid_client("client_id does not match the authenticated client")
    if "client_secret" in form:
        raise OAuthError("invalid_request", "more than one client authentication method used")


def check_grant_type(form):
    """Only the RFC 7522 SAML 2.0 bearer grant is served here."""
    if form.get("grant_type") != [SAML2_BEARER_GRANT]:
        raise OAuthError("unsupported_grant_type", f"grant_type must be {SAML2_BEARER_GRANT}")


def decode_assertion(form):
    """Decode the single `assertion` field; RFC 7522 says base64url, UAA also takes standard."""
    values = form.get("assertion", [])
    if len(values) != 1:
        raise invalid_grant("exactly one assertion parameter is required")
    text = values[0].replace("\r", "").replace("\n", "").rstrip("=")
    text = text.replace("-", "+").replace("_", "/")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        data = b""
    if not data:
        raise invalid_grant("assertion is not valid base64", reason="encoding")
    return data


def parse_assertion(data):
    """Parse without DTDs/entities/network; the root has to be a saml:Assertion."""
    try:
        root = etree.fromstring(data, safe_parser())
    except etree.XMLSyntaxError:
        raise invalid_grant("assertion is not well-formed XML", reason="xml") from None
    if root.getroottree().docinfo.doctype:
        raise invalid_grant("DTDs are not allowed in assertions", reason="xml")
    if root.tag != saml("Assertion"):
        raise invalid_grant("root element must be saml:Assertion", reason="xml")
    return root


def verify_signature(data, root, trusted_certs):
    """Verify the enveloped signature and return the *signed* Assertion element and the
    label of the trusted certificate that verified it.

    Only the element signxml returns is trusted; reading claims from the original
    tree would open the door to signature-wrapping attacks. SAML core puts the
    Signature right after Issuer, so it is required there. Several certificates may be
    trusted at once, as a target does during a key rotation.
    """
    signed, label, _ = verify_signed(data, root, trusted_certs)
    return signed, label


def is_signed(root):
    """Whether the Assertion carries a ds:Signature of its own at all (placed right or not)."""
    return root.find(f"{{{DS_NS}}}Signature") is not None


def verify_signed(data, root, trusted_certs, config=None):
    """verify_signature, also returning the certificate that verified the signature.
    `config` (a signxml SignatureConfiguration) narrows the accepted algorithms."""
    children = [c for c in root if isinstance(c.tag, str)]
    if len(children) < 2 or children[0].tag != saml("Issuer") or children[1].tag != f"{{{DS_NS}}}Signature":
        raise invalid_grant("signature invalid: ds:Signature must directly follow saml:Issuer", reason="signature")
    problem = "no trusted certificate"
    for label, cert in trusted_certs:
        try:
            result = XMLVerifier().verify(
                data, x509_cert=cert, id_attribute="ID", parser=safe_parser(),
                expect_config=config or SignatureConfiguration(expect_references=1, location="./"))
        except (SignXMLException, etree.LxmlError, ValueError) as exc:
            problem = str(exc)
            continue
        signed = result.signed_xml
        if signed is None or signed.tag != saml("Assertion") or not root.get("ID") \
                or signed.get("ID") != root.get("ID"):
            raise invalid_grant("signature invalid: it does not cover the root Assertion", reason="signature")
        return signed, label, cert
    raise invalid_grant(f"signature invalid: {problem}", reason="signature")


def trust_for(root, cfg):
    """The issuer an assertion is held to and the certificates that may sign it, chosen by
    its (not yet verified) Issuer: one of `cfg.other_issuers`, else the gateway's
    (`trusted_issuer`, `trusted_certs`). check_issuer then requires the *signed* Issuer
    to be that same issuer."""
    issuer = root.find(saml("Issuer"))
    claimed = (issuer.text or "").strip() if issuer is not None else None
    for other, certs in cfg.other_issuers:
        if claimed == other:
            return other, certs
    return cfg.trusted_issuer, cfg.trusted_certs


def issuer_of(assertion):
    """The Issuer's text (stripped), None without an Issuer element."""
    issuer = assertion.find(saml("Issuer"))
    return (issuer.text or "").strip() if issuer is not None else None


def check_issuer(assertion, trusted_issuer):
    if issuer_of(assertion) != trusted_issuer:
        raise invalid_grant("untrusted issuer", reason="issuer")


def check_issue_instant(assertion, now):
    """Assertions are short-lived: at most MAX_ISSUE_AGE old and not from the future."""
    issued = parse_saml_time(assertion.get("IssueInstant"), "IssueInstant")
    if issued < now - MAX_ISSUE_AGE - CLOCK_SKEW:
        raise invalid_grant("assertion is too old (IssueInstant)", reason="issue_instant")
    if issued > now + CLOCK_SKEW:
        raise invalid_grant("IssueInstant is in the future", reason="issue_instant")


def check_subject(assertion, endpoint, now):
    """Bearer confirmation per SAML profiles §4.1.4.2 / RFC 7522 §3; returns the NameID."""
    user, data = bearer_confirmation(assertion, now)
    check_recipient(data, endpoint)
    return user


def bearer_confirmation(assertion, now):
    """The NameID and the one bearer SubjectConfirmationData, checked for everything but
    its Recipient (which targets compare differently)."""
    subjects = assertion.findall(saml("Subject"))
    name_id = subjects[0].find(saml("NameID")) if len(subjects) == 1 else None
    # Exactly as signed: the user is who the NameID says, whitespace included.
    user = (name_id.text or "") if name_id is not None else ""
    if not user:
        raise invalid_grant("Subject/NameID is missing or empty", reason="subject.name_id")
    if not user.strip():
        raise invalid_grant("Subject/NameID is blank", reason="subject.name_id")
    confirmations = subjects[0].findall(saml("SubjectConfirmation"))
    if len(confirmations) != 1 or confirmations[0].get("Method") != BEARER_METHOD:
        raise invalid_grant("exactly one bearer SubjectConfirmation is required", reason="subject")
    data = confirmations[0].find(saml("SubjectConfirmationData"))
    if data is None:
        raise invalid_grant("SubjectConfirmationData is missing", reason="subject")
    if data.get("NotBefore") is not None:
        raise invalid_grant("SubjectConfirmationData must not carry NotBefore", reason="subject")
    try:
        expires = parse_saml_time(data.get("NotOnOrAfter"), "SubjectConfirmationData NotOnOrAfter")
    except OAuthError as exc:
        exc.reason = "subject"
        raise
    if now >= expires + CLOCK_SKEW:
        raise invalid_grant("subject confirmation expired", reason="subject")
    return user, data


def check_recipient(data, endpoint):
    if data.get("Recipient") != endpoint:
        raise invalid_grant(f"Recipient must be the token endpoint {endpoint}", reason="subject.recipient")


def check_conditions(assertion, entity_id, now):
    """Validity window plus audience; unknown conditions must fail closed (SAML core §2.5.1)."""
    check_audience(audience_restrictions(assertion, now), entity_id)


def audience_restrictions(assertion, now):
    """Check the Conditions' validity window and that they hold nothing but audience
    restrictions; return the audiences of each AudienceRestriction (a list of lists)."""
    conditions = assertion.findall(saml("Conditions"))
    if len(conditions) != 1:
        raise invalid_grant("exactly one Conditions element is required", reason="conditions.no_audience")
    cond = conditions[0]
    if cond.get("NotBefore") is not None and parse_saml_time(cond.get("NotBefore"), "NotBefore") > now + CLOCK_SKEW:
        raise invalid_grant("assertion not yet valid (Conditions NotBefore)", reason="conditions.not_before")
    if cond.get("NotOnOrAfter") is not None and \
            parse_saml_time(cond.get("NotOnOrAfter"), "NotOnOrAfter") <= now - CLOCK_SKEW:
        raise invalid_grant("assertion expired (Conditions NotOnOrAfter)", reason="conditions.not_on_or_after")
    restrictions = []
    for child in cond:
        if not isinstance(child.tag, str):
            continue  # comments / processing instructions
        if child.tag != saml("AudienceRestriction"):
            name = etree.QName(child).localname
            raise invalid_grant(f"unsupported condition {name}",
                                reason="conditions.one_time_use" if name == "OneTimeUse" else "conditions.unsupported")
        restrictions.append([(a.text or "").strip() for a in child.findall(saml("Audience"))])
    if not restrictions:
        raise invalid_grant("audience restriction missing", reason="conditions.no_audience")
    return restrictions


def check_audience(restrictions, entity_id):
    # SAML core §2.5.1.4: every AudienceRestriction must admit us.
    for audiences in restrictions:
        if entity_id not in audiences:
            raise invalid_grant(f"audience does not include {entity_id}", reason="audience")


def check_authn_statement(assertion, now):
    """RFC 7522 §3 item 6: the user must have actually authenticated, not too long ago."""
    statement = assertion.find(saml("AuthnStatement"))
    if statement is None:
        raise invalid_grant("AuthnStatement is missing", reason="authn")
    if parse_saml_time(statement.get("AuthnInstant"), "AuthnInstant") < now - MAX_AUTHN_AGE:
        raise invalid_grant("authentication is too old (AuthnInstant)", reason="authn")


def slow_delay(query):
    """Seconds /oauth/token/slow waits: `delay` (default 5), clamped to [0, MAX_SLOW_DELAY]."""
    try:
        delay = float(query.get("delay", [DEFAULT_SLOW_DELAY])[0])
        if not math.isfinite(delay):
            raise ValueError(delay)
    except ValueError:
        raise OAuthError("invalid_request", "delay must be a number") from None
    return min(max(delay, 0.0), MAX_SLOW_DELAY)


def validate_exchange(headers, form, endpoint, cfg, state):
    """Run all checks in order; return the accepted assertion's NameID and the label of
    the certificate that verified it."""
    authenticate_client(headers, form, cfg)
    check_grant_type(form)
    data = decode_assertion(form)
    root = parse_assertion(data)
    issuer, certs = trust_for(root, cfg)
    assertion, verified_by = verify_signature(data, root, certs)
    now = time.time()
    check_issuer(assertion, issuer)
    check_issue_instant(assertion, now)
    user = check_subject(assertion, endpoint, now)
    check_conditions(assertion, cfg.entity_id, now)
    check_authn_statement(assertion, now)
    if not state.claim_assertion_id(assertion.get("ID")):
        raise invalid_grant("assertion ID replayed", reason="replay")
    return user, verified_by


# ---------------------------------------------------------------- target profiles
#
# One token endpoint per target profile of docs/target-profiles.md (issue 19), on the token
# port beside /oauth/token, each enforcing what that target documents and refusing in its
# words and shape. The rules and their sources are in that document; the comments below
# give its evidence marks where a text or a rule is not the vendor's own. Tokens issued
# here are ordinary tokens of SharedState: /stats counts them per user, the echo upstream
# resolves them, GET /requests records them (with "target" and "target_details"), and
# faults can be set on these paths too. dev/stack.py configures destinations against the
# constants below.

# S/4HANA Cloud Public Edition: communication system with an OAuth 2.0 identity provider.
S4_TOKEN_PATH = "/s4/sap/bc/sec/oauth2/token"
S4_AUDIENCE = "https://my300117.s4hana.ondemand.com"  # SAML2 Audience: the tenant URL without -api
# On-premise AS ABAP (SAML2 trusted provider, SOAUTH2 client).
ABAP_TOKEN_PATH = "/abap/sap/bc/sec/oauth2/token"
# SuccessFactors HXM Suite: an OAuth client (API key) registered with the gateway's certificates.
SF_TOKEN_PATH = "/sf/oauth/token"
SF_API_KEY = "gateway-sf-api-key"
SF_COMPANY_ID = "ACME"
SF_AUDIENCE = "www.successfactors.com"
# SAP BTP subaccount (XSUAA): the token URL is the SAML ACS location /oauth/token/alias/<alias>.
XSUAA_TOKEN_PREFIX = "/xsuaa/oauth/token/alias/"
XSUAA_ALIAS = "dev-subaccount.aws-live-eu10"
XSUAA_TOKEN_PATH = XSUAA_TOKEN_PREFIX + XSUAA_ALIAS
XSUAA_ENTITY_ID = "dev-subaccount.aws-live-eu10"  # the subaccount's SP entityID: the Audience
# Salesforce connected app (OAuth 2.0 SAML Bearer Assertion Flow for Previously Authorized Apps).
SALESFORCE_TOKEN_PATH = "/salesforce/services/oauth2/token"
SALESFORCE_CONSUMER_KEY = "3MVG9gateway.consumer.key"
SALESFORCE_LOGIN = "https://login.salesforce.com"
SALESFORCE_TEST = "https://test.salesforce.com"
# Audience -> the Recipient that goes with it. The assertion names the real token URL (a
# string); the request itself goes to this development server.
SALESFORCE_TOKEN_URLS = {SALESFORCE_LOGIN: f"{SALESFORCE_LOGIN}/services/oauth2/token",
                         SALESFORCE_TEST: f"{SALESFORCE_TEST}/services/oauth2/token"}
SALESFORCE_SIGNATURE_METHODS = (SignatureMethod.RSA_SHA1, SignatureMethod.RSA_SHA256)


@dataclass(frozen=True)
class TokenRequest:
    """One grant request to a target profile's endpoint: `form` and `query` as parse_qs
    gives them, `endpoint` this endpoint's full URL (how the assertion's Recipient names it)."""

    headers: object
    form: dict
    query: dict
    path: str
    endpoint: str


def attribute_values(assertion, name):
    """The values of every Attribute `name` in the (signed) assertion's AttributeStatements."""
    return [(value.text or "") for statement in assertion.findall(saml("AttributeStatement"))
            for attribute in statement.findall(saml("Attribute")) if attribute.get("Name") == name
            for value in attribute.findall(saml("AttributeValue"))]


def common_name(cert):
    """The subject CN of a certificate, None without one."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def until_expiry(assertion):
    """When a used assertion can be forgotten: the later of its NotOnOrAfter times, plus
    the clock skew (it is refused as expired after that anyway)."""
    times = [el.get("NotOnOrAfter") for el in assertion.iter(saml("Conditions"), saml("SubjectConfirmationData"))]
    parsed = [parse_saml_time(t, "NotOnOrAfter") for t in times if t is not None]
    return max(parsed) + CLOCK_SKEW if parsed else None


def check_times(assertion, now):
    """The generic time checks every profile keeps: IssueInstant at most MAX_ISSUE_AGE old
    (CLOCK_SKEW either way), the bearer confirmation (no NotBefore, NotOnOrAfter present
    and not passed), the Conditions window, AuthnInstant. Returns (NameID, confirmation
    data) and the Conditions' audiences. None of S/4HANA Cloud, AS ABAP, SuccessFactors
    or Salesforce documents a lifetime or skew limit ([?]); these are this server's own,
    the older UAA's (XSUAA's row in docs/target-profiles.md)."""
    check_issue_instant(assertion, now)
    user, data = bearer_confirmation(assertion, now)
    restrictions = audience_restrictions(assertion, now)
    check_authn_statement(assertion, now)
    return user, data, restrictions


# --- S/4HANA Cloud


def s4hana_cloud_exchange(req, cfg, state):
    """S/4HANA Cloud: Basic as the communication user with `client_id` = that user, Audience
    = S4_AUDIENCE, Issuer = the provider name = the CN of the registered certificate that
    verified the signature, Recipient = this endpoint, no assertion ID twice. S/4HANA
    Cloud documents none of its refusal texts ([?]): these are RFC 6749 errors with this
    server's descriptions."""
    if not req.form.get("client_id"):
        # [V] the form carries client_id = the communication user; the answer without it is [?].
        raise OAuthError("invalid_request", "client_id (the communication user) is required")
    authenticate_client(req.headers, req.form, cfg)
    check_grant_type(req.form)
    data = decode_assertion(req.form)
    root = parse_assertion(data)
    assertion, verified_by, cert = verify_signed(data, root, cfg.trusted_certs)
    provider = common_name(cert)
    if issuer_of(assertion) != provider:
        raise invalid_grant(f"Issuer {issuer_of(assertion)!r} is not the provider name {provider!r} (the CN of "
                            "the signing certificate registered at the communication system)", reason="issuer")
    now = time.time()
    user, confirmation, restrictions = check_times(assertion, now)
    check_recipient(confirmation, req.endpoint)
    check_audience(restrictions, S4_AUDIENCE)
    # [C] (inferred from AS ABAP): S/4HANA Cloud keeps used assertions; its text is [?].
    if not state.claim_assertion_id(("s4hana-cloud", assertion.get("ID"))):
        raise invalid_grant("assertion ID replayed: the assertion has already been consumed", reason="replay")
    return user, verified_by, {"provider_name": provider}


# --- AS ABAP

# [C] the shape of AS ABAP's invalid_grant descriptions (itsfullofstars.de, in
# docs/target-profiles.md): "Provided authorization grant is invalid. Exception was <text>.
# For more information, ...". The texts in it are [C] where named, else this server's own.
ABAP_NOT_SIGNED = "Message Assertion is not signed"  # [C]
ABAP_CONSUMED = "The assertion has already been consumed"  # [C] message SAML2 028


def abap_grant_error(text):
    return (f"Provided authorization grant is invalid. Exception was {text}. For more information, consult "
            "the kernel traces or the OAuth 2.0 trouble shooting SAP note 1688545")


def abap_exchange(req, cfg, state):
    """AS ABAP: Basic as the OAuth client's system user, Issuer a trusted provider whose
    certificate signed, Audience or Recipient = this endpoint, NameID without ':', (Issuer,
    ID) used once until the assertion expires, the `client_id` attribute (if sent) equal
    to the form's `client_id`. Assertion refusals take ABAP's description shape."""
    authenticate_client(req.headers, req.form, cfg)
    check_grant_type(req.form)
    try:
        return abap_assertion(req, cfg, state)
    except OAuthError as exc:
        if exc.error != "invalid_grant":
            raise
        raise OAuthError("invalid_grant", abap_grant_error(exc.description), reason=exc.reason) from None


def abap_assertion(req, cfg, state):
    data = decode_assertion(req.form)
    root = parse_assertion(data)
    claimed = issuer_of(root)
    known = {cfg.trusted_issuer: cfg.trusted_certs, **{issuer: certs for issuer, certs in cfg.other_issuers}}
    if claimed not in known:
        # [C] message SOAUTH2 012; in which situation ABAP raises it is [?].
        raise invalid_grant(f'The provided OAuth 2.0 SAML IdP "{claimed or ""}" is invalid', reason="issuer")
    if not is_signed(root):
        raise invalid_grant(ABAP_NOT_SIGNED, reason="signature.missing")
    assertion, verified_by = verify_signature(data, root, known[claimed])
    check_issuer(assertion, claimed)
    now = time.time()
    user, confirmation, restrictions = check_times(assertion, now)
    if ":" in user:
        # [V] "Name IDs must not include colons (:)"; the refusal text is [?].
        raise invalid_grant(f"Name ID {user!r} contains a colon (:), which AS ABAP does not allow",
                            reason="subject.name_id")
    # [V-wiki] "Either the AudienceRestriction or the Recipient element of the assertion must
    # point to an OAuth 2.0 token endpoint URL"; the refusal text is [?].
    audience_ok = all(req.endpoint in audiences for audiences in restrictions)
    if not audience_ok and confirmation.get("Recipient") != req.endpoint:
        raise invalid_grant(f"Neither the AudienceRestriction nor the Recipient is the token endpoint {req.endpoint}",
                            reason="audience")
    client_ids = attribute_values(assertion, "client_id")
    if client_ids and client_ids != req.form.get("client_id"):
        # [V-wiki] with the SOAUTH2 option on, the attribute must equal the client_id form
        # parameter (the option itself is not modelled: an attribute sent is checked); text [?].
        raise invalid_grant("SAML attribute client_id does not equal the client_id parameter", reason="client_id")
    # [C] table SAML2_USED_ASSRT: a hash of ISSUER && ID, kept until VALID_TO.
    if not state.claim_assertion_id(("abap", claimed, assertion.get("ID")), until=until_expiry(assertion)):
        raise invalid_grant(ABAP_CONSUMED, reason="replay")
    return user, verified_by, {"provider": claimed}


# --- SuccessFactors

# [V] KBA 3336571 (its keywords name HTTP 401).
SF_SIGNATURE_FAILED = ("Unable to verify the signature of the SAML assertion. Please ensure that the assertion has "
                       "a signature and the key pairs match the client ID")
# [V] KBA 2668018 (401).
SF_INVALID_USER = "Unable to authenticate the client (Login failed - invalid user)"


def sf_error(status, message, detail=None, error="invalid_grant"):
    """A SuccessFactors refusal: answered as {"errorHttpCode", "errorMessage"} (sf_refusal);
    `error` is only how GET /stats counts it."""
    return OAuthError(error, message, status=status, detail=detail)


def sf_flag(assertion, name):
    return any(value.strip().lower() == "true" for value in attribute_values(assertion, name))


def successfactors_exchange(req, cfg, state):
    """SuccessFactors: `client_id` = the API key (no secret), `company_id` (form or query),
    a signature by the API key's certificate (any of the gateway's), attribute `api_key` =
    `client_id`, Audience www.successfactors.com, NameID = a user ID unless `use_email` or
    `use_username` is true. Standard base64 and base64url are both read. Issuer and
    Recipient are not checked (not documented as checked, [?]); no replay table ([?])."""
    # Texts below other than the two KBA ones are [?] (not documented); statuses: 400 for a
    # malformed request, 401 for what does not authenticate (as the KBA errors are).
    if req.form.get("grant_type") != [SAML2_BEARER_GRANT]:
        raise sf_error(400, f"Unsupported grant_type: it must be {SAML2_BEARER_GRANT}", error="unsupported_grant_type")
    companies = set(req.form.get("company_id", []) + req.query.get("company_id", []))
    if not companies:
        raise sf_error(400, "Missing parameter company_id", error="invalid_request")
    if companies != {SF_COMPANY_ID}:
        raise sf_error(401, f"Unable to authenticate the client (invalid company_id {sorted(companies)})",
                       error="invalid_client")
    client_ids = req.form.get("client_id", [])
    if not client_ids:
        raise sf_error(400, "Missing parameter client_id", error="invalid_request")
    if client_ids != [SF_API_KEY]:
        raise sf_error(401, f"Unable to authenticate the client (invalid client_id {client_ids[0]!r})",
                       error="invalid_client")
    try:
        data = decode_assertion(req.form)
        root = parse_assertion(data)
    except OAuthError as exc:
        raise sf_error(400, f"Unable to read the SAML assertion: {exc.description}", error="invalid_request") from None
    try:
        assertion, verified_by = verify_signature(data, root, cfg.trusted_certs)
    except OAuthError as exc:
        raise sf_error(401, SF_SIGNATURE_FAILED, detail=exc.description) from None
    # [V-code] only: SAP's sample generator adds attribute api_key = the client id.
    api_keys = attribute_values(assertion, "api_key")
    if api_keys != client_ids:
        raise sf_error(401, f"Unable to authenticate the client (the assertion's api_key attribute {api_keys} does "
                            f"not match the client_id)")
    now = time.time()
    try:
        user, _, restrictions = check_times(assertion, now)
        check_audience(restrictions, SF_AUDIENCE)
    except OAuthError as exc:
        raise sf_error(401, f"Unable to validate the SAML assertion: {exc.description}") from None
    use_email, use_username = sf_flag(assertion, "use_email"), sf_flag(assertion, "use_username")
    if use_email and use_username:
        # Not documented ([?]); a gateway that sends both has a bug, so refused here.
        raise sf_error(401, "Unable to authenticate the client (use_email and use_username are both true)")
    mode = "email" if use_email else "username" if use_username else "user_id"
    if mode == "user_id" and "@" in user:
        # [V] KBA 2668018: a user ID in e-mail format fails unless use_email=true. The server
        # has no user store, so this is the one "invalid user" it can recognise.
        raise sf_error(401, SF_INVALID_USER, detail=f"NameID {user!r} looks like an e-mail but use_email is not true")
    return user, verified_by, {"company_id": SF_COMPANY_ID, "user_id_mode": mode}


# --- XSUAA

# Older UAA (spring-security-saml 1, WebSSOProfileConsumerImpl / AbstractProfileBase /
# SAMLAuthenticationProvider) and newer UAA (Saml2BearerGrantAuthenticationConverter) texts
# by failed check ([SRC]). The JSON bodies XSUAA answers with were not seen ([?]): these are
# RFC 6749 invalid_grant with the UAA text, this server's detail in parentheses.
UAA_TEXTS = {
    "encoding": "Error validating SAML message",
    "xml": "Error validating SAML message",
    "issuer.missing": "Missing issuer in bearer assertion",
    "signature.missing": "Assertion is missing a signature.",
    "signature": "Error validating SAML message signature",
    "issue_instant": "Assertion is too old to be used, value can be customized by setting maxAssertionTime value",
    "subject.name_id": "NameID element must be present as part of the Subject in the Response message, please "
                       "enable it in the IDP configuration",
    "subject": "Assertion invalidated by subject confirmation - can't be confirmed by the bearer method",
    "subject.recipient": "Assertion invalidated by subject confirmation - can't be confirmed by the bearer method",
    "conditions.no_audience": "Assertion invalidated by missing Audience Restriction",
    "conditions.not_before": "Assertion is not yet valid, invalidated by condition notBefore",
    "conditions.not_on_or_after": "Assertion is no longer valid, invalidated by condition notOnOrAfter",
    "conditions.one_time_use": "System cannot honor OneTimeUse condition of the Assertion for WebSSO",
    "conditions.unsupported": "Assertion contains conditions which are not understood",
    "audience": "Local entity is not the intended audience of the assertion in at least one AudienceRestriction",
    "authn": "Authentication statement is too old to be used with value",
}
UAA_DEFAULT_TEXT = "Error validating SAML message"
ENTITY_FORMAT = "urn:oasis:names:tc:SAML:2.0:nameid-format:entity"


def xsuaa_exchange(req, cfg, state):
    """XSUAA: the alias URL of a known subaccount, Basic client credentials (form client_id,
    if sent, the same), Issuer a trusted IdP entity ID (Format, if any, `entity`) whose
    certificate signed, Recipient = the alias URL exactly, Audience = XSUAA_ENTITY_ID, no
    bearer NotBefore, NotOnOrAfter present, IssueInstant at most 3000 s old (60 s skew), no
    OneTimeUse. No replay table (UAA documents none)."""
    alias = req.path[len(XSUAA_TOKEN_PREFIX):]
    if alias != XSUAA_ALIAS:
        # [?] what XSUAA answers for an unknown alias is not documented.
        raise invalid_grant(f"No SAML service provider with alias {alias!r} in this subaccount "
                            f"(the known alias is {XSUAA_ALIAS!r})", reason="alias")
    authenticate_client(req.headers, req.form, cfg)
    check_grant_type(req.form)
    try:
        return xsuaa_assertion(req, cfg)
    except OAuthError as exc:
        if exc.error != "invalid_grant" or exc.reason == "uaa":
            raise  # reason "uaa": the description is UAA's text already
        text = UAA_TEXTS.get(exc.reason, UAA_DEFAULT_TEXT)
        raise OAuthError("invalid_grant", f"{text} ({exc.description})", reason=exc.reason) from None


def xsuaa_assertion(req, cfg):
    data = decode_assertion(req.form)
    root = parse_assertion(data)
    claimed = issuer_of(root)
    if not claimed:
        raise invalid_grant("the assertion has no Issuer", reason="issuer.missing")
    issuer_format = root.find(saml("Issuer")).get("Format")
    if issuer_format is not None and issuer_format != ENTITY_FORMAT:
        raise OAuthError("invalid_grant", f"Issuer invalidated by issuer type {issuer_format}", reason="uaa")
    known = {cfg.trusted_issuer: cfg.trusted_certs, **{issuer: certs for issuer, certs in cfg.other_issuers}}
    if claimed not in known:
        # Older UAA; newer UAA finds no trusted IdP for it (text [?]).
        raise OAuthError("invalid_grant", f"Issuer invalidated by issuer value {claimed}", reason="uaa")
    if not is_signed(root):
        raise invalid_grant("no ds:Signature in the Assertion", reason="signature.missing")
    assertion, verified_by = verify_signature(data, root, known[claimed])
    check_issuer(assertion, claimed)
    now = time.time()
    user, confirmation, restrictions = check_times(assertion, now)
    check_recipient(confirmation, req.endpoint)
    check_audience(restrictions, XSUAA_ENTITY_ID)
    return user, verified_by, {"alias": XSUAA_ALIAS, "idp": claimed}


# --- Salesforce

BASE64URL_TEXT = re.compile(r"[A-Za-z0-9_-]+")


def decode_base64url_only(form):
    """RFC 7522 §2.1 base64url: the URL-safe alphabet, no padding, no line breaks. A value
    with `+`, `/` or `=` (standard base64) is refused; Salesforce documents base64url only."""
    values = form.get("assertion", [])
    if len(values) != 1:
        raise invalid_grant("exactly one assertion parameter is required", reason="encoding")
    text = values[0]
    if not BASE64URL_TEXT.fullmatch(text) or len(text) % 4 == 1:
        found = sorted(set(re.sub(r"[A-Za-z0-9_-]", "", text)))
        raise invalid_grant(f"assertion is not base64url (RFC 7522 §2.1: no padding, no + or /; found {found})",
                            reason="encoding")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signature_algorithm(root):
    method = root.find(f"{{{DS_NS}}}Signature/{{{DS_NS}}}SignedInfo/{{{DS_NS}}}SignatureMethod")
    return method.get("Algorithm") if method is not None else None


def salesforce_exchange(req, cfg, state):
    """Salesforce: no client authentication (a Basic header or client_id is ignored),
    base64url only, Issuer = the connected app's consumer key, whose certificates (the
    gateway's) verify an RSA-SHA1 or RSA-SHA256 signature, Audience login or test, the
    Recipient the matching token URL. Only "Audience validation failed" is Salesforce's
    documented text ([V]); the other descriptions are this server's ([?]; [C] "invalid
    assertion"), prefixed "invalid assertion: ". No user store (NameID = a known
    username is not checked), no replay table ([?])."""
    if req.form.get("grant_type") != [SAML2_BEARER_GRANT]:
        # [?] not in docs/target-profiles.md: the description Salesforce is commonly seen to give.
        raise OAuthError("unsupported_grant_type", "grant type not supported")
    try:
        data = decode_base64url_only(req.form)
        root = parse_assertion(data)
        if issuer_of(root) != SALESFORCE_CONSUMER_KEY:
            raise invalid_grant(f"Issuer {issuer_of(root)!r} is not the consumer key of a connected app")
        algorithm = signature_algorithm(root)
        if algorithm not in {m.value for m in SALESFORCE_SIGNATURE_METHODS}:
            raise invalid_grant(f"signature method {algorithm} is not accepted: Salesforce verifies RSA signatures "
                                "with SHA-1 or SHA-256 only", reason="signature")
        config = SignatureConfiguration(expect_references=1, location="./",
                                        signature_methods=frozenset(SALESFORCE_SIGNATURE_METHODS),
                                        digest_algorithms=frozenset({DigestAlgorithm.SHA1, DigestAlgorithm.SHA256}))
        assertion, verified_by, _ = verify_signed(data, root, cfg.trusted_certs, config)
        check_issuer(assertion, SALESFORCE_CONSUMER_KEY)
        now = time.time()
        user, confirmation, restrictions = check_times(assertion, now)
    except OAuthError as exc:
        if exc.error != "invalid_grant":
            raise
        raise OAuthError("invalid_grant", f"invalid assertion: {exc.description}", reason=exc.reason) from None
    admitted = [aud for aud in SALESFORCE_TOKEN_URLS if all(aud in audiences for audiences in restrictions)]
    if not admitted:
        raise OAuthError("invalid_grant", "Audience validation failed", reason="audience")  # [V]
    recipients = [SALESFORCE_TOKEN_URLS[aud] for aud in admitted]
    if confirmation.get("Recipient") not in recipients:
        raise OAuthError("invalid_grant", f"invalid assertion: Recipient must be {' or '.join(recipients)}",
                         reason="subject.recipient")
    return user, verified_by, {"audience": admitted[0]}


# --- dispatch


def rfc6749_refusal(exc):
    """(status, JSON body, extra headers) of an RFC 6749 §5.2 refusal."""
    headers = dict(NO_STORE)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="dev-token-server"'
    return exc.status, {"error": exc.error, "error_description": exc.description}, headers


def sf_refusal(exc):
    """SuccessFactors' own error shape (KBA 2668018), not RFC 6749."""
    return exc.status, {"errorHttpCode": str(exc.status), "errorMessage": exc.description}, dict(NO_STORE)


@dataclass(frozen=True)
class TargetProfile:
    """A target's token endpoint at `path` (XSUAA's: every alias under `prefix`):
    `validate(TokenRequest, cfg, state)` returns (user, certificate label, details) or
    raises OAuthError, which `refusal` turns into (status, JSON body, headers)."""

    name: str
    path: str
    validate: object
    refusal: object = rfc6749_refusal
    prefix: str | None = None

    def serves(self, path):
        if self.prefix is not None:
            return path.startswith(self.prefix) and len(path) > len(self.prefix)
        return path == self.path


# By profile name (the names of docs/target-profiles.md and the plugin's `targetProfile`).
TARGET_PROFILES = {profile.name: profile for profile in (
    TargetProfile("s4hana-cloud", S4_TOKEN_PATH, s4hana_cloud_exchange),
    TargetProfile("abap", ABAP_TOKEN_PATH, abap_exchange),
    TargetProfile("successfactors", SF_TOKEN_PATH, successfactors_exchange, sf_refusal),
    TargetProfile("xsuaa", XSUAA_TOKEN_PATH, xsuaa_exchange, prefix=XSUAA_TOKEN_PREFIX),
    TargetProfile("salesforce", SALESFORCE_TOKEN_PATH, salesforce_exchange),
)}


def target_profile(path):
    """The target profile whose endpoint `path` is, None for any other path (XSUAA's is
    every path under XSUAA_TOKEN_PREFIX, so that an unknown alias is refused as XSUAA)."""
    return next((profile for profile in TARGET_PROFILES.values() if profile.serves(path)), None)


def is_token_path(path):
    """A path the token server answers grant requests on (and faults can be set for)."""
    return path.startswith("/oauth/token") or target_profile(path) is not None


# ------------------------------------------------------------------------- faults

FAULT_PREFIX = "/oauth/token/fault/"
REJECT_DESCRIPTION = "the assertion was refused (fault mode reject)"
HTML_PAGE = b"<html><head><title>Service Unavailable</title></head><body>down for maintenance</body></html>"


def unverified_name_id(assertion_xml):
    """The NameID of an assertion that was not validated (faults skip validation).

    Only used to issue a *working* token inside a faulty answer, so that a gateway
    that wrongly took such an answer would be caught using a valid token."""
    match = re.search(r"<(?:[\w-]+:)?NameID\b[^>]*>([^<]*)<", assertion_xml or "")
    return unescape(match.group(1)) if match else "unknown"


def token_json(token, **fields):
    """A token answer: `fields` override or (with None) drop the usual members."""
    body = {"access_token": token, "token_type": "bearer", "expires_in": DEFAULT_TOKEN_LIFETIME}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


# Faults by name: each takes (handler, working token) and answers (or does not).
# Answers that carry a token carry a real one the echo upstream would accept.
FAULTS = {
    # Transport: the raw connection misbehaves.
    "reset": lambda h, token: h.reset_mid_response(token_json(token)),
    "hang": lambda h, token: h.hang(),
    "drip": lambda h, token: h.drip(token_json(token)),
    # HTTP errors with a body no OAuth client can read.
    "html-500": lambda h, token: h.send_body(500, HTML_PAGE, "text/html"),
    "html-503": lambda h, token: h.send_body(503, HTML_PAGE, "text/html", {"Retry-After": "120"}),
    # 200 with a body that is not a usable token answer.
    "empty": lambda h, token: h.send_body(200, b"", "application/json"),
    "not-json": lambda h, token: h.send_body(200, f"access_token={token}&token_type=bearer".encode(),
                                             "application/x-www-form-urlencoded"),
    "huge": lambda h, token: h.send_body(200, huge_token_json(token), "application/json"),
    "no-access-token": lambda h, token: h.send_body(200, token_json(None), "application/json"),
    "expires-negative": lambda h, token: h.send_body(200, token_json(token, expires_in=-3600), "application/json"),
    "expires-huge": lambda h, token: h.send_body(200, token_json(token, expires_in=10 ** 12), "application/json"),
    "expires-string": lambda h, token: h.send_body(200, token_json(token, expires_in="one hour"),
                                                   "application/json"),
    "token-type-mac": lambda h, token: h.send_body(200, token_json(token, token_type="mac"), "application/json"),
    # Refused as an OAuth server refuses a grant (RFC 6749 §5.2), not a broken server.
    "reject": lambda h, token: h.send_json(400, {"error": "invalid_grant", "error_description": REJECT_DESCRIPTION},
                                           h.NO_STORE),
    # Odd but usable answers (the plugin accepts these; see its README).
    "expires-digits": lambda h, token: h.send_body(200, token_json(token, expires_in="3600"), "application/json"),
    "expires-missing": lambda h, token: h.send_body(200, token_json(token, expires_in=None), "application/json"),
    "bearer-uppercase": lambda h, token: h.send_body(200, token_json(token, token_type="BEARER"),
                                                     "application/json"),
}


def huge_token_json(token):
    """A well-formed token answer of HUGE_BODY bytes: only a reader that refuses its size
    (rather than failing to parse it) is safe from it."""
    head = token_json(token)[:-1] + b', "padding": "'
    return head + b"x" * (HUGE_BODY - len(head) - 2) + b'"}'


# ----------------------------------------------------------------- HTTP plumbing


class BaseHandler(BaseHTTPRequestHandler):
    """Shared helpers: HTTP/1.1 keep-alive, JSON replies, one safe log line per request."""

    protocol_version = "HTTP/1.1"
    label = "?"

    @property
    def app(self):
        return self.server.app

    def log_message(self, format, *args):
        """Silence the default logger: it would print query strings and raw request lines."""

    def log_request(self, code="-", size="-"):
        path = urlsplit(getattr(self, "path", "") or "").path
        code = getattr(code, "value", code)
        sys.stderr.write(f"{self.label} {getattr(self, 'command', None) or '-'} {path} {code}\n")

    def read_body(self):
        """Read the request body (Content-Length or chunked), at most MAX_BODY bytes."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024).strip():
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length > 0 else b""

    def body_or_refusal(self):
        """The request body, or None once a bad or oversized one was answered with 413."""
        try:
            return self.read_body()
        except ValueError:
            self.close_connection = True
            self.send_json(413, {"error": "invalid_request", "error_description": "bad or oversized body"})
            return None

    def send_body(self, status, body, content_type, extra_headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status, obj, extra_headers=None):
        self.send_body(status, json.dumps(obj).encode(), "application/json", extra_headers)

    def not_found(self):
        self.send_json(404, {"error": "not_found"})

    def lower_headers(self):
        """Request headers by lower-case name; repeated headers joined with ', '."""
        result = {}
        for name, value in self.headers.items():
            key = name.lower()
            result[key] = f"{result[key]}, {value}" if key in result else value
        return result


class IdpHandler(BaseHandler):
    label = "idp"

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/.well-known/jwks.json":
            self.send_json(200, self.app.idp.jwks())
        elif url.path == "/minted":
            self.send_json(200, self.app.idp.minted())
        elif url.path == "/token-requests":
            self.send_json(200, self.app.idp.token_requests())
        elif url.path == "/token":
            try:
                token = self.app.idp.mint(parse_qs(url.query, keep_blank_values=True))
            except ValueError as exc:
                self.send_json(400, {"error": "invalid_request", "error_description": str(exc)})
                return
            self.send_body(200, token.encode(), "text/plain")
        else:
            self.not_found()

    def do_POST(self):
        url = urlsplit(self.path)
        body = self.body_or_refusal()
        if body is None:
            return
        if url.path != "/oauth/token":
            self.not_found()
            return
        self.client_credentials(body)

    def client_credentials(self, body):
        """`POST /oauth/token`, grant_type=client_credentials, as XSUAA answers it (RFC 6749
        §4.4): a service token for a registered client. The header `x-zid` (the SAP Cloud
        SDK's subscriber-token request) names the tenant: only the development one is known."""
        idp = self.app.idp
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            form = {}
        zone = self.headers.get("x-zid")
        # What arrived, for the tests: field names, never their values (the secret is one).
        entry = {"time": time.time(), "scheme": "https" if self.server.tls else "http",
                 "form_fields": sorted(form), "grant_type": (form.get("grant_type") or [None])[0],
                 "client_id": None, "client_auth": None, "x_zid": zone}
        try:
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type != FORM_CONTENT_TYPE:
                raise OAuthError("invalid_request", f"Content-Type must be {FORM_CONTENT_TYPE}")
            if form.get("grant_type") != [CLIENT_CREDENTIALS_GRANT]:
                raise OAuthError("unsupported_grant_type", f"grant_type must be {CLIENT_CREDENTIALS_GRANT}")
            entry["client_id"], entry["client_auth"] = idp.authenticate(self.headers, form)
            if zone is not None and zone != idp.zone_id:
                raise invalid_client(f"the client is not registered in zone {zone}")
        except OAuthError as exc:
            idp.record_token_request(dict(entry, outcome=exc.error))
            headers = dict(TokenHandler.NO_STORE)
            if exc.status == 401:
                headers["WWW-Authenticate"] = 'Basic realm="dev-identity-provider"'
            self.send_json(exc.status, {"error": exc.error, "error_description": exc.description}, headers)
            return
        token, claims = idp.client_credentials_token(entry["client_id"])
        idp.record_token_request(dict(entry, outcome="ok"))
        self.send_json(200, {"access_token": token, "token_type": "bearer",
                             "expires_in": claims["exp"] - claims["iat"], "scope": " ".join(claims["scope"]),
                             "jti": claims["jti"]}, TokenHandler.NO_STORE)


class TokenHandler(BaseHandler):
    label = "token"
    NO_STORE = NO_STORE

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/stats":
            self.send_json(200, self.app.state.stats())
        elif path == "/faults":
            self.send_json(200, self.app.state.faults())
        elif path == "/upstream":
            self.send_json(200, self.app.state.upstream())
        elif path == "/requests":
            self.send_json(200, self.app.state.requests())
        elif path == "/healthz":
            self.send_json(200, {"status": "ok"})
        else:
            self.not_found()

    def do_POST(self):
        url = urlsplit(self.path)
        body = self.body_or_refusal()
        if body is None:
            return
        if url.path == "/reset":
            self.app.state.reset()
            self.send_json(200, {})
        elif url.path == "/faults":
            self.set_fault(body)
        elif url.path == "/revoke":
            # POST /revoke with the token as the body: the echo upstream refuses it from now on.
            self.app.state.revoke(body.decode("utf-8", "replace").strip())
            self.send_json(200, {})
        elif is_token_path(url.path):
            self.token_endpoint(url, body)
        else:
            self.not_found()

    def set_fault(self, body):
        """POST /faults {"path": "/oauth/token/..." or a target profile's path, "mode": <a FAULTS name
        or "none">}."""
        try:
            request = json.loads(body)
            path, mode = request["path"], request["mode"]
        except (ValueError, KeyError, TypeError):
            self.send_json(400, {"error": "invalid_request", "error_description": "need JSON path and mode"})
            return
        if not (isinstance(path, str) and is_token_path(path)) or (mode != "none" and mode not in FAULTS):
            self.send_json(400, {"error": "invalid_request", "error_description": "unknown token path or mode"})
            return
        self.app.state.set_fault(path, mode)
        self.send_json(200, self.app.state.faults())

    def fault(self, mode, entry):
        """Answer with fault `mode`, validating nothing; the token inside is a real one."""
        user = unverified_name_id(entry["assertion_xml"])
        token = self.app.state.issue_token(user, DEFAULT_TOKEN_LIFETIME, "openid", entry["path"])
        self.app.state.record(dict(entry, fault_token=token), f"fault:{mode}")
        self.close_connection = True
        try:
            FAULTS[mode](self, token)
        except OSError:
            pass  # the client hung up on a fault: that is its business

    def reset_mid_response(self, body):
        """Headers and half the body, then an RST (SO_LINGER 0) instead of the rest."""
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            self.connection.sendall(head + body[: len(body) // 2])
            time.sleep(0.05)  # let the peer read what was sent before the reset
        except OSError:
            return
        # Detach so that socketserver's own shutdown(SHUT_WR) cannot send a polite FIN first.
        raw = socket.socket(fileno=self.connection.detach())
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()

    def hang(self):
        """Never answer: wait until the client gives up and closes (or HANG_MAX)."""
        select.select([self.connection], [], [], HANG_MAX)

    def drip(self, body):
        """Headers at once, then the body a few bytes at a time, slower than any read timeout."""
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            self.connection.sendall(head)
            for i in range(0, len(body), DRIP_BYTES):
                time.sleep(DRIP_INTERVAL)
                self.connection.sendall(body[i:i + DRIP_BYTES])
        except OSError:
            pass  # the client gave up, as it should

    def token_endpoint(self, url, body):
        """Handle one grant request: record it, apply the path behaviour, validate, issue.
        A target profile's path (TARGET_PROFILES) validates and refuses as that target."""
        query = parse_qs(url.query)
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            form = {}
        profile = target_profile(url.path)
        entry = {"path": url.path, "query": flatten(query), "headers": self.lower_headers(),
                 "form": flatten(form), "assertion_xml": None, "time": time.time(), "verified_by": None}
        if profile is not None:
            entry.update(target=profile.name, target_details=None)
        try:
            entry["assertion_xml"] = decode_assertion(form).decode("utf-8", errors="replace")
        except OAuthError:
            pass
        mode = self.app.state.serve(url.path)
        if mode != "none":
            if mode not in FAULTS:
                self.send_json(404, {"error": "not_found", "error_description": "unknown fault"})
            else:
                self.fault(mode, entry)
            return
        try:
            if url.path == "/oauth/token/slow" or "delay" in query:
                time.sleep(slow_delay(query))
            if url.path == "/oauth/token/reject":
                raise invalid_grant("rejected by test endpoint")
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type != FORM_CONTENT_TYPE:
                raise OAuthError("invalid_request", f"Content-Type must be {FORM_CONTENT_TYPE}")
            endpoint = f"{self.server.base_url}{url.path}"
            if profile is None:
                user, entry["verified_by"] = validate_exchange(self.headers, form, endpoint, self.app.cfg,
                                                              self.app.state)
            else:
                request = TokenRequest(self.headers, form, query, url.path, endpoint)
                user, entry["verified_by"], entry["target_details"] = profile.validate(
                    request, self.app.cfg, self.app.state)
        except OAuthError as exc:
            if exc.detail is not None:
                entry["detail"] = exc.detail
            self.app.state.record(entry, exc.error)
            status, answer, headers = (profile.refusal if profile else rfc6749_refusal)(exc)
            self.send_json(status, answer, headers)
            return
        try:
            lifetime = int(query.get("expires_in", [DEFAULT_TOKEN_LIFETIME])[0])
        except ValueError:
            lifetime = DEFAULT_TOKEN_LIFETIME
        scope = (form.get("scope") or ["openid"])[0] or "openid"
        token = self.app.state.issue_token(user, lifetime, scope, url.path)
        entry["access_token"] = token
        self.app.state.record(entry, "ok", user)
        self.send_json(200, {"access_token": token, "token_type": "bearer",
                             "expires_in": lifetime, "scope": scope}, self.NO_STORE)


class EchoHandler(BaseHandler):
    label = "echo"

    def handle_any(self):
        """Report what arrived upstream and whose token it carried (always 200)."""
        try:
            self.read_body()
        except ValueError:
            self.close_connection = True
        scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
        user, valid = (None, False)
        if scheme.lower() == "bearer" and token.strip():
            user, valid = self.app.state.lookup_token(token.strip())
        expected = self.headers.get("X-Expected-User")  # percent-encoded: any user id fits a header
        if expected is not None:
            self.app.state.count_delivery(unquote(expected), user, valid)
        self.app.state.record_upstream(self.path, token.strip() or None, user, valid)
        if token.strip() and self.app.state.revoked(token.strip()):
            # A resource server that no longer accepts the token (RFC 6750 §3.1).
            self.send_json(401, {"error": "invalid_token", "user": user},
                           {"WWW-Authenticate": 'Bearer error="invalid_token"'})
            return
        self.send_json(200, {"user": user, "token_valid": valid, "method": self.command,
                             "path": self.path, "headers": self.lower_headers()})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = handle_any


# -------------------------------------------------------------------------- main


@dataclass
class App:
    cfg: Config
    state: SharedState
    idp: IdentityProvider


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512  # listen backlog: tests open hundreds of connections at once

    def __init__(self, address, handler, tls: ssl.SSLContext | None = None, host_name: str = HOST):
        super().__init__(address, handler)
        self.tls = tls
        scheme = "https" if tls else "http"
        # How clients address this server (the token endpoint's expected Recipient).
        self.base_url = f"{scheme}://{host_name}:{self.server_address[1]}"  # the bound port, also for 0

    def get_request(self):
        sock, addr = super().get_request()
        if self.tls is None:
            return sock, addr
        # The handshake happens in the request's thread (do_handshake_on_connect), so a
        # client that refuses the certificate only ends its own connection.
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            return  # a client that did not trust the certificate: expected in the tests
        super().handle_error(request, client_address)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--idp-port", type=int, required=True)
    p.add_argument("--token-port", type=int, required=True)
    p.add_argument("--echo-port", type=int, required=True)
    p.add_argument("--trusted-cert", required=True, action="append",
                   help="PEM certificate that signs assertions (repeat to trust several; "
                        "each is labelled by its file name without extension)")
    p.add_argument("--trusted-issuer", required=True)
    p.add_argument("--entity-id", required=True, help="this token server's SAML audience")
    p.add_argument("--client-id", required=True)
    p.add_argument("--client-secret", required=True)
    p.add_argument("--jwt-audience", default="principal-propagation-demo")
    p.add_argument("--idp-client", action="append", default=[], metavar="CLIENT_ID=SECRET",
                   help="an OAuth client of the identity provider's client credentials grant "
                        "(POST /oauth/token; repeat for several)")
    p.add_argument("--service-token-audience", default="principal-propagation-destinations",
                   help="`aud` of the identity provider's client credentials tokens")
    p.add_argument("--zone-id", default=DEV_ZONE_ID,
                   help="the tenant (`zid`) of the identity provider's clients and service tokens")
    p.add_argument("--idp-tls-port", type=int,
                   help="also serve the identity provider over TLS here (--tls-cert, --tls-key), as "
                        "https://127.0.0.1:<port>: the SAP Cloud SDK fetches subscriber tokens over https only")
    p.add_argument("--token-tls-port", type=int,
                   help="also serve the token endpoint over TLS here, as https://localhost:<port>")
    p.add_argument("--tls-cert", help="PEM certificate (and chain) of the TLS endpoints")
    p.add_argument("--tls-key", help="PEM private key of the TLS endpoints")
    p.add_argument("--onprem-port", type=int, help="also run the on-premise backend (dev/onprem.py) here")
    p.add_argument("--onprem-user-ca", help="PEM CA that signs the user certificates the backend accepts")
    p.add_argument("--tls-dir", help="the local CA's directory (dev/local_ca.py), for the on-premise backend")
    import sts  # its development constants are the defaults (it imports this file for Server)
    p.add_argument("--sts-port", type=int,
                   help="also run the development Microsoft Entra ID token service (dev/sts.py) here; "
                        "the token server then trusts its assertions too")
    p.add_argument("--sts-tenant", default=sts.DEV_TENANT_ID,
                   help="the Entra tenant id (token path /<tenant>/oauth2/v2.0/token; also the tenant of "
                        "the IdP's idp=entra tokens)")
    p.add_argument("--sts-client-id", default=sts.DEV_GATEWAY_CLIENT_ID,
                   help="the gateway's app registration: the only client, and the audience of idp=entra tokens")
    p.add_argument("--sts-client-secret", default=sts.DEV_GATEWAY_CLIENT_SECRET)
    p.add_argument("--sts-client-cert", action="append", default=[],
                   help="PEM certificate whose key may sign client assertions (repeat for several)")
    p.add_argument("--sts-entity", action="append", default=[], metavar="ENTITY_ID=REPLY_URL",
                   help="a SAML enterprise application: Identifier (entity id) and first reply URL, the "
                        "assertions' Recipient (repeat for several; default: --entity-id = this token "
                        "server's http://127.0.0.1:<token-port>/oauth/token)")
    p.add_argument("--sts-public-url", action="append", default=[],
                   help="another token URL client assertions may name as aud (besides the one posted to)")
    args = p.parse_args(argv)
    if (args.token_tls_port or args.idp_tls_port) and not (args.tls_cert and args.tls_key):
        p.error("--token-tls-port and --idp-tls-port need --tls-cert and --tls-key")
    clients = {}
    for spec in args.idp_client:
        client_id, sep, secret = spec.partition("=")
        if not (sep and client_id and secret):
            p.error("--idp-client takes CLIENT_ID=SECRET")
        clients[client_id] = secret
    args.idp_clients = clients
    if (args.onprem_port is None) != (args.onprem_user_ca is None):
        p.error("--onprem-port and --onprem-user-ca go together")
    if args.onprem_port is not None and not args.tls_dir:
        p.error("--onprem-port needs --tls-dir")
    if args.sts_port is None and (args.sts_client_cert or args.sts_entity or args.sts_public_url):
        p.error("--sts-client-cert, --sts-entity and --sts-public-url need --sts-port")
    entities = {}
    for spec in args.sts_entity or [f"{args.entity_id}=http://{HOST}:{args.token_port}/oauth/token"]:
        entity_id, sep, reply_url = spec.partition("=")
        if not (sep and entity_id and reply_url):
            p.error(f"--sts-entity {spec!r} is not ENTITY_ID=REPLY_URL")
        entities[entity_id] = reply_url
    args.sts_entities = entities
    if args.sts_port is not None and sts.sts_issuer(args.sts_tenant) == args.trusted_issuer:
        p.error("--trusted-issuer must not be the STS's issuer")
    return args


def main(argv=None):
    args = parse_args(argv)
    import sts
    trusted_certs = []
    for path in args.trusted_cert:
        with open(path, "rb") as f:
            trusted_certs.append((Path(path).stem, x509.load_pem_x509_certificate(f.read())))
    idp = IdentityProvider(f"http://{HOST}:{args.idp_port}", args.jwt_audience,
                           EntraApp(args.sts_tenant, args.sts_client_id, sts.DEV_FRONTEND_CLIENT_ID),
                           clients=args.idp_clients, service_audience=args.service_token_audience,
                           zone_id=args.zone_id)
    token_service = None
    other_issuers = ()
    if args.sts_port is not None:
        token_service = sts.Sts(tenant=args.sts_tenant, client_id=args.sts_client_id,
                                client_secret=args.sts_client_secret, client_certs=args.sts_client_cert,
                                user_token_key=idp.public_key(), entities=args.sts_entities,
                                public_urls=args.sts_public_url)
        other_issuers = ((token_service.issuer, [("sts", token_service.certificate)]),)
    cfg = Config(args.idp_port, args.token_port, args.echo_port, trusted_certs, args.trusted_issuer,
                 args.entity_id, args.client_id, args.client_secret, args.jwt_audience, other_issuers)
    app = App(cfg, SharedState(), idp)

    servers = []
    try:
        for port, handler in ((cfg.idp_port, IdpHandler), (cfg.token_port, TokenHandler),
                              (cfg.echo_port, EchoHandler)):
            server = Server((HOST, port), handler)
            server.app = app
            servers.append(server)
        if args.token_tls_port or args.idp_tls_port:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(args.tls_cert, args.tls_key)
        if args.token_tls_port:
            server = Server((HOST, args.token_tls_port), TokenHandler, tls=tls, host_name="localhost")
            server.app = app
            servers.append(server)
        if args.idp_tls_port:
            server = Server((HOST, args.idp_tls_port), IdpHandler, tls=tls)
            server.app = app
            servers.append(server)
        if args.onprem_port is not None:
            import local_ca
            import onprem  # loaded only when asked for (it imports this file for Server)
            servers.append(onprem.make_server(args.onprem_port, local_ca.ensure(Path(args.tls_dir)),
                                              Path(args.onprem_user_ca)))
        if token_service is not None:
            servers.append(sts.make_server(args.sts_port, token_service))
    except OSError as exc:
        print(f"cannot listen: {exc}", file=sys.stderr)
        for server in servers:
            server.server_close()
        return 1

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    print("ready", flush=True)

    while not stop.wait(0.5):
        pass
    for server in servers:
        server.shutdown()
        server.server_close()
    for thread in threads:
        thread.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
