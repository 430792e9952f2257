"""Streamed failover through Envoy's router, against a real Envoy with the official OpenAI SDK.

A ``"stream": true`` request whose chain can fail over (chat completions, legacy completions, the
Responses API) is handed to Envoy's router with the cluster of each attempt named in
``x-llm-failover-cluster`` (the targets' own clusters, walked by the route's ``priority_group``
specifier) and retries enabled for that one request; the upstream Wasm filter on each target
cluster addresses each attempt for its target. What is pinned down here:

* the fallback's answer *streams*: its chunks reach the client as the provider sends them (the
  mocks send them ``stream_delay_ms`` apart), not in one burst at the end as on the callout path
  (``"streaming": {"failover": "callout"}``, or no streamed-failover wiring in Envoy), which is
  measured side by side;
* failover on 429, 503, refused connections and resets before the headers; each attempt
  addressed for its provider (path, deployment, api-version, credential, Azure v1 body model);
* what the client sees (``x-llm-failover-target`` / ``-attempts``, the last provider's error when
  every attempt failed with a status, the filter's JSON 502/504 when nothing answered or the
  deadline ran out), the per-try timeout bounding only the time to the response headers;
* stats, decision log lines and the access log of a streamed failover, cooldowns leaving a
  cooling target out of the plan, Responses API affinity of a streamed response id;
* Envoy's side missing (a warning, callouts instead) or miswired (an attempt on another cluster
  than its target's is refused), client-sent router control headers having no effect, and
  concurrency (the target clusters' retry circuit breaker never turns failover off).

Timing assertions are tolerant (a loaded 2-core box) but tell "streamed" from "one burst": with
chunks 0.3 s apart, a streamed answer's first content arrives within ~1 s and consecutive
content chunks >= 0.15 s apart, a burst's content arrives all within a fraction of that.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass, field

import openai
import pytest
import requests

import harness
from harness import AZURE_KEY, OPENAI_KEY, azure_target, free_port, make_client, openai_target, plugin_config, wait_for

pytestmark = pytest.mark.envoy

DELAY = 0.3  # seconds between the fallback's SSE chunks in the timed tests
API_VERSION = "2025-04-01-preview"  # envoy/local.yaml's Azure target
CHAT_PATH = "/v1/chat/completions"
AZURE_CHAT_PATH = "/openai/deployments/gpt-4o-prod/chat/completions"
AZURE_COMPLETIONS_PATH = "/openai/deployments/gpt-4o-prod/completions"
OPENAI_TEXT = "Hello from mock openai"
AZURE_TEXT = "Hello from mock azure deployment gpt-4o-prod"
MESSAGES = [{"role": "user", "content": "hi"}]
PLAN_CLUSTERS = "openai,openai,azure,azure"  # envoy/local.yaml: both targets retries 1
ROUTER_CONTROLS = ("x-envoy-retry-on", "x-envoy-max-retries", "x-envoy-retriable-status-codes",
                   "x-envoy-upstream-rq-per-try-timeout-ms", "x-llm-failover-cluster")
MISSING_SIDE_WARNING = "is not defined in Envoy: streamed requests fail over through callouts"


# ----------------------------------------------------------------------------------------------
# helpers


def rid() -> str:
    return "rid-stream-" + uuid.uuid4().hex[:12]


def local_config(**changes) -> dict:
    """envoy/local.yaml's plugin config (openai then azure, retries 1 each), cooldowns off unless
    a target's fields say otherwise: changes = {"openai": {...}, "azure": {...}, top-level...}."""
    cfg = harness.file_plugin_config()
    for t in cfg["targets"]:
        t["cooldown"] = False
        t.update(changes.pop(t["name"], {}))
    cfg.update(changes)
    return cfg


@dataclass
class Streamed:
    """What the client saw of a streamed answer: headers, and each chunk/event with its arrival
    time (seconds since the request was sent)."""
    headers: dict
    headers_at: float
    items: list = field(default_factory=list)  # (t, chunk or event)
    done_at: float = 0.0

    def content(self) -> list[tuple[float, str]]:
        """(t, text) of every chunk carrying text (chat deltas, completion texts, output_text deltas)."""
        out = []
        for t, item in self.items:
            text = None
            if getattr(item, "type", None) == "response.output_text.delta":
                text = item.delta
            elif getattr(item, "choices", None):
                choice = item.choices[0]
                delta = getattr(choice, "delta", None)
                text = delta.content if delta is not None else getattr(choice, "text", None)
            if text:
                out.append((t, text))
        return out

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.content())

    def summary(self) -> str:
        times = [round(t, 3) for t, _ in self.content()]
        return f"headers at {self.headers_at:.3f}s, content at {times}, done at {self.done_at:.3f}s"


def stream_chat(client, request_id: str | None = None, operation: str = "chat", **kw) -> Streamed:
    """A streamed chat completion (or legacy completion) through the SDK, chunk arrivals timed."""
    headers = {"x-request-id": request_id or rid(), **kw.pop("extra_headers", {})}
    t0 = time.monotonic()
    if operation == "chat":
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=headers, **kw)
    else:
        raw = client.completions.with_raw_response.create(
            model="gpt-4o", prompt="hi", stream=True, extra_headers=headers, **kw)
    s = Streamed(headers=dict(raw.headers), headers_at=time.monotonic() - t0)
    for item in raw.parse():
        s.items.append((time.monotonic() - t0, item))
    s.done_at = time.monotonic() - t0
    return s


def stream_responses(client, request_id: str | None = None, **kw) -> Streamed:
    t0 = time.monotonic()
    raw = client.responses.with_raw_response.create(
        model="gpt-4o", input="Say hi.", stream=True, extra_headers={"x-request-id": request_id or rid()}, **kw)
    s = Streamed(headers=dict(raw.headers), headers_at=time.monotonic() - t0)
    for event in raw.parse():
        s.items.append((time.monotonic() - t0, event))
    s.done_at = time.monotonic() - t0
    return s


def assert_streamed(s: Streamed, pieces: int, delay: float = DELAY, first_within: float = 1.2):
    """The content arrived spread out as the upstream sent it (delay apart), not in one burst."""
    print("streamed:", s.summary())
    times = [t for t, _ in s.content()]
    assert len(times) == pieces, s.summary()
    assert times[0] < first_within, "the first content chunk came late: " + s.summary()
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.5 * delay, "content chunks arrived bunched: " + s.summary()
    assert times[-1] - times[0] >= (pieces - 1) * delay * 0.83, s.summary()


def assert_burst(s: Streamed, pieces: int, generated_for: float):
    """The content arrived in one piece at the end, once the upstream had sent all of it."""
    print("burst:", s.summary())
    times = [t for t, _ in s.content()]
    assert len(times) == pieces, s.summary()
    assert times[0] >= generated_for * 0.8, "content arrived before the upstream finished: " + s.summary()
    assert times[-1] - times[0] < DELAY, "content did not arrive in one burst: " + s.summary()


def assert_addressed_to_azure(rec: dict, path: str = AZURE_CHAT_PATH):
    h = rec["headers"]
    assert (rec["method"], rec["path"], rec["query"]) == ("POST", path, {"api-version": API_VERSION}), rec["raw_path"]
    assert rec["deployment"] == "gpt-4o-prod" and rec["api_style"] == "deployments"
    assert rec["credential"] == "api-key" and h.get("api-key") == AZURE_KEY
    assert "authorization" not in h, "OpenAI's bearer reached Azure"
    assert rec["body"]["stream"] is True
    assert not rec["leak"], rec["leak_reasons"]
    for name in ROUTER_CONTROLS:
        assert name not in h, f"{name} reached the provider"


def assert_addressed_to_openai(rec: dict, path: str = CHAT_PATH):
    h = rec["headers"]
    assert (rec["method"], rec["path"]) == ("POST", path)
    assert h.get("authorization") == f"Bearer {OPENAI_KEY}" and "api-key" not in h, h
    assert not rec["leak"], rec["leak_reasons"]


WASM_LOG = re.compile(r"\]\[(\w+)\]\[wasm\].*? wasm log [^:]*: \[ctx=\d+ req=([^\]]+)\] (.*)$")


def decisions(stack, request_id: str) -> list[tuple[str, str]]:
    """(level, message) of every filter log line (filter or upstream filter) about this request."""
    out = []
    for line in stack.log_text.splitlines():
        m = WASM_LOG.search(line)
        if m and m.group(2) == request_id:
            out.append((m.group(1), m.group(3)))
    return out


def wait_for_line(stack, request_id: str, needle: str) -> list[tuple[str, str]]:
    wait_for(lambda: any(needle in m for _, m in decisions(stack, request_id)), 5,
             what=f"a log line with {needle!r} for {request_id}")
    time.sleep(0.2)  # the lines after it
    return decisions(stack, request_id)


def access_line(stack, request_id: str) -> str:
    lines = wait_for(lambda: [line for line in stack.access_log() if f" req_id={request_id} " in line], 5,
                     what=f"the access log line of {request_id}")
    assert len(lines) == 1, lines
    return lines[0]


def counters(stack, names) -> dict[str, float]:
    st = stack.stats()
    return {n: st.get("wasmcustom." + n, st.get(n, 0)) for n in names}


def deltas(before: dict, after: dict) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


# ----------------------------------------------------------------------------------------------
# 1-2. chat (and legacy completions) failed over while streaming


@pytest.mark.parametrize("operation", ["chat", "completions"])
def test_a_rate_limited_primary_fails_over_and_the_fallback_streams(stack, openai_mock, azure_mock, operation):
    """OpenAI answers 429 to both of its tries; Azure's answer reaches the client chunk by chunk."""
    openai_mock.script([{"status": 429, "repeat": "forever"}])
    azure_mock.configure(stream_delay_ms=int(DELAY * 1000))
    client_key = "sk-client-own-" + uuid.uuid4().hex  # the client's credential never goes on
    for m in (openai_mock, azure_mock):
        m.forbid([client_key])
    s = stream_chat(make_client(stack, api_key=client_key), operation=operation)

    assert s.headers["x-llm-failover-target"] == "azure"
    assert s.headers["x-llm-failover-attempts"] == "3"  # openai, its retry, azure
    assert s.headers["content-type"].startswith("text/event-stream")
    assert s.text == AZURE_TEXT
    # Chat: Azure's prompt-filter event and the role chunk come first, content from the 3rd
    # frame; legacy completions: content from the first frame.
    assert_streamed(s, pieces=len(AZURE_TEXT.split()))
    if operation == "chat":
        assert s.items[-1][1].choices[0].finish_reason == "stop"

    path = AZURE_CHAT_PATH if operation == "chat" else AZURE_COMPLETIONS_PATH
    [seen] = azure_mock.api_requests()
    assert_addressed_to_azure(seen, path)
    assert seen["operation"] == operation
    tried = openai_mock.api_requests()
    assert len(tried) == 2
    for rec in tried:
        assert_addressed_to_openai(rec, CHAT_PATH if operation == "chat" else "/v1/completions")
        assert rec["status"] == 429
    assert azure_mock.leaks() == [] and openai_mock.leaks() == []


FAILURES = [
    pytest.param({"status": 503, "repeat": "forever"}, 2, id="503"),
    pytest.param({"close": True, "repeat": "forever"}, 2, id="reset-before-headers"),
    pytest.param(None, 0, id="connection-refused"),
]


@pytest.mark.parametrize("failure, reached", FAILURES)
def test_the_fallback_streams_after_any_primary_failure(stack, make_stack, openai_mock, azure_mock, failure, reached):
    """503, a reset before the headers and a refused connection all fail over on the streamed
    path (the primary's retry included), and Azure's answer streams."""
    if failure is None:
        # openai's cluster points at a port nobody listens on
        gw = make_stack(local_config(), clusters={"openai": free_port()})
    else:
        gw = stack
        openai_mock.script([failure])
    azure_mock.configure(stream_delay_ms=int(DELAY * 1000))
    s = stream_chat(make_client(gw))
    assert (s.headers["x-llm-failover-target"], s.headers["x-llm-failover-attempts"]) == ("azure", "3")
    assert s.text == AZURE_TEXT
    assert_streamed(s, pieces=len(AZURE_TEXT.split()))
    assert len(openai_mock.api_requests()) == reached
    [seen] = azure_mock.api_requests()
    assert_addressed_to_azure(seen)


REWRITES = [
    # the chain; the target that fails first (its attempt rewrites the client's body), the next
    pytest.param([openai_target(retries=0, cooldown=False, model="gpt-4o-mini",
                                override_params={"user": "only-for-openai"}),
                  azure_target(retries=0, cooldown=False)],
                 "openai", "azure", AZURE_CHAT_PATH, id="openai-model-override-then-azure"),
    pytest.param([azure_target(api_version="v1", deployments={"*": "gpt-4o-prod"}, retries=0, cooldown=False),
                  openai_target(retries=0, cooldown=False)],
                 "azure", "openai", CHAT_PATH, id="azure-v1-then-openai"),
    pytest.param([openai_target(retries=0, cooldown=False, model="gpt-4"), azure_target(retries=0, cooldown=False)],
                 "openai", "azure", AZURE_CHAT_PATH, id="openai-shorter-model-then-azure"),
]


@pytest.mark.parametrize("chain, first, second, path", REWRITES)
def test_an_attempt_after_one_that_rewrote_the_body_gets_the_clients_body(make_stack, openai_mock, azure_mock,
                                                                          chain, first, second, path):
    """The first target needs its own body (a model override, or Azure v1's deployment in the
    body); the next one takes the client's body as it is, with a content-length that fits it
    (the router's attempts share one request header map: a content-length set for one attempt's
    rewritten body must not stay for the next attempt's body)."""
    mocks = {"openai": openai_mock, "azure": azure_mock}
    gw = make_stack(plugin_config(chain, deadline="3s"))
    mocks[first].script([{"status": 429, "repeat": "forever"}])
    t0 = time.monotonic()
    try:
        s = stream_chat(make_client(gw, timeout=10))
    except openai.APIStatusError as e:
        recs = mocks[second].api_requests()
        pytest.fail(f"{e.status_code} after {time.monotonic() - t0:.1f}s: {e.response.text}; {second} got "
                    + str([(r["headers"].get("content-length"), r["body_bytes"]) for r in recs]))
    assert (s.headers["x-llm-failover-target"], s.headers["x-llm-failover-attempts"]) == (second, "2")
    assert s.text == (AZURE_TEXT if second == "azure" else OPENAI_TEXT)
    [rewritten] = mocks[first].api_requests()
    assert rewritten["body"]["model"] != "gpt-4o"  # the first attempt did get its own body
    [seen] = mocks[second].api_requests()
    assert seen["path"] == path
    assert int(seen["headers"]["content-length"]) == seen["body_bytes"]
    assert seen["body"] == {"model": "gpt-4o", "messages": MESSAGES, "stream": True}


def test_a_routes_streamed_failover_sends_each_step_its_model(make_stack, openai_mock, azure_mock):
    """A route's chain is planned like the top-level one; each step's model goes in its body."""
    route = {"name": "test", "path": "/api/routes/test/chat/completion", "operation": "chat",
             "targets": [{"target": "openai", "retries": 1, "model": "gpt-4o-mini"},
                         {"target": "azure", "retries": 0, "model": "gpt-4o"}]}
    gw = make_stack(local_config(routes=[route]))
    openai_mock.script([{"status": 503, "repeat": "forever"}])
    azure_mock.configure(stream_delay_ms=int(DELAY * 1000))
    t0 = time.monotonic()
    arrivals = []
    with requests.post(gw.url(route["path"]), stream=True, timeout=10, json={
            "model": "gpt-3.5-turbo", "messages": MESSAGES, "stream": True}) as r:
        assert r.status_code == 200, r.text
        assert (r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) == ("azure", "3")
        for line in r.iter_lines():
            if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == len(AZURE_TEXT.split()), arrivals
    assert arrivals[-1] - arrivals[0] >= (len(arrivals) - 1) * DELAY * 0.83, arrivals
    assert [r["body"]["model"] for r in openai_mock.api_requests()] == ["gpt-4o-mini", "gpt-4o-mini"]
    [seen] = azure_mock.api_requests()
    assert seen["path"] == AZURE_CHAT_PATH and seen["body"]["model"] == "gpt-4o"
    assert int(seen["headers"]["content-length"]) == seen["body_bytes"]
    assert gw.counter("llm_failover.fallbacks.route.test.from.openai.to.azure") == 1


def test_a_chain_longer_than_four_targets_streams_from_its_fifth_each_on_its_own_cluster(
        make_stack, openai_mock, azure_mock, mock_factory):
    """Five targets, five clusters (three added the way a user adds one: a cluster and a target,
    nothing else): the first four fail, the fifth's answer streams. Each attempt reached its
    own target's cluster, addressed for its resource."""
    extra = [mock_factory("azure", name=f"azure{i}", resource=f"llmf-local-{i}", deployments="gpt-4o-prod",
                          stream_delay_ms=int(DELAY * 1000)) for i in (2, 3, 4)]
    targets = [openai_target(retries=0, cooldown=False), azure_target(retries=0, cooldown=False)]
    targets += [azure_target(name=m.name, resource_name=f"llmf-local-{i}", retries=0, cooldown=False)
                for i, m in zip((2, 3, 4), extra)]
    gw = make_stack(plugin_config(targets), clusters={m.name: m.port for m in extra})
    assert harness.wiring.problems(gw.config) == []
    openai_mock.script([{"status": 429, "repeat": "forever"}])
    azure_mock.script([{"status": 503, "repeat": "forever"}])
    extra[0].script([{"close": True, "repeat": "forever"}])
    extra[1].script([{"status": 500, "repeat": "forever"}])
    s = stream_chat(make_client(gw))
    assert (s.headers["x-llm-failover-target"], s.headers["x-llm-failover-attempts"]) == ("azure4", "5")
    assert s.text == "Hello from mock azure4 deployment gpt-4o-prod"
    assert_streamed(s, pieces=len(s.text.split()), first_within=1.2 + 4 * 0.3)
    tried = [len(m.api_requests()) for m in (openai_mock, azure_mock, *extra)]
    assert tried == [1, 1, 1, 1, 1], tried
    for i, m in zip((2, 3, 4), extra):
        [seen] = m.api_requests()
        assert seen["headers"]["host"] == f"llmf-local-{i}.openai.azure.com"
        assert seen["headers"]["api-key"] == AZURE_KEY
    st = gw.stats()
    assert [st[f"cluster.{c}.upstream_rq_total"] for c in ("openai", "azure", "azure2", "azure3", "azure4")] \
        == [1, 1, 1, 1, 1]


# ----------------------------------------------------------------------------------------------
# 3. the Responses API on Azure's v1 API


def responses_v1_config() -> dict:
    return plugin_config(
        [openai_target(retries=0, cooldown=False, timeout="5s"),
         azure_target(api_version="v1", deployments={"gpt-4o": "gpt-4o-prod", "*": "gpt-4o-mini-default"},
                      retries=1, cooldown=False, timeout="5s")],
        deadline="20s")


def test_a_responses_stream_fails_over_to_azure_v1_streams_and_keeps_its_id(make_stack, openai_mock, azure_mock):
    gw = make_stack(responses_v1_config())
    openai_mock.script([{"status": 429, "repeat": "forever"}])
    azure_mock.configure(stream_delay_ms=int(DELAY * 1000))
    client = make_client(gw)
    s = stream_responses(client)

    assert (s.headers["x-llm-failover-target"], s.headers["x-llm-failover-attempts"]) == ("azure", "2")
    types = [e.type for _, e in s.items]
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    assert [e.sequence_number for _, e in s.items] == list(range(len(types)))
    final = s.items[-1][1].response
    assert s.text == final.output_text == AZURE_TEXT
    # response.created, .in_progress, .output_item.added, .content_part.added, then the deltas
    assert_streamed(s, pieces=len(AZURE_TEXT.split()), first_within=4 * DELAY + 0.6)
    event_times = [t for t, _ in s.items]
    assert event_times[-1] - event_times[0] >= (len(types) - 1) * DELAY * 0.83, s.summary()

    # Azure's v1 API: no api-version, the deployment in the body's model (the upstream filter
    # rewrote the client's body for this attempt).
    [seen] = azure_mock.api_requests()
    assert (seen["method"], seen["path"], seen["query"]) == ("POST", "/openai/v1/responses", {})
    assert seen["api_style"] == "v1" and seen["api_version"] is None
    assert seen["body"]["model"] == "gpt-4o-prod" and seen["deployment"] == "gpt-4o-prod"
    assert seen["body"]["input"] == "Say hi." and seen["body"]["stream"] is True
    assert seen["headers"]["api-key"] == AZURE_KEY and "authorization" not in seen["headers"]
    [tried] = openai_mock.api_requests()
    assert tried["path"] == "/v1/responses" and tried["body"]["model"] == "gpt-4o"
    assert final.id in azure_mock.response_ids()

    # OpenAI is healthy again; the follow-up goes to the target that created the response.
    openai_mock.reset()
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="And again.",
                                                    previous_response_id=final.id)
    follow_up = raw.parse()
    assert (raw.headers["x-llm-failover-target"], raw.headers["x-llm-failover-attempts"]) == ("azure", "1")
    assert follow_up.previous_response_id == final.id
    assert openai_mock.api_requests() == []
    assert [r["body"].get("previous_response_id") for r in azure_mock.api_requests()] == [None, final.id]


# ----------------------------------------------------------------------------------------------
# 4. a healthy primary


def test_a_healthy_primary_streams_unchanged(stack, openai_mock, azure_mock):
    openai_mock.configure(stream_delay_ms=int(DELAY * 1000))
    request_id = rid()
    s = stream_chat(make_client(stack), request_id)
    assert (s.headers["x-llm-failover-target"], s.headers["x-llm-failover-attempts"]) == ("openai", "1")
    assert s.text == OPENAI_TEXT
    assert_streamed(s, pieces=len(OPENAI_TEXT.split()))
    [seen] = openai_mock.api_requests()
    assert_addressed_to_openai(seen)
    assert seen["body"]["stream"] is True and seen["body"]["model"] == "gpt-4o"
    assert azure_mock.api_requests() == []
    line = access_line(stack, request_id)
    assert " llmf_target=openai llmf_attempts=1 " in line and "llmf_failover=true" not in line, line


# ----------------------------------------------------------------------------------------------
# 5. stats, log lines, access log


STATS = [
    "llm_failover.requests", "llm_failover.attempts",
    "llm_failover.attempts.target.openai.status.429", "llm_failover.attempts.target.openai.status.2xx",
    "llm_failover.attempts.target.azure.status.2xx", "llm_failover.attempts.target.azure.status.429",
    "llm_failover.retries", "llm_failover.retries.target.openai", "llm_failover.retries.target.azure",
    "llm_failover.fallbacks", "llm_failover.fallbacks.from.openai.to.azure",
    "llm_failover.fallbacks.from.azure.to.openai", "llm_failover.exhausted",
    "llm_failover.tokens.target.azure.kind.completion", "llm_failover.tokens.target.openai.kind.completion",
]


def test_a_streamed_failover_is_counted_logged_and_access_logged_once(stack, openai_mock, azure_mock):
    openai_mock.script([{"status": 429, "repeat": "forever"}])
    before = counters(stack, STATS)
    request_id = rid()
    s = stream_chat(make_client(stack), request_id, stream_options={"include_usage": True})
    assert s.text == AZURE_TEXT and s.headers["x-llm-failover-attempts"] == "3"
    usage = s.items[-1][1].usage
    assert usage is not None and usage.completion_tokens == len(AZURE_TEXT.split())

    line = access_line(stack, request_id)
    assert " llmf_target=azure llmf_attempts=3 llmf_failover=true " in line, line
    got = deltas(before, counters(stack, STATS))
    assert got == {
        "llm_failover.requests": 1, "llm_failover.attempts": 3,
        "llm_failover.attempts.target.openai.status.429": 2, "llm_failover.attempts.target.openai.status.2xx": 0,
        "llm_failover.attempts.target.azure.status.2xx": 1, "llm_failover.attempts.target.azure.status.429": 0,
        "llm_failover.retries": 1, "llm_failover.retries.target.openai": 1, "llm_failover.retries.target.azure": 0,
        "llm_failover.fallbacks": 1, "llm_failover.fallbacks.from.openai.to.azure": 1,
        "llm_failover.fallbacks.from.azure.to.openai": 0, "llm_failover.exhausted": 0,
        # the final chunk's usage, counted for the target that served it
        "llm_failover.tokens.target.azure.kind.completion": usage.completion_tokens,
        "llm_failover.tokens.target.openai.kind.completion": 0,
    }, got

    lines = wait_for_line(stack, request_id, "failover from=")
    messages = [m for _, m in lines]
    retries = [m for m in messages if m.startswith("retry ")]
    failovers = [m for m in messages if m.startswith("failover ")]
    assert retries == ["retry target=openai after status=429 delay=0ms attempt=2"], messages
    assert failovers == ["failover from=openai to=azure after status=429 attempt=3"], messages
    assert not [m for m in messages if "exhausted" in m], messages
    assert all(level == "info" for level, _ in lines if level != "debug"), lines


# ----------------------------------------------------------------------------------------------
# 6. cooldowns


def test_a_cooling_primary_is_left_out_of_the_streamed_plan(make_stack, openai_mock, azure_mock):
    """A 429 with Retry-After starts OpenAI's cooldown; the next streamed requests (on either
    worker) go straight to Azure: one attempt, nothing sent to OpenAI. (On the streamed path the
    router does not wait the Retry-After: the retry of OpenAI goes at once, docs/failure-semantics.md.)"""
    gw = make_stack(local_config(openai={"cooldown": {"after_failures": 3, "duration": "30s"}}))
    openai_mock.script([{"status": 429, "retry_after": "20", "repeat": "forever"}])
    client = make_client(gw)
    first = stream_chat(client)
    assert first.headers["x-llm-failover-target"] == "azure" and first.text == AZURE_TEXT
    assert first.headers["x-llm-failover-attempts"] == "3"
    tried = openai_mock.api_requests()
    reached = len(tried)
    assert reached == 2 and tried[1]["time"] - tried[0]["time"] < 0.5, "Retry-After is not waited here"
    assert gw.counter("llm_failover.cooldowns.target.openai") >= 1

    seen_workers: set[str] = set()
    for _ in range(12):  # each on a new connection, until both workers served one
        before = {k: v for k, v in gw.stats().items() if re.search(r"\.worker_\d+\.downstream_cx_total$", k)}
        request_id = rid()
        s = stream_chat(make_client(gw), request_id)
        assert (s.headers["x-llm-failover-target"], s.headers["x-llm-failover-attempts"]) == ("azure", "1")
        assert s.text == AZURE_TEXT
        lines = wait_for_line(gw, request_id, "skip target=openai reason=cooldown")
        assert [m for _, m in lines if m.startswith(("retry ", "failover "))] == [], lines
        after = {k: v for k, v in gw.stats().items() if re.search(r"\.worker_\d+\.downstream_cx_total$", k)}
        seen_workers |= {k for k in after if after[k] > before.get(k, 0)}
        if len(seen_workers) == 2:
            break
    assert len(seen_workers) == 2, seen_workers
    assert len(openai_mock.api_requests()) == reached, "a request reached the cooling primary"
    assert gw.counter("llm_failover.cooldown_skips.target.openai") >= 2


# ----------------------------------------------------------------------------------------------
# 7-9. the plan spent


def test_a_chain_spent_on_statuses_gives_the_last_providers_error(stack, openai_mock, azure_mock):
    openai_mock.script([{"status": 503, "repeat": "forever"}])
    azure_mock.script([{"status": 503, "repeat": "forever"}])
    before = counters(stack, ["llm_failover.exhausted"])
    request_id = rid()
    with pytest.raises(openai.APIStatusError) as failed:
        stream_chat(make_client(stack), request_id)
    err = failed.value
    assert err.status_code == 503
    assert err.response.headers["x-llm-failover-target"] == "azure"
    assert err.response.headers["x-llm-failover-attempts"] == "4"
    # Azure's own error, as it sent it
    assert err.response.json() == {"error": {"code": "ServiceUnavailable", "message": (
        "The service is temporarily unable to process your request. Please try again later.")}}
    assert (len(openai_mock.api_requests()), len(azure_mock.api_requests())) == (2, 2)
    lines = wait_for_line(stack, request_id, "chain exhausted")
    assert [m for _, m in lines if "chain exhausted" in m] == [
        "chain exhausted after 4 attempt(s): last target=azure status=503"], lines
    assert deltas(before, counters(stack, ["llm_failover.exhausted"])) == {"llm_failover.exhausted": 1}


@pytest.mark.parametrize("how", ["refused", "reset"])
def test_nothing_answering_gives_the_filters_json_502(stack, make_stack, openai_mock, azure_mock, how):
    if how == "refused":
        gw = make_stack(local_config(), clusters={"openai": free_port(), "azure": free_port()})
    else:
        gw = stack
        for m in (openai_mock, azure_mock):
            m.script([{"close": True, "repeat": "forever"}])
    request_id = rid()
    with pytest.raises(openai.APIStatusError) as failed:
        stream_chat(make_client(gw), request_id)
    r = failed.value.response
    assert failed.value.status_code == 502
    assert r.headers["content-type"] == "application/json", "Envoy's own text/plain reply came through"
    assert r.json()["error"]["code"] == "upstream_unavailable"
    assert r.json()["error"]["type"] == "server_error"
    assert "azure" in r.json()["error"]["message"]
    assert (r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) == ("azure", "4")
    assert len(openai_mock.api_requests()) == len(azure_mock.api_requests()) == (2 if how == "reset" else 0)
    lines = wait_for_line(gw, request_id, "chain exhausted")
    assert [m for _, m in lines if "chain exhausted" in m] == [
        "chain exhausted after 4 attempt(s): last target=azure failure=unreachable"], lines


def test_the_deadline_bounds_a_streamed_request(make_stack, openai_mock, azure_mock):
    """deadline 1 s; OpenAI 429s, Azure would answer after 3 s: 504 deadline_exceeded after ~1 s."""
    gw = make_stack(local_config(deadline="1s"))
    openai_mock.script([{"status": 429, "repeat": "forever"}])
    azure_mock.script([{"delay_ms": 3000}])
    request_id = rid()
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as failed:
        stream_chat(make_client(gw), request_id)
    took = time.monotonic() - t0
    r = failed.value.response
    assert failed.value.status_code == 504
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert r.headers["x-llm-failover-target"] == "azure"
    assert 0.9 <= took < 1.8, took
    lines = wait_for_line(gw, request_id, "deadline spent")
    assert [m for _, m in lines if "deadline spent" in m] == [
        "deadline spent after 3 attempt(s): last target=azure failure=timeout"], lines
    assert gw.counter("llm_failover.deadline_exceeded") == 1


# ----------------------------------------------------------------------------------------------
# 10. the per-try timeout bounds the time to the headers only


def test_the_per_try_timeout_bounds_only_the_time_to_the_headers(make_stack, openai_mock, azure_mock):
    gw = make_stack(local_config(openai={"timeout": "500ms", "retries": 0}, azure={"retries": 0}))
    openai_mock.script([{"delay_ms": 2000}])
    azure_mock.configure(stream_delay_ms=int(DELAY * 1000))
    s = stream_chat(make_client(gw))
    assert (s.headers["x-llm-failover-target"], s.headers["x-llm-failover-attempts"]) == ("azure", "2")
    assert 0.45 <= s.headers_at < 1.2, s.summary()  # openai cut at 500 ms, not its 2 s
    assert s.text == AZURE_TEXT and s.items[-1][1].choices[0].finish_reason == "stop"
    # Azure's stream lasts ~2.7 s, far beyond the 500 ms per-try timeout, and completes.
    assert_streamed(s, pieces=len(AZURE_TEXT.split()), first_within=s.headers_at + 2 * DELAY + 0.6)
    assert s.done_at - s.headers_at >= 2.0, s.summary()
    assert len(openai_mock.api_requests()) == 1 and len(azure_mock.api_requests()) == 1


# ----------------------------------------------------------------------------------------------
# 11. the callout path, for comparison: Envoy's side missing, or configured off


@pytest.mark.parametrize("way", ["stream_side_missing", "callout_configured"])
def test_without_the_router_path_the_fallback_arrives_in_one_piece(make_stack, openai_mock, azure_mock, way):
    """The same failover through callouts is still served, but the fallback's stream arrives
    whole at the end; a missing Envoy side is warned about at most once per worker."""
    if way == "stream_side_missing":
        gw = make_stack(local_config(), stream_side=False)
    else:
        gw = make_stack(local_config(streaming={"failover": "callout"}))
    assert not [c for c in gw.config["static_resources"]["clusters"] if c["name"].startswith("llm_failover.")]
    openai_mock.script([{"status": 429, "repeat": "forever"}])
    azure_mock.configure(stream_delay_ms=int(DELAY * 1000))
    s = stream_chat(make_client(gw))
    assert (s.headers["x-llm-failover-target"], s.headers["x-llm-failover-attempts"]) == ("azure", "3")
    assert s.text == AZURE_TEXT
    # Azure sends its 10 frames over 2.7 s; the client gets them all at the end.
    assert_burst(s, pieces=len(AZURE_TEXT.split()), generated_for=9 * DELAY)
    [seen] = azure_mock.api_requests()
    assert_addressed_to_azure(seen)

    azure_mock.configure(stream_delay_ms=5)
    for _ in range(6):  # new connections: both workers see streamed requests
        assert stream_chat(make_client(gw)).text == AZURE_TEXT
    time.sleep(0.2)
    warnings = [line for line in gw.log_text.splitlines() if MISSING_SIDE_WARNING in line]
    if way == "stream_side_missing":
        assert 1 <= len(warnings) <= gw.concurrency, warnings
        assert all("][warning][" in w and PLAN_CLUSTERS in w for w in warnings), warnings
    else:
        assert warnings == []


# ----------------------------------------------------------------------------------------------
# 12. client-sent router control headers


CLIENT_CONTROLS = {"x-envoy-max-retries": "5", "x-envoy-retry-on": "5xx,retriable-status-codes",
                   "x-envoy-retriable-status-codes": "503", "x-envoy-upstream-rq-per-try-timeout-ms": "1",
                   "x-envoy-hedge-on-per-try-timeout": "true"}


def test_a_client_cannot_make_envoy_retry(make_stack, openai_mock, azure_mock):
    gw = make_stack(local_config(openai={"retries": 0}, azure={"retries": 0}))
    openai_mock.script([{"status": 503, "repeat": "forever"}])
    client = make_client(gw)
    # Not streamed: the routed attempt to OpenAI, then Azure through a callout.
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES,
                                                           extra_headers=CLIENT_CONTROLS)
    assert raw.parse().choices[0].message.content == AZURE_TEXT
    assert (raw.headers["x-llm-failover-target"], raw.headers["x-llm-failover-attempts"]) == ("azure", "2")
    [tried] = openai_mock.api_requests()
    for name in ROUTER_CONTROLS:
        assert name not in tried["headers"], f"{name} reached the provider"

    # Streamed: the filter's own retry headers, one attempt per planned try, whatever the client asks.
    openai_mock.reset()
    openai_mock.script([{"status": 503, "repeat": "forever"}])
    azure_mock.reset()
    azure_mock.script([{"status": 503, "repeat": "forever"}])
    with pytest.raises(openai.APIStatusError) as failed:
        stream_chat(client, extra_headers=CLIENT_CONTROLS)
    assert failed.value.status_code == 503
    assert failed.value.response.headers["x-llm-failover-attempts"] == "2"
    assert (len(openai_mock.api_requests()), len(azure_mock.api_requests())) == (1, 1)


# ----------------------------------------------------------------------------------------------
# 13. concurrency


@pytest.mark.test_timeout(60)
def test_concurrent_streamed_failovers_all_reach_the_fallback(stack, openai_mock, azure_mock):
    """12 streams at once while OpenAI always 429s: every one is served by Azure (Envoy's default
    of 3 retries in flight per cluster would have turned failover off for most of them)."""
    openai_mock.script([{"status": 429, "repeat": "forever"}])
    azure_mock.configure(stream_delay_ms=100)  # ~1 s per stream: all of them in flight together
    clusters = ("openai", "azure")
    before = stack.stats()
    n = 12
    barrier = threading.Barrier(n, timeout=10)
    results: list = [None] * n

    def one(i: int):
        try:
            barrier.wait()
            results[i] = stream_chat(make_client(stack))
        except Exception as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    took = time.monotonic() - t0
    errors = [r for r in results if not isinstance(r, Streamed)]
    assert errors == [], errors
    served = [(r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"], r.text) for r in results]
    assert served == [("azure", "3", AZURE_TEXT)] * n
    assert took < 6, took  # together, not one after the other
    assert (len(openai_mock.api_requests()), len(azure_mock.api_requests())) == (2 * n, n)
    after = stack.stats()
    grew = lambda stat: sum(after[f"cluster.{c}.{stat}"] - before.get(f"cluster.{c}.{stat}", 0)  # noqa: E731
                            for c in clusters)
    assert all(f"cluster.{c}.upstream_rq_retry_overflow" in after for c in clusters), "no retry overflow stats"
    assert grew("upstream_rq_retry_overflow") == 0
    assert grew("upstream_rq_retry") == 2 * n


# ----------------------------------------------------------------------------------------------
# An Envoy side that cannot be trusted is refused, never sent on


def test_an_attempt_on_another_cluster_than_its_target_is_refused_not_sent(make_stack, openai_mock, azure_mock):
    """An Envoy side without the Lua filter (hand-edited): the route no longer follows the
    filter's list, so the third attempt, planned for Azure, goes to OpenAI's cluster again. The
    upstream filter cannot send it there with Azure's address or OpenAI's for an Azure attempt, so
    it answers 500 gateway_misconfigured itself; `make validate` names what is missing."""
    def drop_lua(cfg: dict):
        for _, hcm in harness.wiring._hcms(cfg):
            hcm["http_filters"] = [hf for hf in hcm["http_filters"]
                                   if (hf.get("typed_config") or {}).get("@type") != harness.wiring.LUA_FILTER]

    gw = make_stack(local_config(), mutate=drop_lua)
    assert any("no Lua filter" in p for p in harness.wiring.problems(gw.config))
    openai_mock.script([{"status": 429, "repeat": "forever"}])
    client = make_client(gw)
    with pytest.raises(openai.InternalServerError) as caught:
        stream_chat(client)
    assert caught.value.status_code == 500
    assert caught.value.body["code"] == "gateway_misconfigured", caught.value.body
    assert (len(openai_mock.api_requests()), azure_mock.api_requests()) == (2, [])
    wait_for(lambda: "streamed attempt refused: a streamed attempt reached another cluster" in gw.log_text,
             what="the refusal's error line")
