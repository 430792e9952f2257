"""Issue 16 in real Envoy (2 workers): Entra ID tokens the filter obtains and refreshes itself, from
client credentials or a managed identity (IMDS), against strict token mocks whose tokens the Azure
mock accepts only until they expire."""

from __future__ import annotations

import re
import time

import pytest
import requests

import harness
from harness import azure_target, openai_target, plugin_config, start_entra_mock

TENANT, CLIENT, SECRET = "11111111-2222-3333-4444-555555555555", "app-client-1", "s3cret~client.value"
TOKEN_SECRET = "hmac-shared-by-the-two-mocks"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def entra():
    mock = start_entra_mock(tenant_id=TENANT, client_id=CLIENT, client_secret=SECRET, token_secret=TOKEN_SECRET,
                            token_lifetime_s=3)
    yield mock
    leaks = mock.leaks()
    mock.stop()
    assert leaks == []


@pytest.fixture
def azure_ad_mock(mock_factory):
    """An Azure mock that accepts the Entra mock's tokens until they expire (and no api-key)."""
    return mock_factory("azure", name="azure", entra_token_secret=TOKEN_SECRET, api_key="not-used-here",
                        api_versions="2024-10-21", deployments="gpt-4o-prod,gpt-4o-mini-default")


def ad_target(**azure_ad) -> dict:
    t = azure_target(cooldown=False, retries=0)
    del t["api_key_env"]
    t["azure_ad"] = {"cluster": "entra", **azure_ad}
    return t


def client_credentials(**extra) -> dict:
    return ad_target(tenant_id=TENANT, client_id=CLIENT, client_secret_env="AZURE_CLIENT_SECRET", **extra)


def start(make_stack, entra, azure_ad_mock, targets, **kw):
    kw.setdefault("vm_env", {"AZURE_CLIENT_SECRET": SECRET})
    stack = make_stack(plugin_config(targets), clusters={"azure": azure_ad_mock.port, "entra": entra.port}, **kw)
    harness.wait_for(lambda: stack.counter("llm_failover.token_fetches.target.azure.result.ok") >= 1, 10,
                     what="the first token")
    return stack


def fetches(entra) -> list[dict]:
    return [r for r in entra.requests() if r["endpoint"] in ("entra", "imds")]


def test_short_lived_tokens_under_steady_traffic_never_fail_a_request(make_stack, entra, azure_ad_mock):
    stack = start(make_stack, entra, azure_ad_mock, [client_credentials()])
    statuses, began = [], time.monotonic()
    with requests.Session() as s:
        while time.monotonic() - began < 7.5:
            statuses.append(s.post(stack.url("/v1/chat/completions"), json=CHAT, timeout=10).status_code)
            time.sleep(0.03)
    assert len(statuses) > 100 and set(statuses) == {200}, statuses
    seen = azure_ad_mock.api_requests()
    assert {r["credential"] for r in seen} == {"entra"}
    assert not any(r["entra_token"]["expired"] for r in seen)
    # 3 s tokens refreshed at half their life, shared by both workers: one fetch per refresh.
    got = fetches(entra)
    assert 4 <= len(got) <= 8, [(r["time"], r["status"]) for r in got]
    assert all(r["status"] == 200 for r in got)
    gaps = [b["time"] - a["time"] for a, b in zip(got, got[1:])]
    assert min(gaps) > 1.0, gaps
    form = got[0]["form"]
    assert (form["grant_type"], form["client_id"], form["scope"]) == (
        "client_credentials", CLIENT, "https://cognitiveservices.azure.com/.default")
    assert got[0]["client_secret_ok"] is True
    assert got[0]["headers"]["host"] == "login.microsoftonline.com"
    assert got[0]["path"] == f"/{TENANT}/oauth2/v2.0/token"
    assert stack.counter("llm_failover.token_seconds_left.target.azure") <= 3


def test_a_failing_token_endpoint_is_retried_while_the_token_serves(make_stack, entra, azure_ad_mock, openai_mock):
    entra.set_token_lifetime(4)
    stack = start(make_stack, entra, azure_ad_mock, [client_credentials(), openai_target(cooldown=False)])
    issued = fetches(entra)[0]["time"]
    entra.script([{"status": 503, "repeat": "forever"}])
    # Until the token's expiry (4 s, refreshed from 2 s on; not sent in its last second) Azure
    # keeps serving.
    served = []
    with requests.Session() as s:
        while time.time() < issued + 2.8:
            served.append(s.post(stack.url("/v1/chat/completions"), json=CHAT, timeout=10).headers[
                "x-llm-failover-target"])
            time.sleep(0.05)
    assert set(served) == {"azure"}, served
    failing = [r for r in fetches(entra) if r["status"] == 503]
    assert len(failing) >= 1, "the refresh was tried"
    gaps = [b["time"] - a["time"] for a, b in zip(failing, failing[1:])]
    assert all(g > 0.9 for g in gaps), f"backoff between tries: {gaps}"
    # Once it has expired, the target is skipped and the next one serves.
    time.sleep(max(0.0, issued + 4.2 - time.time()))
    r = stack.post_json("/v1/chat/completions", CHAT)
    assert (r.status_code, r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) == (
        200, "openai", "1")
    harness.wait_for(lambda: "skip target=azure reason=no_token" in stack.log_text, what="the skip line")
    assert stack.counter("llm_failover.token_fetches.target.azure.result.error") >= 1


def test_a_wrong_client_secret_skips_the_azure_target_and_the_next_serves(make_stack, entra, azure_ad_mock,
                                                                         openai_mock):
    stack = make_stack(plugin_config([client_credentials(), openai_target(cooldown=False)]),
                       clusters={"azure": azure_ad_mock.port, "entra": entra.port},
                       vm_env={"AZURE_CLIENT_SECRET": "not-the-secret"})
    harness.wait_for(lambda: stack.counter("llm_failover.token_fetches.target.azure.result.error") >= 1, 10,
                     what="a failed fetch")
    r = stack.post_json("/v1/chat/completions", CHAT)
    assert (r.status_code, r.headers["x-llm-failover-target"]) == (200, "openai")
    assert azure_ad_mock.api_requests() == []
    [first, *_] = fetches(entra)
    assert (first["status"], first["error"], first["client_secret_ok"]) == (401, "invalid_client", False)
    harness.wait_for(lambda: re.search(r"token fetch for target=azure failed \(status=401 error=invalid_client\)",
                                       stack.log_text), what="the failure line")
    # With no other target, the client gets a clear 503 instead of a doomed attempt.
    only = make_stack(plugin_config([client_credentials()]),
                      clusters={"azure": azure_ad_mock.port, "entra": entra.port},
                      vm_env={"AZURE_CLIENT_SECRET": "not-the-secret"})
    harness.wait_for(lambda: only.counter("llm_failover.token_fetches.target.azure.result.error") >= 1, 10)
    r = only.post_json("/v1/chat/completions", CHAT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "credential_unavailable"


def test_a_managed_identity_gets_its_tokens_from_imds(make_stack, entra, azure_ad_mock):
    stack = make_stack(plugin_config([ad_target(managed_identity=True)]),
                       clusters={"azure": azure_ad_mock.port, "entra": entra.port})
    harness.wait_for(lambda: stack.counter("llm_failover.token_fetches.target.azure.result.ok") >= 1, 10,
                     what="the first token")
    r = stack.post_json("/v1/chat/completions", CHAT)
    assert r.status_code == 200
    [seen] = azure_ad_mock.api_requests()
    assert seen["credential"] == "entra" and not seen["entra_token"]["expired"]
    [first, *_] = fetches(entra)
    assert (first["endpoint"], first["method"], first["path"]) == ("imds", "GET", "/metadata/identity/oauth2/token")
    assert first["query"] == {"api-version": "2018-02-01", "resource": "https://cognitiveservices.azure.com"}
    assert first["headers"]["metadata"] == "true"
    assert first["headers"]["host"] == "169.254.169.254"


def test_no_client_secret_or_token_in_a_trace_level_log(make_stack, entra, azure_ad_mock, openai_mock):
    stack = start(make_stack, entra, azure_ad_mock, [client_credentials(), openai_target(cooldown=False)],
                  component_log_level="wasm:trace")
    assert stack.post_json("/v1/chat/completions", CHAT).status_code == 200
    azure_ad_mock.script([{"status": 503}])
    assert stack.post_json("/v1/chat/completions", CHAT).status_code == 200  # failed over to openai
    entra.script([{"status": 401}])
    time.sleep(2.0)  # a refresh fails
    stats = stack.admin("/stats").text + stack.prometheus()
    log = stack.log_text
    assert re.search(r"\[trace\]\[wasm\]", log), "the wasm component did not log at trace"
    wasm_lines = "\n".join(line for line in log.splitlines() if "][wasm]" in line)
    assert "token for target=azure fetched" in wasm_lines
    for text in (wasm_lines, stats, "\n".join(stack.access_log())):
        assert SECRET not in text
        assert not re.search(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", text), "a JWT reached the log or stats"
