"""The alert rules (envoy/prometheus-rules.yaml) and their promtool tests are written
against what a gateway really exposes: every metric a rule uses, and every series the
rules' tests feed in (name and label names), appears in a running Envoy's
/stats/prometheus, with the example's stats tags."""

from __future__ import annotations

import re

import yaml

from conftest import ROOT

SERIES = re.compile(r"^([a-z_:][a-z0-9_:]*)\{([^}]*)\}")


def exposition(client) -> dict[str, set[frozenset[str]]]:
    """Metric name -> the sets of label names its series carry."""
    text = client.call(f"http://127.0.0.1:{client.ports.admin}/stats/prometheus")[2].decode()
    found: dict[str, set[frozenset[str]]] = {}
    for line in text.splitlines():
        match = SERIES.match(line)
        if match:
            labels = frozenset(p.split("=")[0] for p in match.group(2).split(",") if p)
            found.setdefault(match.group(1), set()).add(labels)
    return found


def test_the_rules_use_metrics_a_gateway_exposes_as_their_tests_feed_them(client):
    # A request first, so that every counter the plugin declares has been reported.
    client.gateway("/hello", client.jwt("alerts"))
    exposed = exposition(client)
    rules = yaml.safe_load((ROOT / "envoy" / "prometheus-rules.yaml").read_text())
    used = {name for group in rules["groups"] for rule in group["rules"]
            for name in re.findall(r"principal_propagation_[a-z_]+", rule["expr"])}
    assert used, "the rules use the plugin's metrics"
    assert used <= set(exposed), sorted(used - set(exposed))
    tests = yaml.safe_load((ROOT / "tests" / "prometheus" / "rules_test.yaml").read_text())
    for case in tests["tests"]:
        for series in case["input_series"]:
            name, labels = SERIES.match(series["series"]).groups()
            names = frozenset(p.split("=")[0] for p in labels.split(",")) - {"instance"}
            assert names in exposed.get(name, set()), (name, names, exposed.get(name))
    # The certificate gauges carry their key and slot as labels.
    assert frozenset({"key", "slot"}) in exposed["principal_propagation_certificate_days_left"]
