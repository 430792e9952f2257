"""Issue 5, end to end in real Envoy (concurrency 2): the response cache (`cache: {enabled, ttl,
max_entries}`).

Non-streaming 200 chat completions are kept in Envoy shared data, keyed by the gateway key's name,
the operation and the canonical JSON body, and served to every worker for `ttl`. The mocks answer
every call with a fresh `id` and a `usage.prompt_tokens` that follows the prompt's length, so a
test can tell which upstream answer a client got and for which prompt.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from harness import azure_target, make_client, openai_target, plugin_config, wait_for
from mocks.upstream import _approx_tokens

CACHE_HEADER = "x-llm-failover-cache"


def cache_config(ttl="30s", max_entries=64, max_body_bytes=None, **top) -> dict:
    cache = {"enabled": True, "ttl": ttl, "max_entries": max_entries}
    if max_body_bytes is not None:
        cache["max_body_bytes"] = max_body_bytes
    # Cooldowns off: a test's scripted failures must not change which target the next request uses.
    return plugin_config([openai_target(retries=1, cooldown=False), azure_target(cooldown=False)],
                         cache=cache, deadline="20s", **top)


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def ask(stack, prompt: str, headers=None, **body):
    return stack.post_json("/v1/chat/completions", {"model": "gpt-4o", "messages": messages(prompt), **body},
                           headers=headers)


def post_raw(stack, body: bytes, headers=None):
    return stack.request("POST", "/v1/chat/completions", data=body,
                         headers={"content-type": "application/json", **(headers or {})})


def expected_prompt_tokens(prompt: str) -> int:
    """What the mock reports as usage.prompt_tokens for this prompt (it depends on its length)."""
    return _approx_tokens(messages(prompt))


def calls(mock) -> int:
    return len(mock.api_requests())


def test_second_identical_request_is_a_hit_served_without_calling_upstream(make_stack, openai_mock, azure_mock):
    s = make_stack(cache_config())
    first = ask(s, "what is a cache?")
    assert first.status_code == 200
    assert first.headers[CACHE_HEADER] == "miss"
    assert first.headers["x-llm-failover-target"] == "openai"
    assert first.headers["x-llm-failover-attempts"] == "1"

    for _ in range(3):
        again = ask(s, "what is a cache?")
        assert again.status_code == 200
        assert again.headers[CACHE_HEADER] == "hit"
        assert again.headers["x-llm-failover-target"] == "openai"
        assert again.headers["x-llm-failover-attempts"] == "0"
        assert again.headers["content-type"].startswith("application/json")
        assert again.json() == first.json()

    # The OpenAI SDK (which asks for gzip) parses a cached answer like any other.
    raw = make_client(s).chat.completions.with_raw_response.create(model="gpt-4o",
                                                                   messages=messages("what is a cache?"))
    assert raw.headers[CACHE_HEADER] == "hit"
    assert raw.parse().id == first.json()["id"]

    assert calls(openai_mock) == 1 and calls(azure_mock) == 0
    assert s.counter("llm_failover.cache_misses") == 1
    assert s.counter("llm_failover.cache_hits") == 4
    assert s.prometheus_value("llm_failover_cache_hits") == 4
    assert s.prometheus_value("llm_failover_cache_misses") == 1


def test_every_worker_serves_an_entry_another_worker_stored(make_stack, openai_mock):
    s = make_stack(cache_config(), concurrency=2)
    worker_stat = r"^listener\.127\.0\.0\.1_\d+\.worker_\d+\.downstream_cx_total$"
    before = s.counters_matching(worker_stat)
    assert len(before) == 2, before

    first = ask(s, "shared by workers")  # each call is a new connection, spread over the workers
    assert first.headers[CACHE_HEADER] == "miss"
    answers = []

    def both_workers_used():
        r = ask(s, "shared by workers")
        answers.append(r)
        now = s.counters_matching(worker_stat)
        return all(now[k] > before[k] for k in before)

    wait_for(both_workers_used, timeout=20, interval=0, what="connections on both Envoy workers")
    assert answers and all(r.headers[CACHE_HEADER] == "hit" for r in answers)
    assert all(r.json()["id"] == first.json()["id"] for r in answers)
    # One upstream call, although both workers answered: one served what the other stored.
    assert calls(openai_mock) == 1


def test_key_order_and_spacing_of_the_body_do_not_matter(make_stack, openai_mock):
    s = make_stack(cache_config())
    compact = b'{"model":"gpt-4o","messages":[{"role":"user","content":"order test"}],"temperature":0.5}'
    reordered = (b'{ "temperature" : 0.5,\n  "messages" : [ { "content" : "order t\\u0065st", "role" : "user" } ],'
                 b'\n  "model" : "gpt-4o" }')
    assert json.loads(compact) == json.loads(reordered) and compact != reordered

    first = post_raw(s, compact)
    assert first.status_code == 200 and first.headers[CACHE_HEADER] == "miss"
    second = post_raw(s, reordered)
    assert second.status_code == 200 and second.headers[CACHE_HEADER] == "hit"
    assert second.json()["id"] == first.json()["id"]

    # ... but any difference in content is another entry.
    for other in (compact.replace(b"0.5", b"0.7"), compact.replace(b"order test", b"order test!"),
                  compact.replace(b'"gpt-4o"', b'"gpt-4o-mini"')):
        r = post_raw(s, other)
        assert r.status_code == 200 and r.headers[CACHE_HEADER] == "miss", other
        assert r.json()["id"] != first.json()["id"]
    assert calls(openai_mock) == 4


def test_entry_expires_after_its_ttl(make_stack, openai_mock):
    s = make_stack(cache_config(ttl="1s"))
    first = ask(s, "short lived")
    stored_at = time.monotonic()
    assert first.headers[CACHE_HEADER] == "miss"
    within = ask(s, "short lived")
    assert time.monotonic() - stored_at < 0.9, "the machine is too slow for a 1 s TTL test"
    assert within.headers[CACHE_HEADER] == "hit" and within.json()["id"] == first.json()["id"]

    time.sleep(max(0.0, 1.3 - (time.monotonic() - stored_at)))
    after = ask(s, "short lived")
    assert after.headers[CACHE_HEADER] == "miss"
    assert after.json()["id"] != first.json()["id"]
    assert calls(openai_mock) == 2
    # The fresh answer is cached in turn.
    assert ask(s, "short lived").json()["id"] == after.json()["id"]


@pytest.mark.parametrize("cache_control", ["no-cache", "No-Cache", "max-age=0, no-cache"])
def test_cache_control_no_cache_bypasses_the_cache(make_stack, openai_mock, cache_control):
    s = make_stack(cache_config())
    stored = ask(s, "bypass me")
    assert ask(s, "bypass me").headers[CACHE_HEADER] == "hit"

    bypass = ask(s, "bypass me", headers={"cache-control": cache_control})
    assert bypass.status_code == 200
    assert bypass.headers[CACHE_HEADER] != "hit"
    assert bypass.json()["id"] != stored.json()["id"]
    assert calls(openai_mock) == 2

    # A request that bypassed the cache does not fill it either.
    fresh = ask(s, "never stored", headers={"cache-control": cache_control})
    assert fresh.status_code == 200
    later = ask(s, "never stored")
    assert later.headers[CACHE_HEADER] == "miss" and later.json()["id"] != fresh.json()["id"]
    assert calls(openai_mock) == 4


def test_streaming_requests_are_never_cached(make_stack, openai_mock):
    s = make_stack(cache_config())
    bodies = []
    for _ in range(2):
        r = ask(s, "stream me", stream=True)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers.get(CACHE_HEADER) != "hit"
        assert "data: [DONE]" in r.text
        bodies.append(r.text)
    assert calls(openai_mock) == 2
    assert bodies[0] != bodies[1]  # each stream came from the upstream (fresh ids)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "gpt-4o", "prompt": "not a chat"}),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "not a chat"}),
])
def test_only_chat_completions_are_cached(make_stack, openai_mock, path, body):
    s = make_stack(cache_config())
    for _ in range(2):
        r = s.post_json(path, body)
        assert r.status_code == 200 and r.headers.get(CACHE_HEADER) != "hit"
    assert calls(openai_mock) == 2


@pytest.mark.parametrize("openai_steps,azure_steps,status", [
    pytest.param([{"status": 400}], [], 400, id="client-error-not-failed-over"),
    pytest.param([{"status": 404}], [], 404, id="not-found"),
    pytest.param([{"status": 500, "repeat": 2}], [{"status": 503}], 503, id="spent-chain-5xx"),
    pytest.param([{"status": 429, "repeat": 2}], [{"status": 429}], 429, id="spent-chain-429"),
    pytest.param([{"close": True, "repeat": 2}], [{"close": True}], 502, id="spent-chain-transport"),
])
def test_answers_that_are_not_200_are_never_cached(make_stack, openai_mock, azure_mock, openai_steps, azure_steps,
                                                   status):
    s = make_stack(cache_config())
    openai_mock.script(openai_steps)
    azure_mock.script(azure_steps)
    failed = ask(s, "will fail first")
    assert failed.status_code == status
    assert failed.headers.get(CACHE_HEADER) != "hit"
    upstream_calls = calls(openai_mock) + calls(azure_mock)

    # The scripts are spent: the same prompt now reaches the upstream and succeeds ...
    ok = ask(s, "will fail first")
    assert ok.status_code == 200 and ok.headers[CACHE_HEADER] == "miss"
    assert calls(openai_mock) + calls(azure_mock) == upstream_calls + 1
    # ... and only that success is cached.
    hit = ask(s, "will fail first")
    assert hit.headers[CACHE_HEADER] == "hit" and hit.json()["id"] == ok.json()["id"]


def test_a_failover_answer_is_cached_and_served_as_the_target_that_gave_it(make_stack, openai_mock, azure_mock):
    s = make_stack(cache_config())
    openai_mock.script([{"status": 500, "repeat": 2}])
    failed_over = ask(s, "served by azure")
    assert failed_over.status_code == 200
    assert failed_over.headers["x-llm-failover-target"] == "azure"
    assert failed_over.headers["x-llm-failover-attempts"] == "3"
    assert failed_over.headers[CACHE_HEADER] == "miss"
    assert "azure" in failed_over.json()["choices"][0]["message"]["content"]

    hit = ask(s, "served by azure")
    assert hit.status_code == 200
    assert hit.headers[CACHE_HEADER] == "hit"
    assert hit.headers["x-llm-failover-target"] == "azure"
    assert hit.json() == failed_over.json()
    assert calls(openai_mock) == 2 and calls(azure_mock) == 1


def test_gateway_keys_do_not_share_entries(make_stack, openai_mock):
    keys = [{"name": name, "key_sha256": hashlib.sha256(secret.encode()).hexdigest()}
            for name, secret in (("app-a", "gw-key-a"), ("app-b", "gw-key-b"))]
    s = make_stack(cache_config(keys=keys))
    as_a = {"Authorization": "Bearer gw-key-a"}
    as_b = {"api-key": "gw-key-b"}

    a1 = ask(s, "same prompt", headers=as_a)
    b1 = ask(s, "same prompt", headers=as_b)
    assert a1.headers[CACHE_HEADER] == "miss" and b1.headers[CACHE_HEADER] == "miss"
    assert a1.json()["id"] != b1.json()["id"]
    a2 = ask(s, "same prompt", headers=as_a)
    b2 = ask(s, "same prompt", headers=as_b)
    assert a2.headers[CACHE_HEADER] == "hit" and a2.json()["id"] == a1.json()["id"]
    assert b2.headers[CACHE_HEADER] == "hit" and b2.json()["id"] == b1.json()["id"]
    assert calls(openai_mock) == 2

    # A cached prompt is still no answer for a client without a valid key.
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        r = ask(s, "same prompt", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert CACHE_HEADER not in r.headers
    assert calls(openai_mock) == 2


@pytest.mark.test_timeout(60)
def test_many_distinct_prompts_never_get_another_prompts_answer(make_stack, openai_mock):
    """max_entries 8 and 200 distinct prompts: every answer belongs to its own prompt, a prompt just
    answered is served from the cache, and no more than max_entries prompts are ever cached at once."""
    max_entries = 8
    s = make_stack(cache_config(ttl="60s", max_entries=max_entries))
    prompts = [f"prompt {i:03d} " + "x" * (4 * i) for i in range(200)]  # usage.prompt_tokens differs per prompt
    ids: dict[str, set[str]] = {p: set() for p in prompts}
    misses = 0

    def check(prompt, r):
        nonlocal misses
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["usage"]["prompt_tokens"] == expected_prompt_tokens(prompt), prompt[:12]
        if r.headers[CACHE_HEADER] == "hit":
            assert answer["id"] in ids[prompt], f"{prompt[:12]!r} got an answer it was never given upstream"
        else:
            assert r.headers[CACHE_HEADER] == "miss"
            assert all(answer["id"] not in seen for seen in ids.values())
            ids[prompt].add(answer["id"])
            misses += 1
        return r.headers[CACHE_HEADER]

    for p in prompts:
        assert check(p, ask(s, p)) == "miss"
        assert check(p, ask(s, p)) == "hit"  # nothing was stored in between

    # The newest prompts, latest first: each slot's last writer is still there, nothing more.
    hits = sum(check(p, ask(s, p)) == "hit" for p in reversed(prompts))
    assert 1 <= hits <= max_entries
    assert calls(openai_mock) == misses
    assert s.counter("llm_failover.cache_misses") == misses
    assert s.counter("llm_failover.cache_hits") == len(prompts) + hits


@pytest.mark.test_timeout(60)
def test_memory_stays_bounded_by_max_entries(make_stack, openai_mock):
    """200 distinct prompts whose answers are ~300 KB each: unbounded, that would be ~60 MB of
    shared data; with max_entries 8 Envoy's heap grows by about 8 answers."""
    max_entries, answer_bytes = 8, 300_000
    s = make_stack(cache_config(ttl="60s", max_entries=max_entries, max_body_bytes=1_048_576))
    big = {"id": "chatcmpl-big", "object": "chat.completion", "created": 0, "model": "gpt-4o",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "z" * answer_bytes},
                        "finish_reason": "stop"}]}
    openai_mock.script([{"body": big, "repeat": "forever"}])

    def allocated() -> int:
        return int(s.admin("/memory").json()["allocated"])

    ask(s, "warm-up")  # first-use allocations of the workers and the VMs
    before = allocated()
    for i in range(200):
        r = ask(s, f"big answer {i}")
        assert r.status_code == 200 and r.headers[CACHE_HEADER] == "miss"
    assert ask(s, "big answer 199").headers[CACHE_HEADER] == "hit"  # the answers are cached
    grown = allocated() - before
    assert grown < max_entries * answer_bytes + 12_000_000, f"Envoy's heap grew by {grown} bytes"
