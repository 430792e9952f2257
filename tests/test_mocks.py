"""Fast tests of the mock upstreams themselves (no Envoy): strictness, framing, scripting."""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import subprocess
import sys
import time

import openai
import pytest
import requests

from harness import AZURE_KEY, OPENAI_KEY, REPO_ROOT, wait_for_port

OPENAI_HOST = {"Host": "api.openai.com"}
AZURE_HOST = {"Host": "llmf-local.openai.azure.com"}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
T = 10  # seconds, every HTTP call


def oai_post(mock, path="/v1/chat/completions", body=CHAT, key=OPENAI_KEY, headers=None, **kw):
    h = dict(OPENAI_HOST)
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    kw.setdefault("timeout", T)
    if isinstance(body, (bytes, str)):
        h.setdefault("Content-Type", "application/json")
        return requests.post(mock.url(path), data=body, headers=h, **kw)
    return requests.post(mock.url(path), json=body, headers=h, **kw)


def az_path(dep="gpt-4o-prod", op="chat/completions", version="2024-10-21"):
    q = f"?api-version={version}" if version else ""
    return f"/openai/deployments/{dep}/{op}{q}"


def az_post(mock, path=None, body=CHAT, key=AZURE_KEY, headers=None, **kw):
    h = dict(AZURE_HOST)
    if key is not None:
        h["api-key"] = key
    h.update(headers or {})
    kw.setdefault("timeout", T)
    return requests.post(mock.url(path or az_path()), json=body, headers=h, **kw)


def sdk(mock, **kw):
    return openai.OpenAI(base_url=mock.url("/v1"), api_key=OPENAI_KEY, max_retries=0, timeout=T,
                         default_headers=OPENAI_HOST, **kw)


def azure_sdk(mock, api_version="2024-10-21"):
    return openai.AzureOpenAI(azure_endpoint=mock.url(""), api_key=AZURE_KEY, api_version=api_version,
                              max_retries=0, timeout=T, default_headers=AZURE_HOST)


# ----------------------------------------------------------------------------------------------
# OpenAI strictness


def test_openai_chat_ok_and_recorded(openai_mock):
    r = oai_post(openai_mock, headers={"x-request-id": "rid-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "gpt-4o"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello from mock openai",
                                             "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0
    assert r.headers["x-mock-provider"] == "openai"
    [rec] = openai_mock.requests()
    assert rec["method"] == "POST" and rec["path"] == "/v1/chat/completions"
    assert rec["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert rec["headers"]["x-request-id"] == "rid-1"
    assert rec["body"] == CHAT and rec["status"] == 200 and rec["leak"] is False


def test_openai_sdk_chat_completions_embeddings_models(openai_mock):
    c = sdk(openai_mock)
    chat = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "Hello from mock openai"
    assert chat.model == "gpt-4o-mini"
    comp = c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    assert comp.object == "text_completion" and comp.choices[0].text == "Hello from mock openai"
    emb = c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert emb.object == "list" and len(emb.data) == 2 and len(emb.data[0].embedding) == 8
    emb64 = c.embeddings.create(model="text-embedding-3-small", input="a", encoding_format="base64")
    assert emb64.data[0].embedding  # base64 string (or decoded floats, depending on the SDK)
    assert [m.id for m in c.models.list()]


def test_openai_wrong_and_missing_key(openai_mock):
    r = oai_post(openai_mock, key="sk-wrong-key-1234567890")
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error" and err["param"] is None
    assert "Incorrect API key provided" in err["message"]
    assert "sk-wrong-key-1234567890" not in err["message"]  # masked
    r = oai_post(openai_mock, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = oai_post(openai_mock, key=None, headers={"Authorization": OPENAI_KEY})  # no "Bearer "
    assert r.status_code == 401


def test_openai_unknown_path_and_method(openai_mock):
    r = oai_post(openai_mock, path="/v1/chat/completion")
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "Invalid URL (POST /v1/chat/completion)",
                                  "type": "invalid_request_error", "param": None, "code": "unknown_url"}}
    r = requests.get(openai_mock.url("/v1/chat/completions"), timeout=T,
                     headers={**OPENAI_HOST, "Authorization": f"Bearer {OPENAI_KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = oai_post(openai_mock, path="/openai/deployments/x/chat/completions?api-version=2024-10-21")
    assert r.status_code == 404


def test_openai_body_validation(openai_mock):
    r = oai_post(openai_mock, body=b"not json")
    assert r.status_code == 400 and "could not parse the JSON body" in r.json()["error"]["message"]
    r = oai_post(openai_mock, body=b"[1,2]")
    assert r.status_code == 400
    r = oai_post(openai_mock, body={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]
    r = oai_post(openai_mock, body={"model": "gpt-4o"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = oai_post(openai_mock, body={"model": "gpt-4o", "messages": "hi"})
    assert r.status_code == 400
    r = oai_post(openai_mock, path="/v1/completions", body={"model": "gpt-3.5-turbo-instruct"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = oai_post(openai_mock, path="/v1/embeddings", body={"model": "text-embedding-3-small"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert all(rec["status"] == 400 for rec in openai_mock.requests())


def test_content_type_must_be_json(openai_mock, azure_mock):
    body = json.dumps(CHAT)
    r = oai_post(openai_mock, body=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"
    assert oai_post(openai_mock, body=body, headers={"Content-Type": "application/json; charset=utf-8"}).ok
    r = requests.post(azure_mock.url(az_path()), data=body, timeout=T,
                      headers={**AZURE_HOST, "api-key": AZURE_KEY, "Content-Type": "text/plain"})
    assert r.status_code == 415


def test_openai_host_header_enforced(openai_mock):
    r = oai_post(openai_mock, headers={"Host": f"127.0.0.1:{openai_mock.port}"})
    assert r.status_code == 421 and r.json()["error"]["code"] == "wrong_host"
    r = oai_post(openai_mock, headers={"Host": "api.openai.com:443"})
    assert r.status_code == 200


@pytest.mark.allow_leaks
def test_openai_leak_of_azure_credentials(openai_mock):
    r = oai_post(openai_mock, headers={"api-key": "whatever"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "credential_leak"
    # the Azure (local) key sent as a bearer token to OpenAI: forbidden secret by default
    r = oai_post(openai_mock, key=AZURE_KEY)
    assert r.status_code == 400
    leaks = openai_mock.leaks()
    assert len(leaks) == 2
    assert "api-key" in leaks[0]["reason"]
    assert AZURE_KEY not in json.dumps(leaks)  # leak reports mask the secret
    recs = openai_mock.requests()
    assert [r["leak"] for r in recs] == [True, True]
    openai_mock.reset()
    assert openai_mock.leaks() == [] and openai_mock.requests() == []


# ----------------------------------------------------------------------------------------------
# Azure strictness


def test_azure_chat_ok_shape_and_headers(azure_mock):
    r = az_post(azure_mock, body={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "Hello from mock azure deployment gpt-4o-prod"
    assert body["model"] == "gpt-4o-2024-08-06"  # the underlying model, like Azure
    assert "prompt_filter_results" in body
    assert r.headers["x-ms-region"] and r.headers["apim-request-id"]
    r = az_post(azure_mock, path=az_path("gpt-4o-mini-default", version="2024-06-01"))
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "Hello from mock azure deployment gpt-4o-mini-default"
    assert r.json()["model"] == "gpt-4o-mini-2024-07-18"
    rec = azure_mock.last_request()
    assert rec["query"] == {"api-version": "2024-06-01"}
    assert rec["headers"]["api-key"] == AZURE_KEY and "authorization" not in rec["headers"]


def test_azure_sdk_chat_embeddings_completions(azure_mock):
    c = azure_sdk(azure_mock)
    chat = c.chat.completions.create(model="gpt-4o-prod", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "Hello from mock azure deployment gpt-4o-prod"
    emb = c.embeddings.create(model="gpt-4o-prod", input="x")
    assert len(emb.data[0].embedding) == 8
    comp = c.completions.create(model="gpt-4o-mini-default", prompt="x")
    assert comp.choices[0].text.startswith("Hello from mock azure")


def test_azure_api_version_rules(azure_mock):
    r = az_post(azure_mock, path=az_path(version=None))
    assert r.status_code == 404 and r.json() == {"error": {"code": "404", "message": "Resource not found"}}
    r = az_post(azure_mock, path=az_path(version="2023-01-01"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "BadRequest"


def test_azure_unknown_deployment_and_path(azure_mock):
    r = az_post(azure_mock, path=az_path("gpt-4"))
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "DeploymentNotFound" and "does not exist" in err["message"]
    r = az_post(azure_mock, path="/v1/chat/completions?api-version=2024-10-21")
    assert r.status_code == 404 and r.json()["error"]["code"] == "404"
    r = az_post(azure_mock, path=az_path(op="images/generations"))
    assert r.status_code == 404


def test_azure_auth(azure_mock):
    for key in ("wrong", None):
        r = az_post(azure_mock, key=key)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "401"
        assert "Access denied due to invalid subscription key" in r.json()["error"]["message"]
    # a non-Azure bearer (e.g. a gateway key) next to a good api-key is rejected too
    r = az_post(azure_mock, headers={"Authorization": "Bearer gateway-key"})
    assert r.status_code == 401


def test_azure_ad_token(mock_factory):
    m = mock_factory("azure", ad_token="entra-token-123")
    r = az_post(m, key=None, headers={"Authorization": "Bearer entra-token-123"})
    assert r.status_code == 200, r.text
    r = az_post(m, key=None, headers={"Authorization": "Bearer other"})
    assert r.status_code == 401


@pytest.mark.allow_leaks
def test_azure_leak_of_openai_key(azure_mock):
    r = az_post(azure_mock, headers={"Authorization": f"Bearer {OPENAI_KEY}"})
    assert r.status_code == 400
    r = az_post(azure_mock, key=None, headers={"Authorization": "Bearer sk-proj-something"})
    assert r.status_code == 400
    leaks = azure_mock.leaks()
    assert len(leaks) == 2 and all("sk-" in lk["reason"] or "forbidden" in lk["reason"] for lk in leaks)
    assert azure_mock.requests()[0]["leak_reasons"]


def test_azure_host_header_enforced(azure_mock):
    r = az_post(azure_mock, headers={"Host": "api.openai.com"})
    assert r.status_code == 421


def test_azure_body_validation(azure_mock):
    r = az_post(azure_mock, body={"model": "gpt-4o"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = az_post(azure_mock, path=az_path(op="embeddings"), body={"input": []})
    assert r.status_code == 400


# ----------------------------------------------------------------------------------------------
# SSE framing


def _raw_http(port, request: bytes, read_until=b"0\r\n\r\n", timeout=T) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while read_until not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _decode_chunked(raw: bytes) -> list[bytes]:
    chunks = []
    while True:
        line, _, raw = raw.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            return chunks
        chunks.append(raw[:size])
        assert raw[size:size + 2] == b"\r\n"
        raw = raw[size + 2:]


def test_sse_framing_raw(openai_mock):
    body = json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
           b"Authorization: Bearer " + OPENAI_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    raw = _raw_http(openai_mock.port, req)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"HTTP/1.1 200" in head
    assert b"Transfer-Encoding: chunked" in head and b"text/event-stream" in head
    assert b"Content-Length" not in head
    chunks = _decode_chunked(rest)
    # one SSE event per chunk, each "data: ...\n\n"
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") and c.count(b"\n\n") == 1 for c in chunks)
    events = [c[6:-2].decode() for c in chunks]
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert all(o["object"] == "chat.completion.chunk" for o in objs)
    assert objs[0]["choices"][0]["delta"]["role"] == "assistant"
    assert objs[-2]["choices"][0]["finish_reason"] == "stop"
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["total_tokens"] > 0
    text = "".join(o["choices"][0]["delta"].get("content", "") for o in objs if o["choices"])
    assert text == "Hello from mock openai"


def test_sse_via_sdk_is_paced(openai_mock):
    openai_mock.configure(stream_delay_ms=60)
    c = sdk(openai_mock)
    t0 = time.monotonic()
    arrivals, text, usage = [], "", None
    for chunk in c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                           stream=True, stream_options={"include_usage": True}):
        arrivals.append(time.monotonic() - t0)
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "Hello from mock openai"
    assert usage is not None and usage.completion_tokens == 4
    assert len(arrivals) >= 6
    # events arrive one by one, not in a single buffered piece
    assert arrivals[-1] - arrivals[0] >= 0.06 * (len(arrivals) - 1) * 0.7
    assert openai_mock.last_request()["stream"] is True


def test_sse_azure_via_sdk(azure_mock):
    azure_mock.configure(stream_delay_ms=5)
    c = azure_sdk(azure_mock)
    text = ""
    n = 0
    for chunk in c.chat.completions.create(model="gpt-4o-prod", messages=[{"role": "user", "content": "x"}],
                                           stream=True):
        n += 1
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text == "Hello from mock azure deployment gpt-4o-prod"
    assert n >= 5


def test_sse_completions_stream(openai_mock):
    openai_mock.configure(stream_delay_ms=1)
    c = sdk(openai_mock)
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="x", stream=True) if ch.choices)
    assert text == "Hello from mock openai"


def test_stream_close_after_events(openai_mock):
    openai_mock.configure(stream_delay_ms=1)
    openai_mock.script([{"close_after_events": 2}])
    c = sdk(openai_mock)
    with pytest.raises(Exception):
        list(c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True))


# ----------------------------------------------------------------------------------------------
# gzip, keep-alive, chunked request bodies


def test_gzip_when_accepted(openai_mock):
    r = oai_post(openai_mock, headers={"Accept-Encoding": "gzip"}, stream=True)
    assert r.headers["Content-Encoding"] == "gzip"
    raw = r.raw.read(decode_content=False)
    # as recorded: chunked, no Content-Length
    assert r.headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in r.headers
    assert json.loads(gzip.decompress(raw))["object"] == "chat.completion"
    # errors too
    r = oai_post(openai_mock, key="bad", headers={"Accept-Encoding": "br, gzip;q=0.8"})
    assert r.status_code == 401 and r.headers["Content-Encoding"] == "gzip"
    assert r.json()["error"]["code"] == "invalid_api_key"
    # not when not accepted
    for ae in ("identity", "gzip;q=0"):
        r = oai_post(openai_mock, headers={"Accept-Encoding": ae})
        assert "Content-Encoding" not in r.headers and r.json()["object"] == "chat.completion"


def test_gzip_not_applied_to_streams(azure_mock):
    azure_mock.configure(stream_delay_ms=1)
    r = az_post(azure_mock, body={**CHAT, "stream": True}, headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and "Content-Encoding" not in r.headers
    assert r.text.endswith("data: [DONE]\n\n")


def test_keep_alive_and_chunked_request_body(openai_mock):
    body = json.dumps(CHAT).encode()
    one = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
           b"Authorization: Bearer " + OPENAI_KEY.encode() + b"\r\n"
           b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body
           + b"\r\n0\r\n\r\n")
    with socket.create_connection(("127.0.0.1", openai_mock.port), timeout=T) as s:
        f = s.makefile("rb")
        for _ in range(2):  # two requests on the same connection
            s.sendall(one)
            status = f.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            length = None
            while True:
                line = f.readline()
                if line == b"\r\n":
                    break
                k, _, v = line.decode().partition(":")
                if k.lower() == "content-length":
                    length = int(v)
            assert length is not None
            assert json.loads(f.read(length))["choices"][0]["message"]["content"] == "Hello from mock openai"
    assert [r["body"] for r in openai_mock.requests()] == [CHAT, CHAT]


# ----------------------------------------------------------------------------------------------
# scripted failures


def test_script_sequence_and_shapes_openai(openai_mock):
    openai_mock.script([{"status": 429, "retry_after": "2"}, {"status": 500}, {"status": 503},
                        {"status": 429, "retry_after_ms": 1500}, {}])
    r = oai_post(openai_mock)
    assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "requests"
    assert "Rate limit reached for gpt-4o" in r.json()["error"]["message"]
    r = oai_post(openai_mock)
    assert r.status_code == 500 and r.json() == {"error": {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error", "param": None, "code": None}}
    r = oai_post(openai_mock)
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    r = oai_post(openai_mock)
    assert r.status_code == 429 and r.headers["retry-after-ms"] == "1500"
    assert oai_post(openai_mock).status_code == 200
    assert oai_post(openai_mock).status_code == 200  # script spent
    assert [r["status"] for r in openai_mock.requests()] == [429, 500, 503, 429, 200, 200]
    assert openai_mock.requests()[0]["step"]["status"] == 429


def test_script_azure_shapes(azure_mock):
    azure_mock.script([{"status": 429, "retry_after": "3"}, {"status": 429, "retry_after_ms": 1500},
                       {"status": 400, "content_filter": True}, {"status": 503}])
    r = az_post(azure_mock)
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    msg = r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "429"
    assert "ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21" in msg
    assert "Please retry after 3 seconds" in msg
    r = az_post(azure_mock)
    assert r.headers["retry-after-ms"] == "1500" and r.headers["x-ms-retry-after-ms"] == "1500"
    r = az_post(azure_mock)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "content_filter" and err["param"] == "prompt" and err["status"] == 400
    assert err["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert "content_filter_result" in err["innererror"]
    r = az_post(azure_mock)
    assert r.status_code == 503 and r.json()["error"]["code"] == "ServiceUnavailable"
    assert az_post(azure_mock).status_code == 200


def test_script_repeat_and_forever(openai_mock):
    openai_mock.script([{"status": 500, "repeat": 2}, {"status": 502, "repeat": "forever"}])
    assert [oai_post(openai_mock).status_code for _ in range(5)] == [500, 500, 502, 502, 502]
    openai_mock.reset()
    assert oai_post(openai_mock).status_code == 200


def test_script_append(openai_mock):
    openai_mock.script([{"status": 500}])
    openai_mock.script([{"status": 503}], append=True)
    assert [oai_post(openai_mock).status_code for _ in range(3)] == [500, 503, 200]


def test_script_delay(openai_mock):
    openai_mock.script([{"delay_ms": 400}])
    t0 = time.monotonic()
    r = oai_post(openai_mock)
    assert r.status_code == 200 and time.monotonic() - t0 >= 0.38
    with pytest.raises(requests.exceptions.ReadTimeout):
        openai_mock.script([{"delay_ms": 1500}])
        oai_post(openai_mock, timeout=0.3)


def test_script_close_resets_connection(azure_mock):
    azure_mock.script([{"close": True}])
    with pytest.raises(requests.exceptions.ConnectionError):
        az_post(azure_mock)
    assert az_post(azure_mock).status_code == 200
    recs = azure_mock.requests()
    assert recs[0]["closed"] is True and recs[0]["status"] is None


def test_script_custom_body_and_headers(openai_mock):
    openai_mock.script([{"status": 418, "body": {"custom": True}, "headers": {"x-extra": "1"}}])
    r = oai_post(openai_mock)
    assert r.status_code == 418 and r.json() == {"custom": True} and r.headers["x-extra"] == "1"


def test_script_applies_only_to_valid_requests(openai_mock):
    """Strictness errors are not masked by the script: a bad request keeps its own answer."""
    openai_mock.script([{"status": 429}])
    assert oai_post(openai_mock, key="wrong").status_code == 401
    assert oai_post(openai_mock).status_code == 429


def test_fail_rate(openai_mock):
    openai_mock.fail_rate(1.0, [503])
    assert {oai_post(openai_mock).status_code for _ in range(4)} == {503}
    openai_mock.fail_rate(0.5, [429, 500], seed=7)
    codes = [oai_post(openai_mock).status_code for _ in range(40)]
    assert set(codes) <= {200, 429, 500} and 5 < codes.count(200) < 35
    openai_mock.fail_rate(0)
    assert oai_post(openai_mock).status_code == 200


def test_fail_rate_cleared_by_reset(azure_mock):
    azure_mock.fail_rate(1.0, [500])
    assert az_post(azure_mock).status_code == 500
    azure_mock.reset()
    assert az_post(azure_mock).status_code == 200


def test_x_mock_status_header(openai_mock, azure_mock):
    r = oai_post(openai_mock, headers={"x-mock-status": "429", "x-mock-retry-after": "1"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert oai_post(openai_mock).status_code == 200
    r = az_post(azure_mock, headers={"x-mock-status": "503"})
    assert r.status_code == 503


def test_control_api_errors(openai_mock):
    r = requests.post(openai_mock.url("/__mock/script"), data="{", timeout=T)
    assert r.status_code == 400
    r = requests.post(openai_mock.url("/__mock/script"), json={"status": 500}, timeout=T)
    assert r.status_code == 400
    r = requests.post(openai_mock.url("/__mock/nope"), json={}, timeout=T)
    assert r.status_code == 404
    assert requests.get(openai_mock.url("/__mock/health"), timeout=T).json()["ok"] is True
    assert openai_mock.requests() == []  # control calls are not logged


# ----------------------------------------------------------------------------------------------
# TLS with SNI check, CLI


def test_tls_sni_check(mock_factory, make_cert):
    host = "llmf-local.openai.azure.com"
    cert, key = make_cert(host)
    m = mock_factory("azure", tls_cert=cert, tls_key=key, expect_sni=host)
    assert m.base_url.startswith("https://")
    ctx = ssl.create_default_context(cafile=cert)
    with socket.create_connection(("127.0.0.1", m.port), timeout=T) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            body = json.dumps(CHAT).encode()
            s.sendall(b"POST " + az_path().encode() + b" HTTP/1.1\r\nHost: " + host.encode() +
                      b"\r\napi-key: " + AZURE_KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: " +
                      str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert m.last_request()["sni"] == host
    bad = ssl.create_default_context(cafile=cert)
    bad.check_hostname = False
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with socket.create_connection(("127.0.0.1", m.port), timeout=T) as raw:
            with bad.wrap_socket(raw, server_hostname="other.example.com") as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                s.recv(10)
    errs = m.tls_errors()
    assert errs and errs[-1]["sni"] == "other.example.com"


def test_cli_runs_standalone():
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "mocks" / "upstream.py"),
                             "--provider", "azure", "--port", "0", "--api-key", "k1", "--resource", "res1",
                             "--api-versions", "2024-10-21", "--deployments", "dep1=gpt-4", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + proc.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        assert wait_for_port(port)
        r = requests.post(f"http://127.0.0.1:{port}{az_path('dep1')}", json=CHAT, timeout=T,
                          headers={"Host": "res1.openai.azure.com", "api-key": "k1"})
        assert r.status_code == 200 and r.json()["model"] == "gpt-4"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_start_returns_server_and_thread():
    from mocks.upstream import start

    server, thread = start("openai", port=0, host="*")
    try:
        assert server.port > 0 and thread.is_alive()
        r = requests.get(f"http://127.0.0.1:{server.port}/v1/models", timeout=T,
                         headers={"Authorization": f"Bearer {OPENAI_KEY}"})
        assert r.status_code == 200
    finally:
        server.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_x_mock_status_per_name_and_count(openai_mock, azure_mock):
    h = {"x-mock-status-openai": "429", "x-mock-count": "2"}
    assert oai_post(openai_mock, headers=h).status_code == 429
    assert oai_post(openai_mock).status_code == 429  # the follow-up (e.g. a retry without the header)
    assert oai_post(openai_mock).status_code == 200
    assert az_post(azure_mock, headers=h).status_code == 200  # not for the azure mock


# ----------------------------------------------------------------------------------------------
# Responses API (OpenAI)

RESP = {"model": "gpt-4o", "input": "Say hi"}
RESPONSE_EVENT_TYPES = (["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] + ["response.output_text.delta"] * 4 +
                        ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                         "response.completed"])  # "Hello from mock openai": 4 words, one delta each


def oai_call(mock, method, path, body=None, headers=None, key=OPENAI_KEY):
    h = {**OPENAI_HOST, "Authorization": f"Bearer {key}", **(headers or {})}
    return requests.request(method, mock.url(path), json=body, headers=h, timeout=T)


def sse_events(raw_chunks: list[bytes]) -> list[tuple[str, dict]]:
    """(event, data) of each chunk; every chunk must be exactly one `event:` + `data:` SSE event."""
    out = []
    for c in raw_chunks:
        text = c.decode()
        assert text.endswith("\n\n") and text.count("\n\n") == 1, text
        ev_line, data_line = text[:-2].split("\n")
        assert ev_line.startswith("event: ") and data_line.startswith("data: "), text
        out.append((ev_line[7:], json.loads(data_line[6:])))
    return out


def test_openai_responses_create_shape_usage_and_record(openai_mock):
    r = oai_post(openai_mock, "/v1/responses", RESP)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "response" and body["status"] == "completed" and body["model"] == "gpt-4o"
    assert body["id"].startswith("resp_") and len(body["id"]) == 53
    assert isinstance(body["created_at"], int) and body["previous_response_id"] is None
    [msg] = body["output"]
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["status"] == "completed"
    assert msg["id"].startswith("msg_")
    assert msg["content"] == [{"type": "output_text", "annotations": [], "logprobs": [],
                               "text": "Hello from mock openai"}]
    u = body["usage"]
    assert u["input_tokens"] == 2 and u["output_tokens"] == 4 and u["total_tokens"] == 6  # "Say hi": 6 chars
    assert u["input_tokens_details"]["cached_tokens"] == 0 and u["output_tokens_details"]["reasoning_tokens"] == 0
    for field in ("parallel_tool_calls", "tool_choice", "tools", "text", "truncation", "error", "incomplete_details"):
        assert field in body
    assert r.headers["x-ratelimit-remaining-requests"] and r.headers["x-request-id"].startswith("req_")
    [rec] = openai_mock.requests()
    assert (rec["api_style"], rec["operation"], rec["model"], rec["response_id"], rec["credential"]) == (
        "openai", "responses", "gpt-4o", body["id"], "bearer")
    assert openai_mock.response_ids() == {body["id"]}


def test_openai_responses_via_sdk_all_methods(openai_mock):
    c = sdk(openai_mock)
    first = c.responses.create(model="gpt-4o-mini", input="hi", instructions="Be brief.")
    assert first.output_text == "Hello from mock openai" and first.model == "gpt-4o-mini"
    assert first.usage.input_tokens == 1 + 3 and first.usage.output_tokens == 4
    follow = c.responses.create(model="gpt-4o-mini", previous_response_id=first.id,
                                input=[{"role": "user", "content": "and again"},
                                       {"type": "message", "role": "user",
                                        "content": [{"type": "input_text", "text": "thanks"}]}])
    assert follow.previous_response_id == first.id and follow.id != first.id
    assert follow.usage.input_tokens > first.usage.total_tokens  # the previous turn is billed again
    got = c.responses.retrieve(follow.id)
    assert got.id == follow.id and got.output_text == follow.output_text
    items = list(c.responses.input_items.list(follow.id))  # default order: newest first
    assert [i.content[0].text for i in items] == ["thanks", "and again"]
    assert all(i.id.startswith("msg_") and i.role == "user" for i in items)
    assert [i.content[0].text for i in c.responses.input_items.list(follow.id, order="asc")] == ["and again", "thanks"]
    assert c.responses.delete(first.id) is None
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(first.id)
    r = oai_call(openai_mock, "DELETE", f"/v1/responses/{follow.id}")
    assert r.json() == {"id": follow.id, "object": "response.deleted", "deleted": True}
    assert [rec["operation"] for rec in openai_mock.requests()] == [
        "responses", "responses", "responses.retrieve", "responses.input_items", "responses.input_items",
        "responses.delete", "responses.retrieve", "responses.delete"]


def test_response_ids_belong_to_the_instance_that_created_them(openai_mock, mock_factory):
    other = mock_factory("openai", name="openai2")
    rid = oai_post(openai_mock, "/v1/responses", RESP).json()["id"]
    r = oai_post(other, "/v1/responses", {**RESP, "previous_response_id": rid})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": f"Previous response with id '{rid}' not found.",
                                  "type": "invalid_request_error", "param": "previous_response_id",
                                  "code": "previous_response_not_found"}}
    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/cancel"), ("GET", "/input_items")):
        r = oai_call(other, method, f"/v1/responses/{rid}{suffix}")
        assert r.status_code == 404, (method, suffix)
        assert r.json()["error"] == {"message": f"Response with id '{rid}' not found.",
                                     "type": "invalid_request_error", "param": None, "code": None}
    assert oai_post(openai_mock, "/v1/responses", {**RESP, "previous_response_id": rid}).status_code == 200
    assert other.response_ids() == set() and rid in openai_mock.response_ids()
    assert other.requests()[0]["step"] is None  # refused before any script step is taken


def test_responses_store_false_is_not_retrievable(openai_mock):
    body = oai_post(openai_mock, "/v1/responses", {**RESP, "store": False}).json()
    assert body["status"] == "completed" and body["store"] is False
    assert oai_call(openai_mock, "GET", f"/v1/responses/{body['id']}").status_code == 404
    r = oai_post(openai_mock, "/v1/responses", {**RESP, "previous_response_id": body["id"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "previous_response_not_found"
    assert openai_mock.stored_responses()[0]["store"] is False


@pytest.mark.parametrize("body, param, code", [
    ({"input": "x"}, "model", "missing_required_parameter"),
    ({"model": 4, "input": "x"}, "model", "invalid_type"),
    ({"model": "gpt-4o"}, "input", "missing_required_parameter"),
    ({"model": "gpt-4o", "input": {"role": "user"}}, "input", "invalid_type"),
    ({"model": "gpt-4o", "input": [1]}, "input[0]", "invalid_type"),
    ({"model": "gpt-4o", "input": [{"content": "x"}]}, "input[0].role", "missing_required_parameter"),
    ({"model": "gpt-4o", "input": [{"role": "robot", "content": "x"}]}, "input[0].role", "invalid_value"),
    ({"model": "gpt-4o", "input": [{"role": "user"}]}, "input[0].content", "missing_required_parameter"),
    ({"model": "gpt-4o", "input": "x", "stream": "yes"}, "stream", "invalid_type"),
    ({"model": "gpt-4o", "input": "x", "store": 0}, "store", "invalid_type"),
    ({"model": "gpt-4o", "input": "x", "previous_response_id": "abc"}, "previous_response_id", "invalid_value"),
    ({"model": "gpt-4o", "input": "x", "max_output_tokens": 5}, "max_output_tokens", "integer_below_min_value"),
])
def test_responses_body_validation(openai_mock, body, param, code):
    r = oai_post(openai_mock, "/v1/responses", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)
    assert openai_mock.response_ids() == set()


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/responses"),
    ("PUT", "/v1/responses"),
    ("POST", "/v1/responses/resp_1"),
    ("GET", "/v1/responses/resp_1/cancel"),
    ("POST", "/v1/responses/resp_1/input_items"),
    ("GET", "/v1/responses/resp_1/steps"),
    ("POST", "/v1/responses/"),
    ("POST", "/openai/v1/responses"),
])
def test_responses_unknown_paths_and_methods(openai_mock, method, path):
    r = oai_call(openai_mock, method, path, RESP if method in ("POST", "PUT") else None)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url", r.text


def test_responses_content_type_and_auth(openai_mock):
    r = oai_post(openai_mock, "/v1/responses", json.dumps(RESP), headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"
    for key in ("sk-wrong-key-1234567890", None):
        assert oai_post(openai_mock, "/v1/responses", RESP, key=key).status_code == 401
    assert oai_call(openai_mock, "GET", "/v1/responses/resp_x", key="sk-wrong-key-1234567890").status_code == 401


def test_responses_models_option(mock_factory):
    m = mock_factory("openai", models="gpt-4.1")
    assert oai_post(m, "/v1/responses", {**RESP, "model": "gpt-4.1"}).status_code == 200
    r = oai_post(m, "/v1/responses", RESP)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_responses_stream_event_sequence_raw(openai_mock):
    openai_mock.configure(stream_delay_ms=1)
    body = json.dumps({**RESP, "stream": True}).encode()
    req = (b"POST /v1/responses HTTP/1.1\r\nHost: api.openai.com\r\nAccept-Encoding: gzip\r\n"
           b"Authorization: Bearer " + OPENAI_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    raw = _raw_http(openai_mock.port, req)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"HTTP/1.1 200" in head and b"text/event-stream" in head and b"Transfer-Encoding: chunked" in head
    assert b"Content-Encoding" not in head and b"Content-Length" not in head  # never gzipped
    events = sse_events(_decode_chunked(rest))
    assert [e for e, _ in events] == RESPONSE_EVENT_TYPES
    assert all(e == d["type"] for e, d in events)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert b"[DONE]" not in rest
    created, completed = events[0][1]["response"], events[-1][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    assert completed["id"] == created["id"] and completed["status"] == "completed"
    assert completed["usage"]["output_tokens"] == 4 and completed["usage"]["input_tokens"] == 2
    deltas = [d["delta"] for e, d in events if e == "response.output_text.delta"]
    assert "".join(deltas) == "Hello from mock openai" == events[8][1]["text"]
    item_id = events[2][1]["item"]["id"]
    assert all(d["item_id"] == item_id for _, d in events[3:10])
    assert events[10][1]["item"] == completed["output"][0]
    assert oai_call(openai_mock, "GET", f"/v1/responses/{created['id']}").json()["status"] == "completed"
    assert openai_mock.last_request()["operation"] == "responses.retrieve"


def test_responses_stream_via_sdk_and_helper_are_paced(openai_mock):
    openai_mock.configure(stream_delay_ms=40)
    c = sdk(openai_mock)
    t0 = time.monotonic()
    arrivals, types = [], []
    for ev in c.responses.create(model="gpt-4o", input="hi", stream=True):
        arrivals.append(time.monotonic() - t0)
        types.append(ev.type)
    assert types == RESPONSE_EVENT_TYPES
    assert arrivals[-1] - arrivals[0] >= 0.04 * (len(arrivals) - 1) * 0.7
    openai_mock.configure(stream_delay_ms=1)
    with c.responses.stream(model="gpt-4o", input="hi") as stream:
        deltas = [ev.delta for ev in stream if ev.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello from mock openai"
    assert final.usage.output_tokens == 4 and final.status == "completed"
    assert final.id in openai_mock.response_ids()


def test_responses_stream_close_after_events(openai_mock):
    openai_mock.configure(stream_delay_ms=1)
    openai_mock.script([{"close_after_events": 3}])
    c = sdk(openai_mock)
    seen = []
    with pytest.raises(Exception):
        for ev in c.responses.create(model="gpt-4o", input="x", stream=True):
            seen.append(ev.type)
    assert seen == RESPONSE_EVENT_TYPES[:3]
    assert openai_mock.last_request()["closed"] is True


@pytest.mark.parametrize("method, suffix", [("POST", None), ("GET", ""), ("DELETE", ""),
                                            ("GET", "/input_items"), ("POST", "/cancel")])
def test_responses_scripted_failures_apply_to_every_operation(openai_mock, method, suffix):
    rid = oai_post(openai_mock, "/v1/responses", {**RESP, "background": True}).json()["id"]
    path = "/v1/responses" if suffix is None else f"/v1/responses/{rid}{suffix}"
    body = RESP if suffix is None else None
    openai_mock.script([{"status": 429, "retry_after": "1"}, {"status": 503}])
    r = oai_call(openai_mock, method, path, body)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert oai_call(openai_mock, method, path, body).status_code == 503
    r = oai_call(openai_mock, method, path, body, headers={"x-mock-status": "500"})
    assert r.status_code == 500
    assert oai_call(openai_mock, method, path, body).status_code == 200
    rid = oai_post(openai_mock, "/v1/responses", {**RESP, "background": True}).json()["id"]  # (DELETE spent it)
    path = "/v1/responses" if suffix is None else f"/v1/responses/{rid}{suffix}"
    openai_mock.script([{"close": True}])
    with pytest.raises(requests.exceptions.ConnectionError):
        oai_call(openai_mock, method, path, body)
    assert openai_mock.last_request()["closed"] is True


def test_responses_fail_rate_and_gzip(openai_mock):
    openai_mock.fail_rate(1.0, [502])
    assert oai_post(openai_mock, "/v1/responses", RESP).status_code == 502
    openai_mock.fail_rate(0)
    r = oai_post(openai_mock, "/v1/responses", RESP, headers={"Accept-Encoding": "gzip"}, stream=True)
    assert r.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(r.raw.read(decode_content=False)))["object"] == "response"


def test_responses_background_cancel(openai_mock):
    openai_mock.configure(background_delay_ms=5000)
    try:
        c = sdk(openai_mock)
        bg = c.responses.create(model="gpt-4o", input="x", background=True)
        assert bg.status == "queued" and bg.output == [] and bg.usage is None
        assert c.responses.retrieve(bg.id).status == "queued"
        assert c.responses.cancel(bg.id).status == "cancelled"
        assert c.responses.retrieve(bg.id).status == "cancelled"
        assert c.responses.cancel(bg.id).status == "cancelled"  # idempotent
        sync = c.responses.create(model="gpt-4o", input="x")
        with pytest.raises(openai.BadRequestError) as ei:
            c.responses.cancel(sync.id)
        assert ei.value.body["message"] == "Cannot cancel a synchronous response."
        openai_mock.configure(background_delay_ms=0)
        done = c.responses.create(model="gpt-4o", input="x", background=True)
        assert done.status == "queued"
        got = c.responses.retrieve(done.id)
        assert got.status == "completed" and got.output_text == "Hello from mock openai" and got.usage.total_tokens
        assert c.responses.cancel(done.id).status == "completed"  # already finished: unchanged
    finally:
        openai_mock.configure(background_delay_ms=0)


def test_responses_input_items_pagination(openai_mock):
    inp = [{"role": "user", "content": f"m{i}"} for i in range(3)]
    rid = oai_post(openai_mock, "/v1/responses", {**RESP, "input": inp}).json()["id"]
    page = oai_call(openai_mock, "GET", f"/v1/responses/{rid}/input_items?limit=2&order=asc").json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [i["content"][0]["text"] for i in page["data"]] == ["m0", "m1"]
    assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][1]["id"]
    rest = oai_call(openai_mock, "GET", f"/v1/responses/{rid}/input_items?order=asc&after={page['last_id']}").json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["m2"] and rest["has_more"] is False
    for q, code in (("limit=0", "integer_below_min_value"), ("limit=101", "integer_above_max_value"),
                    ("limit=x", "invalid_type"), ("order=up", "invalid_value")):
        r = oai_call(openai_mock, "GET", f"/v1/responses/{rid}/input_items?{q}")
        assert r.status_code == 400 and r.json()["error"]["code"] == code, q


# ----------------------------------------------------------------------------------------------
# Azure v1 API

V1_CHAT = {"model": "gpt-4o-prod", "messages": [{"role": "user", "content": "hi"}]}


def az_v1(mock, op="chat/completions", body=V1_CHAT, version=None, key=AZURE_KEY, headers=None, method="POST"):
    q = f"?api-version={version}" if version is not None else ""
    h = {**AZURE_HOST, **({"api-key": key} if key is not None else {}), **(headers or {})}
    return requests.request(method, mock.url(f"/openai/v1/{op}{q}"), json=body, headers=h, timeout=T)


def azure_v1_sdk(mock, **kw):
    return openai.OpenAI(base_url=mock.url("/openai/v1"), api_key=AZURE_KEY, max_retries=0, timeout=T,
                         default_headers={**AZURE_HOST, "api-key": AZURE_KEY}, **kw)


@pytest.mark.parametrize("op, body, deployment, obj", [
    ("chat/completions", V1_CHAT, "gpt-4o-prod", "chat.completion"),
    ("embeddings", {"model": "gpt-4o-mini-default", "input": "x"}, "gpt-4o-mini-default", "list"),
    ("responses", {"model": "gpt-4o-prod", "input": "x"}, "gpt-4o-prod", "response"),
])
def test_azure_v1_operations_and_record(azure_mock, op, body, deployment, obj):
    r = az_v1(azure_mock, op, body)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == obj
    assert r.json()["model"] == ("gpt-4o-mini-2024-07-18" if "mini" in deployment else "gpt-4o-2024-08-06")
    rec = azure_mock.last_request()
    assert rec["path"] == f"/openai/v1/{op}" and rec["query"] == {} and rec["api_version"] is None
    assert (rec["api_style"], rec["deployment"], rec["model"], rec["credential"]) == (
        "v1", deployment, deployment, "api-key")


@pytest.mark.parametrize("version, status", [(None, 200), ("preview", 200), ("latest", 200), ("2024-10-21", 400),
                                             ("2025-04-01-preview", 400), ("", 400), ("v1", 400)])
def test_azure_v1_api_version_rules(azure_mock, version, status):
    for op, body in (("chat/completions", V1_CHAT), ("responses", {"model": "gpt-4o-prod", "input": "x"})):
        r = az_v1(azure_mock, op, body, version=version)
        assert r.status_code == status, (op, version, r.text)
        if status == 400:
            assert r.json() == {"error": {"code": "BadRequest", "message": "API version not supported"}}


def test_azure_v1_model_must_be_a_deployment(azure_mock):
    for op, body in (("chat/completions", {**V1_CHAT, "model": "gpt-4o"}),
                     ("embeddings", {"model": "text-embedding-3-small", "input": "x"}),
                     ("responses", {"model": "gpt-4o", "input": "x"})):
        r = az_v1(azure_mock, op, body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_model", (op, r.text)
        assert r.json()["error"]["message"] == f"Unknown model: {body['model']}"
    r = az_v1(azure_mock, body={"messages": V1_CHAT["messages"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = az_v1(azure_mock, body={"model": "gpt-4o-prod"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


@pytest.mark.parametrize("method, op", [("POST", "completions"), ("GET", "chat/completions"),
                                        ("POST", "images/generations"), ("POST", "deployments/gpt-4o-prod/chat/completions"),
                                        ("GET", "responses"), ("POST", "responses/resp_1")])
def test_azure_v1_unknown_paths(azure_mock, method, op):
    r = az_v1(azure_mock, op, method=method, body=V1_CHAT if method == "POST" else None)
    assert r.status_code == 404 and r.json() == {"error": {"code": "404", "message": "Resource not found"}}


@pytest.mark.parametrize("key, auth, path, status, credential", [
    (AZURE_KEY, None, "v1", 200, "api-key"),
    (None, f"Bearer {AZURE_KEY}", "v1", 200, "bearer-api-key"),  # the real v1 API takes the key as a bearer
    (AZURE_KEY, f"Bearer {AZURE_KEY}", "v1", 200, "api-key+bearer-api-key"),  # OpenAI SDK + api-key header
    (None, f"Bearer {AZURE_KEY}", "deployments", 401, None),  # not on the deployments-style API
    (AZURE_KEY, "Bearer gateway-key", "v1", 401, None),
    ("wrong", None, "v1", 401, None),
    (None, None, "v1", 401, None),
    (None, "Bearer not-a-token", "v1", 401, None),
])
def test_azure_credentials_v1_and_deployments(azure_mock, key, auth, path, status, credential):
    headers = {"Authorization": auth} if auth else {}
    if path == "v1":
        r = az_v1(azure_mock, key=key, headers=headers)
    else:
        r = az_post(azure_mock, key=key, headers=headers)
    assert r.status_code == status, r.text
    rec = azure_mock.last_request()
    assert rec["credential"] == credential
    if status == 401:
        assert r.json()["error"]["code"] == "401"
        token_msg = "Access token is missing, invalid, audience is incorrect"
        assert (token_msg in r.json()["error"]["message"]) == (key is None and auth is not None)


def test_azure_v1_via_sdk(azure_mock):
    azure_mock.configure(stream_delay_ms=1)
    c = azure_v1_sdk(azure_mock)
    chat = c.chat.completions.create(model="gpt-4o-prod", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "Hello from mock azure deployment gpt-4o-prod"
    assert len(c.embeddings.create(model="gpt-4o-prod", input="x").data[0].embedding) == 8
    resp = c.responses.create(model="gpt-4o-mini-default", input="hi")
    assert resp.output_text == "Hello from mock azure deployment gpt-4o-mini-default"
    assert resp.usage.output_tokens == 6
    with c.responses.stream(model="gpt-4o-prod", input="hi", previous_response_id=resp.id) as st:
        final = st.get_final_response()
    assert final.previous_response_id == resp.id and final.output_text.endswith("gpt-4o-prod")
    assert c.responses.retrieve(final.id).id == final.id
    assert [i.content[0].text for i in c.responses.input_items.list(resp.id)] == ["hi"]
    c.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4o-prod", prompt="x")  # no legacy completions on v1
    paths = [r["path"] for r in azure_mock.requests()]
    assert paths[:3] == ["/openai/v1/chat/completions", "/openai/v1/embeddings", "/openai/v1/responses"]
    assert all(r["api_style"] == "v1" and r["query"] == {} for r in azure_mock.requests())


# ----------------------------------------------------------------------------------------------
# Azure deployments-style Responses API

def az_resp_path(version="2025-03-01-preview", rid=None, sub=None):
    p = "/openai/responses" + (f"/{rid}" if rid else "") + (f"/{sub}" if sub else "")
    return p + (f"?api-version={version}" if version is not None else "")


@pytest.mark.parametrize("version, status, message", [
    ("2025-03-01-preview", 200, None),
    ("2025-04-01-preview", 200, None),
    ("2026-01-01-preview", 200, None),
    ("preview", 200, None),
    ("2024-10-21", 400, "Azure OpenAI Responses API is enabled only for api-version 2025-03-01-preview and later"),
    ("2025-02-01-preview", 400, "Azure OpenAI Responses API is enabled only for api-version 2025-03-01-preview "
                                "and later"),
    ("2025-04-01", 400, "Azure OpenAI Responses API is enabled only for api-version 2025-03-01-preview and later"),
    ("latest", 400, "API version not supported"),
    ("evil", 400, "API version not supported"),
])
def test_azure_responses_deployments_style_api_versions(azure_mock, version, status, message):
    r = az_post(azure_mock, az_resp_path(version), {"model": "gpt-4o-prod", "input": "x"})
    assert r.status_code == status, r.text
    if message:
        assert r.json() == {"error": {"code": "BadRequest", "message": message}}
    else:
        assert r.json()["output"][0]["content"][0]["text"] == "Hello from mock azure deployment gpt-4o-prod"
        rec = azure_mock.last_request()
        assert (rec["api_style"], rec["operation"], rec["deployment"], rec["api_version"]) == (
            "deployments", "responses", "gpt-4o-prod", version)


def test_azure_responses_deployments_style_paths(azure_mock):
    r = az_post(azure_mock, az_resp_path(None), {"model": "gpt-4o-prod", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "404"  # api-version required
    r = az_post(azure_mock, az_resp_path(), {"model": "gpt-4o", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "DeploymentNotFound"
    r = az_post(azure_mock, "/openai/deployments/gpt-4o-prod/responses?api-version=2025-03-01-preview",
                {"model": "gpt-4o-prod", "input": "x"})
    assert r.status_code == 404
    rid = az_post(azure_mock, az_resp_path(), {"model": "gpt-4o-prod", "input": "x"}).json()["id"]
    h = {**AZURE_HOST, "api-key": AZURE_KEY}
    assert requests.get(azure_mock.url(az_resp_path(None, rid)), headers=h, timeout=T).status_code == 404
    r = requests.get(azure_mock.url(az_resp_path("2024-10-21", rid)), headers=h, timeout=T)
    assert r.status_code == 400
    r = requests.get(azure_mock.url(az_resp_path(rid=rid)), headers=h, timeout=T)
    assert r.status_code == 200 and r.json()["id"] == rid
    assert azure_mock.last_request()["response_id"] == rid
    r = requests.delete(azure_mock.url(az_resp_path(rid=rid)), headers=h, timeout=T)
    assert r.json() == {"id": rid, "object": "response", "deleted": True}
    r = requests.get(azure_mock.url(az_resp_path(rid=rid, sub="input_items")), headers=h, timeout=T)
    assert r.status_code == 404 and r.json()["error"]["message"] == f"Response with id '{rid}' not found."


def test_azure_responses_via_sdk(azure_mock):
    azure_mock.configure(stream_delay_ms=1)
    c = azure_sdk(azure_mock, api_version="2025-04-01-preview")
    first = c.responses.create(model="gpt-4o-prod", input="hi")
    assert first.output_text == "Hello from mock azure deployment gpt-4o-prod"
    assert first.model == "gpt-4o-2024-08-06" and first.usage.input_tokens == 1
    events = [ev.type for ev in c.responses.create(model="gpt-4o-prod", input="hi", stream=True,
                                                   previous_response_id=first.id)]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    with c.responses.stream(model="gpt-4o-mini-default", input="hi") as st:
        assert st.get_final_response().output_text.endswith("gpt-4o-mini-default")
    assert c.responses.retrieve(first.id).status == "completed"
    assert len(list(c.responses.input_items.list(first.id))) == 1
    with pytest.raises(openai.BadRequestError):
        c.responses.cancel(first.id)
    c.responses.delete(first.id)
    recs = azure_mock.requests()
    assert recs[0]["raw_path"] == "/openai/responses?api-version=2025-04-01-preview"
    assert recs[0]["body"]["model"] == "gpt-4o-prod" and recs[0]["credential"] == "api-key"
    assert [r["operation"] for r in recs] == ["responses", "responses", "responses", "responses.retrieve",
                                             "responses.input_items", "responses.cancel", "responses.delete"]
    with pytest.raises(openai.BadRequestError) as ei:
        azure_sdk(azure_mock, api_version="2024-10-21").responses.create(model="gpt-4o-prod", input="x")
    assert "2025-03-01-preview and later" in str(ei.value)


def test_azure_responses_api_versions_option(mock_factory):
    m = mock_factory("azure", responses_api_versions="2025-04-01-preview")
    ok = az_post(m, az_resp_path("2025-04-01-preview"), {"model": "gpt-4o-prod", "input": "x"})
    assert ok.status_code == 200
    for version in ("2025-03-01-preview", "preview"):
        assert az_post(m, az_resp_path(version), {"model": "gpt-4o-prod", "input": "x"}).status_code == 400
    assert m.state()["api_versions"] == ["2024-10-21", "2024-06-01"]  # the chat list is unchanged


def test_azure_response_ids_per_instance_shared_by_both_styles(azure_mock, mock_factory):
    other = mock_factory("azure", name="azure2", resource="llmf-local-2")
    rid = az_post(azure_mock, az_resp_path(), {"model": "gpt-4o-prod", "input": "x"}).json()["id"]
    # the same resource serves it through the v1 API too
    r = az_v1(azure_mock, "responses", {"model": "gpt-4o-mini-default", "input": "y", "previous_response_id": rid})
    assert r.status_code == 200 and r.json()["previous_response_id"] == rid
    assert az_v1(azure_mock, f"responses/{rid}", None, method="GET").json()["id"] == rid
    r = requests.post(other.url("/openai/v1/responses"), json={"model": "gpt-4o-prod", "input": "y",
                                                               "previous_response_id": rid}, timeout=T,
                      headers={"Host": "llmf-local-2.openai.azure.com", "api-key": AZURE_KEY})
    assert r.status_code == 400
    assert r.json()["error"] == {"message": f"Previous response with id '{rid}' not found.",
                                 "type": "invalid_request_error", "param": "previous_response_id",
                                 "code": "previous_response_not_found"}
    assert rid in azure_mock.response_ids() and other.response_ids() == set()


def test_azure_responses_scripted_errors(azure_mock):
    azure_mock.script([{"status": 429, "retry_after": "4"}, {"status": 503}])
    r = az_post(azure_mock, az_resp_path(), {"model": "gpt-4o-prod", "input": "x"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "4"
    assert "Responses_Create Operation under Azure OpenAI API version 2025-03-01-preview" in r.json()["error"]["message"]
    r = az_v1(azure_mock, "responses", {"model": "gpt-4o-prod", "input": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "ServiceUnavailable"
    assert azure_mock.response_ids() == set()  # failed attempts create nothing


def test_control_config_refuses_unknown_settings(openai_mock):
    r = requests.post(openai_mock.url("/__mock/config"), json={"stream_delay": 5}, timeout=T)
    assert r.status_code == 400 and "stream_delay" in r.json()["error"]


# ----------------------------------------------------------------------------------------------
# Shapes taken from public recordings of the real services (tests/mocks/RECORDINGS.md)


def _sse_data(text: str) -> list:
    """The JSON of every `data:` event ([DONE] as the string)."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_recorded_openai_503_reset_is_text_plain(openai_mock):
    openai_mock.script([{"status": 503, "reset_before_headers": True}])
    r = oai_post(openai_mock, headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 503
    assert r.headers["Content-Type"] == "text/plain" and "Content-Encoding" not in r.headers
    assert r.text == ("upstream connect error or disconnect/reset before headers. reset reason: "
                      "connection termination")
    assert int(r.headers["Content-Length"]) == len(r.content)
    # the official SDK surfaces it as a 503 whose body is no JSON
    openai_mock.script([{"status": 503, "reset_before_headers": True}])
    with pytest.raises(openai.InternalServerError) as e:
        sdk(openai_mock).chat.completions.create(**CHAT)
    assert e.value.status_code == 503 and "reset reason: connection termination" in e.value.response.text


def test_recorded_text_step(azure_mock):
    azure_mock.script([{"status": 502, "text": "Bad Gateway"}])
    r = az_post(azure_mock)
    assert (r.status_code, r.headers["Content-Type"], r.text) == (502, "text/plain", "Bad Gateway")


def test_recorded_azure_never_gzips_openai_gzips_chunked(openai_mock, azure_mock):
    gz = {"Accept-Encoding": "gzip, deflate"}
    azure_mock.script([{"status": 429, "retry_after": "1"}])
    for r in (az_post(azure_mock, headers=gz), az_post(azure_mock, headers=gz),
              az_post(azure_mock, az_path(op="embeddings"), {"input": "x"}, headers=gz),
              az_post(azure_mock, key="wrong", headers=gz)):
        assert "Content-Encoding" not in r.headers, r.headers
        assert int(r.headers["Content-Length"]) == len(r.content)
    openai_mock.script([{"status": 429}])
    for path, status in (("/v1/chat/completions", 429), ("/v1/chat/completions", 200), ("/v1/nope", 404)):
        r = oai_post(openai_mock, path, headers=gz, stream=True)
        assert r.status_code == status
        assert r.headers["Content-Encoding"] == "gzip" and r.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in r.headers
        json.loads(gzip.decompress(r.raw.read(decode_content=False)))


@pytest.mark.parametrize("provider", ["openai", "azure"])
def test_recorded_include_usage_final_chunk(provider, openai_mock, azure_mock):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    if provider == "openai":
        openai_mock.configure(stream_delay_ms=1)
        events = _sse_data(oai_post(openai_mock, body=body).text)
    else:
        azure_mock.configure(stream_delay_ms=1)
        events = _sse_data(az_post(azure_mock, body=body).text)
    assert events[-1] == "[DONE]"
    last, chunks = events[-2], events[:-2]
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk"
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks if c["id"])  # every other chunk says usage: null
    if provider == "azure":
        assert set(last["latency_checkpoint"]) >= {"engine_ttft_ms", "service_ttft_ms", "user_visible_ttft_ms"}
    else:
        assert "latency_checkpoint" not in last


def test_recorded_azure_first_stream_chunk(azure_mock):
    azure_mock.configure(stream_delay_ms=1)
    events = _sse_data(az_post(azure_mock, body={**CHAT, "stream": True}).text)
    first = events[0]
    assert (first["id"], first["model"], first["object"], first["created"], first["choices"]) == ("", "", "", 0, [])
    assert first["prompt_filter_results"][0]["prompt_index"] == 0
    assert events[1]["id"].startswith("chatcmpl-") and events[1]["choices"][0]["delta"]["role"] == "assistant"
    # the SDK takes it in its stride: the text is whole
    stream = azure_sdk(azure_mock).chat.completions.create(model="gpt-4o-prod", messages=CHAT["messages"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        "Hello from mock azure deployment gpt-4o-prod"


@pytest.mark.parametrize("provider", ["openai", "azure"])
def test_recorded_embeddings_base64_when_asked(provider, openai_mock, azure_mock):
    import base64
    import struct
    body = {"model": "text-embedding-3-small", "input": "hi", "dimensions": 8}
    post = (lambda b: oai_post(openai_mock, "/v1/embeddings", b)) if provider == "openai" else \
        (lambda b: az_post(azure_mock, az_path(op="embeddings"), b))
    floats = post(body).json()["data"][0]["embedding"]
    b64 = post({**body, "encoding_format": "base64"}).json()["data"][0]["embedding"]
    assert isinstance(floats, list) and isinstance(b64, str)
    assert list(struct.unpack("<8f", base64.b64decode(b64))) == pytest.approx(floats, abs=1e-6)
    # the official SDK asks for base64 and hands back floats
    client = sdk(openai_mock) if provider == "openai" else azure_sdk(azure_mock)
    model = "text-embedding-3-small" if provider == "openai" else "gpt-4o-prod"  # azure: a deployment
    got = client.embeddings.create(model=model, input="hi", dimensions=8).data[0].embedding
    assert got == pytest.approx(floats, abs=1e-6)
    mock = openai_mock if provider == "openai" else azure_mock
    assert mock.last_request()["body"]["encoding_format"] == "base64"


def test_recorded_azure_401_reason_phrase(azure_mock):
    r = az_post(azure_mock, key="wrong-key")
    assert (r.status_code, r.reason) == (401, "PermissionDenied")
    assert r.json() == {"error": {"code": "401", "message": (
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for "
        "an active subscription and use a correct regional API endpoint for your resource.")}}
    assert "apim-request-id" in r.headers and "x-ratelimit-remaining-requests" not in r.headers


def test_recorded_azure_v1_unknown_model(azure_mock):
    r = az_v1(azure_mock, body={**V1_CHAT, "model": "no-such-deployment"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "unknown_model"
    # the deployments style keeps its 404 (recorded with a type since 2025)
    r = az_post(azure_mock, az_path(dep="no-such-deployment"))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "DeploymentNotFound" and r.json()["error"]["type"] == "invalid_request_error"


def test_recorded_openai_429_headers_contradict(openai_mock):
    openai_mock.script([{"status": 429, "as_recorded": True}, {"status": 429, "as_recorded": True,
                                                                "retry_after_ms": 250}])
    r = oai_post(openai_mock)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert (r.headers["Retry-After"], r.headers["retry-after-ms"]) == ("1", "1000")
    assert int(r.headers["x-ratelimit-remaining-requests"]) > 0  # says the budget is not spent
    r = oai_post(openai_mock)
    assert (r.headers["Retry-After"], r.headers["retry-after-ms"]) == ("0", "250")
