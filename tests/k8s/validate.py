"""Validate Kubernetes manifests against the vendored CRD schemas in envoy/schemas/.

It does what kube-apiserver does with a custom resource on create, with strict field
validation (`kubectl apply --validate=strict`), in the same order:

1. pick the CRD version (group, version, kind; the version must be served);
2. report fields the schema does not declare (the server would prune them; strict
   validation rejects them), and drop them;
3. drop nulls of non-nullable fields that have no default, then apply `default`s;
4. check the value against the OpenAPI schema (types, enums, bounds, patterns, ...),
   metadata's basic rules, and the uniqueness of `x-kubernetes-list-type` set/map lists;
5. unless step 4 found an error that the server deems blocking (a wrong type, a
   missing required field, a value not in the enum, too long or too many), evaluate
   every `x-kubernetes-validations` CEL rule, with `self` bound to the node's value.

`validate(doc)` returns a list of "path: message" strings, empty for a valid document.
Command line: `python tests/k8s/validate.py FILE...` prints the errors, exit status 1.

Not modelled: admission webhooks and policies (istiod's validation, Gateway API's
ValidatingAdmissionPolicy), update-only checks (transition rules, ratcheting) and CEL
cost limits.
"""

from __future__ import annotations

import base64
import copy
import datetime
import functools
import ipaddress
import json
import math
import re
import sys
from pathlib import Path

import celpy
import celpy.celtypes as ct
import celpy.evaluation
import lark
import re2
import yaml

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "envoy" / "schemas"


# ---------------------------------------------------------------- loading YAML


class _StrictLoader(yaml.CSafeLoader):
    """YAML as the API server reads it: duplicate keys are an error (strict field
    validation rejects them; PyYAML would silently keep the last one), and dates stay
    strings (sigs.k8s.io/yaml does not turn them into timestamps)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate field {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.CSafeLoader.yaml_implicit_resolvers.items()
}


def load_documents(path) -> list:
    """The non-empty YAML documents of a manifest file."""
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=_StrictLoader) if d is not None]


@functools.cache
def load_crds(schema_dir: Path = SCHEMA_DIR) -> dict:
    """CRDs in schema_dir, by (group, kind)."""
    crds = {}
    for path in sorted(Path(schema_dir).glob("*.yaml")):
        with open(path, encoding="utf-8") as f:
            for doc in yaml.load_all(f, Loader=yaml.CSafeLoader):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    spec = doc["spec"]
                    crds[(spec["group"], spec["names"]["kind"])] = doc
    return crds


# ---------------------------------------------------------------- errors and paths


class _Errors(list):
    """Error strings, plus whether one of them blocks the CEL rules: the server skips
    them when the object lacks the shape they were written for (its hasBlockingErr:
    a wrong type, a missing required field, an enum, maxLength or maxItems violation)."""

    blocking = False

    def add(self, path, message, blocking=False):
        self.append(f"{path or '<root>'}: {message}")
        self.blocking |= blocking


def _field(path, name):
    return f"{path}.{name}" if path else name


def _key(path, name):
    return f"{path}[{name}]"


def _json(value):
    return json.dumps(value, sort_keys=True, default=str)


def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


# ---------------------------------------------------------------- entry point


def validate(doc, crds: dict | None = None) -> list[str]:
    """Errors of one parsed manifest document, each "json.path: message"."""
    crds = load_crds() if crds is None else crds
    errs = _Errors()
    if not isinstance(doc, dict):
        errs.add("", f"a manifest document must be an object, not {_json_type(doc)}")
        return list(errs)
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not api_version:
        errs.add("apiVersion", "Required value")
    if not isinstance(kind, str) or not kind:
        errs.add("kind", "Required value")
    if errs:
        return list(errs)
    group, _, version = api_version.rpartition("/")
    crd = crds.get((group, kind))
    if crd is None:
        errs.add("kind", f"no schema for {kind} in group {group!r} (not vendored in {SCHEMA_DIR.name}/)")
        return list(errs)
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    if not served:
        errs.add("apiVersion", f"{api_version} is not a served version of {kind}")
        return list(errs)
    schema = served[0]["schema"]["openAPIV3Schema"]

    obj = copy.deepcopy(doc)
    obj.pop("status", None)  # a subresource: not part of what is created
    _prune_unknown(obj, schema, "", errs, embedded=True)
    _prune_nulls(obj, schema)
    _apply_defaults(obj, schema)
    _check_metadata(obj.get("metadata"), errs)
    _check(obj, schema, "", errs, root=True)
    _check_list_types(obj, schema, "", errs)
    if errs.blocking:
        errs.add("", "some validation rules were not checked because the object was invalid; "
                     "correct the existing errors to complete validation")
    else:
        _check_rules(obj, schema, "", errs)
    return list(errs)


# ---------------------------------------------------------------- step 2 and 3


_OBJECT_META = {"apiVersion", "kind", "metadata"}


def _prune_unknown(value, schema, path, errs, embedded=False):
    """Report (and drop) object fields not declared by the structural schema: walked by
    properties, additionalProperties and items only, like the server's pruning."""
    if not schema:
        return
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        embedded = embedded or schema.get("x-kubernetes-embedded-resource")
        for k in list(value):
            if embedded and k in _OBJECT_META:
                continue  # checked by _check_metadata, not by the schema
            if k in props:
                _prune_unknown(value[k], props[k], _field(path, k), errs)
            elif isinstance(extra, dict):
                _prune_unknown(value[k], extra, _key(path, k), errs)
            elif not (extra is True or schema.get("x-kubernetes-preserve-unknown-fields")):
                errs.add(_field(path, k), f"unknown field {k!r} (not declared in the schema)")
                del value[k]
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _prune_unknown(item, schema["items"], _key(path, i), errs)


def _child_schema(schema, key):
    if not schema:
        return None
    props = schema.get("properties") or {}
    if key in props:
        return props[key]
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def _prune_nulls(value, schema):
    """Drop null object fields that are neither nullable nor defaulted: the server
    treats them as absent (apiextensions' PruneNonNullableNullsWithoutDefaults)."""
    if isinstance(value, dict):
        for k in list(value):
            sub = _child_schema(schema, k)
            if value[k] is None and sub is not None and not sub.get("nullable") and "default" not in sub:
                del value[k]
            else:
                _prune_nulls(value[k], sub)
    elif isinstance(value, list):
        for item in value:
            _prune_nulls(item, (schema or {}).get("items"))


def _apply_defaults(value, schema):
    """Fill absent (or non-nullable null) fields with their schema `default`, before
    validation and CEL, as the server's structural defaulting does."""
    if not schema:
        return
    if isinstance(value, dict):
        for k, sub in (schema.get("properties") or {}).items():
            if "default" in sub and (k not in value or value[k] is None and not sub.get("nullable")):
                value[k] = copy.deepcopy(sub["default"])
        for k in value:
            _apply_defaults(value[k], _child_schema(schema, k))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        items = schema["items"]
        for i in range(len(value)):
            if value[i] is None and "default" in items and not items.get("nullable"):
                value[i] = copy.deepcopy(items["default"])
            _apply_defaults(value[i], items)


# ---------------------------------------------------------------- step 4: metadata

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_META_FIELDS = {
    "name", "generateName", "namespace", "labels", "annotations", "finalizers",
    "ownerReferences", "uid", "resourceVersion", "generation", "creationTimestamp",
    "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink",
}


def _qualified_name_error(key):
    """Label and annotation keys: an optional DNS-subdomain prefix and '/', then a
    name of at most 63 characters."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and not (len(prefix) <= 253 and _DNS1123_SUBDOMAIN.fullmatch(prefix)):
        return "prefix must be a DNS-1123 subdomain"
    if not (0 < len(name) <= 63 and _QUALIFIED_NAME.fullmatch(name)):
        return "name part must be at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
    return None


def _check_metadata(meta, errs):
    """The basic ObjectMeta checks kube-apiserver makes on a custom resource."""
    if not isinstance(meta, dict):
        errs.add("metadata", "Required value" if meta is None else "must be an object", blocking=True)
        return
    for k in meta:
        if k not in _META_FIELDS:
            errs.add(_field("metadata", k), f"unknown field {k!r}")
    name = meta.get("name")
    if not name:
        errs.add("metadata.name", "Required value: name is required", blocking=True)
    elif not (isinstance(name, str) and len(name) <= 253 and _DNS1123_SUBDOMAIN.fullmatch(name)):
        errs.add("metadata.name", f"Invalid value: {_json(name)}: must be a lowercase RFC 1123 subdomain")
    ns = meta.get("namespace")
    if ns is not None and not (isinstance(ns, str) and len(ns) <= 63 and _DNS1123_LABEL.fullmatch(ns)):
        errs.add("metadata.namespace", f"Invalid value: {_json(ns)}: must be a lowercase RFC 1123 label")
    for field in ("labels", "annotations"):
        entries = meta.get(field)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            errs.add(_field("metadata", field), "must be a map of strings")
            continue
        for k, v in entries.items():
            path = _key(_field("metadata", field), k)
            problem = _qualified_name_error(k) if isinstance(k, str) else "key must be a string"
            if problem:
                errs.add(path, f"Invalid value: {_json(k)}: {problem}")
            if not isinstance(v, str):
                errs.add(path, f"Invalid value: {_json(v)}: must be a string")
            elif field == "labels" and not (len(v) <= 63 and _LABEL_VALUE.fullmatch(v)):
                errs.add(path, f"Invalid value: {_json(v)}: not a valid label value")


# ---------------------------------------------------------------- step 4: the schema


def _is_integer(value):
    # A JSON number with no fraction is an integer (1.0 decodes as one).
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or isinstance(value, float) and value.is_integer()


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": _is_integer,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def _same(a, b):
    """JSON equality: Python's has True == 1 and 1 == 1.0 where JSON has not."""
    return _json_type(a) == _json_type(b) and _json(a) == _json(b) or (
        _is_integer(a) and _is_integer(b) and a == b)


@functools.cache
def _regex(pattern):
    # The server matches with Go's regexp (RE2 syntax, unanchored search).
    return re2.compile(pattern)


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _format_error(fmt, value):
    """The string formats the vendored CRDs use; the server ignores formats it does
    not know, and so does this."""
    try:
        if fmt == "byte":
            base64.b64decode(value, validate=True)
        elif fmt == "date-time":
            if not _RFC3339.fullmatch(value):
                return "must be an RFC 3339 date-time"
            datetime.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        elif fmt == "ipv4":
            ipaddress.IPv4Address(value)
        elif fmt == "ipv6":
            ipaddress.IPv6Address(value)
    except ValueError:
        return f"must be of format {fmt}"
    return None


def _check(value, schema, path, errs, root=False):
    """kube-openapi's validation of one value against one (sub)schema."""
    if value is None and (schema.get("nullable") or not schema):
        return
    if schema.get("x-kubernetes-int-or-string") and not (
            isinstance(value, str) or _is_integer(value)):
        errs.add(path, f'Invalid value: "{_json_type(value)}": must be an integer or a string', blocking=True)
        return
    expected = schema.get("type")
    if expected and not _TYPES[expected](value):
        errs.add(path, f'Invalid value: "{_json_type(value)}": must be of type {expected}', blocking=True)
        return
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        supported = ", ".join(_json(e) for e in schema["enum"])
        errs.add(path, f"Unsupported value: {_json(value)}: supported values: {supported}", blocking=True)

    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errs.add(path, f"Too long: may not be more than {schema['maxLength']} characters", blocking=True)
        if "minLength" in schema and len(value) < schema["minLength"]:
            errs.add(path, f"Invalid value: {_json(value)}: should be at least {schema['minLength']} chars long")
        if "pattern" in schema and not _regex(schema["pattern"]).search(value):
            errs.add(path, f"Invalid value: {_json(value)}: should match '{schema['pattern']}'")
        problem = _format_error(schema.get("format"), value)
        if problem:
            errs.add(path, f"Invalid value: {_json(value)}: {problem}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(value, schema, path, errs)
    elif isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errs.add(path, f"Too many: {len(value)}: must have at most {schema['maxItems']} items", blocking=True)
        if "minItems" in schema and len(value) < schema["minItems"]:
            errs.add(path, f"Invalid value: {len(value)} items: should have at least {schema['minItems']} items")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                _check(item, schema["items"], _key(path, i), errs)
    elif isinstance(value, dict):
        _check_object(value, schema, path, errs, root)

    _check_combinators(value, schema, path, errs)


def _check_number(value, schema, path, errs):
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and (value <= low if schema.get("exclusiveMinimum") else value < low):
        op = "greater than" if schema.get("exclusiveMinimum") else "greater than or equal to"
        errs.add(path, f"Invalid value: {_json(value)}: should be {op} {low}")
    if high is not None and (value >= high if schema.get("exclusiveMaximum") else value > high):
        op = "less than" if schema.get("exclusiveMaximum") else "less than or equal to"
        errs.add(path, f"Invalid value: {_json(value)}: should be {op} {high}")
    step = schema.get("multipleOf")
    if step and not math.isclose(value / step, round(value / step)):
        errs.add(path, f"Invalid value: {_json(value)}: should be a multiple of {step}")


def _check_object(value, schema, path, errs, root):
    props = schema.get("properties") or {}
    for name in schema.get("required") or []:
        if name not in value:
            errs.add(_field(path, name), "Required value", blocking=True)
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        errs.add(path, f"Too many: {len(value)}: must have at most {schema['maxProperties']} properties", blocking=True)
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        errs.add(path, f"Invalid value: should have at least {schema['minProperties']} properties")
    extra = schema.get("additionalProperties")
    for k, v in value.items():
        if root and k in _OBJECT_META:
            continue  # apiVersion and kind chose this schema; metadata has its own checks
        if k in props:
            _check(v, props[k], _field(path, k), errs)
        elif isinstance(extra, dict):
            _check(v, extra, _key(path, k), errs)


def _check_combinators(value, schema, path, errs):
    """allOf / anyOf / oneOf / not: in a structural schema they only add value checks.
    When no alternative passes, kube-openapi adds the errors of the one that came
    closest (here: the one with the fewest errors), and they may block CEL."""
    def errors_of(sub):
        sub_errs = _Errors()
        _check(value, sub, path, sub_errs)
        return sub_errs

    def merge(sub_errs):
        errs.extend(sub_errs)
        errs.blocking |= sub_errs.blocking

    for sub in schema.get("allOf") or []:
        merge(errors_of(sub))
    for keyword, wording in (("anyOf", "at least one schema"), ("oneOf", "one and only one schema")):
        if not schema.get(keyword):
            continue
        results = [errors_of(sub) for sub in schema[keyword]]
        passed = sum(not r for r in results)
        if passed == 0 or keyword == "oneOf" and passed > 1:
            errs.add(path, f"Invalid value: must validate {wording} ({keyword})")
        if passed == 0:
            merge(min(results, key=len))
    if "not" in schema and not errors_of(schema["not"]):
        errs.add(path, "Invalid value: must not validate the schema (not)")


def _check_list_types(value, schema, path, errs):
    """x-kubernetes-list-type: set lists have unique items, map lists unique keys."""
    if not schema:
        return
    if isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen = set()
        for i, item in enumerate(value):
            if kind == "set":
                identity = _json(item)
            elif kind == "map" and isinstance(item, dict):
                identity = _json({k: item.get(k) for k in keys})
            else:
                identity = None
            if identity is not None:
                if identity in seen:
                    errs.add(_key(path, i), f"Duplicate value: {identity}")
                seen.add(identity)
            _check_list_types(item, schema.get("items"), _key(path, i), errs)
    elif isinstance(value, dict):
        for k, v in value.items():
            sub = _child_schema(schema, k)
            _check_list_types(v, sub, _field(path, k) if k in (schema.get("properties") or {}) else _key(path, k), errs)


# ---------------------------------------------------------------- step 5: CEL


class _URL:
    """The value of Kubernetes' CEL `url(string)`."""

    def __init__(self, scheme, host, path, query):
        self.scheme, self.host, self.path, self.query = scheme, host, path, query


# ASCII that Go accepts in a host (non-ASCII passes); '%' escapes are checked apart.
_HOST_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
               "-._~!$&'()*+,;=:[]<>\"%")


def _parse_request_uri(text):
    """Go's url.ParseRequestURI, which Kubernetes' isURL() and url() use: an absolute
    URI or an absolute path. Raises ValueError where Go returns an error."""
    if not text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError("empty URL or control character in URL")
    if text == "*":
        return _URL("", "", "*", "")
    scheme, rest = "", text
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", text)
    if text.startswith(":"):
        raise ValueError("missing protocol scheme")
    if m:
        scheme, rest = m.group(1).lower(), text[m.end():]
    rest, _, query = rest.partition("?")
    if not rest.startswith("/"):
        if scheme:
            return _URL(scheme, "", rest, query)  # opaque, like mailto:x
        raise ValueError("invalid URI for request")
    host = ""
    if scheme and rest.startswith("//"):
        authority, slash, rest = rest[2:].partition("/")
        rest = slash + rest
        host = authority.rpartition("@")[2]
        if host.startswith("["):
            if "]" not in host:
                raise ValueError("missing ']' in host")
            port = host[host.rindex("]") + 1:]
        else:
            port = host[host.rindex(":"):] if ":" in host else ""
        if not re.fullmatch(r"(:[0-9]*)?", port):
            raise ValueError(f"invalid port {port!r} after host")
        if any(c not in _HOST_OK for c in host if c < "\x80"):
            raise ValueError("invalid character in host name")
    for part in (host, rest):  # percent escapes must be well-formed
        if re.search(r"%(?![0-9A-Fa-f]{2})", part):
            raise ValueError("invalid URL escape")
    return _URL(scheme, host, rest, query)


def _cel_bool(fn):
    return lambda *args: ct.BoolType(fn(*args))


def _is_url(text):
    try:
        _parse_request_uri(str(text))
        return True
    except ValueError:
        return False


def _substring(s, start, end=None):
    """strings extension: code-point indices, an error when out of range."""
    end = len(s) if end is None else int(end)
    if not 0 <= int(start) <= end <= len(s):
        raise ValueError(f"substring({start}, {end}) out of range for a string of length {len(s)}")
    return ct.StringType(s[int(start):end])


def _split(s, sep, limit=None):
    """strings extension: limit < 0 is no limit, 0 is an empty list, n at most n parts."""
    if limit is not None and int(limit) == 0:
        return ct.ListType([])
    parts = s.split(sep, -1 if limit is None or int(limit) < 0 else int(limit) - 1) if sep else list(s)
    return ct.ListType([ct.StringType(p) for p in parts])


_GO_UNITS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9,
             "m": 60 * 10**9, "h": 3600 * 10**9}
_GO_DURATION = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")


def _duration(value):
    """CEL's duration(string), which parses like Go's time.ParseDuration ("1h30m",
    "0.5s", "0"); celpy's own accepts days and rejects "0". Sub-microsecond parts are
    lost (Python's timedelta)."""
    if isinstance(value, ct.DurationType):
        return value
    text = str(value)
    sign, body = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
    if body == "0":
        return ct.DurationType(0)
    nanos, pos = 0, 0
    for m in _GO_DURATION.finditer(body):
        if m.start() != pos or m.group(1) in ("", "."):
            break
        nanos += round(float(m.group(1)) * _GO_UNITS[m.group(2)])
        pos = m.end()
    if not body or pos != len(body):
        raise ValueError(f"invalid duration {text!r}")
    if nanos > 2**63 - 1:
        raise ValueError(f"duration {text!r} out of range")
    return ct.DurationType(datetime.timedelta(microseconds=sign * nanos // 1000))


# The Kubernetes CEL library functions the vendored CRDs use that celpy lacks (or has
# with other semantics). tests/k8s/test_manifests.py checks that every function any
# vendored rule calls is either here or in celpy.
K8S_FUNCTIONS = {
    "duration": _duration,
    # Kubernetes URL library
    "isURL": _cel_bool(_is_url),
    "url": lambda s: _parse_request_uri(str(s)),
    "getScheme": lambda u: ct.StringType(u.scheme),
    # cel-go strings extension
    "lowerAscii": lambda s: ct.StringType(re.sub(r"[A-Z]+", lambda m: m.group().lower(), s)),
    "upperAscii": lambda s: ct.StringType(re.sub(r"[a-z]+", lambda m: m.group().upper(), s)),
    "trim": lambda s: ct.StringType(s.strip()),
    "split": _split,
    "substring": _substring,
}
_MACROS = {"has", "all", "exists", "exists_one", "map", "filter"}
KNOWN_FUNCTIONS = set(celpy.evaluation.base_functions) | set(K8S_FUNCTIONS) | _MACROS


class RuleError(Exception):
    """A rule that this evaluator cannot compile."""


_env = celpy.Environment()


def _function_names(ast):
    for node in ast.iter_subtrees():
        if node.data in ("member_dot_arg", "ident_arg", "dot_ident_arg"):
            yield next(c.value for c in node.children if isinstance(c, lark.Token) and c.type == "IDENT")


@functools.cache
def compile_rule(rule: str):
    """(program, uses oldSelf) for a rule; RuleError when it cannot be run here,
    including calls to functions neither celpy nor K8S_FUNCTIONS provide (celpy would
    only notice those when it reaches the call)."""
    try:
        ast = _env.compile(rule)
    except celpy.CELParseError as e:
        raise RuleError(f"cannot compile CEL rule {rule!r}: {e}") from e
    unknown = sorted(set(_function_names(ast)) - KNOWN_FUNCTIONS)
    if unknown:
        raise RuleError(f"CEL rule {rule!r} calls functions not implemented here: {', '.join(unknown)}")
    uses_old_self = any(t.type == "IDENT" and t.value == "oldSelf"
                        for t in ast.scan_values(lambda v: isinstance(v, lark.Token)))
    return _env.program(ast, functions=K8S_FUNCTIONS), uses_old_self


_CEL_RESERVED = {"true", "false", "null", "in", "as", "break", "const", "continue", "else",
                 "for", "function", "if", "import", "let", "loop", "package", "namespace",
                 "return", "var", "void", "while"}


def _escape(name):
    """How Kubernetes exposes a property to CEL: reserved words and '__', '.', '-', '/'
    are escaped (a property "x-y" is self.x__dash__y; Gateway API's rules read a
    parentRef's namespace as p.__namespace__)."""
    if name in _CEL_RESERVED:
        return f"__{name}__"
    for raw, escaped in (("__", "__underscores__"), (".", "__dot__"), ("-", "__dash__"), ("/", "__slash__")):
        name = name.replace(raw, escaped)
    return name


def _to_cel(value, schema):
    """A value as the server gives it to CEL: typed by the schema (an integer in a
    `number` field is a double, `format: byte` is bytes, `date-time` a timestamp)."""
    schema = schema or {}
    if value is None:
        return None
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        return ct.MapType({
            ct.StringType(_escape(k) if k in props else k): _to_cel(v, _child_schema(schema, k))
            for k, v in value.items()})
    if isinstance(value, list):
        return ct.ListType([_to_cel(v, schema.get("items")) for v in value])
    if isinstance(value, bool):
        return ct.BoolType(value)
    if isinstance(value, (int, float)):
        if schema.get("type") == "number":
            return ct.DoubleType(value)
        return ct.IntType(int(value)) if _is_integer(value) else ct.DoubleType(value)
    fmt = schema.get("format") if schema.get("type") == "string" else None
    try:
        if fmt == "byte":
            return ct.BytesType(base64.b64decode(value, validate=True))
        if fmt in ("date", "date-time", "datetime"):
            return ct.TimestampType(value)
        if fmt == "duration":
            return _duration(value)
    except ValueError:
        pass  # a malformed value: the format check has reported it
    return ct.StringType(value)


def _check_rules(value, schema, path, errs):
    """Evaluate each x-kubernetes-validations rule where the value is present."""
    if not schema or value is None:
        return
    rules = schema.get("x-kubernetes-validations") or []
    if rules:
        self_value = _to_cel(value, schema)
        kind = schema.get("type") or _json_type(value)
        for rule in rules:
            _check_rule(rule, self_value, kind, path, errs)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for k, v in value.items():
            _check_rules(v, _child_schema(schema, k), _field(path, k) if k in props else _key(path, k), errs)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_rules(item, schema.get("items"), _key(path, i), errs)


_REASONS = {"FieldValueForbidden": "Forbidden", "FieldValueRequired": "Required value",
            "FieldValueDuplicate": "Duplicate value"}


def _check_rule(rule, self_value, kind, path, errs):
    """One rule; errors are worded as the server words them."""
    program, uses_old_self = compile_rule(rule["rule"])
    if uses_old_self:
        return  # a transition rule: only checked on update
    where = (path + rule.get("fieldPath", "")).lstrip(".")  # fieldPath: ".x.y", relative
    try:
        result = program.evaluate({"self": self_value})
    except celpy.CELEvalError as e:
        result = e
    if isinstance(result, celpy.CELEvalError):
        errs.add(where, f'Invalid value: "{kind}": {_cel_error(result)} evaluating rule: {rule["rule"]}')
        return
    if not isinstance(result, ct.BoolType):
        errs.add(where, f'Invalid value: "{kind}": rule did not evaluate to a bool: {rule["rule"]}')
        return
    if result:
        return
    message = rule.get("message") or f"failed rule: {rule['rule']}"
    if rule.get("messageExpression"):
        try:
            message = str(compile_rule(rule["messageExpression"])[0].evaluate({"self": self_value}))
        except (celpy.CELEvalError, RuleError):
            pass  # the server too falls back to message
    prefix = _REASONS.get(rule.get("reason"), f'Invalid value: "{kind}"')
    errs.add(where, f"{prefix}: {message}")


def _cel_error(error):
    """The message of a celpy evaluation error, or of the exception that caused it
    (such as url()'s ValueError), e.g. "no such member in mapping: 'x'"."""
    cause = error.args[2] if len(error.args) > 2 else None
    if isinstance(cause, tuple) and cause:
        return str(cause[0])
    return str(cause or error.args[0])


# ---------------------------------------------------------------- CLI


def main(argv):
    if not argv:
        print("usage: python tests/k8s/validate.py FILE...", file=sys.stderr)
        return 2
    failed = False
    for path in argv:
        try:
            docs = load_documents(path)
        except (OSError, yaml.YAMLError) as e:
            print(f"{path}: {e}")
            failed = True
            continue
        for i, doc in enumerate(docs):
            label = f"{path}: document {i + 1}"
            if isinstance(doc, dict):
                meta = doc.get("metadata")
                label += f" ({doc.get('kind')} {meta.get('name') if isinstance(meta, dict) else None})"
            try:
                errors = validate(doc)
            except RuleError as e:
                print(f"{label}: cannot check: {e}")
                return 2
            for error in errors:
                print(f"{label}: {error}")
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
