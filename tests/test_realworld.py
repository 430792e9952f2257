"""What real services send and real apps call (issue 24), against a real Envoy.

Each test pins down a gap that the lab's own mocks hid:

1. a target that cannot serve an operation is never sent it: an Azure deployments-style target
   older than ``2025-03-01-preview`` is skipped for the Responses API (Azure would answer 400
   "Azure OpenAI Responses API is enabled only for api-version 2025-03-01-preview and later"),
   with one warning at load; the shipped ``envoy/local.yaml`` (``make run``) fails Responses over;
2. a healthy stream streams in every wiring: on a route without the streamed-failover wiring
   (README, "Streamed failover"), once Envoy has shown a worker so (the one streamed request that
   did is served through a callout, whole), the first attempt is routed (chunk by chunk), and only
   a failover arrives whole;
3. an upstream's answer is judged by its status: OpenAI's own plain-text 503 ("upstream connect
   error or disconnect/reset before headers. reset reason: connection termination", recorded in
   public test cassettes of the OpenAI SDKs) is the provider's 503, not a transport failure, on
   the routed attempt and on a callout;
4. a target refusing the gateway's credential (401/403) is failed over, cooled down, logged once
   at warn (``credential_rejected``) and counted, unless switched off;
5. the deadline bounds the chain, not an answer that started: a stream longer than the deadline
   arrives whole, with ``[DONE]``;
6. short-lived Entra ID tokens with the first target down: no request fails.

Timing assertions are bounds with generous margins (a loaded 2-core box): "streamed" means the
content chunks arrived spread over most of the time the mock took to send them, "one burst" that
they arrived within a small fraction of it.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid

import pytest
import requests

import harness
from harness import (AZURE_KEY, OPENAI_KEY, azure_target, file_plugin_config, make_client, openai_target,
                     plugin_config, start_entra_mock)

pytestmark = pytest.mark.envoy

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "gpt-4o", "messages": MESSAGES}
OPENAI_TEXT = "Hello from mock openai"
AZURE_TEXT = "Hello from mock azure deployment gpt-4o-prod"
OLD_API_VERSION = "2024-10-21"
RESPONSES_API_VERSION = "2025-04-01-preview"
# OpenAI's edge answers this when its backend resets (a cassette of the OpenAI SDKs' tests).
OPENAI_EDGE_503 = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"


def rid() -> str:
    return "rid-real-" + uuid.uuid4().hex[:12]


def local_config(**changes) -> dict:
    """envoy/local.yaml's plugin config, cooldowns off unless a target's fields say otherwise:
    changes = {"openai": {...}, "azure": {...}, top-level...}."""
    cfg = file_plugin_config()
    for t in cfg["targets"]:
        t["cooldown"] = False
        t.update(changes.pop(t["name"], {}))
    cfg.update(changes)
    return cfg


def sse_arrivals(response: requests.Response) -> tuple[list[float], list[str], float]:
    """(arrival time of each `data:` line carrying content, the data lines, total time) of a
    streamed answer read line by line."""
    t0 = time.monotonic()
    times, lines = [], []
    for line in response.iter_lines():
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):].decode()
        lines.append(data)
        if data != "[DONE]" and _content(data):
            times.append(time.monotonic() - t0)
    return times, lines, time.monotonic() - t0


def _content(data: str) -> str:
    event = json.loads(data)
    if event.get("type") == "response.output_text.delta":
        return event.get("delta") or ""
    choices = event.get("choices") or []
    return ((choices[0].get("delta") or {}).get("content") or "") if choices else ""


def streamed_text(lines: list[str]) -> str:
    return "".join(_content(d) for d in lines if d != "[DONE]")


# ----------------------------------------------------------------------------------------------
# A stand-in for OpenAI's edge: answers every request with a recorded answer.


class RecordedAnswer:
    """An HTTP server on a free loopback port that answers every request with one recorded
    status, content type and body (the request's body is read, never used)."""

    def __init__(self, status: int, content_type: str, body: bytes, reason: str | None = None):
        answer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                answer.requests.append({"path": self.path, "headers": dict(self.headers)})
                self.send_response(status, reason)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.requests: list[dict] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def openai_edge_503():
    server = RecordedAnswer(503, "text/plain", OPENAI_EDGE_503)
    yield server
    server.stop()


# ----------------------------------------------------------------------------------------------
# 1. a target that cannot serve the Responses API is never sent it


def test_responses_skip_an_azure_target_whose_api_version_has_no_responses_api(make_stack, openai_mock,
                                                                                azure_mock):
    targets = [openai_target(cooldown=False),
               azure_target("azure-old", cluster="azure", api_version=OLD_API_VERSION, cooldown=False),
               azure_target("azure-new", cluster="azure", api_version=RESPONSES_API_VERSION, cooldown=False)]
    gw = make_stack(plugin_config(targets))
    warnings = [line for line in gw.log_text.splitlines() if "targets[1].api_version" in line]
    assert len(warnings) >= 1 and all("][warning][" in w and "Responses API" in w for w in warnings), warnings
    assert not [line for line in gw.log_text.splitlines() if "targets[2].api_version" in line]

    openai_mock.script([{"status": 429, "repeat": "forever"}])
    request_id = rid()
    r = gw.post_json("/v1/responses", {"model": "gpt-4o", "input": "Say hi."}, headers={"x-request-id": request_id})
    assert r.status_code == 200, r.text
    assert (r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) == ("azure-new", "2")
    [seen] = azure_mock.api_requests()
    assert (seen["path"], seen["query"]) == ("/openai/responses", {"api-version": RESPONSES_API_VERSION})
    assert gw.counter("llm_failover.operation_skips.target.azure-old") == 1
    harness.wait_for(lambda: f"req={request_id}] skip target=azure-old reason=unsupported_operation" in gw.log_text,
                     5, what="the skip's log line")

    # Chat is served by the old version as before.
    openai_mock.reset()
    azure_mock.reset()
    openai_mock.script([{"status": 429, "repeat": "forever"}])
    r = gw.chat()
    assert r.status_code == 200 and r.headers["x-llm-failover-target"] == "azure-old", r.text


def test_the_shipped_local_config_fails_the_responses_api_over(stack, openai_mock, azure_mock):
    """`make run`'s config: OpenAI rate-limited, the Responses API request is served by Azure."""
    openai_mock.script([{"status": 429, "repeat": 2}])
    client = make_client(stack)
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="Say hi.")
    assert (raw.headers["x-llm-failover-target"], raw.headers["x-llm-failover-attempts"]) == ("azure", "3")
    assert raw.parse().output_text
    [seen] = azure_mock.api_requests()
    assert seen["path"] == "/openai/responses" and seen["status"] == 200


# ----------------------------------------------------------------------------------------------
# 2. a healthy stream streams without the streamed-failover wiring


DELAY = 0.3


@pytest.mark.parametrize("operation", ["chat", "responses"])
def test_a_healthy_stream_streams_without_the_streamed_failover_wiring(make_stack, openai_mock, azure_mock,
                                                                        operation):
    # One worker: the request that shows it the route lacks the wiring is the only one served whole.
    gw = make_stack(local_config(), stream_side=False, concurrency=1)
    assert harness.wiring.problems(gw.config) != []
    openai_mock.configure(stream_delay_ms=int(DELAY * 1000))
    if operation == "chat":
        path, body = "/v1/chat/completions", {**CHAT, "stream": True}
    else:
        path, body = "/v1/responses", {"model": "gpt-4o", "input": "Say hi.", "stream": True}
    arrivals = []
    for _ in range(2):
        with gw.request("POST", path, json=body, stream=True) as r:
            assert r.status_code == 200
            assert (r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) == ("openai", "1")
            times, lines, took = sse_arrivals(r)
        assert streamed_text(lines) == OPENAI_TEXT
        arrivals.append(times)
    print("content at", [[round(t, 3) for t in times] for times in arrivals])
    words = len(OPENAI_TEXT.split())
    first, second = arrivals
    # The first went through a callout (Envoy has no cluster named by the list): one burst.
    assert first[-1] - first[0] < DELAY, first
    # The second was routed: sent DELAY apart, spread over (words - 1) * DELAY.
    assert len(second) == words
    assert second[-1] - second[0] >= (words - 1) * DELAY * 0.6, second
    gaps = [b - a for a, b in zip(second, second[1:])]
    assert min(gaps) >= DELAY * 0.4, gaps
    # Only the requests themselves reached OpenAI.
    assert len(openai_mock.api_requests()) == 2 and azure_mock.api_requests() == []


def test_without_the_wiring_only_a_failover_arrives_whole(make_stack, openai_mock, azure_mock):
    gw = make_stack(local_config(), stream_side=False)
    openai_mock.script([{"status": 429, "repeat": "forever"}])
    azure_mock.configure(stream_delay_ms=int(DELAY * 1000))
    with gw.request("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, stream=True) as r:
        assert r.status_code == 200
        assert (r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) == ("azure", "3")
        times, lines, took = sse_arrivals(r)
    assert streamed_text(lines) == AZURE_TEXT and lines[-1] == "[DONE]"
    # The callout's answer is buffered by Envoy: every chunk at once, at the end.
    assert times[-1] - times[0] < DELAY, times


# ----------------------------------------------------------------------------------------------
# 3. an upstream's plain-text 503 is its status, not a transport failure


def test_openais_plain_text_503_on_the_routed_attempt_reaches_the_client(make_stack, openai_mock, azure_mock,
                                                                          openai_edge_503):
    gw = make_stack(local_config(strategy={"on_status_codes": [429]}), clusters={"openai": openai_edge_503.port})
    r = gw.chat()
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "text/plain"
    assert r.content == OPENAI_EDGE_503
    assert (r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) == ("openai", "1")
    assert len(openai_edge_503.requests) == 1 and azure_mock.api_requests() == []
    assert gw.counter("llm_failover.attempts.target.openai.status.5xx") == 1
    assert gw.counter("llm_failover.attempts.target.openai.status.transport") == 0


def test_openais_plain_text_503_on_a_callout_reaches_the_client(make_stack, openai_mock, azure_mock,
                                                                 openai_edge_503):
    """The fallback (a callout) answers the recorded 503: with 503 not a failover status, it is the
    client's answer, counted as 5xx."""
    cfg = local_config(strategy={"on_status_codes": [429]}, openai={"retries": 0}, azure={"retries": 0})
    gw = make_stack(cfg, clusters={"azure": openai_edge_503.port})
    openai_mock.script([{"status": 429}])
    r = gw.chat()
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "text/plain"
    assert r.content == OPENAI_EDGE_503
    assert (r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) == ("azure", "2")
    assert gw.counter("llm_failover.attempts.target.azure.status.5xx") == 1
    assert gw.counter("llm_failover.attempts.target.azure.status.transport") == 0


def test_a_plain_text_503_that_is_a_failover_status_fails_over_as_a_5xx(make_stack, openai_mock, azure_mock,
                                                                       openai_edge_503):
    gw = make_stack(local_config(openai={"retries": 0}), clusters={"openai": openai_edge_503.port})
    request_id = rid()
    r = gw.chat(headers={"x-request-id": request_id})
    assert r.status_code == 200 and r.headers["x-llm-failover-target"] == "azure", r.text
    assert gw.counter("llm_failover.attempts.target.openai.status.5xx") == 1
    assert gw.counter("llm_failover.attempts.target.openai.status.transport") == 0
    harness.wait_for(lambda: f"req={request_id}] failover from=openai to=azure after status=503" in gw.log_text,
                     5, what="the failover's log line")


# ----------------------------------------------------------------------------------------------
# 4. a target refusing the gateway's credential is failed over


@pytest.mark.allow_leaks
def test_a_rejected_provider_key_fails_over_cools_the_target_and_warns_once(make_stack, openai_mock, azure_mock):
    wrong_key = "sk-revoked-" + uuid.uuid4().hex
    cfg = local_config(openai={"api_key": wrong_key, "retries": 2, "cooldown": {"duration": "30s"}})
    del cfg["targets"][0]["api_key_env"]
    gw = make_stack(cfg)
    r = gw.chat()
    assert r.status_code == 200, r.text
    # Not retried on OpenAI (the same key would be refused again): straight to Azure.
    assert (r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) == ("azure", "2")
    [refused] = openai_mock.api_requests()
    assert refused["status"] == 401
    # Cooling: the next requests go straight to Azure.
    for _ in range(3):
        r = gw.chat()
        assert (r.status_code, r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) == (
            200, "azure", "1")
    assert len(openai_mock.api_requests()) == 1
    assert gw.counter("llm_failover.credential_rejections.target.openai") == 1
    harness.wait_for(lambda: "credential_rejected" in gw.log_text, 5, what="the warning")
    warned = [line for line in gw.log_text.splitlines() if "credential_rejected" in line]
    assert len(warned) == 1 and "][warning][" in warned[0] and "target=openai" in warned[0], warned
    assert wrong_key not in gw.log_text and wrong_key[:16] not in gw.log_text


@pytest.mark.allow_leaks
def test_a_rejected_key_on_a_streamed_request_fails_over_through_the_router(make_stack, openai_mock, azure_mock):
    cfg = local_config(openai={"api_key": "sk-revoked-" + uuid.uuid4().hex, "retries": 0}, azure={"retries": 0})
    del cfg["targets"][0]["api_key_env"]
    gw = make_stack(cfg)
    with gw.request("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, stream=True) as r:
        assert r.status_code == 200
        assert (r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) == ("azure", "2")
        _, lines, _ = sse_arrivals(r)
    assert streamed_text(lines) == AZURE_TEXT
    assert gw.counter("llm_failover.credential_rejections.target.openai") == 1


@pytest.mark.allow_leaks
def test_credential_rejections_are_passed_on_when_switched_off(make_stack, openai_mock, azure_mock):
    cfg = local_config(openai={"api_key": "sk-revoked-" + uuid.uuid4().hex},
                       strategy={"failover_on_credential_rejection": False})
    del cfg["targets"][0]["api_key_env"]
    gw = make_stack(cfg)
    r = gw.chat()
    assert r.status_code == 401, r.text
    assert r.headers["x-llm-failover-target"] == "openai" and azure_mock.api_requests() == []
    assert gw.counter("llm_failover.credential_rejections.target.openai") == 0


# ----------------------------------------------------------------------------------------------
# 5. the deadline bounds the chain, not an answer that started


@pytest.mark.parametrize("wiring", ["router", "no_stream_clusters", "callout"])
@pytest.mark.test_timeout(60)
def test_a_stream_longer_than_the_deadline_arrives_whole(make_stack, openai_mock, azure_mock, wiring):
    """deadline 2 s, target timeout 1 s; OpenAI streams its answer over ~4 s: all of it, [DONE]."""
    changes = {"deadline": "2s", "openai": {"timeout": "1s"}}
    if wiring == "callout":
        changes["streaming"] = {"failover": "callout"}
    gw = make_stack(local_config(**changes), stream_side=wiring == "router", concurrency=1)
    if wiring == "no_stream_clusters":
        # The one streamed request that shows the worker its route lacks the wiring is served
        # through a callout (whole, within its target's timeout); the worker then routes streams.
        with gw.request("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status_code == 200 and "[DONE]" in r.text
        openai_mock.reset()
    openai_mock.configure(stream_delay_ms=700)
    with gw.request("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, stream=True) as r:
        assert r.status_code == 200
        assert r.headers["x-llm-failover-target"] == "openai"
        times, lines, took = sse_arrivals(r)
    assert took >= 3.0, took
    assert streamed_text(lines) == OPENAI_TEXT and lines[-1] == "[DONE]", lines
    assert azure_mock.api_requests() == []
    time.sleep(0.3)
    access = [line for line in gw.access_log() if "/v1/chat/completions" in line][-1]
    assert " 200 " in access and " UT " not in access, access


# ----------------------------------------------------------------------------------------------
# 6. short-lived Entra ID tokens with the first target down


TENANT, CLIENT, SECRET = "11111111-2222-3333-4444-555555555555", "app-client-1", "s3cret~client.value"
TOKEN_SECRET = "hmac-shared-by-the-two-mocks"


@pytest.mark.test_timeout(90)
def test_short_lived_tokens_with_the_first_target_down_fail_no_request(make_stack, mock_factory):
    entra = start_entra_mock(tenant_id=TENANT, client_id=CLIENT, client_secret=SECRET, token_secret=TOKEN_SECRET,
                             token_lifetime_s=3)
    try:
        azure = mock_factory("azure", name="azure", entra_token_secret=TOKEN_SECRET, api_key="not-used-here",
                             api_versions=OLD_API_VERSION, deployments="gpt-4o-prod,gpt-4o-mini-default")
        ad = azure_target(cooldown=False, retries=0)
        del ad["api_key_env"]
        ad["azure_ad"] = {"cluster": "entra", "tenant_id": TENANT, "client_id": CLIENT,
                          "client_secret_env": "AZURE_CLIENT_SECRET"}
        down = openai_target(cooldown=False, retries=0, timeout="2s")
        # OpenAI's cluster points at a closed port: every first attempt is refused.
        clusters = {"openai": harness.free_port(), "azure": azure.port, "entra": entra.port}
        gw = make_stack(plugin_config([down, ad]), clusters=clusters, vm_env={"AZURE_CLIENT_SECRET": SECRET})
        harness.wait_for(lambda: gw.counter("llm_failover.token_fetches.target.azure.result.ok") >= 1, 10,
                         what="the first token")
        failed, served, began = [], 0, time.monotonic()
        with requests.Session() as s:
            while time.monotonic() - began < 10 and served + len(failed) < 2000:
                r = s.post(gw.url("/v1/chat/completions"), json=CHAT, timeout=10)
                if r.status_code == 200 and r.headers.get("x-llm-failover-target") == "azure":
                    served += 1
                else:
                    failed.append((round(time.monotonic() - began, 3), r.status_code, r.text[:200]))
                time.sleep(0.02)
        assert served > 100 and failed == [], (served, failed)
        seen = azure.api_requests()
        assert not any(r["entra_token"]["expired"] for r in seen)
    finally:
        leaks = entra.leaks()
        entra.stop()
        assert leaks == []
