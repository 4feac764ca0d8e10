"""`pp`, the operator's command: `pp assertion` makes, from the plugin's configuration and
a user's claims, exactly what the gateway would send: the assertion verifies with xmlsec1
and signxml, the development token server (which checks it as XSUAA does) exchanges it,
and the printout shows the request without a secret."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.parse
import uuid

import pytest

import stack
from conftest import PORTS
from test_signatures import signxml_verified_name_id, xmlsec1_verifies


def pp(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(stack.PP), *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def plugin_file(tmp_path_factory):
    """The test stack's plugin configuration, its keys in the environment as in Envoy."""
    path = tmp_path_factory.mktemp("pp") / "plugin.json"
    path.write_text(json.dumps(stack.plugin_config(PORTS, "test")))
    return path


def environment() -> dict:
    import os
    return {"PATH": os.environ.get("PATH", ""), **stack.key_environment()}


def test_every_command_explains_itself():
    overall = pp("--help")
    assert overall.returncode == 0 and "keys" in overall.stdout and "assertion" in overall.stdout
    for command in ("keys", "assertion", "check", "config"):
        result = pp(command, "--help")
        assert result.returncode == 0 and result.stdout.startswith(f"usage: pp {command}"), result
    unknown = pp("nope")
    assert unknown.returncode == 2 and "unknown command" in unknown.stderr


def test_the_assertion_is_the_gateways_and_the_token_server_takes_it(client, plugin_file, tmp_path):
    user = f"pp-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "assertion.xml"
    result = pp("assertion", "--config", str(plugin_file), "--destination", "dev",
                "--claims", json.dumps({"user_name": user, "email": f"{user}@example.com"}), "--out", str(out),
                env=environment())
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"<saml2:NameID Format=\"urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified\">{user}</saml2:NameID>" in text
    assert "(equals DigestValue)" in text
    # What the request carries, without a secret: the password, the key, the assertion.
    assert f"Basic <client \"{stack.CLIENT_ID}\", password not shown>" in text
    for secret in (stack.CLIENT_SECRET, *stack.key_environment().values()):
        assert secret.strip() not in text
    signed = out.read_bytes()
    assert base64.b64encode(signed).decode() not in text
    # pp check, with the destination's expectations (its issuer, audience, recipient,
    # NameID format and its key's certificate), passes it.
    checked = pp("check", "--config", str(plugin_file), "--destination", "dev", str(out), env=environment())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "all 17 rules pass" in checked.stdout
    assert f'pass  Recipient: "http://127.0.0.1:{PORTS.token}/oauth/token"' in checked.stdout
    # Independent verifiers, then the token server (signature, issuer, audience, recipient,
    # times, replay) in a real exchange.
    cert = stack.key_files("a")[1]
    assert xmlsec1_verifies(signed, cert)
    assert signxml_verified_name_id(signed, cert) == user
    form = urllib.parse.urlencode({"grant_type": "urn:ietf:params:oauth:grant-type:saml2-bearer",
                                   "assertion": base64.urlsafe_b64encode(signed).decode().rstrip("=")}).encode()
    basic = base64.b64encode(f"{stack.CLIENT_ID}:{stack.CLIENT_SECRET}".encode()).decode()
    status, _, body = client.call(f"http://127.0.0.1:{PORTS.token}/oauth/token", method="POST", data=form,
                                  headers={"Content-Type": "application/x-www-form-urlencoded",
                                           "Authorization": f"Basic {basic}"})
    assert status == 200, body
    assert client.exchanges(user) == 1


def test_a_destination_with_more_fields_shows_them_and_hides_configured_values(plugin_file):
    result = pp("assertion", "--config", str(plugin_file), "--destination", "sf",
                "--jwt", "x." + base64.urlsafe_b64encode(json.dumps({"email": "eve@example.com"}).encode())
                .decode().rstrip("=") + ".y", env=environment())
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert ">eve@example.com</saml2:NameID>" in text
    for shown in ("company_id=ACME", "scope=read write", f"client_id={stack.CLIENT_ID}",
                  "characters of base64>", "extra_field=<configured value, not shown>",
                  "X-Token-Test: <configured value, not shown>"):
        assert shown in text, shown


@pytest.mark.parametrize("args, problem", [
    (["--destination", "onprem", "--claims", "{}"], "is a PrincipalPropagation destination"),
    (["--destination", "entra", "--claims", "{}"], "takes its assertion from the identity provider"),
    (["--destination", "nope", "--claims", "{}"], "no destination \"nope\""),
    (["--destination", "dev", "--claims", "{}"], "the user: "),
    (["--destination", "dev", "--jwt", "not-a-jwt"], "--jwt is not a JWT"),
    (["--destination", "dev"], "give --claims or --jwt"),
])
def test_what_cannot_be_shown_is_said_plainly(plugin_file, args, problem):
    result = pp("assertion", "--config", str(plugin_file), *args, env=environment())
    assert result.returncode == 2
    assert problem in result.stderr, result.stderr


def test_keys_come_from_the_environment_as_in_envoy(plugin_file):
    result = pp("assertion", "--config", str(plugin_file), "--destination", "dev", "--claims", "{}",
                env={"PATH": ""})
    assert result.returncode == 2 and "not set in the Wasm VM" in result.stderr


def test_exchange_sends_the_request_and_shows_the_answer_without_its_token(client, plugin_file):
    import local_ca

    user = f"pp-x-{uuid.uuid4().hex[:8]}"
    claims = json.dumps({"user_name": user})
    result = pp("assertion", "--config", str(plugin_file), "--destination", "dev", "--claims", claims,
                "--exchange", "true", env=environment())
    assert result.returncode == 0, result.stderr
    answer = result.stdout.split("## The answer", 1)[1]
    assert "HTTP 200" in answer and '"token_type": "bearer"' in answer
    assert '"access_token": "<' in answer and "characters, not shown>" in answer
    assert client.exchanges(user) == 1
    # A refusal is shown as the token service gave it.
    refused = pp("assertion", "--config", str(plugin_file), "--destination", "reject", "--claims", claims,
                 "--exchange", "true", env=environment())
    assert refused.returncode == 0 and "HTTP 400" in refused.stdout and '"error": "invalid_grant"' in refused.stdout
    # Over TLS: verified against the given CA only; without it the handshake fails.
    ca = local_ca.ensure(stack.TLS_DIR).ca
    tls = pp("assertion", "--config", str(plugin_file), "--destination", "tls", "--claims", claims,
             "--exchange", "true", "--ca", str(ca), env=environment())
    assert tls.returncode == 0 and "HTTP 200" in tls.stdout, tls.stderr
    untrusted = pp("assertion", "--config", str(plugin_file), "--destination", "tls", "--claims", claims,
                   "--exchange", "true", env=environment())
    assert untrusted.returncode == 2 and "the exchange at https://localhost" in untrusted.stderr
