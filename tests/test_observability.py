"""Issue 6, end to end in real Envoy: what an operator sees. Envoy stats as scraped from
/stats/prometheus (names and labels produced by envoy/local.yaml's stats_config), the access log's
filter state, the decision log lines, and the request id / trace context carried on callouts.

docs/observability.md lists the metrics these tests pin down.
"""

from __future__ import annotations

import re

import pytest

from harness import (AZURE_KEY, OPENAI_KEY, azure_target, make_client, openai_target, parse_prometheus,
                     plugin_config, wait_for)
from mocks.upstream import _approx_tokens

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"

# Every metric family the filter defines, as /stats/prometheus names it.
COUNTER_FAMILIES = {
    "llm_failover_requests", "llm_failover_attempts", "llm_failover_retries", "llm_failover_fallbacks",
    "llm_failover_exhausted", "llm_failover_deadline_exceeded", "llm_failover_cache_hits",
    "llm_failover_cache_misses", "llm_failover_cooldown_skips", "llm_failover_cooldowns",
    "llm_failover_deployment_skips", "llm_failover_rejected", "llm_failover_tokens", "llm_failover_recoveries",
}
HISTOGRAM_FAMILY = "llm_failover_attempt_latency_ms"

OPENAI_WORDS = len("Hello from mock openai".split())  # the mocks' completion_tokens
AZURE_WORDS = len("Hello from mock azure deployment gpt-4o-prod".split())


def obs_config(cache=False, openai_cooldown=False) -> dict:
    top = {"deadline": "20s"}
    if cache:
        top["cache"] = {"enabled": True, "ttl": "60s", "max_entries": 64}
    return plugin_config([openai_target(retries=1, cooldown=openai_cooldown), azure_target(cooldown=False)], **top)


def exact(stack, metric: str, **labels) -> float | None:
    """The one sample of `metric` whose label set is exactly `labels` (None if absent)."""
    found = [v for n, lbls, v in stack.prometheus_samples() if n == metric and lbls == labels]
    assert len(found) <= 1, (metric, labels, found)
    return found[0] if found else None


def families(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (llm_failover_\w+) (\w+)$", text, re.MULTILINE))


def identity(headers=None) -> dict:
    """Ask for an uncompressed answer (test_token_usage_is_counted_when_the_client_accepts_gzip covers gzip)."""
    return {"Accept-Encoding": "identity", **(headers or {})}


def test_prometheus_names_and_labels_after_successes_failovers_and_spent_chains(make_stack, openai_mock,
                                                                                 azure_mock):
    s = make_stack(obs_config(cache=True))
    assert s.post_json("/v1/chat/completions", CHAT).status_code == 200  # openai 2xx, cache miss
    assert s.post_json("/v1/chat/completions", CHAT).status_code == 200  # cache hit, no attempt

    openai_mock.script([{"status": 500}, {"status": 429}])  # routed 5xx, retry 429, then azure
    r = s.post_json("/v1/chat/completions", {**CHAT, "user": "failover"})
    assert (r.status_code, r.headers["x-llm-failover-target"]) == (200, "azure")

    openai_mock.script([{"status": 500, "repeat": 2}])
    azure_mock.script([{"status": 503}])
    assert s.post_json("/v1/chat/completions", {**CHAT, "user": "spent"}).status_code == 503

    openai_mock.script([{"close": True, "repeat": 2}])
    azure_mock.script([{"close": True}])
    r = s.post_json("/v1/chat/completions", {**CHAT, "user": "unreachable"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"

    bad = s.request("POST", "/v1/chat/completions", data=b"[]", headers={"content-type": "application/json"})
    assert bad.status_code == 400

    text = s.prometheus()
    fams = families(text)
    assert COUNTER_FAMILIES <= set(fams), sorted(COUNTER_FAMILIES - set(fams))
    assert all(fams[f] == "counter" for f in COUNTER_FAMILIES)
    # The stats_config turned every `.target.<t>`, `.status.<c>`, `.from.<a>.to.<b>`, `.kind.<k>`,
    # `.reason.<r>` segment into a label: no name still carries one.
    leftovers = [n for n in fams if re.search(r"_(target|status|from|to|kind|reason)_", n)]
    assert leftovers == []

    assert exact(s, "llm_failover_requests") == 6
    assert exact(s, "llm_failover_cache_misses") == 4 and exact(s, "llm_failover_cache_hits") == 1
    attempts = {(lbl["target"], lbl["status"]): v for n, lbl, v in parse_prometheus(text)
                if n == "llm_failover_attempts" and lbl}
    assert {k: v for k, v in attempts.items() if v} == {
        ("openai", "2xx"): 1, ("openai", "5xx"): 3, ("openai", "429"): 1, ("openai", "transport"): 2,
        ("azure", "2xx"): 1, ("azure", "5xx"): 1, ("azure", "transport"): 1,
    }
    assert {c for _, c in attempts} == {"2xx", "3xx", "4xx", "429", "5xx", "transport"}
    assert exact(s, "llm_failover_attempts") == 10  # the unlabeled total
    assert exact(s, "llm_failover_retries", target="openai") == 3
    assert exact(s, "llm_failover_retries", target="azure") == 0
    assert exact(s, "llm_failover_retries") == 3
    assert exact(s, "llm_failover_fallbacks", **{"from": "openai", "to": "azure"}) == 3
    assert exact(s, "llm_failover_fallbacks", **{"from": "azure", "to": "openai"}) == 0
    assert exact(s, "llm_failover_fallbacks") == 3
    assert exact(s, "llm_failover_exhausted") == 2
    assert exact(s, "llm_failover_deadline_exceeded") == 0
    assert exact(s, "llm_failover_rejected", reason="invalid_request_body") == 1
    assert exact(s, "llm_failover_rejected", reason="invalid_api_key") == 0
    for kind in ("prompt", "completion"):
        assert exact(s, "llm_failover_tokens", target="openai", kind=kind) is not None
    # In /stats the same counters keep the plugin's dotted names.
    assert s.counter("llm_failover.fallbacks.from.openai.to.azure") == 3
    assert s.counter("llm_failover.attempts.target.openai.status.transport") == 2


@pytest.mark.test_timeout(40)
def test_attempt_latency_histogram_by_target_appears_after_the_stats_flush(make_stack, openai_mock, azure_mock):
    s = make_stack(obs_config())
    openai_mock.script([{"status": 500, "repeat": 2}])
    azure_mock.script([{"delay_ms": 400}])
    r = s.post_json("/v1/chat/completions", CHAT)
    assert r.status_code == 200 and r.headers["x-llm-failover-target"] == "azure"

    # Histograms reach the admin endpoints at the stats flush (every 5 s by default).
    wait_for(lambda: exact(s, f"{HISTOGRAM_FAMILY}_count", target="azure"), timeout=15, interval=0.5,
             what="the attempt latency histogram in /stats/prometheus")
    text = s.prometheus()
    assert families(text)[HISTOGRAM_FAMILY] == "histogram"
    assert exact(s, f"{HISTOGRAM_FAMILY}_count", target="azure") == 1
    assert exact(s, f"{HISTOGRAM_FAMILY}_count", target="openai") == 2
    assert exact(s, f"{HISTOGRAM_FAMILY}_sum", target="azure") >= 350  # the mock took 400 ms
    assert exact(s, f"{HISTOGRAM_FAMILY}_bucket", target="azure", le="250") == 0
    assert exact(s, f"{HISTOGRAM_FAMILY}_bucket", target="azure", le="+Inf") == 1
    assert exact(s, f"{HISTOGRAM_FAMILY}_bucket", target="openai", le="250") == 2


def test_token_usage_by_target_from_answers_and_final_stream_chunks(make_stack, openai_mock, azure_mock):
    s = make_stack(obs_config())

    def tokens(target, kind):
        return exact(s, "llm_failover_tokens", target=target, kind=kind)

    prompt_tokens = _approx_tokens(CHAT["messages"])
    assert tokens("openai", "prompt") == 0

    r = s.post_json("/v1/chat/completions", CHAT, headers=identity())
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == prompt_tokens
    assert (tokens("openai", "prompt"), tokens("openai", "completion")) == (prompt_tokens, OPENAI_WORDS)

    # A stream counts only when it carries usage in its final chunk.
    r = s.post_json("/v1/chat/completions", {**CHAT, "stream": True}, headers=identity())
    assert r.status_code == 200 and '"usage"' not in r.text
    assert (tokens("openai", "prompt"), tokens("openai", "completion")) == (prompt_tokens, OPENAI_WORDS)
    r = s.post_json("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
                    headers=identity())
    assert r.status_code == 200 and '"prompt_tokens"' in r.text
    assert (tokens("openai", "prompt"), tokens("openai", "completion")) == (2 * prompt_tokens, 2 * OPENAI_WORDS)

    # Answers of a fallback count for the target that gave them, streamed or not.
    openai_mock.script([{"status": 503, "repeat": 4}])
    r = s.post_json("/v1/chat/completions", CHAT, headers=identity())
    assert r.headers["x-llm-failover-target"] == "azure"
    r = s.post_json("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
                    headers=identity())
    assert r.headers["x-llm-failover-target"] == "azure" and '"prompt_tokens"' in r.text
    assert (tokens("azure", "prompt"), tokens("azure", "completion")) == (2 * prompt_tokens, 2 * AZURE_WORDS)
    assert (tokens("openai", "prompt"), tokens("openai", "completion")) == (2 * prompt_tokens, 2 * OPENAI_WORDS)


def test_token_usage_is_counted_when_the_client_accepts_gzip(make_stack, openai_mock, azure_mock):
    s = make_stack(obs_config())
    client = make_client(s)  # the SDK asks for gzip, like every real client
    client.chat.completions.create(**CHAT)
    openai_mock.script([{"status": 503, "repeat": 2}])
    raw = client.chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["x-llm-failover-target"] == "azure"
    prompt_tokens = _approx_tokens(CHAT["messages"])
    assert exact(s, "llm_failover_tokens", target="openai", kind="prompt") == prompt_tokens
    assert exact(s, "llm_failover_tokens", target="openai", kind="completion") == OPENAI_WORDS
    assert exact(s, "llm_failover_tokens", target="azure", kind="prompt") == prompt_tokens
    assert exact(s, "llm_failover_tokens", target="azure", kind="completion") == AZURE_WORDS


def test_cooldowns_and_cooldown_skips_by_target(make_stack, openai_mock, azure_mock):
    s = make_stack(obs_config(openai_cooldown={"after_failures": 2, "duration": "30s"}))
    openai_mock.script([{"status": 500, "repeat": 2}])
    assert s.post_json("/v1/chat/completions", CHAT).headers["x-llm-failover-target"] == "azure"
    assert exact(s, "llm_failover_cooldowns", target="openai") == 1
    assert exact(s, "llm_failover_cooldown_skips", target="openai") == 0

    for n in (1, 2):
        r = s.post_json("/v1/chat/completions", CHAT)
        assert r.headers["x-llm-failover-target"] == "azure" and r.headers["x-llm-failover-attempts"] == "1"
        assert exact(s, "llm_failover_cooldown_skips", target="openai") == n
    assert len(openai_mock.api_requests()) == 2 and len(azure_mock.api_requests()) == 3
    assert exact(s, "llm_failover_cooldown_skips", target="azure") == 0
    assert exact(s, "llm_failover_cooldowns", target="azure") == 0


def test_deployment_skips_by_target(make_stack, openai_mock, azure_mock):
    s = make_stack(plugin_config([openai_target(cooldown=False),
                                  azure_target(deployments={"gpt-4o": "gpt-4o-prod"}, cooldown=False)]))
    openai_mock.script([{"status": 500}])
    r = s.post_json("/v1/chat/completions", {**CHAT, "model": "gpt-3.5-turbo"})
    assert r.status_code == 500
    assert exact(s, "llm_failover_deployment_skips", target="azure") == 1
    assert azure_mock.api_requests() == []


def access_line(stack, request_id: str) -> str:
    def find():
        return [line for line in stack.access_log() if f" req_id={request_id} " in line]
    [line] = wait_for(find, timeout=5, what=f"the access log line of {request_id}")
    return line


def test_access_log_shows_target_attempts_and_failover(make_stack, openai_mock, azure_mock):
    s = make_stack(obs_config(cache=True))
    assert s.post_json("/v1/chat/completions", CHAT, headers={"x-request-id": "obs-direct"}).status_code == 200
    assert s.post_json("/v1/chat/completions", CHAT, headers={"x-request-id": "obs-hit"}).status_code == 200
    openai_mock.script([{"status": 429, "repeat": 2}])
    r = s.post_json("/v1/chat/completions", {**CHAT, "user": "x"}, headers={"x-request-id": "obs-failover"})
    assert r.status_code == 200
    openai_mock.script([{"status": 500, "repeat": 2}])
    azure_mock.script([{"status": 503}])
    r = s.post_json("/v1/chat/completions", {**CHAT, "user": "y"}, headers={"x-request-id": "obs-spent"})
    assert r.status_code == 503
    s.request("POST", "/v1/chat/completions", data=b"nope", headers={"x-request-id": "obs-rejected"})

    # Off routes the access log's llmf_route is empty ("-"); tests/test_routes.py shows it set.
    fields = lambda line: {k: v for k, v in re.findall(r"\b(llmf_\w+)=(\S+)", line)  # noqa: E731
                           if not (k == "llmf_route" and v == "-")}
    assert fields(access_line(s, "obs-direct")) == {
        "llmf_target": "openai", "llmf_attempts": "1", "llmf_failover": "false"}
    assert fields(access_line(s, "obs-hit")) == {
        "llmf_target": "openai", "llmf_attempts": "0", "llmf_failover": "false"}
    failover = access_line(s, "obs-failover")
    assert '"POST /v1/chat/completions HTTP/1.1" 200 ' in failover
    assert fields(failover) == {"llmf_target": "azure", "llmf_attempts": "3", "llmf_failover": "true"}
    spent = access_line(s, "obs-spent")
    assert " 503 " in spent
    assert fields(spent) == {"llmf_target": "azure", "llmf_attempts": "3", "llmf_failover": "true"}
    rejected = access_line(s, "obs-rejected")
    assert " 400 " in rejected
    assert fields(rejected) == {"llmf_target": "-", "llmf_attempts": "-", "llmf_failover": "-"}


def test_request_id_and_trace_context_are_carried_on_every_callout(make_stack, openai_mock, azure_mock):
    s = make_stack(obs_config())
    openai_mock.script([{"status": 500, "repeat": 2}])
    r = s.post_json("/v1/chat/completions", CHAT, headers={
        "x-request-id": "obs-trace-1", "traceparent": TRACEPARENT, "tracestate": TRACESTATE})
    assert r.status_code == 200 and r.headers["x-llm-failover-attempts"] == "3"
    seen = openai_mock.api_requests() + azure_mock.api_requests()  # routed, retry callout, fallback callout
    assert [q["mock"] for q in seen] == ["openai", "openai", "azure"]
    for q in seen:
        assert q["headers"]["x-request-id"] == "obs-trace-1"
        assert q["headers"]["traceparent"] == TRACEPARENT
        assert q["headers"]["tracestate"] == TRACESTATE

    # Without a client id, Envoy's generated one is carried and is the one the access log shows.
    openai_mock.reset()
    azure_mock.reset()
    openai_mock.script([{"status": 500, "repeat": 2}])
    assert s.post_json("/v1/chat/completions", CHAT).status_code == 200
    seen = openai_mock.api_requests() + azure_mock.api_requests()
    ids = {q["headers"].get("x-request-id") for q in seen}
    assert len(seen) == 3 and len(ids) == 1 and None not in ids
    [generated] = ids
    assert "llmf_failover=true" in access_line(s, generated)


def test_one_log_line_per_retry_and_failover_decision_without_secrets(make_stack, openai_mock, azure_mock):
    s = make_stack(obs_config())
    offset = s.log_offset()
    openai_mock.script([{"status": 500}, {"status": 429}])
    r = s.post_json("/v1/chat/completions", CHAT, headers={"x-request-id": "obs-log-1",
                                                           "Authorization": "Bearer sk-client-secret-1"})
    assert r.status_code == 200

    def decisions():
        lines = [line for line in s.log_since(offset).splitlines() if "req=obs-log-1" in line]
        retry = [line for line in lines if re.search(r"\bretry\b", line)]
        failover = [line for line in lines if re.search(r"\bfailover\b", line)]  # not "llm_failover"
        return (retry, failover) if retry and failover else None

    retry, failover = wait_for(decisions, timeout=5, what="the retry and failover log lines")
    assert len(retry) == 1 and "openai" in retry[0] and "500" in retry[0]
    assert len(failover) == 1 and all(w in failover[0] for w in ("openai", "azure", "429"))
    log = s.log_text
    for secret in (OPENAI_KEY, AZURE_KEY, "sk-client-secret-1"):
        assert secret not in log


def test_target_names_with_dashes_and_digits_are_whole_label_values(make_stack, openai_mock, azure_mock):
    s = make_stack(plugin_config([openai_target("openai-main-1", cluster="openai", cooldown=False),
                                  azure_target("azure-east-2", cluster="azure", cooldown=False)]))
    openai_mock.script([{"status": 500}])
    r = s.post_json("/v1/chat/completions", CHAT, headers=identity())
    assert r.headers["x-llm-failover-target"] == "azure-east-2"
    assert exact(s, "llm_failover_attempts", target="openai-main-1", status="5xx") == 1
    assert exact(s, "llm_failover_attempts", target="azure-east-2", status="2xx") == 1
    assert exact(s, "llm_failover_fallbacks", **{"from": "openai-main-1", "to": "azure-east-2"}) == 1
    assert exact(s, "llm_failover_tokens", target="azure-east-2", kind="completion") == AZURE_WORDS
    names = {n for n, _, _ in s.prometheus_samples() if n.startswith("llm_failover")}
    assert not [n for n in names if "east" in n or "main" in n]  # the whole name went into the label
