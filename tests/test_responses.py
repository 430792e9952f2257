"""Issue 14 in real Envoy with the official SDK: the Responses API failed over like chat (plain and
streamed), response ids kept with the target that created them (follow-ups, retrieve, delete), and
Azure's v1 API for chat, embeddings and responses."""

from __future__ import annotations

import time

import openai
import pytest

import harness
from conftest import serve_stack, use_shared_stack
from harness import AZURE_KEY, OPENAI_KEY, azure_target, make_client, openai_target, plugin_config

V1_DEPLOYMENTS = {"gpt-4o": "gpt-4o-prod", "*": "gpt-4o-mini-default"}


def v1_config(**top) -> dict:
    return plugin_config(
        [openai_target(retries=0, cooldown=False, timeout="5s"),
         azure_target(api_version="v1", deployments=V1_DEPLOYMENTS, retries=1, cooldown=False, timeout="5s")],
        deadline="20s", **top)


@pytest.fixture(scope="module")
def _v1_stack(_openai_server, _azure_server):
    yield from serve_stack(v1_config(), _openai_server, _azure_server)


@pytest.fixture
def gw(request, _v1_stack, openai_mock, azure_mock):
    """Envoy with targets openai (no retries) then an Azure v1 target (1 retry), cooldowns off."""
    yield from use_shared_stack(request, _v1_stack, "the Responses API Envoy")


def raw_create(client, **kw):
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="Say hi.", **kw)
    return raw, raw.parse()


def test_responses_create_fails_over_to_azure_v1_with_the_deployment_in_the_body(gw, openai_mock, azure_mock):
    openai_mock.script([{"status": 429, "retry_after": "30"}])
    raw, resp = raw_create(make_client(gw))
    assert raw.headers["x-llm-failover-target"] == "azure"
    assert raw.headers["x-llm-failover-attempts"] == "2"
    assert resp.output_text.startswith("Hello from mock azure")
    assert resp.id in azure_mock.response_ids()
    [seen] = azure_mock.api_requests()
    assert (seen["method"], seen["path"], seen["query"]) == ("POST", "/openai/v1/responses", {})
    assert seen["api_style"] == "v1" and seen["credential"] == "api-key"
    assert seen["headers"]["api-key"] == AZURE_KEY and "authorization" not in seen["headers"]
    assert seen["body"]["model"] == "gpt-4o-prod" and seen["body"]["input"] == "Say hi."
    # Counted from usage.input_tokens / output_tokens.
    tokens = {k: gw.counter(f"llm_failover.tokens.target.azure.kind.{k}") for k in ("prompt", "completion")}
    assert tokens == {"prompt": resp.usage.input_tokens, "completion": resp.usage.output_tokens}


def test_a_healthy_primary_streams_the_responses_api_event_by_event(gw, openai_mock, azure_mock):
    openai_mock.configure(stream_delay_ms=150)
    client = make_client(gw)
    arrivals, types, text = [], [], ""
    start = time.monotonic()
    for event in client.responses.create(model="gpt-4o", input="Say hello.", stream=True):
        arrivals.append(time.monotonic() - start)
        types.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert text == "Hello from mock openai" and types.count("response.output_text.delta") == 4
    # Passed through as the upstream sends it: the deltas do not arrive in one burst.
    deltas = [t for t, kind in zip(arrivals, types) if kind == "response.output_text.delta"]
    assert deltas[-1] - deltas[0] > 0.4, arrivals
    [seen] = openai_mock.api_requests()
    assert seen["path"] == "/v1/responses" and seen["stream"]
    assert azure_mock.api_requests() == []


def test_a_failed_over_responses_stream_is_sdk_parsable(gw, openai_mock, azure_mock):
    openai_mock.script([{"status": 503}])
    client = make_client(gw)
    with client.responses.stream(model="gpt-4o", input="Say hi.") as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert final.output_text.startswith("Hello from mock azure")
    assert final.id in azure_mock.response_ids()
    [seen] = azure_mock.api_requests()
    assert seen["body"]["model"] == "gpt-4o-prod" and seen["body"]["stream"] is True


def test_a_follow_up_goes_to_the_target_that_created_the_response(gw, openai_mock, azure_mock):
    openai_mock.script([{"status": 500}])
    client = make_client(gw)
    _, first = raw_create(client)
    assert first.id in azure_mock.response_ids()
    # OpenAI is healthy again, but only Azure can find the previous response.
    raw, follow_up = raw_create(client, previous_response_id=first.id)
    assert raw.headers["x-llm-failover-target"] == "azure"
    assert raw.headers["x-llm-failover-attempts"] == "1"
    assert follow_up.previous_response_id == first.id
    assert len(openai_mock.api_requests()) == 1, "only the first, failed attempt"
    assert [r["body"].get("previous_response_id") for r in azure_mock.api_requests()] == [None, first.id]
    assert gw.counter("llm_failover.affinity_pins") >= 1
    harness.wait_for(lambda: "pinned to target=azure" in gw.log_text, what="the pinning log line")


def test_a_follow_up_whose_owner_fails_gets_that_failure_and_goes_nowhere_else(gw, openai_mock, azure_mock):
    openai_mock.script([{"status": 429, "retry_after": "30"}])
    client = make_client(gw)
    _, first = raw_create(client)
    openai_mock.reset()
    azure_mock.script([{"status": 503, "repeat": "forever"}])
    with pytest.raises(openai.InternalServerError) as failed:
        raw_create(client, previous_response_id=first.id)
    assert failed.value.status_code == 503
    assert failed.value.response.headers["x-llm-failover-target"] == "azure"
    assert failed.value.response.headers["x-llm-failover-attempts"] == "2", "the owner's retry, no failover"
    assert openai_mock.api_requests() == []


def test_a_follow_up_of_an_unknown_response_goes_down_the_chain(gw, openai_mock, azure_mock):
    with pytest.raises(openai.BadRequestError) as refused:
        raw_create(make_client(gw), previous_response_id="resp_" + "0" * 48)
    # Not known here: every target is asked; the last one's own "not found" is the answer.
    assert refused.value.code == "previous_response_not_found"
    assert refused.value.response.headers["x-llm-failover-target"] == "azure"
    assert refused.value.response.headers["x-llm-failover-attempts"] == "2"
    assert [r["body"]["previous_response_id"] for r in azure_mock.api_requests()] == ["resp_" + "0" * 48]


def test_stored_responses_are_read_and_deleted_on_the_target_that_has_them(gw, openai_mock, azure_mock):
    openai_mock.script([{"status": 502}])
    client = make_client(gw)
    _, created = raw_create(client)
    got = client.responses.retrieve(created.id)
    assert got.id == created.id and got.output_text == created.output_text
    items = client.responses.input_items.list(created.id, limit=5)
    assert [item.type for item in items.data] == ["message"]
    deleted = client.responses.delete(created.id)
    assert deleted is None
    paths = [(r["method"], r["path"], r["query"]) for r in azure_mock.api_requests()]
    assert paths == [("POST", "/openai/v1/responses", {}),
                     ("GET", f"/openai/v1/responses/{created.id}", {}),
                     ("GET", f"/openai/v1/responses/{created.id}/input_items", {"limit": "5"}),
                     ("DELETE", f"/openai/v1/responses/{created.id}", {})]
    assert all(r["headers"]["api-key"] == AZURE_KEY for r in azure_mock.api_requests()[1:])
    assert len(openai_mock.api_requests()) == 1
    # An id nobody here created is asked of every target, each with its own address and key.
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_unknown1")
    [*_, unknown] = openai_mock.api_requests()
    assert unknown["path"] == "/v1/responses/resp_unknown1"
    assert unknown["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    [*_, unknown] = azure_mock.api_requests()
    assert unknown["path"] == "/openai/v1/responses/resp_unknown1"
    assert unknown["headers"]["api-key"] == AZURE_KEY


def test_chat_and_embeddings_reach_a_v1_target_by_its_v1_paths(gw, openai_mock, azure_mock):
    openai_mock.script([{"status": 503, "repeat": 2}])
    client = make_client(gw)
    chat = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert chat.headers["x-llm-failover-target"] == "azure"
    assert chat.parse().choices[0].message.content == "Hello from mock azure deployment gpt-4o-prod"
    emb = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hi")
    assert emb.headers["x-llm-failover-target"] == "azure"
    seen = [(r["path"], r["query"], r["body"]["model"], r["api_style"]) for r in azure_mock.api_requests()]
    assert seen == [("/openai/v1/chat/completions", {}, "gpt-4o-prod", "v1"),
                    ("/openai/v1/embeddings", {}, "gpt-4o-mini-default", "v1")]


def test_legacy_completions_skip_a_v1_target(make_stack, openai_mock, azure_mock):
    gw = make_stack(plugin_config(
        [azure_target(api_version="v1", deployments=V1_DEPLOYMENTS, cooldown=False),
         openai_target(cooldown=False)]))
    r = gw.post_json("/v1/completions", {"model": "gpt-4o", "prompt": "hi"})
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-failover-target"] == "openai"
    assert r.headers["x-llm-failover-attempts"] == "1"
    assert azure_mock.api_requests() == []
    harness.wait_for(lambda: "skip target=azure reason=unsupported_operation" in gw.log_text,
                     what="the skip log line")
    assert gw.counter("llm_failover.operation_skips.target.azure") == 1
    # Chat still goes to the v1 target first.
    r = gw.post_json("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert r.headers["x-llm-failover-target"] == "azure"


def test_deployments_style_responses_use_the_targets_preview_api_version(make_stack, openai_mock, azure_mock):
    gw = make_stack(plugin_config(
        [openai_target(cooldown=False),
         azure_target(api_version="2025-04-01-preview", cooldown=False)]))
    openai_mock.script([{"status": 500}])
    client = make_client(gw)
    raw, created = raw_create(client)
    assert raw.headers["x-llm-failover-target"] == "azure"
    got = client.responses.retrieve(created.id)
    assert got.id == created.id
    seen = [(r["method"], r["path"], r["query"], r["body"] and r["body"].get("model"))
            for r in azure_mock.api_requests()]
    assert seen == [("POST", "/openai/responses", {"api-version": "2025-04-01-preview"}, "gpt-4o-prod"),
                    ("GET", f"/openai/responses/{created.id}", {"api-version": "2025-04-01-preview"}, None)]


def test_responses_are_never_cached(make_stack, openai_mock, azure_mock):
    gw = make_stack(v1_config(cache={"enabled": True, "ttl": "60s"}))
    client = make_client(gw)
    first, second = raw_create(client)[1], raw_create(client)[1]
    assert first.id != second.id
    assert len(openai_mock.api_requests()) == 2
    assert gw.counter("llm_failover.cache_hits") == 0
