"""Issue 25 in real Envoy with the official SDK: apps written for Azure OpenAI (``AzureOpenAI``, and
``OpenAI(base_url=<gateway>/openai/v1/)``) get failover too. The shipped example envoy/azure-first.yaml
(Azure first, OpenAI as its fallback) in front of the strict mocks: deployments-style and v1 requests
understood as their OpenAI-shaped twins, the deployment mapped to its model, each target addressed in
its own shape with its own credential and api-version, streams failed over through the router, and the
filter's own errors in Azure's error shape."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from conftest import serve_stack, use_shared_stack
from harness import AZURE_KEY, HTTP_TIMEOUT, OPENAI_KEY, file_plugin_config

AZURE_FIRST = "envoy/azure-first.yaml"
GATEWAY_KEY = "my-azure-app-key"  # envoy/azure-first.json's key "azure-app"
API_VERSION = "2024-10-21"
CLUSTERS = ("azure", "openai")  # the targets' own clusters, which the router retries over


def azure_first_config(**azure_fields) -> dict:
    """envoy/azure-first.yaml's plugin config with cooldowns off (tests run back to back)."""
    cfg = file_plugin_config(AZURE_FIRST)
    for t in cfg["targets"]:
        t["cooldown"] = False
        if t["name"] == "azure":
            t.update(azure_fields)
    return cfg


@pytest.fixture(scope="module")
def _azure_first_stack(_openai_server, _azure_server):
    yield from serve_stack(azure_first_config(), _openai_server, _azure_server, AZURE_FIRST)


@pytest.fixture
def gw(request, _azure_first_stack, openai_mock, azure_mock):
    """envoy/azure-first.yaml: Azure (v1 API, 1 retry) then OpenAI (1 retry), cooldowns off."""
    for m in (openai_mock, azure_mock):
        m.forbid([GATEWAY_KEY])  # the client's credential never reaches an upstream
    yield from use_shared_stack(request, _azure_first_stack, "the Azure-first Envoy")


def azure_client(stack, api_version: str = API_VERSION, **kw) -> openai.AzureOpenAI:
    kw.setdefault("api_key", GATEWAY_KEY)
    return openai.AzureOpenAI(azure_endpoint=stack.url(""), api_version=api_version, max_retries=0,
                              timeout=HTTP_TIMEOUT, **kw)


def v1_client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url("/openai/v1/"), api_key=GATEWAY_KEY, max_retries=0,
                         timeout=HTTP_TIMEOUT)


def chat(client, model: str, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], **kw)
    return raw, raw.parse()


def assert_on_azure_v1(seen: dict, path: str, deployment: str):
    """Azure's v1 API in its own shape: the deployment in the body, no api-version, the Azure key."""
    assert (seen["method"], seen["path"], seen["query"]) == ("POST", path, {})
    assert seen["api_style"] == "v1" and seen["body"]["model"] == deployment
    assert seen["headers"]["api-key"] == AZURE_KEY and "authorization" not in seen["headers"]


def assert_on_openai(seen: dict, path: str, model: str):
    assert (seen["method"], seen["path"], seen["query"]) == ("POST", path, {})
    assert seen["body"]["model"] == model
    assert seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}" and "api-key" not in seen["headers"]


# ----------------------------------------------------------------------------------------------
# chat: healthy and failed over, whatever the deployment is called


def test_an_azure_client_is_served_by_azure_in_azures_own_shape(gw, openai_mock, azure_mock):
    raw, completion = chat(azure_client(gw), "gpt-4o")  # a deployment named after its model
    assert raw.headers["x-llm-failover-target"] == "azure"
    assert raw.headers["x-llm-failover-attempts"] == "1"
    assert completion.choices[0].message.content.startswith("Hello from mock azure")
    [seen] = azure_mock.api_requests()
    # The client's api-version is not forwarded: the v1 target sends none.
    assert_on_azure_v1(seen, "/openai/v1/chat/completions", "gpt-4o-prod")
    assert seen["body"]["messages"] == [{"role": "user", "content": "hi"}]
    assert openai_mock.api_requests() == []


@pytest.mark.parametrize("deployment, model", [
    pytest.param("gpt-4o", "gpt-4o", id="named-after-its-model"),
    pytest.param("gpt-4o-prod", "gpt-4o", id="the-azure-targets-deployment"),
    pytest.param("chat", "gpt-4o", id="deployment_models"),
    pytest.param("gpt-4o-mini-default", "gpt-4o-mini", id="deployment_models-over-star"),
])
def test_an_azure_429_fails_over_to_openai_with_the_deployments_model(gw, openai_mock, azure_mock, deployment, model):
    azure_mock.script([{"status": 429, "retry_after": "30"}])  # over max_retry_wait: no retry
    raw, completion = chat(azure_client(gw), deployment)
    assert raw.headers["x-llm-failover-target"] == "openai"
    assert raw.headers["x-llm-failover-attempts"] == "2"
    assert completion.choices[0].message.content.startswith("Hello from mock openai")
    assert completion.model == model
    [tried] = azure_mock.api_requests()
    assert tried["status"] == 429
    assert_on_azure_v1(tried, "/openai/v1/chat/completions",
                       "gpt-4o-prod" if model == "gpt-4o" else "gpt-4o-mini-default")
    [seen] = openai_mock.api_requests()
    assert_on_openai(seen, "/v1/chat/completions", model)


def test_entra_style_and_v1_clients_authenticate_with_a_bearer_gateway_key(gw, openai_mock, azure_mock):
    """AzureOpenAI(azure_ad_token=...) and the OpenAI client send the gateway key as a bearer token."""
    raw, _ = chat(azure_client(gw, api_key=None, azure_ad_token=GATEWAY_KEY), "chat")
    assert raw.headers["x-llm-failover-target"] == "azure"
    azure_mock.script([{"status": 503, "repeat": 2}])
    raw, completion = chat(v1_client(gw), "gpt-4o-prod")  # v1: the body's model is the deployment
    assert raw.headers["x-llm-failover-target"] == "openai"
    assert raw.headers["x-llm-failover-attempts"] == "3"  # Azure, its retry, OpenAI
    assert completion.model == "gpt-4o"
    first, *retried = azure_mock.api_requests()
    assert_on_azure_v1(first, "/openai/v1/chat/completions", "gpt-4o-prod")
    assert [r["status"] for r in retried] == [503, 503]
    [seen] = openai_mock.api_requests()
    assert_on_openai(seen, "/v1/chat/completions", "gpt-4o")


# ----------------------------------------------------------------------------------------------
# streams


def stream(client, deployment: str):
    with client.chat.completions.with_streaming_response.create(
            model=deployment, messages=[{"role": "user", "content": "hi"}], stream=True) as resp:
        headers = resp.headers
        pieces = [c.choices[0].delta.content for c in resp.parse() if c.choices and c.choices[0].delta.content]
    return headers, pieces


def test_a_healthy_azure_streams_to_an_azure_client(gw, openai_mock, azure_mock):
    headers, pieces = stream(azure_client(gw), "chat")
    assert headers["x-llm-failover-target"] == "azure"
    assert "".join(pieces).startswith("Hello from mock azure") and len(pieces) > 2
    [seen] = azure_mock.api_requests()
    assert_on_azure_v1(seen, "/openai/v1/chat/completions", "gpt-4o-prod")
    assert seen["stream"]


@pytest.mark.parametrize("client", [azure_client, v1_client], ids=["AzureOpenAI", "OpenAI-on-v1"])
def test_a_stream_fails_over_through_the_router_and_keeps_streaming(gw, openai_mock, azure_mock, client):
    def retries() -> int:
        stats = gw.stats()
        return sum(stats.get(f"cluster.{c}.upstream_rq_retry", 0) for c in CLUSTERS)

    before = retries()
    azure_mock.script([{"status": 429, "repeat": 2}])
    headers, pieces = stream(client(gw), "gpt-4o-prod")
    assert headers["x-llm-failover-target"] == "openai"
    assert headers["x-llm-failover-attempts"] == "3"  # Azure, its retry, OpenAI
    assert "".join(pieces).startswith("Hello from mock openai") and len(pieces) > 2
    # Envoy's router retried it, over the targets' own clusters.
    assert retries() - before == 2
    tried = azure_mock.api_requests()
    assert [r["status"] for r in tried] == [429, 429]
    for rec in tried:
        assert_on_azure_v1(rec, "/openai/v1/chat/completions", "gpt-4o-prod")
    [seen] = openai_mock.api_requests()
    assert_on_openai(seen, "/v1/chat/completions", "gpt-4o")
    assert seen["stream"]


# ----------------------------------------------------------------------------------------------
# embeddings and the Responses API


def test_embeddings_are_served_and_failed_over(gw, openai_mock, azure_mock):
    client = azure_client(gw)
    raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hello")
    assert raw.headers["x-llm-failover-target"] == "azure" and len(raw.parse().data) == 1
    [seen] = azure_mock.api_requests()
    # Azure's "*" deployment serves a model it does not name.
    assert_on_azure_v1(seen, "/openai/v1/embeddings", "gpt-4o-mini-default")

    azure_mock.reset()
    azure_mock.script([{"status": 500, "repeat": 2}])
    raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hello")
    assert raw.headers["x-llm-failover-target"] == "openai" and len(raw.parse().data) == 1
    [seen] = openai_mock.api_requests()
    assert_on_openai(seen, "/v1/embeddings", "text-embedding-3-small")


def test_responses_with_a_follow_up_stay_with_the_target_that_holds_them(gw, openai_mock, azure_mock):
    client = azure_client(gw, api_version="2025-04-01-preview")
    first = client.responses.with_raw_response.create(model="chat", input="Say hi.")
    resp = first.parse()
    assert first.headers["x-llm-failover-target"] == "azure"
    assert resp.id in azure_mock.response_ids()
    follow = client.responses.with_raw_response.create(model="chat", input="Again.", previous_response_id=resp.id)
    assert follow.headers["x-llm-failover-target"] == "azure"
    assert follow.parse().previous_response_id == resp.id
    got = client.responses.retrieve(resp.id)
    assert got.id == resp.id
    items = client.responses.input_items.list(resp.id)
    assert len(items.data) >= 1
    client.responses.delete(resp.id)
    seen = azure_mock.api_requests()
    assert [(r["method"], r["path"], r["query"]) for r in seen] == [
        ("POST", "/openai/v1/responses", {}), ("POST", "/openai/v1/responses", {}),
        ("GET", f"/openai/v1/responses/{resp.id}", {}),
        ("GET", f"/openai/v1/responses/{resp.id}/input_items", {}),
        ("DELETE", f"/openai/v1/responses/{resp.id}", {})]
    assert [r["status"] for r in seen] == [200] * 5
    assert seen[1]["body"]["previous_response_id"] == resp.id
    assert all(r["headers"]["api-key"] == AZURE_KEY for r in seen)

    # The v1 client, with Azure throttled: OpenAI creates it, and the follow-up goes there too.
    azure_mock.reset()
    azure_mock.script([{"status": 429, "retry_after": "30"}])
    v1 = v1_client(gw)
    raw = v1.responses.with_raw_response.create(model="gpt-4o-prod", input="Say hi.")
    made = raw.parse()
    assert raw.headers["x-llm-failover-target"] == "openai" and made.id in openai_mock.response_ids()
    follow = v1.responses.with_raw_response.create(model="gpt-4o-prod", input="Again.",
                                                     previous_response_id=made.id)
    assert follow.headers["x-llm-failover-target"] == "openai"
    created = openai_mock.api_requests()
    assert len(created) == 2
    for rec in created:
        assert_on_openai(rec, "/v1/responses", "gpt-4o")
    assert v1.responses.retrieve(made.id).id == made.id
    assert len(azure_mock.api_requests()) == 1  # only the throttled create


# ----------------------------------------------------------------------------------------------
# api-version and the filter's own errors, in Azure's shape


def test_an_unsupported_api_version_is_refused_as_azure_refuses_it(gw, openai_mock, azure_mock):
    before = gw.counter("llm_failover.rejected.reason.invalid_api_version")
    for version in ("2024-13-45", "v1", "latest", "october"):
        with pytest.raises(openai.BadRequestError) as e:
            chat(azure_client(gw, api_version=version), "gpt-4o")
        assert e.value.status_code == 400
        assert e.value.body["code"] == "BadRequest"
        assert e.value.body["message"].startswith("API version not supported")
    # Deployments style without api-version: Azure's 404 "Resource not found".
    r = requests.post(gw.url("/openai/deployments/gpt-4o/chat/completions"), headers={"api-key": GATEWAY_KEY},
                      json={"messages": [{"role": "user", "content": "hi"}]}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 404
    assert r.json() == {"error": {"code": "404", "message": "Resource not found"}}
    assert openai_mock.api_requests() == [] and azure_mock.api_requests() == []
    assert gw.counter("llm_failover.rejected.reason.invalid_api_version") - before == 5


def test_the_filters_own_errors_are_azure_shaped(gw, openai_mock, azure_mock):
    with pytest.raises(openai.AuthenticationError) as e:
        chat(azure_client(gw, api_key="not-the-gateway-key"), "gpt-4o")
    assert set(e.value.body) == {"code", "message"} and e.value.body["code"] == "invalid_api_key"

    url = gw.url(f"/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}")
    r = requests.post(url, headers={"api-key": GATEWAY_KEY, "content-type": "application/json"}, data=b"[1, 2]",
                      timeout=HTTP_TIMEOUT)
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"code", "message"} and r.json()["error"]["code"] == "invalid_request_body"

    big = json.dumps({"messages": [{"role": "user", "content": "x" * (4 * 1024 * 1024 + 10)}]})
    r = requests.post(url, headers={"api-key": GATEWAY_KEY, "content-type": "application/json"}, data=big,
                      timeout=HTTP_TIMEOUT)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert openai_mock.api_requests() == [] and azure_mock.api_requests() == []

    # Every attempt reset before an answer: the filter's 502, with who was tried last.
    for m in (azure_mock, openai_mock):
        m.script([{"close": True, "repeat": 2}])
    with pytest.raises(openai.APIStatusError) as e:
        chat(azure_client(gw), "gpt-4o")
    assert e.value.status_code == 502
    assert e.value.body == {"code": "upstream_unavailable", "message": e.value.body["message"]}
    assert e.value.response.headers["x-llm-failover-target"] == "openai"
    assert e.value.response.headers["x-llm-failover-attempts"] == "4"


def test_an_openai_client_still_gets_openais_error_shape(gw, openai_mock, azure_mock):
    r = requests.post(gw.url("/v1/chat/completions"), headers={"authorization": "Bearer wrong"},
                      json={"model": "gpt-4o", "messages": []}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 401
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ----------------------------------------------------------------------------------------------
# a route on an Azure-shaped path, and an Azure target of the deployments style


def test_a_route_on_a_deployments_path_takes_its_own_chain(gw, openai_mock, azure_mock):
    """envoy/azure-first.json's route "team-a": deployment team-a is OpenAI first, gpt-4o-mini."""
    raw, completion = chat(azure_client(gw), "team-a")
    assert raw.headers["x-llm-failover-target"] == "openai"
    assert completion.model == "gpt-4o-mini"
    [seen] = openai_mock.api_requests()
    assert_on_openai(seen, "/v1/chat/completions", "gpt-4o-mini")
    assert azure_mock.api_requests() == []
    openai_mock.script([{"status": 429, "retry_after": "30"}])
    raw, _ = chat(azure_client(gw), "team-a")
    assert raw.headers["x-llm-failover-target"] == "azure"
    [seen] = azure_mock.api_requests()
    assert_on_azure_v1(seen, "/openai/v1/chat/completions", "gpt-4o-mini-default")


@pytest.mark.test_timeout(180)
def test_deployments_style_azure_targets_get_their_own_deployment_and_api_version(make_stack, mock_factory,
                                                                                   openai_mock, azure_mock):
    """Azure, then a second Azure resource with other deployment names, then OpenAI: an Azure
    client's deployment reaches each as that target's own deployment for the model."""
    west = mock_factory("azure", name="azure-west", api_key=AZURE_KEY, resource="llmf-west",
                        api_versions="2024-06-01", deployments="gpt4o-west")
    cfg = azure_first_config(api_version="2024-10-21")
    second = dict(next(t for t in cfg["targets"] if t["name"] == "azure"), name="azure-west",
                  cluster="azure-west", resource_name="llmf-west", api_version="2024-06-01",
                  deployments={"gpt-4o": "gpt4o-west"})
    cfg["targets"].insert(1, second)
    gw = make_stack(cfg, base_config=AZURE_FIRST, clusters={"azure-west": west.port})
    for m in (openai_mock, azure_mock, west):
        m.forbid([GATEWAY_KEY])
    client = azure_client(gw, api_version="2025-01-01-preview")
    raw, _ = chat(client, "chat")
    assert raw.headers["x-llm-failover-target"] == "azure"
    [seen] = azure_mock.api_requests()
    assert (seen["path"], seen["query"]) == ("/openai/deployments/gpt-4o-prod/chat/completions",
                                             {"api-version": "2024-10-21"})
    assert seen["headers"]["api-key"] == AZURE_KEY

    azure_mock.reset()
    azure_mock.script([{"status": 429, "retry_after": "30"}])
    raw, completion = chat(client, "gpt-4o-prod")
    assert raw.headers["x-llm-failover-target"] == "azure-west"
    assert completion.choices[0].message.content.startswith("Hello from mock azure-west")
    [seen] = west.api_requests()
    assert (seen["path"], seen["query"]) == ("/openai/deployments/gpt4o-west/chat/completions",
                                             {"api-version": "2024-06-01"})

    # Streamed and failed over past both: the router addresses each attempt in its target's shape.
    for m in (azure_mock, west):
        m.reset()
        m.script([{"status": 429, "repeat": 2}])
    headers, pieces = stream(client, "chat")
    assert headers["x-llm-failover-target"] == "openai" and "".join(pieces).startswith("Hello from mock openai")
    assert headers["x-llm-failover-attempts"] == "5"
    assert [(r["path"], r["query"]["api-version"]) for r in azure_mock.api_requests()] == [
        ("/openai/deployments/gpt-4o-prod/chat/completions", "2024-10-21")] * 2
    assert [(r["path"], r["query"]["api-version"]) for r in west.api_requests()] == [
        ("/openai/deployments/gpt4o-west/chat/completions", "2024-06-01")] * 2
    [seen] = openai_mock.api_requests()
    assert_on_openai(seen, "/v1/chat/completions", "gpt-4o")
