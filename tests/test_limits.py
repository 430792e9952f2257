"""Issue 29: limits per gateway key and per route (SPEC 2d), in real Envoy with two workers.

Each test starts its own Envoy (envoy/local.yaml, ``--concurrency 2``; every request on a fresh
connection, so requests land on both workers and the limits must hold across them) in front of the
strict OpenAI mock, whose request log shows what reached the upstream. The OpenAI Python SDK is the
client where what it does with a 429 matters (``max_retries=0`` where the 429 itself is asserted).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid

import openai
import pytest

import harness
from harness import make_client, openai_target, plugin_config

pytestmark = pytest.mark.envoy

CHAT = "/v1/chat/completions"
_run = uuid.uuid4().hex[:10]
SECRET = {name: f"gw-{name}-{_run}" for name in ("a", "b", "c", "d")}
U64_MAX = 2**64 - 1
GO_DURATION = re.compile(r"^(\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s)$")


def key(name: str, limits: dict | None = None) -> dict:
    k = {"name": name, "key_sha256": hashlib.sha256(SECRET[name].encode()).hexdigest()}
    if limits is not None:
        k["limits"] = limits
    return k


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {SECRET[name]}"}


def per(count: int, window: str) -> dict:
    return {"count": count, "per": window}


def go_seconds(text: str) -> float:
    """An OpenAI-format duration (`6m0s`, `20ms`, `1.5s`) in seconds."""
    assert GO_DURATION.match(text), text
    if text.endswith("ms"):
        return int(text[:-2]) / 1000
    total, number = 0.0, ""
    for ch in text:
        if ch.isdigit() or ch == ".":
            number += ch
        else:
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[ch]
            number = ""
    return total


def chat_answer(prompt_tokens, completion_tokens, usage=True) -> dict:
    """A chat completion with the given usage, for the mock to answer with."""
    body = {
        "id": "chatcmpl-limits", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    }
    if usage is True:
        body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": None}
    elif usage is not None:
        body["usage"] = usage
    return body


@pytest.fixture
def gateway(make_stack, openai_mock):
    """gateway(keys=None, routes=None, **target fields) -> an Envoy with one OpenAI target."""

    def start(keys=None, routes=None, **target) -> harness.EnvoyStack:
        cfg = plugin_config([openai_target("openai", **target)])
        if keys is not None:
            cfg["keys"] = keys
        if routes is not None:
            cfg["routes"] = routes
        return make_stack(cfg)

    return start


def limited(stack, **labels) -> float:
    return stack.prometheus_value("llm_failover_limited", **labels)


def assert_openai_429(err: openai.RateLimitError, kind: str) -> dict:
    """The SDK's view of the gateway's 429: OpenAI's error shape, and the headers it backs off by."""
    assert err.status_code == 429
    body = err.response.json()["error"]
    assert body["type"] == kind
    assert body["code"] == "rate_limit_exceeded"
    assert body["param"] is None
    assert err.code == "rate_limit_exceeded"
    h = err.response.headers
    assert 1 <= int(h["retry-after"]) <= 120
    assert 1 <= int(h["retry-after-ms"]) <= int(h["retry-after"]) * 1000
    assert h[f"x-ratelimit-remaining-{kind}"] == "0"
    go_seconds(h[f"x-ratelimit-reset-{kind}"])
    assert "x-llm-failover-target" not in h, "no target was tried"
    return h


def test_a_key_over_its_request_limit_gets_429_and_nothing_reaches_the_upstream(gateway, openai_mock):
    gw = gateway(keys=[key("a", {"requests": per(3, "1m")}), key("b")], cooldown={"after_failures": 1})
    client = make_client(gw, api_key=SECRET["a"], max_retries=0)
    remaining = []
    for _ in range(3):
        r = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert r.http_response.status_code == 200
        h = r.headers
        # The key's limit, in place of the provider account's (10000 on the mock).
        assert h["x-ratelimit-limit-requests"] == "3"
        remaining.append(h["x-ratelimit-remaining-requests"])
        assert 0 < go_seconds(h["x-ratelimit-reset-requests"]) <= 60
        assert "x-ratelimit-limit-tokens" not in h, "the provider's token headers are not mixed in"
    assert remaining == ["2", "1", "0"]
    assert len(openai_mock.api_requests()) == 3

    for _ in range(3):
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        h = assert_openai_429(e.value, "requests")
        assert h["x-ratelimit-limit-requests"] == "3"
        assert int(h["retry-after"]) <= 20, "one request comes back every 20 s"
        assert SECRET["a"] not in e.value.response.text
        assert "gateway key 'a'" in e.value.message
    assert len(openai_mock.api_requests()) == 3, "a refused request never reaches the upstream"

    # The gateway's own 429s are no target failure: no cooldown (after_failures 1), no failover,
    # and another key is served by the same target at once.
    r = gw.chat(headers=auth("b"))
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-failover-target"] == "openai"
    assert r.headers["x-ratelimit-limit-requests"] == "10000", "a key without limits shows the provider's"
    assert gw.counter("llm_failover.cooldowns.target.openai") == 0
    assert gw.counter("llm_failover.fallbacks") == 0
    assert gw.counter("llm_failover.attempts") == 4
    assert limited(gw, key="a", kind="requests") == 3
    assert limited(gw, key="b") == 0


def test_the_limit_comes_back_after_its_window_and_the_sdk_backs_off_on_its_own(gateway, openai_mock):
    # 2 per 3 s: one request comes back every 1.5 s (the margin a loaded machine needs).
    gw = gateway(keys=[key("a", {"requests": per(2, "3s")})])
    statuses = [gw.chat(headers=auth("a")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    time.sleep(3.2)
    r = gw.chat(headers=auth("a"))
    assert r.status_code == 200
    assert r.headers["x-ratelimit-remaining-requests"] == "1", "the whole budget is back after 3 s"
    assert gw.chat(headers=auth("a")).status_code == 200
    refused = gw.chat(headers=auth("a"))
    assert refused.status_code == 429
    assert refused.headers["retry-after"] in ("1", "2")
    assert 1 <= go_seconds(refused.headers["x-ratelimit-reset-requests"]) <= 3
    assert len(openai_mock.api_requests()) == 4

    # The SDK (its default retries) reads retry-after-ms, waits, and gets its answer.
    client = make_client(gw, api_key=SECRET["a"], max_retries=2)
    started = time.monotonic()
    answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content
    assert time.monotonic() - started < 10
    assert len(openai_mock.api_requests()) == 5


def test_a_token_limit_stops_a_key_after_its_usage_crossed_it(gateway, openai_mock):
    gw = gateway(keys=[key("a", {"tokens": per(100, "1m")}), key("b", {"tokens": per(100, "1m")})])
    openai_mock.script([{"body": chat_answer(40, 20), "repeat": "forever"}])
    client = make_client(gw, api_key=SECRET["a"], max_retries=0)
    seen = []
    for _ in range(2):
        r = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        seen.append((r.headers["x-ratelimit-limit-tokens"], r.headers["x-ratelimit-remaining-tokens"]))
        assert "x-ratelimit-limit-requests" not in r.headers
    # Charged after each answer: 100 before the first, 40 left before the second (which overruns).
    assert seen == [("100", "100"), ("100", "40")]
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    h = assert_openai_429(e.value, "tokens")
    assert h["x-ratelimit-limit-tokens"] == "100"
    # 120 of 100 spent: 20 over plus one token to let a request in, at 100 per minute: 12.6 s,
    # less the time since the first answer.
    assert 10 <= int(h["retry-after"]) <= 13
    assert len(openai_mock.api_requests()) == 2
    assert limited(gw, key="a", kind="tokens") == 1

    # A stream's usage (its final chunk, stream_options.include_usage) is charged too.
    other = make_client(gw, api_key=SECRET["b"], max_retries=0)
    openai_mock.script([{"repeat": "forever"}])
    stream = other.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "tell me a long story " * 40}],
        stream=True, stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage]
    assert usage and usage[-1].total_tokens > 100, usage
    with pytest.raises(openai.RateLimitError) as e:
        other.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert_openai_429(e.value, "tokens")


def test_two_keys_do_not_share_a_budget(gateway, openai_mock):
    gw = gateway(keys=[key("a", {"requests": per(2, "1m")}), key("b", {"requests": per(2, "1m")}), key("c")])
    order = ["a", "b", "a", "b", "a", "b", "c", "c", "c"]
    got = [(k, gw.chat(headers=auth(k)).status_code) for k in order]
    assert got == [("a", 200), ("b", 200), ("a", 200), ("b", 200), ("a", 429), ("b", 429),
                   ("c", 200), ("c", 200), ("c", 200)]
    assert len(openai_mock.api_requests()) == 4 + 3
    assert limited(gw, key="a", kind="requests") == 1
    assert limited(gw, key="b", kind="requests") == 1


def test_a_route_limit_applies_to_every_key_on_it(gateway, openai_mock):
    routes = [{"name": "chat", "path": "/chat", "operation": "chat", "targets": ["openai"],
               "limits": {"requests": per(3, "1m")}}]
    gw = gateway(keys=[key("a", {"requests": per(10, "1m")}), key("b")], routes=routes)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    r = gw.post_json("/chat", body, headers=auth("a"))
    assert r.status_code == 200
    # Under two limits, a request shows the tighter: the route's (2 left) over the key's (9 left).
    assert (r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-remaining-requests"]) == ("3", "2")
    assert gw.post_json("/chat", body, headers=auth("b")).status_code == 200
    assert gw.post_json("/chat", body, headers=auth("b")).status_code == 200
    for k in ("a", "b"):
        refused = gw.post_json("/chat", body, headers=auth(k))
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert "route 'chat'" in error["message"]
        assert refused.headers["x-ratelimit-limit-requests"] == "3"
    # Off the route, key a has its own budget: 1 spent on the route; the request the route refused
    # was given back.
    r = gw.chat(headers=auth("a"))
    assert r.status_code == 200
    assert (r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-remaining-requests"]) == ("10", "8")
    assert len(openai_mock.api_requests()) == 4
    assert limited(gw, key="a", route="chat", kind="requests") == 1
    assert limited(gw, key="b", route="chat", kind="requests") == 1


def test_hostile_and_boundary_values_neither_panic_nor_leak(gateway, openai_mock):
    # count 0 is refused at load, naming the field.
    cfg = plugin_config([openai_target("openai")])
    cfg["keys"] = [key("a", {"requests": per(0, "1m")})]
    rc, out = harness.validate_config(plugin_config=cfg)
    assert rc != 0
    assert "keys[0].limits.requests.count: must be at least 1" in out

    gw = gateway(keys=[key("a", {"requests": per(U64_MAX, "30d"), "tokens": per(U64_MAX, "30d")}),
                       key("b", {"tokens": per(5, "10s")}), key("c", {"tokens": per(1, "1m")})])
    # Huge counts: nothing overflows, nothing is refused.
    for _ in range(3):
        r = gw.chat(headers=auth("a"))
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-limit-requests"] == str(U64_MAX)
        assert int(r.headers["x-ratelimit-remaining-requests"]) >= U64_MAX - 3
    # Answers without usage, or with usage no one can count, charge nothing.
    for usage in (None, "lots", {"prompt_tokens": -5}, {"prompt_tokens": 1e30}, {"prompt_tokens": "7"}):
        openai_mock.script([{"body": chat_answer(0, 0, usage=usage)}])
        r = gw.chat(headers=auth("c"))
        assert r.status_code == 200, (usage, r.text)
        assert r.headers["x-ratelimit-remaining-tokens"] == "1", usage
    # The largest usage there is: the key owes at most one more window, not forever.
    openai_mock.script([{"body": chat_answer(U64_MAX, U64_MAX)}])
    assert gw.chat(headers=auth("b")).status_code == 200
    refused = gw.chat(headers=auth("b"))
    assert refused.status_code == 429
    assert 8 <= int(refused.headers["retry-after"]) <= 10, "at most one window (10 s)"
    # Client-sent rate-limit or filter headers change nothing.
    spoof = {**auth("b"), "x-ratelimit-remaining-tokens": "999", "x-llm-failover-key": "a"}
    assert gw.chat(headers=spoof).status_code == 429
    for r in (refused,):
        text = r.text + json.dumps(dict(r.headers))
        assert not any(s in text for s in SECRET.values())
    assert gw.counter("llm_failover.attempts") == 3 + 5 + 1
    gw.assert_no_vm_failure()


# Envoy's own rate limiting, keyed by the filter's descriptor source (docs/deployment.md): the
# local_ratelimit filter with descriptors stands in for envoy.filters.http.ratelimit and a rate
# limit service, which take the same route `rate_limits`.
KEY_DESCRIPTOR = {
    "extension": {
        "name": "envoy.rate_limit_descriptors.expr",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.rate_limit_descriptors.expr.v3.Descriptor",
            "descriptor_key": "llm_failover_key",
            "text": "filter_state['wasm.llm_failover.key']",
            "skip_if_error": True,
        },
    }
}


def with_envoy_rate_limit(cfg: dict):
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    at = next(i for i, f in enumerate(filters) if f["name"] == "llm_failover") + 1
    filters.insert(at, {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "llm_limits",
            "token_bucket": {"max_tokens": 1000, "tokens_per_fill": 1000, "fill_interval": "1s"},
            "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "descriptors": [{
                "entries": [{"key": "llm_failover_key", "value": "a"}],
                "token_bucket": {"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "60s"},
            }],
        },
    })
    for vhost in hcm["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            route["route"]["rate_limits"] = [{"actions": [KEY_DESCRIPTOR]}]


def test_envoys_rate_limiting_counts_by_the_key_the_filter_checked(make_stack, openai_mock):
    cfg = plugin_config([openai_target("openai")])
    cfg["keys"] = [key("a"), key("b")]
    gw = make_stack(cfg, mutate=with_envoy_rate_limit)
    got = [(k, gw.chat(headers=auth(k)).status_code) for k in ["a", "a", "b", "a", "b"]]
    assert got == [("a", 200), ("a", 200), ("b", 200), ("a", 429), ("b", 200)]
    assert len(openai_mock.api_requests()) == 4
    # Only the key's name is the descriptor: no header carries it, to the upstream or anywhere.
    for seen in openai_mock.api_requests():
        assert not any("llm-failover-key" in h for h in seen["headers"])
    # A client cannot pose as another key: the descriptor is what the filter checked.
    spoof = {**auth("b"), "x-llm-failover-key": "a"}
    assert gw.chat(headers=spoof).status_code == 200


def test_every_answer_under_a_limit_carries_the_keys_headers(make_stack, openai_mock, azure_mock):
    """Routed, failed over through a callout, streamed through Envoy's router, from the cache:
    the client sees its key's budget, never a provider account's."""
    cfg = plugin_config([openai_target("openai"), harness.azure_target("azure")],
                        cache={"enabled": True, "ttl": "60s"})
    cfg["keys"] = [key("a", {"requests": per(10, "1m"), "tokens": per(1_000_000, "1m")})]
    gw = make_stack(cfg)

    def budget(r):
        assert r.status_code == 200, r.text
        return (r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-remaining-requests"],
                r.headers["x-ratelimit-limit-tokens"])

    routed = gw.chat(headers=auth("a"), content="routed")
    assert budget(routed) == ("10", "9", "1000000")
    cached = gw.chat(headers=auth("a"), content="routed")
    assert cached.headers["x-llm-failover-cache"] == "hit"
    assert budget(cached) == ("10", "8", "1000000"), "a cache hit is a request too"
    openai_mock.script([{"status": 503, "repeat": "forever"}])
    failed_over = gw.chat(headers=auth("a"), content="failover")
    assert failed_over.headers["x-llm-failover-target"] == "azure"
    assert budget(failed_over) == ("10", "7", "1000000"), "Azure's own x-ratelimit-remaining-requests: 99 replaced"
    streamed = gw.chat(headers=auth("a"), content="stream", stream=True)
    assert streamed.headers["x-llm-failover-target"] == "azure"
    assert budget(streamed) == ("10", "6", "1000000")
    assert "data: [DONE]" in streamed.text


def test_concurrent_requests_on_both_workers_share_one_budget(gateway, openai_mock):
    from concurrent.futures import ThreadPoolExecutor

    gw = gateway(keys=[key("a", {"requests": per(5, "1m")})])
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda _: gw.chat(headers=auth("a")).status_code, range(24)))
    assert sorted(statuses) == [200] * 5 + [429] * 19
    assert len(openai_mock.api_requests()) == 5
    assert limited(gw, key="a", kind="requests") == 19
    per_worker = gw.counters_matching(r"^listener\..*\.worker_\d+\.downstream_cx_total$")
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker.values()), per_worker
