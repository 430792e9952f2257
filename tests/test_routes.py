"""Issue 15 in real Envoy with the shipped example envoy/routes.yaml: BricksLLM's "OpenAI with Azure
OpenAI as failover" route (its own chain, retries, model, cache and keys) next to the plain /v1
paths on one listener."""

from __future__ import annotations

import re
import time

import pytest

import harness
from harness import AZURE_KEY, OPENAI_KEY, file_plugin_config

ROUTES_YAML = "envoy/routes.yaml"
ROUTE_PATH = "/api/routes/test/chat/completion"
GUIDE_BODY = {"messages": [{"role": "system", "content": "hi"}]}
KEY = {"Authorization": "Bearer my-secret-key"}
OTHER_KEY = "other-app-key"


def routes_config() -> dict:
    """envoy/routes.yaml's plugin config with a second gateway key that the route does not name."""
    cfg = file_plugin_config(ROUTES_YAML)
    import hashlib

    cfg["keys"].append({"name": "other-app", "key_sha256": hashlib.sha256(OTHER_KEY.encode()).hexdigest()})
    return cfg


@pytest.fixture
def gw(make_stack):
    return make_stack(routes_config(), base_config=ROUTES_YAML)


def test_the_guides_request_is_answered_by_openai_with_the_routes_model(gw, openai_mock, azure_mock):
    # As the guide sends it: no model, a Bricks-style key.
    r = gw.post_json(ROUTE_PATH, GUIDE_BODY, headers=KEY)
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-failover-target"] == "openai"
    assert r.headers["x-llm-failover-attempts"] == "1"
    assert r.headers["x-llm-failover-cache"] == "miss"
    assert r.json()["model"] == "gpt-4"
    [seen] = openai_mock.api_requests()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["body"] == {"model": "gpt-4", **GUIDE_BODY}
    assert seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert azure_mock.api_requests() == []


def test_the_routes_retries_then_azure_with_the_model_mapped_to_its_deployment(gw, openai_mock, azure_mock):
    openai_mock.script([{"status": 503, "repeat": "forever"}])
    r = gw.post_json(ROUTE_PATH, GUIDE_BODY, headers={**KEY, "x-request-id": "route-failover"})
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-failover-target"] == "azure"
    assert r.headers["x-llm-failover-attempts"] == "4", "three attempts on OpenAI (retries 2), then Azure"
    assert len(openai_mock.api_requests()) == 3
    [seen] = azure_mock.api_requests()
    assert seen["path"] == "/openai/deployments/gpt-4o-prod/chat/completions"
    assert seen["query"] == {"api-version": "2025-04-01-preview"}
    assert seen["headers"]["api-key"] == AZURE_KEY
    assert seen["body"]["messages"] == GUIDE_BODY["messages"]
    # The route's name is in the decision log, the stats and the access log.
    harness.wait_for(lambda: re.search(r"req=route-failover route=test\] failover from=openai to=azure",
                                       gw.log_text), what="the failover log line")
    assert gw.counter("llm_failover.fallbacks.route.test.from.openai.to.azure") == 1
    assert gw.counter("llm_failover.attempts.route.test.target.openai.status.5xx") == 3
    assert gw.counter("llm_failover.requests.route.test") == 1
    line = harness.wait_for(lambda: next((l for l in gw.access_log() if "route-failover" in l), None))
    assert "llmf_route=test" in line and "llmf_target=azure" in line and "llmf_attempts=4" in line
    labels = {tuple(sorted(s[1].items())) for s in gw.prometheus_samples() if s[0] == "llm_failover_fallbacks"}
    assert (("from", "openai"), ("route", "test"), ("to", "azure")) in labels


def test_an_identical_request_within_the_routes_ttl_is_served_from_its_cache(gw, openai_mock, azure_mock):
    first = gw.post_json(ROUTE_PATH, GUIDE_BODY, headers=KEY)
    second = gw.post_json(ROUTE_PATH, GUIDE_BODY, headers=KEY)
    assert (first.headers["x-llm-failover-cache"], second.headers["x-llm-failover-cache"]) == ("miss", "hit")
    assert second.json() == first.json()
    assert len(openai_mock.api_requests()) == 1
    assert gw.counter("llm_failover.cache_hits.route.test") == 1
    # The plain paths have no cache (only the route has one).
    r = gw.post_json("/v1/chat/completions", {"model": "gpt-4o", **GUIDE_BODY}, headers=KEY)
    assert "x-llm-failover-cache" not in r.headers
    # After the route's 5 s TTL the entry is gone.
    time.sleep(5.2)
    third = gw.post_json(ROUTE_PATH, GUIDE_BODY, headers=KEY)
    assert third.headers["x-llm-failover-cache"] == "miss"
    assert len(openai_mock.api_requests()) == 3


def test_a_key_the_route_does_not_name_is_refused_and_nothing_is_sent(gw, openai_mock, azure_mock):
    r = gw.post_json(ROUTE_PATH, GUIDE_BODY, headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "permission_denied"
    assert r.json()["error"]["param"] is None
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = gw.post_json(ROUTE_PATH, GUIDE_BODY, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert openai_mock.api_requests() == [] and azure_mock.api_requests() == []
    # The same key may use the plain paths (the top-level chain).
    r = gw.post_json("/v1/chat/completions", {"model": "gpt-4o", **GUIDE_BODY},
                     headers={"api-key": OTHER_KEY})
    assert r.status_code == 200
    assert gw.counter("llm_failover.rejected.reason.permission_denied") == 1


def test_a_route_and_the_plain_paths_each_use_their_own_chain(gw, openai_mock, azure_mock):
    openai_mock.script([{"status": 500, "repeat": "forever"}])
    plain = gw.post_json("/v1/chat/completions", {"model": "gpt-4o", **GUIDE_BODY}, headers=KEY)
    assert plain.status_code == 200
    # The top-level openai target has no retries: one attempt, then Azure's gpt-4o deployment.
    assert plain.headers["x-llm-failover-attempts"] == "2"
    assert len(openai_mock.api_requests()) == 1
    routed = gw.post_json(ROUTE_PATH, {**GUIDE_BODY, "user": "u"}, headers=KEY)
    assert routed.headers["x-llm-failover-attempts"] == "4"
    assert len(openai_mock.api_requests()) == 4
    models = [r["body"]["model"] for r in openai_mock.api_requests()]
    assert models == ["gpt-4o", "gpt-4", "gpt-4", "gpt-4"]
    assert [r["path"] for r in azure_mock.api_requests()] == [
        "/openai/deployments/gpt-4o-prod/chat/completions"] * 2
    assert gw.counter("llm_failover.attempts.target.openai.status.5xx") == 1
    assert gw.counter("llm_failover.attempts.route.test.target.openai.status.5xx") == 3


def test_the_client_model_is_replaced_by_the_routes_and_other_methods_are_not_the_route(gw, openai_mock,
                                                                                         azure_mock):
    r = gw.post_json(ROUTE_PATH, {"model": "gpt-3.5-turbo", **GUIDE_BODY}, headers=KEY)
    assert r.status_code == 200
    [seen] = openai_mock.api_requests()
    assert seen["body"]["model"] == "gpt-4"
    r = gw.request("GET", ROUTE_PATH, headers=KEY)
    # Not the route: passed to the first target as it is, which has no such path.
    assert r.status_code == 404
    assert openai_mock.api_requests()[-1]["path"] == ROUTE_PATH
