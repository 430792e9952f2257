"""Issue 4: gateway keys and credential hygiene, against a real Envoy.

Every test starts its own Envoy running envoy/local.yaml with the plugin config it needs, in front of
the strict mocks (``openai``; ``azure`` on resource ``llmf-local``; ``azure2`` on ``llmf-local-2``).
The mocks are told which secrets must never reach them and record every request, so the tests can
assert exactly which credential each upstream got. docs/security.md describes what is tested here.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
import uuid

import openai
import pytest
import requests

import harness
from harness import AZURE_KEY, OPENAI_KEY, azure_target, free_port, make_client, openai_target

pytestmark = pytest.mark.envoy

CHAT = "/v1/chat/completions"
API_VERSION = "2024-10-21"
AZURE2_RESOURCE = "llmf-local-2"
AD_RESOURCE = "llmf-ad"
DEAD_PORT = free_port()  # handed out once and never bound: connection refused

_run = uuid.uuid4().hex[:12]
GW_APP = f"gw-app-{_run}"  # key "app": every target (key_sha256)
GW_AZURE_ONLY = f"gw-azure-only-{_run}"  # key "azure-only": targets ["azure"] (key_env)
GW_NO_OPENAI = f"gw-no-openai-{_run}"  # key "no-openai": targets ["azure2", "azure"] (key_sha256)
GW_WRONG = f"gw-wrong-{_run}"  # a key nobody configured
CLIENT_OPENAI_KEY = f"sk-client-own-{_run}"  # a client's own provider keys, sent to a gateway without keys
CLIENT_AZURE_KEY = f"client-azure-{_run}"
AD_TOKEN = f"eyJ0eXAiOiJKV1QifQ.fake-entra-token-{_run}"
AZURE_ONLY_ENV = "LLMF_GW_AZURE_ONLY"
AD_TOKEN_ENV = "LLMF_AZURE_AD_TOKEN"

CLIENT_SECRETS = [GW_APP, GW_AZURE_ONLY, GW_NO_OPENAI, GW_WRONG, CLIENT_OPENAI_KEY, CLIENT_AZURE_KEY]
ALL_SECRETS = [OPENAI_KEY, AZURE_KEY, AD_TOKEN, *CLIENT_SECRETS]


def sha256_hex(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


KEYS = [
    {"name": "app", "key_sha256": sha256_hex(GW_APP)},
    {"name": "azure-only", "key_env": AZURE_ONLY_ENV, "targets": ["azure"]},
    {"name": "no-openai", "key_sha256": sha256_hex(GW_NO_OPENAI), "targets": ["azure2", "azure"]},
]
APP_KEYS = KEYS[:2]  # for configs without azure2
VM_ENV = {AZURE_ONLY_ENV: GW_AZURE_ONLY, AD_TOKEN_ENV: AD_TOKEN}

# What each target's attempt looks like on its mock: (mock name, path).
SENT = {
    "openai": ("openai", CHAT),
    "azure": ("azure", "/openai/deployments/gpt-4o-prod/chat/completions"),
    "azure2": ("azure2", "/openai/deployments/gpt-4o-prod/chat/completions"),
    "azure-ad": ("azure-ad", "/openai/deployments/gpt-4o-prod/chat/completions"),
}


def target(name: str, **fields) -> dict:
    make = {
        "openai": lambda: openai_target("openai"),
        "azure": lambda: azure_target("azure", deployments={"*": "gpt-4o-prod"}),
        "azure2": lambda: azure_target("azure2", resource_name=AZURE2_RESOURCE, deployments={"*": "gpt-4o-prod"}),
        "dead": lambda: openai_target("dead", cluster="dead"),
    }
    if name == "azure-ad":
        t = azure_target("azure-ad", resource_name=AD_RESOURCE, deployments={"*": "gpt-4o-prod"},
                         azure_ad_token_env=AD_TOKEN_ENV)
        del t["api_key_env"]
    else:
        t = make[name]()
    t.update(fields)
    return t


def config(targets: list[dict], keys: list[dict] | None = None, **top) -> dict:
    cfg = {"strategy": {"mode": "fallback", "on_status_codes": [429, 500, 502, 503, 504]}, "targets": targets, **top}
    if keys is not None:
        cfg["keys"] = keys
    return cfg


def default_forbidden(provider: str) -> list[str]:
    return [AZURE_KEY] if provider == "openai" else [OPENAI_KEY]


@pytest.fixture
def mocks(openai_mock, azure_mock, mock_factory):
    """The mocks, each told that every secret but its own credential must never reach it."""
    azure2 = mock_factory("azure", name="azure2", resource=AZURE2_RESOURCE, deployments="gpt-4o-prod")
    azure_ad = mock_factory("azure", name="azure-ad", resource=AD_RESOURCE, deployments="gpt-4o-prod",
                            ad_token=AD_TOKEN, api_key=f"ad-resource-key-nobody-has-{_run}")
    ms = {"openai": openai_mock, "azure": azure_mock, "azure2": azure2, "azure-ad": azure_ad}
    own = {"openai": [OPENAI_KEY], "azure": [AZURE_KEY], "azure2": [AZURE_KEY], "azure-ad": [AD_TOKEN]}
    for name, m in ms.items():
        m.forbid([s for s in ALL_SECRETS if s not in own[name]])
    yield ms
    for name in ("openai", "azure"):  # session mocks: give them back their defaults
        ms[name].forbid(default_forbidden(name))


@pytest.fixture
def gateway(make_stack, mocks):
    """gateway(targets, keys=None, **top) -> a started EnvoyStack with that plugin config."""

    def start(targets: list[dict], keys: list[dict] | None = None, **kw) -> harness.EnvoyStack:
        stack_kw = {k: kw.pop(k) for k in ("log_level", "component_log_level") if k in kw}
        clusters = {"azure2": mocks["azure2"].port, "azure-ad": mocks["azure-ad"].port, "dead": DEAD_PORT}
        return make_stack(config(targets, keys, **kw), clusters=clusters, vm_env=VM_ENV, **stack_kw)

    return start


# ----------------------------------------------------------------------------------------------
# helpers


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def chat_body(model: str = "gpt-4o") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def chat(stack, headers: dict | None = None, **kw) -> requests.Response:
    hdrs = {"x-request-id": "rid-" + uuid.uuid4().hex[:16], **(headers or {})}
    return stack.post_json(CHAT, chat_body(), headers=hdrs, **kw)


def received(ms: dict) -> list[dict]:
    recs = [r for m in ms.values() for r in m.requests()]
    return sorted(recs, key=lambda r: (r["time"], r["seq"]))


def reset(ms: dict):
    for m in ms.values():
        m.reset()


def assert_addressed(rec: dict):
    """An upstream request carries exactly its target's credential, nothing the client sent."""
    h = rec["headers"]
    if rec["mock"] == "openai":
        assert h.get("authorization") == f"Bearer {OPENAI_KEY}", h
        assert "api-key" not in h, h
    elif rec["mock"] == "azure-ad":
        assert h.get("authorization") == f"Bearer {AD_TOKEN}", h
        assert "api-key" not in h, h
    else:
        assert h.get("api-key") == AZURE_KEY, h
        assert "authorization" not in h, h
    if rec["path"].startswith("/openai/"):
        assert rec["query"] == {"api-version": API_VERSION}, rec["raw_path"]
    assert "x-llm-failover-cluster" not in h, h
    assert rec["leak"] is False, rec["leak_reasons"]


def assert_unauthorized(r: requests.Response):
    assert r.status_code == 401, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["code"], err["type"], err["param"]) == ("invalid_api_key", "invalid_request_error", None)
    assert "Authorization: Bearer" in err["message"]


def response_text(r: requests.Response) -> str:
    return "\n".join(f"{k}: {v}" for k, v in r.headers.items()) + "\n" + r.text


# ----------------------------------------------------------------------------------------------
# gateway keys


ACCEPTED = [
    # id, client headers, openai's / azure's answers, targets tried (in order)
    ("Bearer, key_sha256", bearer(GW_APP), {}, ["openai"]),
    ("api-key header", {"api-key": GW_APP}, {}, ["openai"]),
    ("lower-case scheme and spaces", {"authorization": f"bearer  {GW_APP} "}, {}, ["openai"]),
    ("non-Bearer Authorization, then api-key", {"Authorization": "Basic Zm9vOmJhcg==", "api-key": GW_APP}, {},
     ["openai"]),
    ("a key for every target fails over", bearer(GW_APP), {"openai": [503]}, ["openai", "azure"]),
    ("key_env, routed to its first target", bearer(GW_AZURE_ONLY), {}, ["azure"]),
    ("never beyond its targets", {"api-key": GW_AZURE_ONLY}, {"azure": [503]}, ["azure"]),
    ("chain order, not the key's order", bearer(GW_NO_OPENAI), {}, ["azure"]),
    ("fails over within its targets", bearer(GW_NO_OPENAI), {"azure": [503]}, ["azure", "azure2"]),
]


def test_gateway_key_selects_its_targets(gateway, mocks, subtests):
    """A configured key (by key_sha256 or key_env), as Bearer or api-key, is accepted; a key limited
    to some targets routes its first attempt to the first of them (in chain order) and never
    reaches the others."""
    stack = gateway([target(n, cooldown=False) for n in ("openai", "azure", "azure2")], KEYS)
    for name, headers, scripts, attempts in ACCEPTED:
        with subtests.test(name):
            reset(mocks)
            for mock, answers in scripts.items():
                mocks[mock].script([{"status": s} for s in answers])
            r = chat(stack, headers)
            last = attempts[-1]
            if last in scripts:  # the last target failed too: the client gets its answer
                assert r.status_code == 503, r.text
            else:
                assert r.status_code == 200, r.text
                assert r.json()["object"] == "chat.completion"
            assert r.headers["x-llm-failover-target"] == last
            assert r.headers["x-llm-failover-attempts"] == str(len(attempts))
            recs = received(mocks)
            assert [(rec["mock"], rec["path"]) for rec in recs] == [SENT[n] for n in attempts]
            for rec in recs:
                assert_addressed(rec)


def test_openai_sdk_with_a_gateway_key(gateway, mocks):
    """An OpenAI SDK uses the gateway key as its api_key; a wrong one gets AuthenticationError."""
    stack = gateway([target("openai"), target("azure")], APP_KEYS)
    raw = make_client(stack, api_key=GW_APP).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices[0].message.content == "Hello from mock openai"
    assert raw.headers["x-llm-failover-target"] == "openai"

    emb = make_client(stack, api_key=GW_AZURE_ONLY).embeddings.create(model="text-embedding-3-small", input="hi")
    assert len(emb.data) == 1
    [rec] = mocks["azure"].requests()
    assert rec["path"] == "/openai/deployments/gpt-4o-prod/embeddings"

    reset(mocks)
    with pytest.raises(openai.AuthenticationError) as ei:
        make_client(stack, api_key=GW_WRONG).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert ei.value.status_code == 401
    assert ei.value.code == "invalid_api_key"
    assert received(mocks) == []


REFUSED = [
    ("no credential", {}),
    ("wrong Bearer", bearer(GW_WRONG)),
    ("wrong api-key", {"api-key": GW_WRONG}),
    ("longer than a key", bearer(GW_APP + "x")),
    ("prefix of a key", bearer(GW_APP[:-1])),
    ("the digest is not the key", bearer(sha256_hex(GW_APP))),
    ("a provider key is not a gateway key", bearer(OPENAI_KEY)),
    ("no scheme", {"Authorization": GW_APP}),
    ("Basic", {"Authorization": "Basic " + base64.b64encode(f"user:{GW_APP}".encode()).decode()}),
    ("empty", {"Authorization": "Bearer ", "api-key": ""}),
    ("Bearer wins over api-key", {**bearer(GW_WRONG), "api-key": GW_APP}),
    ("another header", {"x-api-key": GW_APP}),
]


def test_missing_or_wrong_key_is_401_and_reaches_no_upstream(gateway, mocks, subtests):
    """Without a configured key every request (operations, other paths, bad bodies alike) gets 401
    in OpenAI's error shape, and nothing reaches an upstream."""
    stack = gateway([target("openai"), target("azure")], APP_KEYS)
    for name, headers in REFUSED:
        with subtests.test(name):
            hdrs = {"x-request-id": "rid-refused", **headers}
            responses = [
                stack.post_json(CHAT, chat_body(), headers=hdrs),
                stack.post_json("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}, headers=hdrs),
                stack.request("GET", "/v1/models", headers=hdrs),
                stack.request("POST", CHAT, data=b"not json", headers={**hdrs, "content-type": "application/json"}),
            ]
            for r in responses:
                assert_unauthorized(r)
                for secret in CLIENT_SECRETS + [OPENAI_KEY, AZURE_KEY]:
                    assert secret not in response_text(r)
            assert received(mocks) == []
    assert stack.counter("llm_failover.rejected.reason.invalid_api_key") == 4 * len(REFUSED)


# ----------------------------------------------------------------------------------------------
# credential hygiene


HYGIENE = [
    # gateway keys?, chain, what the client presents
    pytest.param(True, ["openai", "azure"], {**bearer(GW_APP), "api-key": GW_APP}, id="keys-openai-first"),
    pytest.param(True, ["azure", "openai"], {**bearer(GW_APP), "api-key": GW_APP}, id="keys-azure-first"),
    pytest.param(False, ["openai", "azure"], {**bearer(CLIENT_OPENAI_KEY), "api-key": CLIENT_AZURE_KEY},
                 id="no-keys-openai-first"),
    pytest.param(False, ["azure", "openai"], {**bearer(CLIENT_OPENAI_KEY), "api-key": CLIENT_AZURE_KEY},
                 id="no-keys-azure-first"),
]


@pytest.mark.parametrize("with_keys, chain, presented", HYGIENE)
def test_client_credentials_never_reach_an_upstream(gateway, mocks, with_keys, chain, presented):
    """The client's Authorization and api-key are removed from every upstream request: the routed
    attempt, retries, failover callouts and other paths; each provider gets its own credential
    only (the OpenAI key never reaches Azure and vice versa)."""
    first, second = chain
    stack = gateway([target(first, retries=1), target(second)], APP_KEYS if with_keys else None)
    cases = [
        ("routed", {}, [first]),
        ("retry", {first: [503]}, [first, first]),
        ("failover", {first: [503, 500]}, [first, first, second]),
    ]
    for name, scripts, attempts in cases:
        reset(mocks)
        for m, answers in scripts.items():
            mocks[m].script([{"status": s} for s in answers])
        r = chat(stack, presented)
        assert r.status_code == 200, (name, r.text)
        assert r.headers["x-llm-failover-target"] == attempts[-1]
        recs = received(mocks)
        assert [(rec["mock"], rec["path"]) for rec in recs] == [SENT[n] for n in attempts], name
        for rec in recs:
            assert_addressed(rec)
        for secret in ALL_SECRETS:
            assert secret not in response_text(r), name

    # a path the filter does not rewrite goes to the first target, with that target's credential
    reset(mocks)
    r = stack.request("GET", "/v1/models", headers=presented)
    [rec] = received(mocks)
    assert (rec["mock"], rec["path"]) == (first, "/v1/models")
    assert_addressed(rec)
    assert r.status_code == (200 if first == "openai" else 404)
    for m in mocks.values():
        assert m.leaks() == []


@pytest.mark.parametrize("chain, scripts, attempts", [
    pytest.param(["azure-ad", "openai"], {}, ["azure-ad"], id="routed"),
    pytest.param(["openai", "azure-ad"], {"openai": [503]}, ["openai", "azure-ad"], id="callout"),
])
def test_azure_entra_id_token_is_sent_as_bearer(gateway, mocks, chain, scripts, attempts):
    """A target with azure_ad_token_env sends `Authorization: Bearer <token>` and no api-key; the
    token reaches no other upstream."""
    stack = gateway([target(n) for n in chain])
    for name, answers in scripts.items():
        mocks[name].script([{"status": s} for s in answers])
    client = make_client(stack, api_key=CLIENT_OPENAI_KEY)  # no gateway keys: the client's own key is dropped
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices[0].message.content == "Hello from mock azure-ad deployment gpt-4o-prod"
    assert raw.headers["x-llm-failover-target"] == "azure-ad"
    recs = received(mocks)
    assert [(rec["mock"], rec["path"]) for rec in recs] == [SENT[n] for n in attempts]
    for rec in recs:
        assert_addressed(rec)


# ----------------------------------------------------------------------------------------------
# no secret in logs, responses or stats


@pytest.mark.parametrize("levels, scope", [
    pytest.param(("info", "wasm:trace"), "whole log", id="wasm-trace"),
    pytest.param(("trace", "wasm:trace"), "wasm lines", id="everything-trace"),
])
def test_no_secret_in_logs_responses_or_stats(gateway, mocks, levels, scope):
    """Every path (success, retry, failover, cooldown skip, 401, bad body, other path, transport
    failure, spent chain) with the filter logging at trace: no provider key, Entra ID token or
    client key shows in the filter's log lines, the responses or the stats. At info level that holds
    for Envoy's whole log; Envoy's own debug/trace logging prints request headers itself."""
    log_level, component = levels
    targets = [target("openai", retries=1, cooldown={"after_failures": 3}), target("azure-ad"),
               target("azure", cooldown={"after_failures": 1}),
               target("dead")]
    stack = gateway(targets, APP_KEYS, log_level=log_level, component_log_level=component)
    app, azure_only = bearer(GW_APP), {"api-key": GW_AZURE_ONLY}
    runs = [
        (app, {}),  # routed success
        (app, {"openai": [{"status": 429, "retry_after_ms": 100}]}),  # retry after a wait
        (app, {"openai": [503, 503]}),  # failover
        (app, {"openai": [503, 503], "azure-ad": [500], "azure": [503]}),  # spent chain (dead last)
        (azure_only, {}),  # azure was put in cooldown: the one allowed target is tried anyway
        (app, {}),  # openai is cooling too (3 failures in a row): skipped
        (bearer(GW_WRONG), {}),
        ({}, {}),
        ({"api-key": GW_WRONG}, {}),
    ]
    responses = []
    for headers, scripts in runs:
        reset(mocks)
        for name, answers in scripts.items():
            mocks[name].script([a if isinstance(a, dict) else {"status": a} for a in answers])
        responses.append(chat(stack, headers))
    responses.append(stack.request("GET", "/v1/models", headers=app))
    responses.append(stack.request("POST", CHAT, data=b"[1]", headers={**app, "content-type": "application/json"}))
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 200, 200, 502, 200, 200, 401, 401, 401, 200, 400], statuses
    assert responses[5].headers["x-llm-failover-target"] == "azure-ad"

    stats = stack.admin("/stats").text + stack.prometheus()
    time.sleep(0.3)  # the last log lines are flushed
    log = stack.stop()
    assert re.search(r"\[trace\]\[wasm\]", log), "the wasm component did not log at trace"
    if scope == "wasm lines":
        checked = "\n".join(line for line in log.splitlines() if "][wasm]" in line)
    else:
        checked = log + "\n".join(stack.access_log())
    for secret in ALL_SECRETS:
        assert secret not in checked, f"a secret ({secret[:6]}...) is in the Envoy log"
        assert secret not in stats, f"a secret ({secret[:6]}...) is in /stats"
        for r in responses:
            assert secret not in response_text(r)


# ----------------------------------------------------------------------------------------------
# the cluster header


CLUSTER_HEADER = [
    # id, request (method, path, body), client headers, outcome: the mock that got it, or a status
    ("chat", ("POST", CHAT, chat_body()), {"x-llm-failover-cluster": "azure"}, "openai"),
    ("dead cluster, mixed case", ("POST", CHAT, chat_body()), {"X-LLM-Failover-Cluster": "dead"}, "openai"),
    ("unknown cluster", ("POST", CHAT, chat_body()), {"x-llm-failover-cluster": "no-such-cluster"}, "openai"),
    ("other path", ("GET", "/v1/models", None), {"x-llm-failover-cluster": "azure"}, "openai"),
    ("bad body", ("POST", CHAT, b"not json"), {"x-llm-failover-cluster": "azure"}, 400),
]
CLUSTER_HEADER_WITH_KEYS = [
    ("key limited to azure", ("POST", CHAT, chat_body()), {"x-llm-failover-cluster": "openai", **bearer(GW_AZURE_ONLY)},
     "azure"),
    ("key for every target", ("GET", "/v1/models", None), {"x-llm-failover-cluster": "azure", **bearer(GW_APP)},
     "openai"),
    ("no key", ("POST", CHAT, chat_body()), {"x-llm-failover-cluster": "openai"}, 401),
]


@pytest.mark.parametrize("with_keys", [False, True], ids=["no-keys", "keys"])
def test_client_cluster_header_never_chooses_the_cluster(gateway, mocks, subtests, with_keys):
    """x-llm-failover-cluster from a client is overwritten on every request the filter sees, and
    never reaches an upstream."""
    stack = gateway([target("openai"), target("azure")], APP_KEYS if with_keys else None)
    for name, (method, path, body), headers, outcome in (CLUSTER_HEADER_WITH_KEYS if with_keys else CLUSTER_HEADER):
        with subtests.test(name):
            reset(mocks)
            kw = {"json": body} if isinstance(body, dict) else {"data": body}
            r = stack.request(method, path, headers={"content-type": "application/json", **headers}, **kw)
            recs = received(mocks)
            if isinstance(outcome, int):
                assert r.status_code == outcome, r.text
                assert recs == []
            else:
                assert r.status_code == 200, r.text
                assert [rec["mock"] for rec in recs] == [outcome]
                assert_addressed(recs[0])
                assert recs[0]["path"] == (path if outcome == "openai" else SENT[outcome][1])
