"""The local stack: development servers plus the real Envoy running the plugin.

Used by `make run` (profile `demo`, fixed ports, foreground) and by the end-to-end
tests (profile `test`, shifted ports, extra destinations that exercise failures).
Everything binds to 127.0.0.1. Envoy's configuration is generated here, from one
place, and written to `.run/<profile>/envoy.json` so it can be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import local_ca
import log_audit
import servers
import sts

ROOT = Path(__file__).resolve().parent.parent
# PP_WASM: another build of the plugin (to compare two versions in the same benchmark).
WASM = Path(os.environ.get("PP_WASM") or ROOT / "target" / "wasm32-wasip1" / "release" / "principal_propagation.wasm")
VENV_BIN = ROOT / ".venv" / "bin"

ISSUER = "principal-propagation-gateway"
ENTITY_ID = "dev-token-server"
CLIENT_ID = "gateway-client"
CLIENT_SECRET = "gateway-secret"
CLIENT_SECRET_ENV = "PP_CLIENT_SECRET"  # the plugin reads the password from the VM's environment
JWT_AUDIENCE = "principal-propagation-demo"
SECOND_ISSUER = "https://second-idp.example"  # a second jwt_authn provider in the test profile
# The Entra-style flow: user tokens from `GET /token?idp=entra` for the gateway's app, which
# the development Entra token endpoint (dev/sts.py) exchanges for a SAML assertion.
ENTRA_ISSUER = f"https://login.microsoftonline.com/{sts.DEV_TENANT_ID}/v2.0"
STS_SECRET_ENV = "PP_STS_SECRET"
# An audience jwt_authn accepts but the STS does not (the gateway's app is the only one it
# redeems tokens for): a token issued for another application reaches the STS.
OTHER_APP_AUDIENCE = "api://another-application"
# An enterprise application whose Identifier is not the target's entity id: Entra issues
# the assertion, the target refuses it (XSUAA's "Error validating SAML message").
MISCONFIGURED_ENTITY = "misconfigured-target"
# The find-destination API for applications (SAP Destination Service's shape): the
# application's service token is a client-credentials JWT from the development IdP
# (`POST /oauth/token`) for this audience; `demo-app` may read the exposed destinations.
DESTINATION_API_AUDIENCE = "principal-propagation-destinations"
API_CLIENT_ID = "demo-app"
API_CLIENT_SECRET = "demo-app-secret"
# Another registered application, allowed no destination of the demo (a 403 in the tests).
OTHER_API_CLIENT_ID = "other-app"
OTHER_API_CLIENT_SECRET = "other-app-secret"
# jwt_authn's metadata key for the verified service token (the user's stays `payload`).
SERVICE_TOKEN_PAYLOAD = "service_token"


@dataclass(frozen=True)
class Ports:
    listener: int = 10000
    admin: int = 9901
    idp: int = 9000
    token: int = 9100
    echo: int = 9200
    # The on-premise backend (dev/onprem.py): HTTPS, trusts a forwarded user certificate
    # only from the gateway's system certificate, as ABAP ICM does.
    onprem: int = 9300
    # The development Entra ID token endpoint (dev/sts.py): on-behalf-of, SAML out.
    sts: int = 9400

    @property
    def closed(self) -> int:
        """A port nothing listens on: the 'token service down' cluster."""
        return self.token + 1

    @property
    def token_tls(self) -> int:
        """The token server over TLS (https://localhost:<port>), its certificate signed by
        the local CA (dev/local_ca.py)."""
        return self.token + 2

    @property
    def idp_tls(self) -> int:
        """The identity provider's token endpoint over TLS (https://127.0.0.1:<port>), for
        clients that hard-code https (the SAP Cloud SDK's subscriber token). +4: free in
        every port layout of the tests and benchmarks (+1 is some benches' token port)."""
        return self.idp + 4

    def shifted(self, offset: int) -> "Ports":
        return Ports(*(p + offset for p in (self.listener, self.admin, self.idp, self.token, self.echo,
                                            self.onprem, self.sts)))


# The operator command (`pp keys …` makes the demo's keys).
PP = ROOT / "target" / "release" / "pp"
PP_KEYS = [str(PP), "keys"]
KEY_DIR = ROOT / ".run" / "keys"
# Key files of the demo: the active/passive pair `a`/`b` of key `default`, `second` (the
# test profile's per-destination key) and `ca` / `ca_ec`, CAs that sign the users' client
# certificates (RSA-2048 and P-256). Each reaches Envoy as PP_KEY_<X>/PP_CERT_<X>.
KEY_SLOTS = ("a", "b", "second", "ec", "ca", "ca_ec")
# Slots holding a P-256 key (ECDSA-SHA256) instead of RSA.
EC_SLOTS = ("ec", "ca_ec")
# Slots holding a CA (`pp keys generate --ca true`).
CA_SLOTS = ("ca", "ca_ec")
USERS_CA = "principal-propagation users CA"
# Keys whose certificates the development STS accepts client assertions from.
STS_CLIENT_CERT_SLOTS = ("a", "ec")
# Further variables PP_EXTRA_0.. passed to the Wasm VM (tests put extra keys there).
EXTRA_ENV_SLOTS = 4


def key_files(slot: str) -> tuple[Path, Path]:
    return KEY_DIR / f"{slot}-key.pem", KEY_DIR / f"{slot}-cert.pem"


def ensure_keys() -> None:
    """Generates the demo's missing keys with the project's own `pp keys` command."""
    for slot in KEY_SLOTS:
        key, cert = key_files(slot)
        if key.exists() and cert.exists():
            continue
        if not PP.exists():
            raise RuntimeError(f"{PP} is missing: run `make keys`")
        algorithm = ["--algorithm", "ec"] if slot in EC_SLOTS else []
        issuer, ca = (USERS_CA, ["--ca", "true"]) if slot in CA_SLOTS else (ISSUER, [])
        subprocess.run([*PP_KEYS, "generate", "--issuer", issuer, "--key", str(key), "--cert", str(cert),
                        *algorithm, *ca], check=True, stdout=subprocess.DEVNULL)


def trusted_cert(label: str) -> Path:
    """The certificate the token server names (by file stem) as having verified an assertion."""
    return KEY_DIR / f"{label}.pem"


def key_environment() -> dict[str, str]:
    """The secrets Envoy passes to the Wasm VM (so none is in the configuration)."""
    env = {CLIENT_SECRET_ENV: CLIENT_SECRET, STS_SECRET_ENV: sts.DEV_GATEWAY_CLIENT_SECRET}
    for slot in KEY_SLOTS:
        key, cert = key_files(slot)
        env[f"PP_KEY_{slot.upper()}"] = key.read_text()
        env[f"PP_CERT_{slot.upper()}"] = cert.read_text()
    return env


def key_ref(slot: str) -> dict:
    return {"privateKeyEnv": f"PP_KEY_{slot.upper()}", "certificateEnv": f"PP_CERT_{slot.upper()}"}


def destination(ports: Ports, name: str, path: str = "/oauth/token", **extra) -> dict:
    """An SAP OAuth2SAMLBearerAssertion destination against the dev token server."""
    d = {
        "Name": name,
        "Type": "HTTP",
        "URL": f"http://127.0.0.1:{ports.echo}",
        "Authentication": "OAuth2SAMLBearerAssertion",
        "ProxyType": "Internet",
        "tokenServiceURL": f"http://127.0.0.1:{ports.token}{path}",
        "tokenServiceUser": CLIENT_ID,
        "tokenServicePasswordEnv": CLIENT_SECRET_ENV,
        "audience": ENTITY_ID,
        "assertionIssuer": ISSUER,
        "nameIdFormat": "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified",
        "authnContextClassRef": "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession",
    }
    d.update(extra)
    return d


def onprem_destination(name: str = "onprem", **extra) -> dict:
    """An SAP PrincipalPropagation destination: a short-lived client certificate for the
    user, signed by the `users-ca` key, in SSL_CLIENT_CERT to the on-premise backend."""
    d = {
        "Name": name,
        "Type": "HTTP",
        "URL": "https://localhost/onprem",
        "Authentication": "PrincipalPropagation",
        "ProxyType": "OnPremise",
        "clientCertificateIssuerKey": "users-ca",
        "clientCertificateValidityMinutes": 10,
    }
    d.update(extra)
    return d


def entra_destination(ports: Ports, name: str = "entra", fault: str = "", **extra) -> dict:
    """An OAuth2SAMLBearerAssertion destination whose assertion Entra ID issues (the
    development STS, on behalf of the user) and the dev token server exchanges."""
    d = destination(ports, name)
    del d["assertionIssuer"], d["nameIdFormat"], d["authnContextClassRef"]
    d.update({
        "assertionServiceURL": f"http://127.0.0.1:{ports.sts}{sts.token_path(sts.DEV_TENANT_ID)}{fault}",
        "assertionServiceCluster": "sts",
        "assertionServiceClientId": sts.DEV_GATEWAY_CLIENT_ID,
        "assertionServiceClientSecretEnv": STS_SECRET_ENV,
    })
    d.update(extra)
    return {k: v for k, v in d.items() if v is not None}


def profile_destination(ports: Ports, name: str, path: str, profile: str | None, **extra) -> dict:
    """A destination against the token server's endpoint that plays a real target
    (dev/servers.py, TARGET_PROFILES): with `profile`, configured the way that profile
    wants (its defaults fill the rest); without, a misconfiguration the target refuses."""
    d = destination(ports, name, path, **{"targetProfile": profile, **extra})
    return {k: v for k, v in d.items() if v is not None}


def target_destinations(ports: Ports) -> list[dict]:
    """One destination per target profile, as it should be configured, and one per rule
    of its target broken (no profile, so the gateway's load check lets it through and the
    target refuses it)."""
    token = f"http://127.0.0.1:{ports.token}"
    no_basic = {"tokenServiceUser": None, "tokenServicePasswordEnv": None}
    sf = {"clientKey": servers.SF_API_KEY, "companyId": servers.SF_COMPANY_ID, **no_basic}
    salesforce = {"clientKey": servers.SALESFORCE_CONSUMER_KEY, **no_basic,
                  "assertionRecipient": servers.SALESFORCE_TOKEN_URLS[servers.SALESFORCE_LOGIN]}
    return [
        # The profiles' defaults apply where these leave a property unset (None).
        profile_destination(ports, "p-s4", servers.S4_TOKEN_PATH, "s4hana-cloud", audience=servers.S4_AUDIENCE,
                            authnContextClassRef=None),
        profile_destination(ports, "p-abap", servers.ABAP_TOKEN_PATH, "abap"),
        profile_destination(ports, "p-sf", servers.SF_TOKEN_PATH, "successfactors", audience=None,
                            assertionIssuer=None, **sf),
        profile_destination(ports, "p-xsuaa", servers.XSUAA_TOKEN_PATH, "xsuaa", audience=servers.XSUAA_ENTITY_ID,
                            nameIdFormat=None),
        profile_destination(ports, "p-salesforce", servers.SALESFORCE_TOKEN_PATH, "salesforce", audience=None,
                            assertionIssuer=None, **salesforce),
        # Each breaks one rule its target checks; the profile would have refused it at load.
        profile_destination(ports, "p-s4-issuer", servers.S4_TOKEN_PATH, None, audience=servers.S4_AUDIENCE,
                            assertionIssuer="not-the-certificates-cn", clientKey=CLIENT_ID),
        profile_destination(ports, "p-abap-recipient", servers.ABAP_TOKEN_PATH, None,
                            assertionRecipient=f"{token}/elsewhere"),
        profile_destination(ports, "p-sf-no-api-key", servers.SF_TOKEN_PATH, None, audience=servers.SF_AUDIENCE,
                            samlAssertionEncoding="base64", **sf),
        profile_destination(ports, "p-xsuaa-recipient", servers.XSUAA_TOKEN_PATH, None,
                            audience=servers.XSUAA_ENTITY_ID, assertionRecipient=f"{token}/xsuaa/oauth/token"),
        profile_destination(ports, "p-salesforce-base64", servers.SALESFORCE_TOKEN_PATH, None,
                            audience=servers.SALESFORCE_LOGIN, assertionIssuer=servers.SALESFORCE_CONSUMER_KEY,
                            samlAssertionEncoding="base64", **salesforce),
        *[profile_destination(ports, name, path, None, **extra) for name, path, extra in broken_rules(ports)],
    ]


def broken_rules(ports: Ports) -> list[tuple[str, str, dict]]:
    """More of each target's rules, broken one per destination: (name, token path, properties)."""
    token = f"http://127.0.0.1:{ports.token}"
    no_basic = {"tokenServiceUser": None, "tokenServicePasswordEnv": None}
    s4 = {"audience": servers.S4_AUDIENCE, "clientKey": CLIENT_ID}
    sf = {"clientKey": servers.SF_API_KEY, "companyId": servers.SF_COMPANY_ID, "audience": servers.SF_AUDIENCE,
          "targetProfile": "successfactors", **no_basic}
    xsuaa = {"audience": servers.XSUAA_ENTITY_ID}
    salesforce = {"clientKey": servers.SALESFORCE_CONSUMER_KEY, "assertionIssuer": servers.SALESFORCE_CONSUMER_KEY,
                  "audience": servers.SALESFORCE_LOGIN, **no_basic,
                  "assertionRecipient": servers.SALESFORCE_TOKEN_URLS[servers.SALESFORCE_LOGIN]}
    return [
        ("p-s4-audience", servers.S4_TOKEN_PATH, {**s4, "audience": "https://my300117-api.s4hana.ondemand.com"}),
        ("p-s4-recipient", servers.S4_TOKEN_PATH, {**s4, "assertionRecipient": f"{token}/elsewhere"}),
        ("p-s4-client", servers.S4_TOKEN_PATH, {**s4, "clientKey": "SOMEONE_ELSE"}),
        ("p-s4-no-basic", servers.S4_TOKEN_PATH, {**s4, **no_basic}),
        ("p-abap-issuer", servers.ABAP_TOKEN_PATH, {"assertionIssuer": "an-unknown-provider"}),
        # (a user whose id has a colon: the e2e test sends one to p-abap)
        ("p-sf-company", servers.SF_TOKEN_PATH, {**sf, "companyId": "OTHER"}),
        ("p-sf-audience", servers.SF_TOKEN_PATH, {**sf, "audience": "https://sf.example"}),
        # The e-mail as NameID without the e-mail format, so without use_email.
        ("p-sf-email", servers.SF_TOKEN_PATH, {**sf, "userIdSource": "email"}),
        ("p-xsuaa-audience", servers.XSUAA_TOKEN_PATH, {**xsuaa, "audience": "another-subaccount"}),
        ("p-xsuaa-issuer", servers.XSUAA_TOKEN_PATH, {**xsuaa, "assertionIssuer": "an-unknown-idp"}),
        ("p-xsuaa-no-basic", servers.XSUAA_TOKEN_PATH, {**xsuaa, **no_basic}),
        ("p-salesforce-issuer", servers.SALESFORCE_TOKEN_PATH, {**salesforce, "assertionIssuer": "my-gateway"}),
        ("p-salesforce-audience", servers.SALESFORCE_TOKEN_PATH,
         {**salesforce, "audience": "https://acme.my.salesforce.com"}),
        ("p-salesforce-recipient", servers.SALESFORCE_TOKEN_PATH,
         {**salesforce, "assertionRecipient": servers.SALESFORCE_TOKEN_URLS[servers.SALESFORCE_TEST]}),
        ("p-salesforce-ecdsa", servers.SALESFORCE_TOKEN_PATH, {**salesforce, "KeyStoreLocation": "ec"}),
    ]


def test_destinations(ports: Ports) -> list[dict]:
    """Destinations whose behaviour the end-to-end tests check, one route each."""
    return [
        destination(ports, "reject", "/oauth/token/reject"),
        destination(
            ports,
            "slow",
            "/oauth/token/slow",
            **{"tokenServiceURL.queries.delay": "4", "tokenServiceURL.SocketReadTimeoutInSeconds": "1"},
        ),
        destination(ports, "lagging", "/oauth/token/slow", **{"tokenServiceURL.queries.delay": "0.5"}),
        destination(ports, "lagging-reject", "/oauth/token/reject", **{"tokenServiceURL.queries.delay": "0.5"}),
        destination(
            ports,
            "lagging-timeout",
            "/oauth/token/slow",
            **{"tokenServiceURL.queries.delay": "1.5", "tokenServiceURL.SocketReadTimeoutInSeconds": "1"},
        ),
        # Answers after 2 s, within its 3 s timeout: exchanges in flight for a while.
        destination(
            ports,
            "swap",
            "/oauth/token/slow",
            **{"tokenServiceURL.queries.delay": "2", "tokenServiceURL.SocketReadTimeoutInSeconds": "3"},
        ),
        destination(ports, "down", tokenServiceCluster="token_service_down"),
        destination(ports, "wrong-audience", audience="https://someone-else.example"),
        destination(ports, "short", **{"tokenServiceURL.queries.expires_in": "33"}),
        # Usable for 8 s (38 s minus the 30 s margin): renewed several times in a load test.
        destination(ports, "renewing", **{"tokenServiceURL.queries.expires_in": "38"}),
        destination(ports, "own-key", KeyStoreLocation="second"),
        destination(ports, "ec", KeyStoreLocation="ec"),
        # The token service over TLS, verified against the local CA; and the same service
        # through a cluster that trusts another CA (its handshake must fail).
        destination(ports, "tls", tokenServiceCluster="token_service_tls",
                    tokenServiceURL=f"https://localhost:{ports.token_tls}/oauth/token"),
        destination(ports, "tls-untrusted", tokenServiceCluster="token_service_tls_untrusted",
                    tokenServiceURL=f"https://localhost:{ports.token_tls}/oauth/token"),
        destination(
            ports,
            "sf",
            nameIdFormat="urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress",
            clientKey=CLIENT_ID,
            companyId="ACME",
            scope="read write",
            samlAssertionEncoding="base64",
            includeSigningCertificateInSAMLAssertion="true",
            **{
                "tokenService.body.extra_field": "1",
                "tokenServiceURL.headers.X-Token-Test": "yes",
                "URL.headers.X-Propagated": "1",
                "URL.queries.sap-client": "100",
            },
        ),
        # The on-behalf-of flow's variants: a key as the client credential (RS256, ES256),
        # the assertion re-encoded as base64, and the identity provider failing.
        entra_destination(ports, "entra-key", assertionServiceClientAssertionKey="default",
                          assertionServiceClientSecretEnv=None),
        entra_destination(ports, "entra-ec-key", assertionServiceClientAssertionKey="ec",
                          assertionServiceClientSecretEnv=None),
        entra_destination(ports, "entra-base64", samlAssertionEncoding="base64"),
        entra_destination(ports, "entra-garbage", fault="/fault/garbage"),
        entra_destination(ports, "entra-html", fault="/fault/html-500"),
        entra_destination(ports, "entra-slow", fault="/fault/slow?delay=3", assertionServiceTimeoutInSeconds=1),
        entra_destination(ports, "entra-down", assertionServiceCluster="token_service_down"),
        entra_destination(ports, "entra-wrong-entity", audience=MISCONFIGURED_ENTITY),
        # Read through the find-destination API: its token path can be made to refuse at
        # run time (POST /faults), and healed.
        api_destination(ports, "api-flaky", "/oauth/token/api-flaky"),
        api_destination(ports, "api-system", SystemUser="TECHNICAL_USER"),
        *target_destinations(ports),
    ]


def api_destination(ports: Ports, name: str, path: str = "/oauth/token", **extra) -> dict:
    """A destination applications read through the find-destination API: as pasted from
    the BTP cockpit (with `x_user_token.jwks_uri`, which the SAP Cloud SDK requires for a
    user token not issued by XSUAA), exposed to `demo-app`."""
    return destination(ports, name, path, **{
        "x_user_token.jwks_uri": f"http://127.0.0.1:{ports.idp}/.well-known/jwks.json",
        "exposeToClients": [API_CLIENT_ID],
        **extra,
    })


def plugin_config(ports: Ports, profile: str) -> dict:
    destinations = [api_destination(ports, "dev"), onprem_destination(), entra_destination(ports)]
    if profile == "test":
        destinations += test_destinations(ports)
    keys = {"default": {"active": key_ref("a"), "passive": key_ref("b")}, "users-ca": key_ref("ca")}
    if profile == "test":
        keys["second"] = key_ref("second")
        keys["ec"] = key_ref("ec")
    return {
        # The development token service speaks plain HTTP on loopback.
        "allowInsecureTokenService": True,
        "tokenServiceCluster": "token_service",
        "keys": keys,
        "defaultDestination": "dev",
        "trustMetadataPath": "/.well-known/saml-idp-metadata",
        "assertionLifetimeSeconds": 300,
        "clockSkewSeconds": 60,
        "destinations": destinations,
        "destinationApi": {"serviceTokenPayloadKey": SERVICE_TOKEN_PAYLOAD},
    }


def cluster(name: str, port: int) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}
            ],
        },
    }


TLS_DIR = ROOT / ".run" / "tls"


def tls_cluster(name: str, port: int, trusted_ca: Path) -> dict:
    """A cluster to a local TLS server that verifies it: signed by `trusted_ca`, for the
    name `localhost` (SNI and subject alternative name)."""
    c = cluster(name, port)
    c["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "localhost",
            "common_tls_context": {"validation_context": {
                "trusted_ca": {"filename": str(trusted_ca)},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "localhost"}}],
            }},
        },
    }
    return c


def tls_clusters(ports: Ports) -> list[dict]:
    tls = local_ca.ensure(TLS_DIR)
    return [tls_cluster("token_service_tls", ports.token_tls, tls.ca),
            tls_cluster("token_service_tls_untrusted", ports.token_tls, tls.other_ca)]


def onprem_cluster(ports: Ports) -> dict:
    """The on-premise backend over TLS: Envoy verifies the server (local CA, `localhost`)
    and authenticates with the gateway's own system certificate, the connection the
    backend trusts a forwarded user certificate on (Envoy's UpstreamTlsContext with a
    client certificate)."""
    tls = local_ca.ensure(TLS_DIR)
    c = tls_cluster("onprem", ports.onprem, tls.ca)
    c["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificates"] = [{
        "certificate_chain": {"filename": str(tls.gateway_cert)},
        "private_key": {"filename": str(tls.gateway_key)},
    }]
    return c


def route(prefix: str, destination_name: str | None = None, cluster_name: str = "echo") -> dict:
    r = {"match": {"prefix": prefix}, "route": {"cluster": cluster_name, "timeout": "15s"}}
    if destination_name:
        r["metadata"] = {"filter_metadata": {"principal_propagation": {"destination": destination_name}}}
    return r


def wasm_filter(plugin: dict, vm_configuration: str = "") -> dict:
    """The Wasm HTTP filter running the plugin with configuration `plugin`. Another
    `vm_configuration` makes Envoy start new VMs (as a code update does)."""
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {
            "name": "principal_propagation",
            "root_id": "principal_propagation",
            "fail_open": False,
            "configuration": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": json.dumps(plugin),
            },
            "vm_config": {
                "vm_id": "principal_propagation",
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": vm_configuration},
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": str(WASM)}},
                "environment_variables": {
                    "host_env_keys": [f"PP_{kind}_{slot.upper()}" for slot in KEY_SLOTS for kind in ("KEY", "CERT")]
                    + [f"PP_EXTRA_{i}" for i in range(EXTRA_ENV_SLOTS)] + [CLIENT_SECRET_ENV, STS_SECRET_ENV]
                },
            },
        },
    }


def write_plugin_file(path: Path, plugin: dict, vm_configuration: str = "") -> None:
    """Writes the plugin's filter configuration where Envoy watches it (extension config
    discovery from the filesystem). The rename makes the update atomic."""
    response = {
        "version_info": str(time.time_ns()),
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": "principal_propagation",
            "typed_config": wasm_filter(plugin, vm_configuration),
        }],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(response, indent=2))
    tmp.rename(path)


def read_plugin_file(path: Path) -> dict:
    response = json.loads(path.read_text())
    return json.loads(response["resources"][0]["typed_config"]["config"]["configuration"]["value"])


def rotate(path: Path) -> list[str]:
    """Swaps active and passive of every key that has both; Envoy applies it without a
    restart. Returns the names of the rotated keys."""
    plugin = read_plugin_file(path)
    rotated = []
    for name, key in plugin["keys"].items():
        if "active" in key and "passive" in key:
            key["active"], key["passive"] = key["passive"], key["active"]
            rotated.append(name)
    write_plugin_file(path, plugin)
    return rotated


def example_stats_config() -> dict:
    """`stats_config` of envoy/envoy.yaml: one source for the example and the stacks."""
    import yaml  # the stacks run in the project's virtualenv, which has it

    return yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())["stats_config"]


def jwt_provider(ports: Ports, issuer: str, forward: bool = False) -> dict:
    return {
        "issuer": issuer,
        "audiences": [JWT_AUDIENCE],
        "remote_jwks": {
            "http_uri": {
                "uri": f"http://127.0.0.1:{ports.idp}/.well-known/jwks.json",
                "cluster": "idp",
                "timeout": "5s",
            },
            "cache_duration": "300s",
            "async_fetch": {},
        },
        "payload_in_metadata": "payload",
        "forward": forward,
    }


def jwt_providers(ports: Ports, profile: str) -> dict:
    """The dev IdP; in the test profile also a second issuer (same keys), whose payload
    lands under the same metadata key, as with Istio's several RequestAuthentications,
    and which leaves the verified JWT where it found it (`forward`, as Envoy Gateway's
    SecurityPolicy always does): a JWT sent as `?access_token=` then stays in the URL."""
    providers = {"dev_idp": jwt_provider(ports, f"http://127.0.0.1:{ports.idp}")}
    # Entra-style user tokens: the plugin passes them on (on-behalf-of), so the provider
    # keeps them in the request (`forward`).
    providers["entra_idp"] = jwt_provider(ports, ENTRA_ISSUER, forward=True)
    providers["entra_idp"]["audiences"] = [sts.DEV_GATEWAY_CLIENT_ID, OTHER_APP_AUDIENCE]
    if profile == "test":
        providers["second_idp"] = jwt_provider(ports, SECOND_ISSUER, forward=True)
    return providers


def destination_api_providers(ports: Ports) -> dict:
    """The find-destination API's two tokens: the application's service token in
    `Authorization` (its payload under `service_token`), the user's in `X-user-token`
    (under `payload`, where the plugin reads the user), both from the development IdP."""
    service = jwt_provider(ports, f"http://127.0.0.1:{ports.idp}")
    service.update(audiences=[DESTINATION_API_AUDIENCE], payload_in_metadata=SERVICE_TOKEN_PAYLOAD,
                   from_headers=[{"name": "Authorization", "value_prefix": "Bearer "}])
    user = jwt_provider(ports, f"http://127.0.0.1:{ports.idp}")
    user.update(from_headers=[{"name": "X-user-token"}])
    return {"api_service_token": service, "api_user_token": user}


def optional(provider: str) -> dict:
    """A jwt_authn requirement that lets a request without (or with an invalid) token
    through to the plugin, which answers it with its own error contract."""
    return {"requires_any": {"requirements": [{"provider_name": provider}, {"allow_missing_or_failed": {}}]}}


def envoy_config(ports: Ports, profile: str, config_override: dict | None = None,
                 plugin_file: Path | None = None) -> dict:
    """Envoy's bootstrap. The plugin's configuration is inline when `plugin_file` is
    None (a bad one stops Envoy at start), else read from that watched file."""
    routes = []
    if profile == "test":
        routes += [route(f"/t/{d['Name']}/", d["Name"]) for d in test_destinations(ports)]
        # The default destination in front of a direct response: measures the gateway alone.
        routes.append({"match": {"prefix": "/direct"},
                       "direct_response": {"status": 200, "body": {"inline_string": "ok"}}})
    routes.append(route("/onprem/", "onprem", "onprem"))
    routes.append(route("/entra/", "entra"))
    routes.append(route("/"))  # the default destination
    plugin = config_override if config_override is not None else plugin_config(ports, profile)
    if plugin_file is None:
        plugin_filter = {"name": "envoy.filters.http.wasm", "typed_config": wasm_filter(plugin)}
    else:
        write_plugin_file(plugin_file, plugin)
        plugin_filter = {
            "name": "principal_propagation",
            "config_discovery": {
                "config_source": {
                    "path_config_source": {
                        "path": str(plugin_file),
                        "watched_directory": {"path": str(plugin_file.parent)},
                    },
                },
                "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"],
            },
        }
    http_filters = [
        {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {**jwt_providers(ports, profile), **destination_api_providers(ports)},
                # The plugin answers a missing or invalid JWT itself, with the JSON
                # error body and WWW-Authenticate of the error contract.
                "rules": [
                    {
                        "match": {"prefix": "/destination-configuration/"},
                        "requires": {"requires_all": {"requirements": [
                            optional(name) for name in destination_api_providers(ports)]}},
                    },
                    {
                        "match": {"prefix": "/"},
                        "requires": {
                            "requires_any": {
                                "requirements": [{"provider_name": name} for name in jwt_providers(ports, profile)]
                                + [{"allow_missing_or_failed": {}}]
                            }
                        },
                    }
                ],
            },
        },
        plugin_filter,
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        },
    ]
    return {
        # xDS from files (the plugin's configuration) needs a node identity.
        "node": {"id": f"principal-propagation-{profile}", "cluster": "principal-propagation"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.admin}}},
        # The example's tags (key and slot of the certificate gauges), as the alerts expect.
        "stats_config": example_stats_config(),
        "static_resources": {
            "listeners": [
                {
                    "name": "main",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.listener}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "ingress",
                                        # Forwarded client certificates reach the plugin as a
                                        # client sent them (as behind another proxy): it must
                                        # remove them itself.
                                        "forward_client_cert_details": "ALWAYS_FORWARD_ONLY",
                                        "route_config": {
                                            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]
                                        },
                                        "http_filters": http_filters,
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster("idp", ports.idp),
                cluster("token_service", ports.token),
                cluster("token_service_down", ports.closed),
                cluster("echo", ports.echo),
                cluster("sts", ports.sts),
                onprem_cluster(ports),
                *(tls_clusters(ports) if profile == "test" else []),
            ],
        },
    }


def _get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


class Stack:
    """Starts dev servers and Envoy; stops both. Every wait is bounded."""

    def __init__(self, profile: str = "demo", ports: Ports = Ports(), envoy_log_level: str | None = None,
                 config_override: dict | None = None, plugin_log_level: str = "info", name: str | None = None,
                 extra_trusted: tuple[Path, ...] = (), extra_env: dict[str, str] | None = None,
                 bootstrap: dict | None = None, concurrency: int = 2):
        """`name` (default: the profile) names the run directory; `extra_trusted` are
        further certificates the token server trusts; `extra_env` reaches Envoy.
        Envoy's log level defaults to $PP_ENVOY_LOG_LEVEL (else info); with
        PP_AUDIT_LOGS=1, leaving the `with` block searches Envoy's log for every secret
        of the run (dev/log_audit.py) and fails on any."""
        self.profile, self.ports = profile, ports
        self.run_dir = ROOT / ".run" / (name or profile)
        self.extra_trusted, self.extra_env = extra_trusted, extra_env or {}
        self.bootstrap, self.concurrency = bootstrap, concurrency  # a whole Envoy config instead
        self.envoy_log_level = envoy_log_level or os.environ.get("PP_ENVOY_LOG_LEVEL", "info")
        self.audit = os.environ.get("PP_AUDIT_LOGS") == "1"
        self.plugin_log_level = plugin_log_level
        self.config_override = config_override
        self.servers: subprocess.Popen | None = None
        self.envoy: subprocess.Popen | None = None
        self.envoy_log = self.run_dir / "envoy.log"

    def start(self, timeout: float = 60.0) -> "Stack":
        """Starts everything or, on any failure, stops what did start and raises."""
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> "Stack":
        if not WASM.exists():
            raise RuntimeError(f"{WASM} is missing: run `make build`")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ensure_keys()
        p = self.ports
        certs = [key_files(slot)[1] for slot in KEY_SLOTS if slot not in CA_SLOTS] + list(self.extra_trusted)
        trusted = [arg for cert in certs for arg in ("--trusted-cert", str(cert))]
        tls = local_ca.ensure(TLS_DIR)
        self.servers = subprocess.Popen(
            [sys.executable, str(ROOT / "dev" / "servers.py"),
             "--idp-port", str(p.idp), "--token-port", str(p.token), "--echo-port", str(p.echo),
             *trusted, "--trusted-issuer", ISSUER, "--entity-id", ENTITY_ID,
             "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET, "--jwt-audience", JWT_AUDIENCE,
             "--token-tls-port", str(p.token_tls), "--tls-cert", str(tls.server_cert),
             "--tls-key", str(tls.server_key), "--idp-tls-port", str(p.idp_tls),
             "--idp-client", f"{API_CLIENT_ID}={API_CLIENT_SECRET}",
             "--idp-client", f"{OTHER_API_CLIENT_ID}={OTHER_API_CLIENT_SECRET}",
             "--service-token-audience", DESTINATION_API_AUDIENCE,
             "--onprem-port", str(p.onprem), "--onprem-user-ca", str(key_files("ca")[1]),
             "--tls-dir", str(TLS_DIR), "--sts-port", str(p.sts),
             "--sts-entity", f"{ENTITY_ID}=http://127.0.0.1:{p.token}/oauth/token",
             "--sts-entity", f"{MISCONFIGURED_ENTITY}=http://127.0.0.1:{p.token}/oauth/token",
             *[arg for slot in STS_CLIENT_CERT_SLOTS for arg in ("--sts-client-cert", str(key_files(slot)[1]))]],
            stdout=subprocess.PIPE, stderr=open(self.run_dir / "servers.log", "w"), text=True,
        )
        line = self.servers.stdout.readline()  # the servers print `ready` once listening
        if line.strip() != "ready":
            raise RuntimeError(f"dev servers did not start; see {self.run_dir / 'servers.log'}")

        self.envoy_log.unlink(missing_ok=True)  # Envoy appends; each run gets its own log
        config_path = self.run_dir / "envoy.json"
        self.plugin_file = None
        if self.config_override is None:
            (self.run_dir / "ecds").mkdir(exist_ok=True)
            self.plugin_file = self.run_dir / "ecds" / "plugin.json"
        config = self.bootstrap or envoy_config(p, self.profile, self.config_override, self.plugin_file)
        config_path.write_text(json.dumps(config, indent=2))
        env = dict(os.environ, **key_environment(), **self.extra_env)
        self.envoy = subprocess.Popen(
            [str(VENV_BIN / "envoy"), "-c", str(config_path), "--concurrency", str(self.concurrency),
             "--log-level", self.envoy_log_level, "--component-log-level", f"wasm:{self.plugin_log_level}",
             "--base-id", str(p.listener),
             "--disable-hot-restart", "--log-path", str(self.envoy_log), "--file-flush-interval-msec", "100"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.envoy.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.envoy.returncode}; see {self.envoy_log}")
            if _get(f"http://127.0.0.1:{p.admin}/ready")[0] == 200:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"envoy not ready within {timeout}s; see {self.envoy_log}")

    def stop(self) -> None:
        for proc in (self.envoy, self.servers):
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, exc_type, *exc) -> None:
        if not (self.audit and exc_type is None and self.servers and self.servers.poll() is None):
            self.stop()
            return
        p = self.ports
        secrets = log_audit.collect(f"http://127.0.0.1:{p.idp}", f"http://127.0.0.1:{p.token}",
                                    [*key_environment().values(), *self.extra_env.values()], CLIENT_SECRET)
        self.stop()  # Envoy flushes its log on exit
        report = log_audit.scan(self.envoy_log, secrets)
        (self.run_dir / "log-audit.json").write_text(json.dumps(dataclasses.asdict(report), indent=2))
        assert not report.leaks, f"secrets in Envoy's log ({self.envoy_log_level} level): {report.leaks}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", nargs="?", choices=["run", "rotate"], default="run")
    parser.add_argument("--profile", choices=["demo", "test"], default="demo")
    args = parser.parse_args()
    if args.command == "rotate":
        plugin_file = ROOT / ".run" / args.profile / "ecds" / "plugin.json"
        if not plugin_file.exists():
            print(f"{plugin_file} does not exist: start the stack first (make run)", file=sys.stderr)
            return 1
        rotated = rotate(plugin_file)
        active = {name: key["active"]["privateKeyEnv"] for name, key in read_plugin_file(plugin_file)["keys"].items()
                  if "active" in key}
        print(f"rotated {', '.join(rotated) or 'nothing'}; active now: {active}")
        return 0
    stack = Stack(args.profile)
    # Ctrl-C and SIGTERM both stop the stack (SIGINT explicitly: a shell may have
    # started us with it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        stack.start()
        p = stack.ports
        print(
            f"""
principal-propagation demo is up (Ctrl-C to stop):
  gateway (Envoy + plugin)   http://127.0.0.1:{p.listener}     admin http://127.0.0.1:{p.admin}
  identity provider          http://127.0.0.1:{p.idp}/token?user=alice
  token server (UAA rules)   http://127.0.0.1:{p.token}/stats
  echo upstream              http://127.0.0.1:{p.echo}
  on-premise backend (ICM)   https://localhost:{p.onprem} (through the gateway at /onprem/)
  Entra ID token endpoint    http://127.0.0.1:{p.sts}{sts.token_path(sts.DEV_TENANT_ID)} (on-behalf-of, SAML out; /entra/)

Try:
  curl -s -H "Authorization: Bearer $(curl -s 'http://127.0.0.1:{p.idp}/token?user=alice')" http://127.0.0.1:{p.listener}/hello
  curl -s -H "Authorization: Bearer $(curl -s 'http://127.0.0.1:{p.idp}/token?user=alice')" http://127.0.0.1:{p.listener}/onprem/hello
  curl -s -H "Authorization: Bearer $(curl -s 'http://127.0.0.1:{p.idp}/token?user=alice&idp=entra')" http://127.0.0.1:{p.listener}/entra/hello
  curl -s -i http://127.0.0.1:{p.listener}/hello
Logs: {stack.envoy_log}
""",
            flush=True,
        )
        while stack.envoy.poll() is None and stack.servers.poll() is None:
            time.sleep(0.5)
        print("a component exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
