"""One scripted outage, watched by a real Prometheus: the run behind tests/test_dashboard.py and the
picture tools/outage_plot.py draws (docs/outage.png).

A real Envoy (envoy/local.yaml, 2 workers) runs the filter with the chain OpenAI -> Azure (Azure with
Entra ID tokens from the Entra mock, the cache on, two gateway keys) in front of the strict mocks;
Prometheus scrapes its admin `/stats/prometheus` every second. Steady traffic of the "app" key runs
throughout (a quarter of it the same question, so the cache answers some); the primary answers
429/503 to everything during the outage, then is healthy again. Between phases the script can add
what the steady traffic never does: a burst of the "batch" key over its request limit (429s from
the filter itself), and Responses API requests naming responses another Envoy of the fleet created
on Azure (each costs a "not found" from OpenAI before Azure is asked).

    lab = OutageLab(rule_files=[...]).start()
    lab.run_traffic()                 # in a background thread until lab.stop()
    lab.phase("healthy", 6); lab.batch_over_its_limit(); lab.follow_ups_from_another_replica()
    lab.outage(12); lab.phase("recovered", 10)
    lab.prometheus.query_range(...)
    lab.stop()
"""

from __future__ import annotations

import hashlib
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
# Gateway keys: "app" sends the steady traffic, "batch" is limited to BATCH_LIMIT requests a minute.
GATEWAY_KEYS = {"app": "gw-outage-app-secret", "batch": "gw-outage-batch-secret"}
BATCH_LIMIT = 2
# An Azure API version with the Responses API, so that Azure can be probed for a response's owner.
AZURE_API_VERSION = "2025-04-01-preview"


def lab_plugin_config() -> dict:
    primary = openai_target(retries=1, cooldown={"after_failures": 2, "duration": "2s", "max_duration": "2s"})
    secondary = azure_target(retries=1, cooldown=False, api_version=AZURE_API_VERSION)
    del secondary["api_key_env"]
    secondary["azure_ad"] = {"cluster": "entra", "tenant_id": TENANT, "client_id": CLIENT,
                             "client_secret_env": "AZURE_CLIENT_SECRET"}
    keys = [{"name": name, "key_sha256": hashlib.sha256(secret.encode()).hexdigest()}
            for name, secret in GATEWAY_KEYS.items()]
    keys[1]["limits"] = {"requests": {"count": BATCH_LIMIT, "per": "1m"}}
    return plugin_config([primary, secondary], deadline="20s", keys=keys,
                         cache={"enabled": True, "ttl": "600s", "max_entries": 64})


def key_header(name: str) -> dict:
    return {"Authorization": f"Bearer {GATEWAY_KEYS[name]}"}


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
class SideAnswer:
    """An answer to a request of the script itself (not the steady traffic)."""
    what: str
    status: int
    target: str | None
    attempts: str | None
    code: str | None


def side_answer(what: str, r: requests.Response) -> SideAnswer:
    try:
        code = (r.json().get("error") or {}).get("code")
    except ValueError:
        code = None
    return SideAnswer(what, r.status_code, r.headers.get("x-llm-failover-target"),
                      r.headers.get("x-llm-failover-attempts"), code)


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
                                entra_token_secret=TOKEN_SECRET, api_versions=AZURE_API_VERSION,
                                deployments="gpt-4o-prod,gpt-4o-mini-default")
        for mock in (self.openai, self.azure):
            mock.forbid(GATEWAY_KEYS.values())
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
                              headers={"Accept-Encoding": "identity", **key_header("app")})
                self.answers.append(Answer(sent, r.status_code, r.headers.get("x-llm-failover-target"),
                                           r.headers.get("x-llm-failover-cache")))
            except requests.RequestException:
                self.answers.append(Answer(sent, 0, None, None))
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))
        http.close()

    # -- the script's own requests ----------------------------------------------------------------

    def batch_over_its_limit(self, n: int = BATCH_LIMIT + 3) -> list[SideAnswer]:
        """`n` chat completions of the "batch" key at once: BATCH_LIMIT are served, the rest get the
        filter's own 429 `rate_limit_exceeded`."""
        with requests.Session() as http:
            return [side_answer("batch", http.post(
                self.envoy.url("/v1/chat/completions"), timeout=20,
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": f"batch job {i}"}]},
                headers={"Accept-Encoding": "identity", **key_header("batch")})) for i in range(n)]

    def follow_ups_from_another_replica(self) -> list[SideAnswer]:
        """Two responses created on Azure through another Envoy of the fleet (straight on the Azure
        mock: this Envoy never saw them), then a follow-up of one and a retrieve of the other through
        this Envoy. It does not know their owner, so it probes the chain: OpenAI says "not found",
        Azure has it."""
        straight_to_azure = {"Host": f"{AZURE_RESOURCE}.openai.azure.com", "api-key": AZURE_KEY}
        ids = []
        with requests.Session() as http:
            for i in range(2):
                r = http.post(self.azure.url(f"/openai/responses?api-version={AZURE_API_VERSION}"),
                              json={"model": "gpt-4o-prod", "input": f"conversation {i}"},
                              headers=straight_to_azure, timeout=20)
                r.raise_for_status()
                ids.append(r.json()["id"])
            headers = {"Accept-Encoding": "identity", **key_header("app")}
            return [
                side_answer("follow-up", http.post(self.envoy.url("/v1/responses"), timeout=20, headers=headers,
                                                   json={"model": "gpt-4o", "input": "and then?",
                                                         "previous_response_id": ids[0]})),
                side_answer("retrieve", http.get(self.envoy.url(f"/v1/responses/{ids[1]}"), timeout=20,
                                                 headers=headers)),
            ]

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
