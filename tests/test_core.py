"""Issue 2, end to end in real Envoy with envoy/local.yaml: rewriting for OpenAI and Azure, the routed
first attempt, failover through callouts, streaming, headers, spent chains and bad input."""

from __future__ import annotations

import json
import time

import pytest

from harness import (AZURE_KEY, OPENAI_KEY, azure_target, make_client, openai_target, plugin_config,
                     validate_config)

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
AZURE_CHAT_PATH = "/openai/deployments/gpt-4o-prod/chat/completions"


def content(resp) -> str:
    return resp.json()["choices"][0]["message"]["content"]


def test_healthy_primary_serves_with_openai_rewriting(stack, openai_mock, azure_mock):
    r = stack.post_json("/v1/chat/completions", CHAT, headers={"Authorization": "Bearer client-own-key"})
    assert r.status_code == 200
    assert content(r) == "Hello from mock openai"
    assert r.headers["x-llm-failover-target"] == "openai"
    assert r.headers["x-llm-failover-attempts"] == "1"
    [seen] = openai_mock.api_requests()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["host"] == "api.openai.com"
    assert seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "api-key" not in seen["headers"]
    assert "x-llm-failover-cluster" not in seen["headers"]
    assert seen["body"] == CHAT
    assert azure_mock.api_requests() == []


@pytest.mark.parametrize("path,body,azure_path", [
    ("/v1/chat/completions", CHAT, AZURE_CHAT_PATH),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}, "/openai/deployments/gpt-4o-prod/completions"),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"},
     "/openai/deployments/gpt-4o-mini-default/embeddings"),
])
def test_openai_429_fails_over_to_azure_with_azure_addressing(stack, openai_mock, azure_mock, path, body, azure_path):
    openai_mock.script([{"status": 429, "repeat": "forever"}])
    r = stack.post_json(path, body, headers={"Authorization": "Bearer client-own-key", "x-request-id": "req-core-1"})
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-failover-target"] == "azure"
    # local.yaml: openai retries 1 (2 attempts), then azure.
    assert r.headers["x-llm-failover-attempts"] == "3"
    assert len(openai_mock.api_requests()) == 2
    [seen] = azure_mock.api_requests()
    assert seen["path"] == azure_path
    assert seen["query"] == {"api-version": "2025-04-01-preview"}
    assert seen["headers"]["host"] == "llmf-local.openai.azure.com"
    assert seen["headers"]["api-key"] == AZURE_KEY
    assert "authorization" not in seen["headers"]
    assert seen["headers"]["x-request-id"] == "req-core-1"
    assert seen["body"] == body


def test_client_cannot_choose_the_cluster(stack, openai_mock, azure_mock):
    r = stack.post_json("/v1/chat/completions", CHAT, headers={"x-llm-failover-cluster": "azure"})
    assert r.status_code == 200
    assert r.headers["x-llm-failover-target"] == "openai"
    assert len(openai_mock.api_requests()) == 1 and azure_mock.api_requests() == []


def test_spent_chain_answers_with_the_last_failure(stack, openai_mock, azure_mock):
    openai_mock.script([{"status": 500, "repeat": "forever"}])
    azure_mock.script([{"status": 503, "repeat": "forever"}])
    r = stack.post_json("/v1/chat/completions", CHAT)
    assert r.status_code == 503
    assert r.headers["x-llm-failover-target"] == "azure"
    assert r.headers["x-llm-failover-attempts"] == "4"
    err = r.json()["error"]
    assert err["code"] == "ServiceUnavailable"  # Azure's own error body, passed through
    assert len(openai_mock.api_requests()) == 2 and len(azure_mock.api_requests()) == 2


def test_non_failure_statuses_are_not_failed_over(stack, openai_mock, azure_mock):
    openai_mock.script([{"status": 404}])
    r = stack.post_json("/v1/chat/completions", CHAT)
    assert r.status_code == 404
    assert r.headers["x-llm-failover-attempts"] == "1"
    assert azure_mock.api_requests() == []


def test_sdk_sync_call_fails_over(stack, openai_mock, azure_mock):
    openai_mock.script([{"status": 429, "retry_after": "30", "repeat": "forever"}])
    client = make_client(stack)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from mock azure deployment gpt-4o-prod"
    assert raw.headers["x-llm-failover-target"] == "azure"
    emb = client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(emb.data[0].embedding) > 0


def test_sdk_stream_on_healthy_primary_arrives_chunk_by_chunk(stack, openai_mock, azure_mock):
    openai_mock.configure(stream_delay_ms=250)
    client = make_client(stack)
    arrivals, text = [], []
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    assert "".join(text) == "Hello from mock openai"
    # Several chunks, spread over the mock's pacing: nothing buffered the stream.
    assert len(arrivals) >= 4
    assert arrivals[-1] - arrivals[0] >= 0.5
    [seen] = openai_mock.api_requests()
    assert seen["stream"] is True


def test_sdk_stream_fails_over_and_parses(stack, openai_mock, azure_mock):
    openai_mock.script([{"status": 503, "repeat": "forever"}])
    client = make_client(stack)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-llm-failover-target"] == "azure"
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == "Hello from mock azure deployment gpt-4o-prod"


def test_sse_framing_survives_failover(stack, openai_mock, azure_mock):
    openai_mock.script([{"status": 429, "repeat": "forever"}])
    r = stack.post_json("/v1/chat/completions", {**CHAT, "stream": True})
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        assert e.startswith("data: ")
        json.loads(e[len("data: "):])


def test_upstreams_are_asked_for_identity_bodies_whatever_the_client_accepts(stack, openai_mock, azure_mock):
    # The filter reads what comes back (error bodies, usage, cache entries), so no attempt asks
    # for a compressed body; Envoy's compressor filter can compress toward the client.
    openai_mock.script([{"status": 429, "repeat": "forever"}])
    r = stack.post_json("/v1/chat/completions", CHAT, headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200
    assert "content-encoding" not in r.headers
    assert content(r) == "Hello from mock azure deployment gpt-4o-prod"
    for seen in openai_mock.api_requests() + azure_mock.api_requests():
        assert "accept-encoding" not in seen["headers"]


def test_paths_that_are_not_operations_go_to_the_first_target(stack, openai_mock, azure_mock):
    r = stack.request("GET", "/v1/models", headers={"Authorization": "Bearer client-own-key"})
    assert r.status_code == 200
    assert r.headers["x-llm-failover-target"] == "openai"
    [seen] = openai_mock.api_requests()
    assert seen["path"] == "/v1/models"
    assert seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"


@pytest.mark.parametrize("body,why", [
    (b"not json", "not a JSON object"),
    (b'{"model": "gpt-4o", "messages": [', "invalid JSON"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b"\"just a string\"", "not a JSON object"),
    (b'{"model": 5, "messages": []}', "'model' must be a string"),
])
def test_bodies_that_are_not_json_objects_get_400_and_reach_no_upstream(stack, openai_mock, azure_mock, body, why):
    r = stack.request("POST", "/v1/chat/completions", data=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_request_body"
    assert err["type"] == "invalid_request_error" and err["param"] is None
    assert why in err["message"]
    assert openai_mock.api_requests() == [] and azure_mock.api_requests() == []
    assert stack.post_json("/v1/chat/completions", CHAT).status_code == 200


def test_empty_body_gets_400(stack, openai_mock):
    r = stack.request("POST", "/v1/chat/completions")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request_body"
    assert openai_mock.api_requests() == []


def test_oversized_body_gets_413_and_the_next_request_is_served(make_stack, openai_mock, azure_mock):
    cfg = plugin_config([openai_target(), azure_target()], max_request_body_bytes=2048)
    s = make_stack(cfg)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    r = s.post_json("/v1/chat/completions", big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert openai_mock.api_requests() == []
    assert s.post_json("/v1/chat/completions", CHAT).status_code == 200


def test_target_model_and_override_params_are_applied_per_target(make_stack, openai_mock, azure_mock):
    cfg = plugin_config([
        openai_target(retries=0),
        azure_target(model="gpt-4o-mini", deployments={"gpt-4o-mini": "gpt-4o-mini-default"},
                     override_params={"temperature": 0}),
    ])
    s = make_stack(cfg)
    openai_mock.script([{"status": 500}])
    r = s.post_json("/v1/chat/completions", {**CHAT, "temperature": 1})
    assert r.status_code == 200 and r.headers["x-llm-failover-target"] == "azure"
    assert openai_mock.api_requests()[0]["body"]["model"] == "gpt-4o"
    [seen] = azure_mock.api_requests()
    assert seen["path"] == "/openai/deployments/gpt-4o-mini-default/chat/completions"
    assert seen["body"]["model"] == "gpt-4o-mini" and seen["body"]["temperature"] == 0


def test_azure_target_without_deployment_for_the_model_is_skipped(make_stack, openai_mock, azure_mock):
    cfg = plugin_config([openai_target(retries=0), azure_target(deployments={"gpt-4o": "gpt-4o-prod"})])
    s = make_stack(cfg)
    openai_mock.script([{"status": 500, "repeat": "forever"}])
    r = s.post_json("/v1/chat/completions", {**CHAT, "model": "gpt-3.5-turbo"})
    # Azure cannot serve gpt-3.5-turbo: the chain is just openai, whose failure the client gets.
    assert r.status_code == 500
    assert r.headers["x-llm-failover-target"] == "openai"
    assert azure_mock.api_requests() == []


def test_routed_first_attempt_to_azure_when_azure_is_first(make_stack, openai_mock, azure_mock):
    s = make_stack(plugin_config([azure_target(), openai_target()]))
    r = s.post_json("/v1/chat/completions?foo=bar", CHAT, headers={"Authorization": "Bearer client-own-key"})
    assert r.status_code == 200 and r.headers["x-llm-failover-target"] == "azure"
    [seen] = azure_mock.api_requests()
    assert seen["path"] == AZURE_CHAT_PATH
    assert seen["query"] == {"api-version": "2024-10-21"}  # the client's query string is not forwarded
    assert seen["headers"]["api-key"] == AZURE_KEY and "authorization" not in seen["headers"]


@pytest.mark.parametrize("mutate,field", [
    (lambda c: c["targets"][1].pop("api_version"), "targets[1].api_version"),
    (lambda c: c["targets"][0].update(provider="anthropic"), "targets[0].provider"),
    (lambda c: c["targets"][0].update(timeout="soon"), "targets[0].timeout"),
    (lambda c: c.update(keys=[{"name": "app", "key_sha256": "nothex"}]), "keys[0].key_sha256"),
])
def test_invalid_plugin_config_is_refused_by_envoy_naming_the_field(mutate, field):
    cfg = plugin_config([openai_target(), azure_target()])
    mutate(cfg)
    code, output = validate_config(plugin_config=cfg)
    assert code != 0
    assert f"invalid configuration: {field}" in output
