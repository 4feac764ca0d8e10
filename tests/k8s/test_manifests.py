"""The Kubernetes examples in envoy/ against the platforms' published CRD schemas
(envoy/schemas/), checked the way kube-apiserver checks a custom resource
(tests/k8s/validate.py): every real document passes, and broken variants of them fail
with exactly the error the API server would give."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import validate  # noqa: E402
from validate import RuleError, compile_rule, load_crds, load_documents  # noqa: E402

MANIFESTS = [ROOT / "envoy" / "istio.yaml", ROOT / "envoy" / "envoy-gateway.yaml"]
BROKEN = sorted((HERE / "broken").glob("*.yaml"))


def _documents():
    for path in MANIFESTS:
        for i, doc in enumerate(load_documents(path)):
            yield pytest.param(doc, id=f"{path.name}:{i + 1}:{doc['kind']}")


def real(kind):
    """A fresh copy of the first example document of that kind."""
    found = [d for path in MANIFESTS for d in load_documents(path) if d["kind"] == kind]
    assert found, kind
    return copy.deepcopy(found[0])


def test_every_kind_has_its_schema():
    kinds = {(d["apiVersion"].rpartition("/")[0], d["kind"]) for p in MANIFESTS for d in load_documents(p)}
    assert kinds == set(load_crds())


@pytest.mark.parametrize("doc", list(_documents()))
def test_example_document_is_valid(doc):
    assert validate.validate(doc) == []


# ---------------------------------------------------------------- broken variants

def _set(path, value):
    """A mutation that sets a field, given as a list of keys and indexes."""
    def mutate(doc):
        node = doc
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(doc):
        node = doc
        for step in path[:-1]:
            node = node[step]
        del node[path[-1]]
    return mutate


def _rewrite_to_exact_match(doc):
    rule = doc["spec"]["rules"][0]
    rule["matches"][0]["path"]["type"] = "Exact"
    rule["filters"][0]["urlRewrite"]["path"] = {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/odata/"}


def _duplicate_listener(doc):
    listeners = doc["spec"]["listeners"]
    listeners.append(dict(listeners[0], port=8443))


# After a blocking error (wrong type, missing required field, enum, maxLength, maxItems)
# the server, and validate.py, skip the CEL rules and say so.
CEL_SKIPPED = ("<root>: some validation rules were not checked because the object was invalid; "
               "correct the existing errors to complete validation")

BROKEN_VARIANTS = {
    "unknown-field": ("WasmPlugin", _set(["spec", "phse"], "AUTHZ"), [
        "spec.phse: unknown field 'phse' (not declared in the schema)"]),
    "unknown-top-level-field": ("ServiceEntry", _set(["specs"], {}), [
        "specs: unknown field 'specs' (not declared in the schema)"]),
    "unknown-metadata-field": ("Backend", _set(["metadata", "label"], {"a": "b"}), [
        "metadata.label: unknown field 'label'"]),
    "wrong-enum": ("WasmPlugin", _set(["spec", "phase"], "AUTHORIZATION"), [
        'spec.phase: Unsupported value: "AUTHORIZATION": supported values: '
        '"UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"', CEL_SKIPPED]),
    "wrong-enum-nested": ("DestinationRule", _set(["spec", "trafficPolicy", "tls", "mode"], "TLS"), [
        'spec.trafficPolicy.tls.mode: Unsupported value: "TLS": supported values: '
        '"DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"', CEL_SKIPPED]),
    "missing-required": ("ServiceEntry", _delete(["spec", "hosts"]), [
        "spec.hosts: Required value", CEL_SKIPPED]),
    "missing-required-nested": ("HTTPRoute", _delete(["spec", "rules", 0, "backendRefs", 0, "name"]), [
        "spec.rules[0].backendRefs[0].name: Required value", CEL_SKIPPED]),
    "missing-name": ("WasmPlugin", _delete(["metadata", "name"]), [
        "metadata.name: Required value: name is required", CEL_SKIPPED]),
    "invalid-name": ("SecurityPolicy", _set(["metadata", "name"], "Corporate_IdP"), [
        'metadata.name: Invalid value: "Corporate_IdP": must be a lowercase RFC 1123 subdomain']),
    "cel-rule": ("SecurityPolicy", _set(["spec", "jwt", "failOpen"], True), [
        'spec.jwt: Invalid value: "object": optional and failOpen cannot both be set; '
        "failOpen already tolerates a missing JWT"]),
    "cel-rule-required-by-type": ("EnvoyExtensionPolicy", _delete(["spec", "wasm", 0, "code", "image"]), [
        'spec.wasm[0].code: Invalid value: "object": If type is Image, image field needs to be set.']),
    "cel-url-scheme": ("WasmPlugin", _set(["spec", "url"], "ftp://registry.example.com/pp.wasm"), [
        'spec.url: Invalid value: "string": url must have schema one of [http, https, file, oci]']),
    "cel-url-jwks": ("RequestAuthentication", _set(["spec", "jwtRules", 0, "jwksUri"], "idp.example.com/jwks"), [
        'spec.jwtRules[0].jwksUri: Invalid value: "string": invalid URI for request '
        'evaluating rule: url(self).getScheme() in ["http", "https"]']),
    "cel-port-range": ("ServiceEntry", _set(["spec", "ports", 0, "number"], 70000), [
        'spec.ports[0].number: Invalid value: "integer": port must be between 1-65535']),
    # The match's path type is defaulted to PathPrefix, so only an explicit other type
    # breaks this rule (see test_defaults_apply_before_cel).
    "cel-after-defaults": ("HTTPRoute", _rewrite_to_exact_match, [
        'spec.rules[0]: Invalid value: "object": When using URLRewrite filter with '
        "path.replacePrefixMatch, exactly one PathPrefix match must be specified"]),
    "cel-and-list-map-duplicate": ("Gateway", _duplicate_listener, [
        'spec.listeners[1]: Duplicate value: {"name": "https"}',
        'spec.listeners: Invalid value: "array": Listener name must be unique within the Gateway']),
    "cel-escaped-property-names": ("HTTPRoute", _set(["spec", "parentRefs"], [
        {"name": "sap-gateway", "namespace": "a"}, {"name": "sap-gateway", "namespace": "a"}]), [
        'spec.parentRefs: Invalid value: "array": sectionName or port must be unique when '
        "parentRefs includes 2 or more references to the same parent"]),
    "wrong-type": ("ServiceEntry", _set(["spec", "ports", 0, "number"], "443"), [
        'spec.ports[0].number: Invalid value: "string": must be of type integer',
        CEL_SKIPPED]),
    "wrong-type-object": ("EnvoyProxy", _set(["spec", "provider", "kubernetes", "envoyDeployment", "container", "env"], {}), [
        'spec.provider.kubernetes.envoyDeployment.container.env: Invalid value: "object": must be of type array',
        CEL_SKIPPED]),
    "pattern": ("HTTPRoute", _set(["spec", "hostnames"], ["API.example.com"]), [
        'spec.hostnames[0]: Invalid value: "API.example.com": should match '
        r"'^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'"]),
    "max-length": ("GatewayClass", _set(["spec", "controllerName"], "example.com/" + "c" * 250), [
        "spec.controllerName: Too long: may not be more than 253 characters", CEL_SKIPPED]),
    "unserved-version": ("WasmPlugin", _set(["apiVersion"], "extensions.istio.io/v1"), [
        "apiVersion: extensions.istio.io/v1 is not a served version of WasmPlugin"]),
    "unknown-kind": ("Backend", _set(["kind"], "Backends"), [
        "kind: no schema for Backends in group 'gateway.envoyproxy.io' (not vendored in schemas/)"]),
}


@pytest.mark.parametrize("name", BROKEN_VARIANTS)
def test_broken_variant_is_rejected(name):
    kind, mutate, expected = BROKEN_VARIANTS[name]
    doc = real(kind)
    mutate(doc)
    assert validate.validate(doc) == expected


VALID_VARIANTS = {
    # Without the default `matches: [{path: {type: PathPrefix, value: /}}]` the rule on
    # spec.rules that counts matches (self[0].matches.size()) fails: no such key.
    "defaults-apply-before-cel": ("HTTPRoute", _delete(["spec", "rules", 0, "matches"])),
    # Two parents that differ only by namespace: the rules read it as
    # p1.__namespace__ (Kubernetes escapes CEL keywords); unescaped, they see the same
    # parent twice.
    "escaped-property-names": ("HTTPRoute", _set(["spec", "parentRefs"], [
        {"name": "sap-gateway", "namespace": "a"}, {"name": "sap-gateway", "namespace": "b"}])),
    # The server drops a null non-nullable field that has no default.
    "null-is-dropped": ("WasmPlugin", _set(["spec", "phase"], None)),
    # Not a URL by itself: the rule retries with http:// in front.
    "url-without-scheme": ("WasmPlugin", _set(["spec", "url"], "registry.example.com/pp:0.1.0")),
    # pluginConfig preserves unknown fields: anything goes below it.
    "preserve-unknown-fields": ("WasmPlugin", _set(["spec", "pluginConfig", "anything"], {"x": [1, None]})),
}


@pytest.mark.parametrize("name", VALID_VARIANTS)
def test_valid_variant_is_accepted(name):
    kind, mutate = VALID_VARIANTS[name]
    doc = real(kind)
    mutate(doc)
    assert validate.validate(doc) == []


def test_defaults_apply_before_cel():
    doc = real("HTTPRoute")
    rule = doc["spec"]["rules"][0]
    del rule["matches"]
    rule["filters"][0]["urlRewrite"]["path"] = {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/odata/"}
    assert validate.validate(doc) == []


EXPECT = re.compile(r"^# expect: (\d+): (.*)$", re.MULTILINE)


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.name)
def test_broken_manifest_file(path):
    expected = [(int(n), error) for n, error in EXPECT.findall(path.read_text())]
    assert expected, f"{path.name} lists no '# expect:' line"
    got = [(i + 1, error) for i, doc in enumerate(load_documents(path)) for error in validate.validate(doc)]
    assert got == expected


def _cli(*files):
    return subprocess.run([sys.executable, str(HERE / "validate.py"), *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def test_cli_accepts_the_examples():
    run = _cli(*MANIFESTS)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")


def test_cli_rejects_a_broken_manifest():
    run = _cli(HERE / "broken" / "istio.yaml")
    assert run.returncode == 1
    assert "spec.phse: unknown field 'phse'" in run.stdout


def test_duplicate_yaml_key_is_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("apiVersion: v1\nkind: X\nkind: Y\n")
    with pytest.raises(Exception, match="duplicate field 'kind'"):
        load_documents(path)


# ---------------------------------------------------------------- the CEL evaluator

def _schema_nodes():
    """Every schema node of every vendored CRD version (not inside values)."""
    for crd in load_crds().values():
        for version in crd["spec"]["versions"]:
            stack = [version["schema"]["openAPIV3Schema"]]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    yield node
                    stack.extend(v for k, v in node.items() if k not in ("default", "enum", "example"))
                elif isinstance(node, list):
                    stack.extend(node)


def _vendored_rules():
    for node in _schema_nodes():
        yield from node.get("x-kubernetes-validations") or []


def test_every_vendored_rule_compiles_with_known_functions():
    """Whatever field a manifest sets, its rules can run here: each rule (and message
    expression) parses, and every function it calls is in celpy or K8S_FUNCTIONS."""
    failures = []
    for rule in _vendored_rules():
        for text in (rule["rule"], rule.get("messageExpression")):
            if text:
                try:
                    compile_rule(text)
                except RuleError as e:
                    failures.append(str(e))
    assert failures == []


def test_every_vendored_pattern_compiles():
    """The server's Go regexp and RE2 share a syntax: each `pattern` compiles."""
    patterns = {node["pattern"] for node in _schema_nodes() if isinstance(node.get("pattern"), str)}
    assert patterns
    for pattern in patterns:
        validate._regex(pattern)


def test_a_rule_that_cannot_run_is_loud():
    crd = {"spec": {"group": "example.com", "names": {"kind": "Thing"}, "versions": [{
        "name": "v1", "served": True, "schema": {"openAPIV3Schema": {
            "type": "object", "properties": {"spec": {
                "type": "object", "x-kubernetes-preserve-unknown-fields": True,
                "x-kubernetes-validations": [{"rule": "quantity('1Gi').isGreaterThan(quantity('1'))"}],
            }}}}}]}}
    doc = {"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "t"}, "spec": {}}
    with pytest.raises(RuleError, match="not implemented here: isGreaterThan, quantity"):
        validate.validate(doc, {("example.com", "Thing"): crd})


def test_transition_rules_are_skipped():
    assert compile_rule("self == oldSelf")[1] is True
    assert compile_rule("self == 'x'")[1] is False


@pytest.mark.parametrize("text, ok, scheme", [
    ("https://idp.example.com/jwks", True, "https"),
    ("OCI://registry.example.com/pp:0.1.0", True, "oci"),
    ("file:///opt/pp.wasm", True, "file"),
    ("/opt/pp.wasm", True, ""),
    ("mailto:someone", True, "mailto"),
    ("http://[::1]:8080/x", True, "http"),
    ("https://bücher.example/", True, "https"),
    ("http://[::1]x/", False, None),
    ("registry.example.com/pp:0.1.0", False, None),
    ("http://host:port/", False, None),
    ("http://host name/", False, None),
    ("http://host/%zz", False, None),
    (":8080/x", False, None),
    ("", False, None),
])
def test_url_like_go_parse_request_uri(text, ok, scheme):
    assert validate._is_url(text) is ok
    if ok:
        assert validate._parse_request_uri(text).scheme == scheme


@pytest.mark.parametrize("text, seconds", [
    ("1h30m", 5400), ("0", 0), ("1.5s", 1.5), ("-2m", -120), ("300ms", 0.3), ("1us", 1e-6),
])
def test_duration_like_go(text, seconds):
    assert validate._duration(text).total_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "1d", "1h 30m", "h", ".s", "2562048h"])
def test_duration_rejects_what_go_rejects(text):
    with pytest.raises(ValueError):
        validate._duration(text)


@pytest.mark.parametrize("rule, value, result", [
    ("self.lowerAscii() == 'host'", "HoSt", True),
    ("self.upperAscii() == 'POST'", "post", True),
    ("self.trim() == ''", " \t", True),
    ('self.split("/")[0].size() < 253', "example.com/key", True),
    ('self.split("/", 1) == ["a/b"]', "a/b", True),
    ('self.substring(7, 8) == "/"', "unix:///run/x.sock", True),
    ('self.substring(7) == "/run"', "unix:///run", True),
    ("duration(self) >= duration('1ms')", "0.5ms", False),
    ('self.matches("^[a-z]+$")', "abc", True),
])
def test_added_functions(rule, value, result):
    program, _ = compile_rule(rule)
    assert program.evaluate({"self": validate._to_cel(value, {"type": "string"})}) == result


# ---------------------------------------------------------------- generic schema rules

THING = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "minLength": 2},
    "size": {"type": "integer", "minimum": 1, "exclusiveMaximum": True, "maximum": 10, "default": 5},
    "ratio": {"type": "number", "x-kubernetes-validations": [{"rule": "self < 1.0", "message": "below 1"}]},
    "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
    "ip": {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]},
    "note": {"type": "string", "nullable": True},
    "tags": {"type": "array", "maxItems": 2, "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "either": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
               "oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
    "notB": {"type": "object", "properties": {"b": {"type": "string"}}, "not": {"required": ["b"]}},
}, "x-kubernetes-validations": [
    {"rule": "has(self.size)", "message": "size is defaulted before this runs"},
    {"rule": "!has(self.name) || self.name != 'reserved'", "fieldPath": ".name", "reason": "FieldValueForbidden", "message": "reserved"},
]}


@pytest.mark.parametrize("spec, expected", [
    ({"name": "ok", "ratio": 0.5, "port": "http", "ip": "::1", "note": None, "tags": ["a", "b"],
      "labels": {"x": "y"}, "either": {"a": "1"}, "notB": {}}, []),
    ({"name": "ok", "port": 8080, "ratio": 0, "ip": "10.0.0.1"}, []),
    ({}, ["spec.name: Required value", CEL_SKIPPED]),
    ({"name": "x"}, ['spec.name: Invalid value: "x": should be at least 2 chars long']),
    ({"name": "ok", "size": 10}, ["spec.size: Invalid value: 10: should be less than 10"]),
    ({"name": "ok", "size": 0}, ["spec.size: Invalid value: 0: should be greater than or equal to 1"]),
    ({"name": "ok", "ratio": 2}, ['spec.ratio: Invalid value: "number": below 1']),
    ({"name": "ok", "port": True}, [
        'spec.port: Invalid value: "boolean": must be an integer or a string', CEL_SKIPPED]),
    ({"name": "ok", "ip": "10.0.0"}, [
        "spec.ip: Invalid value: must validate at least one schema (anyOf)",
        'spec.ip: Invalid value: "10.0.0": must be of format ipv4']),
    ({"name": "ok", "either": {}}, [
        "spec.either: Invalid value: must validate one and only one schema (oneOf)",
        "spec.either.a: Required value", CEL_SKIPPED]),
    ({"name": "ok", "tags": ["a", "a"]}, ['spec.tags[1]: Duplicate value: "a"']),
    ({"name": "ok", "tags": ["a", "b", "c"]}, ["spec.tags: Too many: 3: must have at most 2 items", CEL_SKIPPED]),
    ({"name": "ok", "labels": {"x": 1}}, [
        'spec.labels[x]: Invalid value: "integer": must be of type string', CEL_SKIPPED]),
    ({"name": "ok", "either": {"a": "1", "b": "2"}}, [
        "spec.either: Invalid value: must validate one and only one schema (oneOf)"]),
    ({"name": "ok", "notB": {"b": "1"}}, ["spec.notB: Invalid value: must not validate the schema (not)"]),
    ({"name": "reserved"}, ["spec.name: Forbidden: reserved"]),
    ({"name": "ok", "tags": [None]}, [
        'spec.tags[0]: Invalid value: "null": must be of type string', CEL_SKIPPED]),
])
def test_schema_rules(spec, expected):
    crd = {"spec": {"group": "example.com", "names": {"kind": "Thing"}, "versions": [{
        "name": "v1", "served": True, "schema": {"openAPIV3Schema": {
            "type": "object", "properties": {"spec": THING}}}}]}}
    doc = {"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "t"}, "spec": spec}
    assert validate.validate(doc, {("example.com", "Thing"): crd}) == expected


# ---------------------------------------------------------------- provenance

def test_vendored_schemas_name_their_source():
    files = sorted(validate.SCHEMA_DIR.glob("*.yaml"))
    readme = (validate.SCHEMA_DIR / "README.md").read_text()
    assert files
    for path in files:
        head = path.read_text()[:600]
        assert head.startswith("# Vendored"), path.name
        assert re.search(r"^# commit [0-9a-f]{40}$", head, re.MULTILINE), path.name
        assert path.name in readme, path.name
