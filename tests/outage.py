"""One scripted outage, watched by a real Prometheus: the run behind tests/test_dashboard.py and the
picture tools/outage_plot.py draws (docs/outage.png).

A real Envoy (envoy/local.yaml, 2 workers) runs the filter with the chain OpenAI -> Azure (Azure with
Entra ID tokens from the Entra mock, the cache on) in front of the strict mocks; Prometheus scrapes
its admin `/stats/prometheus` every second. Steady traffic runs throughout (a quarter of it the same
question, so the cache answers some); the primary answers 429/503 to everything during the outage,
then is healthy again.

    lab = OutageLab(rule_files=[...]).start()
    lab.run_traffic()                 # in a background thread until lab.stop()
    lab.phase("healthy", 6); lab.outage(12); lab.phase("recovered", 10)
    lab.prometheus.query_range(...)
    lab.stop()
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import requests
import yaml

from harness import (wait_for, AZURE_KEY, AZURE_RESOURCE, OPENAI_KEY, EnvoyStack, azure_target, openai_target, plugin_config,
                     start_entra_mock, start_mock)
import prometheus_server as ps
from prometheus_server import PrometheusServer

TENANT, CLIENT, SECRET = "11111111-2222-3333-4444-555555555555", "outage-client", "outage~client.secret"
TOKEN_SECRET = "outage-hmac-shared-by-the-two-mocks"
TOKEN_LIFETIME_S = 20  # short, so the run sees refreshes (the filter refreshes before expiry)
OUTAGE_STATUSES = (429, 503)


def lab_plugin_config() -> dict:
    primary = openai_target(retries=1, cooldown={"after_failures": 2, "duration": "2s", "max_duration": "2s"})
    secondary = azure_target(retries=1, cooldown=False)
    del secondary["api_key_env"]
    secondary["azure_ad"] = {"cluster": "entra", "tenant_id": TENANT, "client_id": CLIENT,
                             "client_secret_env": "AZURE_CLIENT_SECRET"}
    return plugin_config([primary, secondary], deadline="20s",
                         cache={"enabled": True, "ttl": "600s", "max_entries": 64})


def _fast_stats_flush(cfg: dict):
    # Histograms reach /stats/prometheus at each stats flush (5 s by default).
    cfg["stats_flush_interval"] = "1s"


@dataclass
class Answer:
    sent: float
    status: int
    target: str | None
    cache: str | None


@dataclass
class Phase:
    name: str
    start: float
    end: float = 0.0


@dataclass
class OutageLab:
    rule_files: Iterable[Path] = ()
    requests_per_second: float = 8.0
    answers: list[Answer] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)

    def start(self) -> "OutageLab":
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.entra = start_entra_mock(tenant_id=TENANT, client_id=CLIENT, client_secret=SECRET,
                                      token_secret=TOKEN_SECRET, token_lifetime_s=TOKEN_LIFETIME_S)
        self.openai = start_mock("openai", api_key=OPENAI_KEY, name="openai")
        self.azure = start_mock("azure", name="azure", api_key=AZURE_KEY, resource=AZURE_RESOURCE,
                                entra_token_secret=TOKEN_SECRET, api_versions="2024-10-21",
                                deployments="gpt-4o-prod,gpt-4o-mini-default")
        self.envoy = EnvoyStack(plugin_config=lab_plugin_config(),
                                clusters={"openai": self.openai.port, "azure": self.azure.port,
                                          "entra": self.entra.port},
                                vm_env={"AZURE_CLIENT_SECRET": SECRET}, mutate=_fast_stats_flush)
        self.prometheus = None
        try:
            self.envoy.start()
            self.prometheus = PrometheusServer([f"127.0.0.1:{self.envoy.admin_port}"], self.rule_files)
        except BaseException:
            self.stop()
            raise
        return self

    # -- traffic ---------------------------------------------------------------------------------

    def run_traffic(self):
        self._thread = threading.Thread(target=self._traffic, name="outage-traffic", daemon=True)
        self._thread.start()

    def _traffic(self):
        period = 1.0 / self.requests_per_second
        http = requests.Session()
        n = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            n += 1
            content = "what is the capital of France?" if n % 4 == 0 else f"question {n}"
            body = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}
            sent = time.time()
            try:
                r = http.post(self.envoy.url("/v1/chat/completions"), json=body, timeout=20,
                              headers={"Accept-Encoding": "identity"})
                self.answers.append(Answer(sent, r.status_code, r.headers.get("x-llm-failover-target"),
                                           r.headers.get("x-llm-failover-cache")))
            except requests.RequestException:
                self.answers.append(Answer(sent, 0, None, None))
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))
        http.close()

    # -- the script ------------------------------------------------------------------------------

    def phase(self, name: str, seconds: float) -> Phase:
        p = Phase(name, time.time())
        self.phases.append(p)
        time.sleep(seconds)
        p.end = time.time()
        return p

    def begin_outage(self) -> Phase:
        """The primary answers 429 or 503 to every request until end_outage()."""
        self.openai.fail_rate(1.0, OUTAGE_STATUSES, seed=7)
        p = Phase("outage", time.time())
        self.phases.append(p)
        return p

    def end_outage(self) -> Phase:
        self.openai.fail_rate(0.0)
        p = self.phases[-1]
        p.end = time.time()
        return p

    def outage(self, seconds: float) -> Phase:
        self.begin_outage()
        time.sleep(seconds)
        return self.end_outage()

    def served_by(self, since: float, until: float) -> dict[str, int]:
        """Answers to the requests sent between two times, by who gave them: a target, "cache", or the
        error status (0: no answer)."""
        counts: dict[str, int] = {}
        for a in self.answers:
            if since <= a.sent < until:
                key = str(a.status) if a.status != 200 else "cache" if a.cache == "hit" else (a.target or "?")
                counts[key] = counts.get(key, 0) + 1
        return counts

    def leaks(self) -> list:
        return self.openai.leaks() + self.azure.leaks() + self.entra.leaks()

    def stop(self):
        if getattr(self, "_stop", None) is not None:
            self._stop.set()
        if getattr(self, "_thread", None) is not None:
            self._thread.join(timeout=30)
        for part in ("prometheus", "envoy", "openai", "azure", "entra"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.stop()


def start_with_short_rules() -> OutageLab:
    """A lab whose Prometheus evaluates the shipped alerts with short windows (10 s, `for: 1s`),
    started and scraping Envoy."""
    with tempfile.TemporaryDirectory(prefix="llmf-rules-") as d:
        rules = Path(d) / "rules.yaml"
        rules.write_text(yaml.safe_dump(ps.short_rules(ps.load_rules()), sort_keys=False))
        lab = OutageLab(rule_files=[rules]).start()
    try:
        wait_for(lab.prometheus.targets_up, timeout=15, interval=0.5, what="Prometheus scraping Envoy")
    except BaseException:
        lab.stop()
        raise
    return lab
