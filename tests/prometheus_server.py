"""A real Prometheus (Debian's `prometheus` package) for tests, and what the tests do with the shipped
dashboard and alerting rules of deploy/observability/.

* ``PrometheusServer(targets, rule_files=())``: Prometheus on a free loopback port with a temp
  config and storage dir, scraping Envoy admin addresses (``/stats/prometheus``) every second and
  evaluating rules every second; ``query``, ``query_range``, ``alerts``, ``stop``.
* ``dashboard_queries(dashboard)``: every panel's PromQL with the dashboard's variables substituted
  (as Grafana does, "All" selected); ``check_promql(exprs)``: `promtool` parses them offline.
* ``short_rules(rules)``: a copy of the shipped rules with short windows and ``for:``, for a test
  that cannot wait minutes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable

import requests
import yaml

from harness import REPO_ROOT, free_port, wait_for

OBSERVABILITY = REPO_ROOT / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "llm-failover-dashboard.json"
RULES = OBSERVABILITY / "llm-failover-rules.yaml"
RULES_TESTS = OBSERVABILITY / "llm-failover-rules.test.yaml"
PROMETHEUS_RULE = OBSERVABILITY / "llm-failover-prometheusrule.yaml"

JOB = "llm-failover"
SCRAPE_INTERVAL = "1s"


def prometheus_bin() -> str | None:
    return shutil.which("prometheus")


def promtool_bin() -> str | None:
    return shutil.which("promtool")


class PrometheusServer:
    """Prometheus scraping Envoy admin endpoints (``host:port``), stopped by ``stop()``."""

    def __init__(self, targets: Iterable[str], rule_files: Iterable[Path] = (), start_timeout: float = 30.0):
        self.workdir = Path(tempfile.mkdtemp(prefix="llmf-prometheus-"))
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        rules = []
        for i, path in enumerate(rule_files):
            copy = self.workdir / f"rules-{i}.yaml"
            shutil.copyfile(path, copy)
            rules.append(str(copy))
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL,
                       "scrape_timeout": SCRAPE_INTERVAL},
            "rule_files": rules,
            "scrape_configs": [{"job_name": JOB, "metrics_path": "/stats/prometheus",
                                "static_configs": [{"targets": list(targets)}]}],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = self.workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [prometheus_bin() or "prometheus", f"--config.file={self.workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self._http = requests.Session()
        try:
            wait_for(self._ready, timeout=start_timeout, interval=0.2, what="Prometheus /-/ready")
        except AssertionError:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        try:
            return self._http.get(self.base_url + "/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, path: str, **params) -> dict:
        r = self._http.get(self.base_url + path, params=params, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise PromQLError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant vector (or scalar) result of ``expr``: [{"metric": {...}, "value": [t, "v"]}]."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("/api/v1/query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        """[{"metric": {...}, "values": [[t, "v"], ...]}]"""
        return self.api("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=f"{step:g}")["result"]

    def alerts(self) -> list[dict]:
        """Active (pending or firing) alerts: [{"labels": {"alertname": ...}, "state": ...}]."""
        return self.api("/api/v1/alerts")["alerts"]

    def alert_state(self, name: str) -> str:
        """"firing", "pending" or "inactive" (no active alert of that name)."""
        states = {a["state"] for a in self.alerts() if a["labels"].get("alertname") == name}
        return "firing" if "firing" in states else "pending" if "pending" in states else "inactive"

    def targets_up(self) -> bool:
        active = self.api("/api/v1/targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        self._http.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


class PromQLError(AssertionError):
    pass


# ----------------------------------------------------------------------------------------------
# The shipped dashboard

# Grafana's built-in interval variables, as Grafana would set them for a 1 s scrape interval
# ($__rate_interval is at least four scrape intervals).
BUILTINS = {"__rate_interval": "5s", "__interval": "1s", "__range": "60s"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def load_dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows included (rows themselves left out)."""
    out = []
    for p in dashboard.get("panels", []):
        if p.get("type") == "row":
            out += p.get("panels", [])
        else:
            out.append(p)
    return out


def variable_values(dashboard: dict) -> dict[str, str]:
    """What each dashboard variable stands for with "All" selected (or its current value)."""
    values = dict(BUILTINS)
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "datasource":
            continue
        if var.get("includeAll") and var.get("allValue"):
            values[var["name"]] = var["allValue"]
        else:
            values[var["name"]] = str((var.get("current") or {}).get("value") or var.get("query") or "")
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name.isdigit():  # a regex group reference of label_replace ("$1"), which Grafana leaves alone
            return m.group(0)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(one, expr)


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title / refId, PromQL with the variables substituted) for every query of every panel."""
    values = variable_values(dashboard)
    return [(f"{p['title']} / {t.get('refId', '?')}", substitute(t["expr"], values))
            for p in panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


# ----------------------------------------------------------------------------------------------
# The shipped rules

_RANGE = re.compile(r"\[(\d+[smhdwy])\]")


def load_rules(path: Path = RULES) -> dict:
    return yaml.safe_load(path.read_text())


def short_rules(rules: dict, window: str = "10s", hold: str = "1s") -> dict:
    """The rules with every range selector `[...]` set to `window` and every `for:` to `hold`."""
    out = json.loads(json.dumps(rules))
    for group in out["groups"]:
        group["interval"] = SCRAPE_INTERVAL
        for rule in group["rules"]:
            rule["expr"] = _RANGE.sub(f"[{window}]", rule["expr"])
            if "for" in rule:
                rule["for"] = hold
    return out


def check_promql(exprs: dict[str, str]) -> subprocess.CompletedProcess:
    """`promtool check rules` on recording rules made of `exprs` (name -> PromQL): parses them offline."""
    rules = {"groups": [{"name": "parse", "rules": [
        {"record": f"llmf_check:{re.sub(r'[^a-zA-Z0-9_]', '_', name)}_{i}", "expr": expr}
        for i, (name, expr) in enumerate(exprs.items())]}]}
    with tempfile.TemporaryDirectory(prefix="llmf-promql-") as d:
        path = Path(d) / "panels.yaml"
        path.write_text(yaml.safe_dump(rules, sort_keys=False))
        return subprocess.run([promtool_bin() or "promtool", "check", "rules", str(path)], capture_output=True,
                              text=True, timeout=60)


def finite(series: list[dict]) -> list[float]:
    """Every finite value in a query or query_range result."""
    out = []
    for s in series:
        for _, v in s.get("values") or [s["value"]]:
            f = float(v)
            if f == f and f not in (float("inf"), float("-inf")):
                out.append(f)
    return out

