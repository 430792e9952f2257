"""Issue 28: the shipped Grafana dashboard and Prometheus alerting rules (deploy/observability/),
proven with Debian's Prometheus and promtool against a real Envoy through a scripted outage.

The tests read the shipped files, so a panel or an alert added later is covered as it is: its query
must parse, and (in the live test) return data from the outage run of tests/outage.py. A panel on a
metric that run does not produce needs the run to produce it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

import prometheus_server as ps
from conftest import require_envoy
from harness import vm_failure_lines, wait_for

FAILING_OVER = "LLMFailoverFailingOver"
# What the issue asks the dashboard to show, as the metric families its panels must query.
REQUIRED_FAMILIES = {
    "llm_failover_requests", "llm_failover_attempts", "llm_failover_fallbacks", "llm_failover_retries",
    "llm_failover_exhausted", "llm_failover_cooldowns", "llm_failover_spillovers",
    "llm_failover_attempt_latency_ms_bucket", "llm_failover_tokens", "llm_failover_token_fetches",
    "llm_failover_cache_hits", "llm_failover_cache_misses", "llm_failover_limited", "llm_failover_affinity_probes",
}

# Families with an unlabelled total next to labelled series, and the label that tells them apart
# (docs/observability.md): a query must select one side, or a sum counts everything twice.
TOTAL_SPLIT = {"attempts": "target", "retries": "target", "fallbacks": "from", "requests": "route",
               "cache_hits": "route", "cache_misses": "route", "affinity_probes": "target"}
SPLIT_FAMILY = re.compile(r"\bllm_failover_(%s)\b(\{[^}]*\})?" % "|".join(TOTAL_SPLIT))


def require(tool: str) -> str:
    path = ps.prometheus_bin() if tool == "prometheus" else ps.promtool_bin()
    if path is None:
        msg = f"{tool} is missing (Debian package `prometheus`: `make setup` installs it)"
        if os.environ.get("CI") or os.environ.get("LLMF_REQUIRE_ENVOY"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([require("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def overlap(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


def alert_names(rules: dict) -> list[str]:
    return [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]


# ----------------------------------------------------------------------------------------------
# Offline: the files themselves


def test_the_alerting_rules_pass_promtool_and_each_alert_has_unit_tests():
    check = promtool("check", "rules", str(ps.RULES))
    assert check.returncode == 0, check.stdout + check.stderr

    unit = promtool("test", "rules", ps.RULES_TESTS.name, cwd=ps.RULES_TESTS.parent)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr

    tests = yaml.safe_load(ps.RULES_TESTS.read_text())
    assert tests["rule_files"] == [ps.RULES.name]
    tested = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]}
    fired = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"] if case["exp_alerts"]}
    names = alert_names(ps.load_rules())
    assert {"LLMFailoverFailingOver", "LLMFailoverChainExhausted", "LLMFailoverTargetCoolingRepeatedly",
            "LLMFailoverTokenRefreshFailing", "LLMFailoverNoRequests"} <= set(names)
    assert tested == fired == set(names), "every alert is unit-tested firing (and not firing)"


def test_the_prometheusrule_holds_the_rules_files_groups():
    [rule] = [d for d in yaml.safe_load_all(ps.PROMETHEUS_RULE.read_text()) if d]
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == ps.load_rules()["groups"]


def test_the_dashboard_is_importable_and_every_panel_has_a_query_that_parses():
    dash = ps.load_dashboard()
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "${%s}" % dash["__inputs"][0]["name"]

    ids = [p["id"] for p in dash["panels"]] + [p["id"] for r in dash["panels"] for p in r.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    panels = ps.panels(dash)
    assert len(panels) >= 10
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t.get("expr") for t in p["targets"]), f"{p['title']}: no query"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
    overlapping = [(a["title"], b["title"]) for i, a in enumerate(dash["panels"]) for b in dash["panels"][i + 1:]
                   if overlap(a["gridPos"], b["gridPos"])]
    assert overlapping == [], "panels (rows included) that cover each other"

    unscoped = [p["title"] for p in panels for t in p["targets"]
                if not ('job=~"$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"])]
    assert unscoped == [], "every query follows the job and Envoy selectors"

    queries = dict(ps.dashboard_queries(dash))
    double_counted = [(name, m.group(0)) for name, q in queries.items() for m in SPLIT_FAMILY.finditer(q)
                      if not re.search(rf'\b{TOTAL_SPLIT[m.group(1)]}!?=""', m.group(2) or "")]
    assert double_counted == [], "a selector that mixes the unlabelled total with the labelled series"
    families = {m for q in queries.values() for m in re.findall(r"\b(llm_failover_\w+)\{", q)}
    assert REQUIRED_FAMILIES <= families, sorted(REQUIRED_FAMILIES - families)

    parsed = ps.check_promql(queries)
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr
    assert f"SUCCESS: {len(queries)} rules found" in parsed.stdout


def test_a_broken_panel_query_is_refused_by_the_parse_check():
    parsed = ps.check_promql({"broken": 'sum by (target) (rate(llm_failover_attempts{target!=""}[5s])'})
    assert parsed.returncode != 0


def test_the_short_rules_of_the_live_test_differ_from_the_shipped_ones_only_in_windows_and_for():
    rules = ps.load_rules()
    short = ps.short_rules(rules)
    for long_rule, short_rule in zip([r for g in rules["groups"] for r in g["rules"]],
                                     [r for g in short["groups"] for r in g["rules"]]):
        assert re.sub(r"\[\w+\]", "[W]", long_rule["expr"]) == re.sub(r"\[\w+\]", "[W]", short_rule["expr"])
        assert re.findall(r"\[(\w+)\]", short_rule["expr"]) == ["10s"] * len(re.findall(r"\[\w+\]", long_rule["expr"]))
        assert short_rule.get("for") == ("1s" if "for" in long_rule else None)
        assert {k: v for k, v in long_rule.items() if k not in ("expr", "for")} == \
               {k: v for k, v in short_rule.items() if k not in ("expr", "for")}


# ----------------------------------------------------------------------------------------------
# Live: a real Prometheus scrapes a real Envoy through an outage


def at(series: list[dict], when: float, target: str) -> float:
    """The value of the series labelled target=`target` at the step nearest `when` (0 if none)."""
    for s in series:
        if s["metric"].get("target") == target:
            nearest = min(s["values"], key=lambda tv: abs(float(tv[0]) - when))
            if abs(float(nearest[0]) - when) <= 1.5:
                return float(nearest[1])
    return 0.0


def panel_series(prom, dash: dict, title: str, start: float, end: float, every: bool = False) -> list:
    """The series of the (first, or with `every` each) query of the panel whose title starts with
    `title`, over a time range."""
    [panel] = [p for p in ps.panels(dash) if p["title"].startswith(title)]
    values = ps.variable_values(dash)
    results = [prom.query_range(ps.substitute(t["expr"], values), start, end) for t in panel["targets"]]
    return results if every else results[0]


def peak(series: dict) -> float:
    return max(ps.finite([series]), default=0.0)


@pytest.mark.test_timeout(180)
def test_an_outage_of_the_primary_on_every_panel_and_the_failing_over_alert_fires_then_resolves():
    require("prometheus")
    require_envoy()
    from outage import BATCH_LIMIT, start_with_short_rules

    lab = start_with_short_rules()
    try:
        prom = lab.prometheus
        lab.run_traffic()
        healthy = lab.phase("healthy", 8)
        assert prom.alert_state(FAILING_OVER) == "inactive"

        # Before the outage (and out of the "Answers by target" checks below): a key over its limit,
        # and Responses API requests that probe for their owner.
        batch = lab.batch_over_its_limit()
        assert [(a.status, a.code) for a in batch] == \
               [(200, None)] * BATCH_LIMIT + [(429, "rate_limit_exceeded")] * (len(batch) - BATCH_LIMIT)
        moved = {"from": "openai", "to": "azure"}
        moved_before = lab.envoy.prometheus_value("llm_failover_fallbacks", **moved)
        probed = lab.follow_ups_from_another_replica()
        assert [(a.status, a.target, a.attempts) for a in probed] == [(200, "azure", "2")] * 2, probed
        # A "not found" that sends a probe on is an answer, not a failover: the fallbacks (and so
        # LLMFailoverFailingOver) do not move.
        assert lab.envoy.prometheus_value("llm_failover_fallbacks", **moved) == moved_before

        outage = lab.begin_outage()
        wait_for(lambda: prom.alert_state(FAILING_OVER) == "firing", timeout=30, interval=0.5,
                 what=f"{FAILING_OVER} firing")
        fired_at = time.time()
        firing = [a for a in prom.alerts() if a["labels"]["alertname"] == FAILING_OVER and a["state"] == "firing"]
        assert {a["labels"]["target"] for a in firing} == {"openai"}
        time.sleep(max(0.0, outage.start + 10 - time.time()))
        lab.end_outage()

        wait_for(lambda: prom.alert_state(FAILING_OVER) == "inactive", timeout=40, interval=0.5,
                 what=f"{FAILING_OVER} resolved")
        resolved_at = time.time()
        time.sleep(1.5)  # a last scrape and evaluation after the recovery
        end = time.time()

        # What the clients saw: OpenAI before and after, Azure during the outage, never an error.
        # (A request sent just before a change of phase may meet the next one: a margin of 1 s.)
        before, during, after = (lab.served_by(healthy.start, healthy.end - 1),
                                 lab.served_by(outage.start + 1, outage.end), lab.served_by(outage.end + 3, end))
        assert set(before) == {"openai", "cache"}, before
        assert set(during) == {"azure", "cache"}, during
        assert "openai" in after, after
        assert all(a.status == 200 for a in lab.answers)

        # Every panel's query returns data over the run.
        dash = ps.load_dashboard()
        queries = ps.dashboard_queries(dash)
        empty = [name for name, expr in queries if not ps.finite(prom.query_range(expr, healthy.start, end))]
        assert empty == [], f"panel queries without data: {empty}"

        # The limits panel shows the batch key's refusals; the probe panels, a "not found" from
        # OpenAI for each response found on Azure: half of the probe attempts.
        [limited] = panel_series(prom, dash, "Requests refused by limits", healthy.start, end)
        assert limited["metric"] == {"key": "batch", "kind": "requests"} and peak(limited) > 0
        probes = {s["metric"]["result"]: peak(s) for s in
                  panel_series(prom, dash, "Responses API owner probes by result", healthy.start, end)}
        assert probes["found"] > 0 and probes["not_found"] > 0 and probes["failed"] == probes["answered"] == 0
        of_all, of_probes = panel_series(prom, dash, "Owner probes: extra attempts", healthy.start, end, every=True)
        assert 0 < peak(of_all[0]) < 0.5
        assert pytest.approx(0.5) in ps.finite(of_probes), "a window with both probes: one of two attempts"

        # "Who serves now" shows the outage: OpenAI, then Azure, then OpenAI again.
        [who] = [p for p in ps.panels(dash) if p["title"].startswith("Answers by target")]
        serving = prom.query_range(ps.substitute(who["targets"][0]["expr"], ps.variable_values(dash)),
                                   healthy.start, end)
        assert at(serving, healthy.end - 0.5, "openai") > 0 and at(serving, healthy.end - 0.5, "azure") == 0
        assert at(serving, outage.end - 0.5, "azure") > 0 and at(serving, outage.end - 0.5, "openai") == 0
        assert at(serving, resolved_at, "openai") > 0

        # The alert's history in Prometheus: firing for openai during the outage, not after.
        history = prom.query_range(f'ALERTS{{alertname="{FAILING_OVER}", alertstate="firing"}}', healthy.start, end)
        assert [s["metric"]["target"] for s in history] == ["openai"]
        times = [float(t) for t, _ in history[0]["values"]]
        assert outage.start < min(times) <= fired_at + 1 and max(times) < resolved_at + 1

        # The other alerts on the same run: OpenAI cooled again and again (a 2 s cooldown, 10 s window);
        # no client got an error, every token was fetched, and traffic never stopped.
        fired = {(s["metric"]["alertname"], s["metric"].get("target")) for s in
                 prom.query_range('ALERTS{alertstate="firing"}', outage.start, end)}
        assert ("LLMFailoverTargetCoolingRepeatedly", "openai") in fired
        assert {name for name, _ in fired} <= {FAILING_OVER, "LLMFailoverTargetCoolingRepeatedly"}

        assert lab.leaks() == []
    finally:
        lab.stop()
    assert vm_failure_lines(lab.envoy.log_text) == []
