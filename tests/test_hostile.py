"""Issue 9, against real Envoy: hostile and broken input. Every case gets a clear answer (OpenAI's
error shape where the filter answers), nothing is injected into what an upstream receives, the
Wasm VM never fails (the fixtures check Envoy's log after every test) and the next request is
served normally.

The tests share one Envoy (this module's) running the shipped plugin config (envoy/local.yaml)
with cooldowns off, so that scripted failures do not change the next request's route, and the
cache on, so that hostile bodies also go through the cache key (every test uses fresh prompts).
Tests that need another Envoy config start their own.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import serve_stack, use_shared_stack
from harness import (OPENAI_KEY, EnvoyStack, azure_target, file_plugin_config, free_port, openai_target,
                     plugin_config, wait_for)
from mocks.upstream import _approx_tokens

CHAT_PATH = "/v1/chat/completions"
OPERATIONS = [CHAT_PATH, "/v1/completions", "/v1/embeddings"]
AZURE_GPT4O_PATH = "/openai/deployments/gpt-4o-prod/chat/completions"  # local.yaml's deployment of gpt-4o
AZURE_DEFAULT_PATH = "/openai/deployments/gpt-4o-mini-default/chat/completions"  # ... and its "*" deployment
_prompt_ids = itertools.count()


def hostile_config(**changes) -> dict:
    cfg = file_plugin_config()
    for t in cfg["targets"]:
        t["cooldown"] = False
    cfg["cache"] = {"enabled": True, "ttl": "30s", "max_entries": 256}
    cfg.update(changes)
    return cfg


@pytest.fixture(scope="module")
def _module_stack(_openai_server, _azure_server):
    yield from serve_stack(hostile_config(), _openai_server, _azure_server)


@pytest.fixture
def gw(request, _module_stack, openai_mock, azure_mock) -> EnvoyStack:
    """This module's Envoy; like conftest's `stack`, its log must show no VM failure after each test."""
    yield from use_shared_stack(request, _module_stack, "this module's Envoy")


def chat_body(prompt=None, model="gpt-4o", **extra) -> dict:
    """A chat request; a fresh prompt unless one is given, so the shared cache never answers it."""
    prompt = prompt if prompt is not None else f"hi {next(_prompt_ids)}"
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}


def assert_filter_error(r, status: int, code: str):
    """The filter's own answer: OpenAI's error shape, with the documented status and code."""
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["param"] is None
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] in ("invalid_request_error", "server_error")


def assert_served_normally(stack, openai_mock):
    """A fresh prompt (never a cache hit) is answered by the first target."""
    before = len(openai_mock.api_requests())
    r = stack.post_json(CHAT_PATH, chat_body(f"normal request {next(_prompt_ids)}"))
    assert r.status_code == 200, r.text[:300]
    assert r.headers["x-llm-failover-target"] == "openai"
    assert r.json()["choices"][0]["message"]["content"] == "Hello from mock openai"
    assert len(openai_mock.api_requests()) == before + 1


def post_bytes(stack, body: bytes, path=CHAT_PATH, headers=None, **kw):
    return stack.request("POST", path, data=body, headers={"content-type": "application/json", **(headers or {})},
                         **kw)


def raw_exchange(stack, request: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Sends bytes as they are (no client-side validation) and reads one HTTP/1.1 answer."""
    with socket.create_connection(("127.0.0.1", stack.listener_port), timeout=timeout) as sock:
        sock.sendall(request)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def raw_post(path: bytes, extra_headers: bytes, body: bytes) -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            + extra_headers + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)


def no_upstream_was_called(*mocks):
    return all(m.api_requests() == [] for m in mocks)


# ---- bodies ------------------------------------------------------------------------------------


def test_random_bytes_get_400_on_every_operation_and_reach_no_upstream(gw, openai_mock, azure_mock):
    rng = random.Random(9)
    for path in OPERATIONS:
        for _ in range(15):
            body = rng.randbytes(rng.randint(1, 4096))
            if body.lstrip()[:1] == b"{":
                continue
            for content_type in ("application/json", "application/octet-stream"):
                r = post_bytes(gw, body, path, headers={"content-type": content_type})
                assert_filter_error(r, 400, "invalid_request_body")
    assert no_upstream_was_called(openai_mock, azure_mock)
    assert_served_normally(gw, openai_mock)


@pytest.mark.parametrize("body", [
    b"[]", b'[{"model": "gpt-4o", "messages": []}]', b'"a string"', b"42", b"-1.5e300", b"null", b"true",
    b"false", b"\xef\xbb\xbf{\"model\": \"gpt-4o\"}", b'{"model": "gpt-4o"} {"model": "gpt-4o"}',
    b'{"model": "gpt-4o"} trailing', b'{"model": "a", "model": "b", "messages": []}', b"{", b'{"model": "gpt-4o",}',
    b'{"model": "gpt-4o", "stream": "yes"}', b'{"model": ["gpt-4o"]}', b"{'model': 'gpt-4o'}",
], ids=lambda b: b[:24].decode("utf-8", "replace"))
def test_json_that_is_not_one_valid_object_gets_400(gw, openai_mock, azure_mock, body):
    assert_filter_error(post_bytes(gw, body), 400, "invalid_request_body")
    assert no_upstream_was_called(openai_mock, azure_mock)
    assert_served_normally(gw, openai_mock)


def test_empty_bodies_get_400(gw, openai_mock, azure_mock):
    for path in OPERATIONS:
        assert_filter_error(gw.request("POST", path), 400, "invalid_request_body")  # no body at all
        assert_filter_error(post_bytes(gw, b" \r\n\t ", path), 400, "invalid_request_body")
        status, headers, body = raw_exchange(gw, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: gateway\r\n"
                                             b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n")
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_request_body"
    assert no_upstream_was_called(openai_mock, azure_mock)
    assert_served_normally(gw, openai_mock)


def test_invalid_utf8_anywhere_in_the_body_gets_400(gw, openai_mock, azure_mock):
    for body in (b'{"model": "gpt-\xff\xfe", "messages": []}', b'{"model": "\xc3", "messages": []}',
                 b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "caf\xe9 \xff\xfe"}]}',
                 b'{"model": "gpt-4o", "messages": [], "metadata": {"k\xff": 1}}'):
        assert_filter_error(post_bytes(gw, body), 400, "invalid_request_body")
    assert no_upstream_was_called(openai_mock, azure_mock)
    assert_served_normally(gw, openai_mock)


def _deep(n: int, open_: bytes, close: bytes, inner: bytes = b"1") -> bytes:
    return open_ * n + inner + close * n


DEEP_BODY = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "deep"}], "metadata": %s}'


@pytest.mark.parametrize("body", [
    b"[" * 100_000,
    b'{"model": ' + b"[" * 100_000,
    b'{"model": ' + _deep(100_000, b"[", b"]") + b', "messages": []}',
    DEEP_BODY % _deep(100_000, b"[", b"]"),
    DEEP_BODY % _deep(50_000, b'{"a": ', b"}"),
    b'{"model": "gpt-4o", "messages": ' + _deep(100_000, b"[", b"]") + b', "stream": {"x": 1}}',
], ids=["open-arrays", "unterminated-model", "deep-model", "deep-arrays", "deep-objects", "deep-and-bad-stream"])
def test_deeply_nested_json_gets_400_from_the_filter(gw, openai_mock, azure_mock, body):
    """Nesting deeper than the filter's JSON reader allows (it must be able to rewrite and hash every
    body it forwards) is refused up front, without exhausting the VM's stack."""
    assert_filter_error(post_bytes(gw, body), 400, "invalid_request_body")
    assert no_upstream_was_called(openai_mock, azure_mock)
    assert_served_normally(gw, openai_mock)


def test_moderately_nested_json_is_forwarded_and_cached_like_any_body(gw, openai_mock, azure_mock):
    body = DEEP_BODY % _deep(50, b"{\"a\": [", b"]}")  # 101 levels
    first, second = post_bytes(gw, body), post_bytes(gw, body)
    assert first.status_code == 200 and first.headers["x-llm-failover-cache"] == "miss"
    assert second.status_code == 200 and second.headers["x-llm-failover-cache"] == "hit"
    [seen] = openai_mock.api_requests()
    assert seen["body"] == json.loads(body)


def test_body_over_max_request_body_bytes_gets_413_from_the_filter(gw, openai_mock, azure_mock):
    limit = hostile_config()["max_request_body_bytes"]
    for size in (limit - 40, 5 * 1024 * 1024):  # with the JSON around it, both are over the limit
        r = post_bytes(gw, json.dumps(chat_body("x" * size)).encode())
        assert_filter_error(r, 413, "request_too_large")
        assert str(limit) in r.json()["error"]["message"]
    # Over the listener's 8 MiB buffer too: whoever sees it first answers 413 (Envoy reads a socket in
    # chunks of up to the buffer size, so one chunk can overflow it before the filter sees the body).
    r = post_bytes(gw, json.dumps(chat_body("x" * 9 * 1024 * 1024)).encode())
    assert r.status_code == 413
    if r.headers["content-type"] == "application/json":
        assert_filter_error(r, 413, "request_too_large")
    assert no_upstream_was_called(openai_mock, azure_mock)
    assert_served_normally(gw, openai_mock)


def test_body_over_the_listener_buffer_gets_envoys_own_413(make_stack, openai_mock, azure_mock):
    """Why envoy/local.yaml sets per_connection_buffer_limit_bytes >= max_request_body_bytes: with a
    smaller buffer Envoy itself refuses the body before the filter can answer in OpenAI's shape."""
    def small_buffer(cfg):
        cfg["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] = 1024 * 1024

    s = make_stack(hostile_config(), mutate=small_buffer)
    r = post_bytes(s, json.dumps(chat_body("x" * 2 * 1024 * 1024)).encode())
    assert r.status_code == 413
    assert "x-llm-failover-target" not in r.headers
    assert not r.headers.get("content-type", "").startswith("application/json")  # Envoy's plain reply
    assert no_upstream_was_called(openai_mock, azure_mock)
    assert_served_normally(s, openai_mock)


@pytest.mark.test_timeout(60)
def test_large_body_under_the_limit_is_failed_over_intact(gw, openai_mock, azure_mock):
    body = json.dumps(chat_body("y" * 3 * 1024 * 1024, temperature=0.5)).encode()
    openai_mock.script([{"status": 503, "repeat": 2}])
    r = post_bytes(gw, body)
    assert r.status_code == 200 and r.headers["x-llm-failover-target"] == "azure"
    sizes = [q["body_bytes"] for q in openai_mock.api_requests() + azure_mock.api_requests()]
    assert sizes == [len(body)] * 3
    assert azure_mock.api_requests()[0]["body"] == json.loads(body)
    assert_served_normally(gw, openai_mock)


# ---- headers -----------------------------------------------------------------------------------


def test_huge_header_values_are_carried_and_oversized_headers_get_envoys_431(gw, openai_mock, azure_mock):
    big_id = "r" * 40_000
    openai_mock.script([{"status": 500, "repeat": 2}])
    r = gw.post_json(CHAT_PATH, chat_body(), headers={"x-request-id": big_id, "x-big": "b" * 8000})
    assert r.status_code == 200 and r.headers["x-llm-failover-target"] == "azure"
    routed = openai_mock.api_requests()[0]
    [fallback] = azure_mock.api_requests()
    assert routed["headers"]["x-big"] == "b" * 8000
    assert routed["headers"]["x-request-id"] == fallback["headers"]["x-request-id"] == big_id  # intact

    openai_mock.reset()
    azure_mock.reset()
    too_big = gw.post_json(CHAT_PATH, chat_body(), headers={"x-big": "b" * 100_000})
    assert too_big.status_code == 431
    too_many = gw.post_json(CHAT_PATH, chat_body(), headers={f"x-h{i}": "v" for i in range(150)})
    assert too_many.status_code == 431
    assert no_upstream_was_called(openai_mock, azure_mock)
    assert_served_normally(gw, openai_mock)


@pytest.mark.parametrize("header,status", [
    (b"x-request-id: abc\rInjected: yes\r\n", 200),  # Envoy drops the lone CR
    (b"x-request-id: abc\r\n Injected: yes\r\n", 200),  # obsolete line folding: one value
    (b"x-request-id: abc\x00Injected: yes\r\n", 400),
    (b"traceparent: 00-abc\x0bInjected: yes\r\n", 400),
    (b"x-request-id: caf\xc3\xa9\r\n", 200),
    (b"x-request-id: caf\xff\xfe\r\n", 200),
], ids=["cr", "obs-fold", "nul", "vtab", "utf8", "not-utf8"])
def test_control_characters_in_header_values_inject_nothing(gw, openai_mock, azure_mock, header, status):
    """Envoy refuses or normalises the value; either way no upstream sees an extra header or a
    broken value, on the routed attempt or on the callouts."""
    openai_mock.script([{"status": 500, "repeat": 2}])
    got, headers, body = raw_exchange(gw, raw_post(CHAT_PATH.encode(), header, json.dumps(chat_body()).encode()))
    assert got == status, body[:200]
    if status == 200:
        assert headers["x-llm-failover-target"] == "azure"
    seen = openai_mock.api_requests() + azure_mock.api_requests()
    assert len(seen) == (3 if status == 200 else 0)
    for q in seen:
        assert not any(name.startswith("injected") for name in q["headers"]), q["headers"]
        assert not any(c in v for v in q["headers"].values() for c in "\r\n\x00")
        assert q["raw_path"] in (CHAT_PATH, AZURE_GPT4O_PATH + "?api-version=2025-04-01-preview")
    openai_mock.reset()
    azure_mock.reset()
    assert_served_normally(gw, openai_mock)


def test_hostile_gateway_credentials_get_401(make_stack, openai_mock, azure_mock):
    digest = hashlib.sha256(b"gw-good-key").hexdigest()
    s = make_stack(hostile_config(keys=[{"name": "app", "key_sha256": digest}]))
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer " + "k" * 40_000},
                    {"Authorization": "Basic Z3ctZ29vZC1rZXk6"}, {"Authorization": "gw-good-key"},
                    {"Authorization": "Bearer gw-good-key-and-more"}, {"api-key": "GW-GOOD-KEY"},
                    {"Authorization": "Bearer gw-good-k\u00e9y".encode()}):
        r = s.post_json(CHAT_PATH, chat_body(), headers=headers)
        assert_filter_error(r, 401, "invalid_api_key")
    assert no_upstream_was_called(openai_mock, azure_mock)
    ok = s.post_json(CHAT_PATH, chat_body(), headers={"Authorization": "Bearer  gw-good-key "})
    assert ok.status_code == 200
    assert openai_mock.api_requests()[0]["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"


# ---- models and paths --------------------------------------------------------------------------

HOSTILE_MODELS = ["gpt-4o\r\nX-Injected: 1", "gpt 4o/../../admin?x=1#f", "../../../etc/passwd", "%0d%0aX-Injected:%201",
                  "gpt-4o\u2028\u00e9\U0001F600", "m" * 20_000]


@pytest.mark.parametrize("model", HOSTILE_MODELS, ids=["crlf", "path-chars", "traversal", "encoded-crlf", "unicode",
                                                       "huge"])
def test_hostile_model_names_stay_in_the_body(gw, openai_mock, azure_mock, model):
    """The model picks a deployment from the config; it never becomes part of a path or a header."""
    openai_mock.script([{"status": 500, "repeat": 2}])
    r = gw.post_json(CHAT_PATH, chat_body(model=model))
    assert r.status_code == 200 and r.headers["x-llm-failover-target"] == "azure"
    routed, retry = openai_mock.api_requests()
    [fallback] = azure_mock.api_requests()
    assert routed["raw_path"] == retry["raw_path"] == CHAT_PATH
    assert fallback["path"] == AZURE_DEFAULT_PATH and fallback["query"] == {"api-version": "2025-04-01-preview"}
    for q in (routed, retry, fallback):
        assert q["body"]["model"] == model
        assert not any(name.startswith("x-injected") for name in q["headers"])
    assert not any(line.startswith("X-Injected") for line in gw.log_text.splitlines())
    assert_served_normally(gw, openai_mock)


def test_a_model_no_target_serves_gets_400_with_the_name_escaped(make_stack, openai_mock, azure_mock):
    s = make_stack(plugin_config([azure_target(deployments={"gpt-4o": "gpt-4o-prod"}, cooldown=False)]))
    for model in HOSTILE_MODELS[:5]:
        r = s.post_json(CHAT_PATH, chat_body(model=model))
        assert_filter_error(r, 400, "model_not_available")
        assert model in r.json()["error"]["message"]
    assert not any(line.startswith("X-Injected") for line in s.log_text.splitlines())
    assert no_upstream_was_called(openai_mock, azure_mock)
    assert s.post_json(CHAT_PATH, chat_body()).status_code == 200


def test_hostile_paths_and_query_strings(gw, openai_mock, azure_mock):
    # Control characters in the request line: Envoy's codec refuses them.
    for bad in (b"/v1/chat/comp\rletions", b"/v1/chat/completions\x00", b"/v1/chat completions"):
        status, _, _ = raw_exchange(gw, raw_post(bad, b"", json.dumps(chat_body()).encode()))
        assert status == 400
    assert no_upstream_was_called(openai_mock, azure_mock)

    # Encoded CR/LF in the query stays encoded for OpenAI and never reaches Azure.
    path = CHAT_PATH + "?api-version=evil&x=%0D%0AInjected:%201"
    openai_mock.script([{"status": 500, "repeat": 2}])
    r = gw.post_json(path, chat_body())
    assert r.status_code == 200 and r.headers["x-llm-failover-target"] == "azure"
    assert {q["raw_path"] for q in openai_mock.api_requests()} == {path}
    [fallback] = azure_mock.api_requests()
    assert fallback["raw_path"] == AZURE_GPT4O_PATH + "?api-version=2025-04-01-preview"
    for q in openai_mock.api_requests() + [fallback]:
        assert not any(name.startswith("injected") for name in q["headers"])
    assert_served_normally(gw, openai_mock)


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/v1/models", 200),
    ("POST", "/v1/unknown", 404),
    ("GET", CHAT_PATH, 404),
    ("PUT", CHAT_PATH, 404),
    ("DELETE", CHAT_PATH, 404),
    ("PATCH", "/v1/files/file-abc", 404),
    ("OPTIONS", "/", 404),
    ("POST", CHAT_PATH + "/extra", 404),
    ("POST", "/V1/CHAT/COMPLETIONS", 404),
    # An Azure path the filter does not rewrite (Azure-shaped chat is an operation: test_azure_shaped.py).
    ("POST", "/openai/deployments/gpt-4o-prod/images/generations?api-version=2024-10-21", 404),
])
def test_unknown_paths_and_methods_go_to_the_first_target_only(gw, openai_mock, azure_mock, method, path, status):
    r = gw.request(method, path, data=b"not json at all", headers={"Authorization": "Bearer client-key"})
    assert r.status_code == status  # the first target's own answer
    assert r.headers["x-llm-failover-target"] == "openai"
    assert r.headers["x-llm-failover-attempts"] == "1"
    [seen] = openai_mock.api_requests()
    assert (seen["method"], seen["raw_path"]) == (method, path)
    assert seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert azure_mock.api_requests() == []
    assert_served_normally(gw, openai_mock)


def test_unknown_paths_are_not_failed_over_when_the_first_target_is_down(make_stack, openai_mock, azure_mock):
    s = make_stack(hostile_config(), clusters={"openai": free_port()})  # nothing listens there
    for method, path in (("GET", "/v1/models"), ("DELETE", CHAT_PATH), ("POST", "/v1/unknown")):
        r = s.request(method, path)
        assert r.status_code == 503
        assert r.headers["x-llm-failover-target"] == "openai"
    assert azure_mock.api_requests() == []
    # ... while an operation fails over.
    r = s.post_json(CHAT_PATH, chat_body())
    assert r.status_code == 200 and r.headers["x-llm-failover-target"] == "azure"


def test_unknown_http_method_gets_envoys_400(gw, openai_mock, azure_mock):
    status, _, _ = raw_exchange(gw, b"BREW /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert status == 400
    assert no_upstream_was_called(openai_mock, azure_mock)
    assert_served_normally(gw, openai_mock)


# ---- upstreams that hang or are gone -----------------------------------------------------------


def _slow_config(openai_timeout, azure_timeout, deadline):
    return plugin_config([openai_target(timeout=openai_timeout, cooldown=False),
                          azure_target(timeout=azure_timeout, cooldown=False)], deadline=deadline)


def test_attempt_timeouts_with_no_target_left_get_504_upstream_timeout(make_stack, openai_mock, azure_mock):
    s = make_stack(_slow_config("300ms", "300ms", "10s"))
    openai_mock.script([{"delay_ms": 1500}])
    azure_mock.script([{"delay_ms": 1500}])
    t0 = time.monotonic()
    r = s.post_json(CHAT_PATH, chat_body())
    assert time.monotonic() - t0 < 1.4
    assert_filter_error(r, 504, "upstream_timeout")
    assert r.headers["x-llm-failover-target"] == "azure" and r.headers["x-llm-failover-attempts"] == "2"
    time.sleep(1.2)  # let the slow mocks finish
    assert_served_normally(s, openai_mock)


def test_unreachable_targets_get_502_upstream_unavailable(make_stack, openai_mock, azure_mock):
    s = make_stack(hostile_config(), clusters={"openai": free_port(), "azure": free_port()})
    r = s.post_json(CHAT_PATH, chat_body())
    assert_filter_error(r, 502, "upstream_unavailable")
    assert r.headers["x-llm-failover-target"] == "azure"
    assert "'azure'" in r.json()["error"]["message"]


def test_a_spent_deadline_gets_504_deadline_exceeded_without_trying_further(make_stack, openai_mock, azure_mock):
    s = make_stack(_slow_config("5s", "5s", "1s"))
    openai_mock.script([{"delay_ms": 2500}])
    t0 = time.monotonic()
    r = s.post_json(CHAT_PATH, chat_body())
    assert 0.9 < time.monotonic() - t0 < 2.0
    assert_filter_error(r, 504, "deadline_exceeded")  # not "upstream_timeout ... no other target was left"
    assert r.headers["x-llm-failover-target"] == "openai"
    assert azure_mock.api_requests() == []


# ---- clients that leave, and many clients at once ----------------------------------------------


def _leave_early(stack, timeout: float, **kw):
    with pytest.raises(requests.exceptions.ReadTimeout):
        stack.post_json(CHAT_PATH, chat_body(), timeout=timeout, **kw)


def test_client_disconnect_during_a_fallback_callout(gw, openai_mock, azure_mock):
    openai_mock.script([{"status": 500, "repeat": 2}])
    azure_mock.script([{"delay_ms": 1200}])
    _leave_early(gw, 0.5, headers={"x-request-id": "hostile-dc-callout"})
    wait_for(lambda: len(azure_mock.api_requests()) == 1, timeout=5, what="the fallback callout")
    time.sleep(1.0)  # the fallback answers after the client left
    assert_served_normally(gw, openai_mock)

    # Many at once, on both workers.
    openai_mock.reset()
    azure_mock.reset()
    openai_mock.script([{"status": 500, "repeat": "forever"}])
    azure_mock.script([{"delay_ms": 800, "repeat": "forever"}])
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: _leave_early(gw, 0.4), range(16)))
    wait_for(lambda: len(azure_mock.api_requests()) == 16, timeout=10, what="16 fallback callouts")
    time.sleep(1.0)
    openai_mock.reset()
    azure_mock.reset()
    assert_served_normally(gw, openai_mock)


def test_access_log_of_a_client_that_left_during_failover_shows_the_failover(gw, openai_mock, azure_mock):
    openai_mock.script([{"status": 500, "repeat": 2}])
    azure_mock.script([{"delay_ms": 1000}])
    _leave_early(gw, 0.4, headers={"x-request-id": "hostile-dc-log"})
    [line] = wait_for(lambda: [ln for ln in gw.access_log() if "req_id=hostile-dc-log " in ln], timeout=5,
                      what="the access log line")
    assert "llmf_failover=true" in line and "llmf_attempts=3" in line


def test_client_disconnect_while_waiting_for_retry_after(gw, openai_mock, azure_mock):
    # Control: a 429 with Retry-After: 1 is retried on the same target after a second.
    openai_mock.script([{"status": 429, "retry_after": "1"}])
    t0 = time.monotonic()
    r = gw.post_json(CHAT_PATH, chat_body())
    assert r.status_code == 200 and r.headers["x-llm-failover-attempts"] == "2"
    assert r.headers["x-llm-failover-target"] == "openai" and time.monotonic() - t0 >= 0.9

    openai_mock.reset()
    openai_mock.script([{"status": 429, "retry_after": "1"}])
    _leave_early(gw, 0.3)
    time.sleep(1.5)
    # The client is gone: its retry is never sent, nothing fails over.
    assert len(openai_mock.api_requests()) == 1 and azure_mock.api_requests() == []
    assert_served_normally(gw, openai_mock)


def test_client_disconnect_mid_stream(gw, openai_mock, azure_mock):
    openai_mock.configure(stream_delay_ms=200)
    with requests.post(gw.url(CHAT_PATH), json=chat_body(stream=True), stream=True, timeout=10) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert first.startswith(b"data: ")
    # The response object is closed: the client left after one event.
    time.sleep(0.6)
    openai_mock.configure(stream_delay_ms=0)
    assert_served_normally(gw, openai_mock)


@pytest.mark.test_timeout(60)
def test_concurrent_requests_during_failover_each_get_their_own_answer(gw, openai_mock, azure_mock):
    openai_mock.script([{"status": 500, "repeat": "forever"}])
    azure_mock.script([{"delay_ms": 150, "repeat": "forever"}])
    prompts = [f"concurrent {i} " + "z" * (4 * i) for i in range(48)]
    lock = threading.Lock()
    answers: dict[str, requests.Response] = {}

    def one(i):
        if i % 4 == 3:  # hostile requests mixed in
            r = post_bytes(gw, b"\xff" * i)
            assert_filter_error(r, 400, "invalid_request_body")
            return
        r = gw.post_json(CHAT_PATH, chat_body(prompts[i]))
        with lock:
            answers[prompts[i]] = r

    with ThreadPoolExecutor(24) as pool:
        list(pool.map(one, range(len(prompts))))
    assert len(answers) == 36
    for prompt, r in answers.items():
        assert r.status_code == 200, r.text[:200]
        assert r.headers["x-llm-failover-target"] == "azure" and r.headers["x-llm-failover-attempts"] == "3"
        assert r.json()["usage"]["prompt_tokens"] == _approx_tokens([{"role": "user", "content": prompt}])
    assert len({r.json()["id"] for r in answers.values()}) == 36
    assert sorted(q["body"]["messages"][0]["content"] for q in azure_mock.api_requests()) == sorted(answers)
    openai_mock.reset()
    azure_mock.reset()
    assert_served_normally(gw, openai_mock)
