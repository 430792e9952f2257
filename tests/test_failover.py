"""Issue 3: when the filter retries, fails over, skips and gives up, against a real Envoy.

Every test starts its own Envoy (2 workers) running envoy/local.yaml with the plugin config it
needs, in front of the strict mocks: ``openai`` and ``azure`` (resource ``llmf-local``, deployments
``gpt-4o-prod`` and ``gpt-4o-mini-default``), ``azure2`` (a second resource, ``llmf-local-2``) and a
``dead`` cluster whose port nobody listens on. Assertions are on what the client sees (status,
``x-llm-failover-target`` / ``x-llm-failover-attempts``, parsed JSON) and on what each mock received,
in order (path, api-version, credential). docs/failure-semantics.md describes what is tested here.
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
import uuid
from email.utils import formatdate

import openai
import pytest
import requests

import harness
from harness import AZURE_KEY, OPENAI_KEY, azure_target, free_port, make_client, openai_target, wait_for

pytestmark = pytest.mark.envoy

CHAT = "/v1/chat/completions"
API_VERSION = "2024-10-21"
AZURE2_RESOURCE = "llmf-local-2"
FAILURE_CODES = (429, 500, 502, 503, 504)
DEAD_PORT = free_port()  # handed out once and never bound: connection refused


def azure_chat(deployment: str) -> str:
    return f"/openai/deployments/{deployment}/chat/completions"


# What each target's attempt looks like on its mock: (mock name, path).
SENT = {
    "openai": ("openai", CHAT),
    "azure": ("azure", azure_chat("gpt-4o-prod")),
    "azure-mini": ("azure", azure_chat("gpt-4o-mini-default")),
    "azure2": ("azure2", azure_chat("gpt-4o-prod")),
}
# The answer each target gives when healthy (the mocks say who they are).
GREETING = {
    "openai": "Hello from mock openai",
    "azure": "Hello from mock azure deployment gpt-4o-prod",
    "azure-mini": "Hello from mock azure deployment gpt-4o-mini-default",
    "azure2": "Hello from mock azure2 deployment gpt-4o-prod",
}


def target(name: str, **fields) -> dict:
    """A chain member by name: OpenAI, two deployments of the azure mock's resource, a second Azure
    resource, and an OpenAI target behind the dead cluster."""
    make = {
        "openai": lambda: openai_target("openai"),
        "azure": lambda: azure_target("azure", deployments={"*": "gpt-4o-prod"}),
        "azure-mini": lambda: azure_target("azure-mini", cluster="azure", deployments={"*": "gpt-4o-mini-default"}),
        "azure2": lambda: azure_target("azure2", resource_name=AZURE2_RESOURCE, deployments={"*": "gpt-4o-prod"}),
        "dead": lambda: openai_target("dead", cluster="dead"),
    }[name]
    t = make()
    t.update(fields)
    return t


def config(targets: list[dict], strategy: dict | None = None, **top) -> dict:
    return {"strategy": {"mode": "fallback", "on_status_codes": list(FAILURE_CODES), **(strategy or {})},
            "targets": targets, **top}


@pytest.fixture
def mocks(openai_mock, azure_mock, mock_factory) -> dict[str, harness.MockClient]:
    azure2 = mock_factory("azure", name="azure2", resource=AZURE2_RESOURCE, deployments="gpt-4o-prod")
    return {"openai": openai_mock, "azure": azure_mock, "azure2": azure2}


@pytest.fixture
def gateway(make_stack, mocks):
    """gateway(targets, strategy=None, **top) -> a started EnvoyStack with that plugin config."""

    def start(targets: list[dict], strategy: dict | None = None, **kw) -> harness.EnvoyStack:
        stack_kw = {k: kw.pop(k) for k in ("concurrency", "log_level", "component_log_level") if k in kw}
        return make_stack(config(targets, strategy, **kw),
                          clusters={"azure2": mocks["azure2"].port, "dead": DEAD_PORT}, **stack_kw)

    return start


# ----------------------------------------------------------------------------------------------
# helpers


def steps(items) -> list[dict]:
    """Mock script steps; a bare int is an answer with that status."""
    return [{"status": s} if isinstance(s, int) else s for s in items]


def script(mocks, scripts: dict):
    for name, items in scripts.items():
        mocks[name].script(steps(items))


def rid() -> str:
    return "rid-" + uuid.uuid4().hex[:16]


def chat(stack, request_id: str | None = None, timeout: float = 20, **headers) -> tuple[requests.Response, float]:
    """POST /v1/chat/completions; returns the response and the seconds it took."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    hdrs = {"x-request-id": request_id or rid(), **headers}
    t0 = time.monotonic()
    r = stack.post_json(CHAT, body, headers=hdrs, timeout=timeout)
    return r, time.monotonic() - t0


def received(*ms) -> list[dict]:
    """The API requests the mocks received, in arrival order."""
    recs = [r for m in ms for r in m.requests()]
    return sorted(recs, key=lambda r: (r["time"], r["seq"]))


def assert_addressed(rec: dict):
    """An attempt carries exactly its provider's credential, and Azure gets the api-version."""
    h = rec["headers"]
    if rec["provider"] == "openai":
        assert h.get("authorization") == f"Bearer {OPENAI_KEY}" and "api-key" not in h, h
    else:
        assert h.get("api-key") == AZURE_KEY and "authorization" not in h, h
        assert rec["query"] == {"api-version": API_VERSION}, rec["raw_path"]
    assert "x-llm-failover-cluster" not in h


def assert_served(r: requests.Response, target_name: str, attempts: int):
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-failover-target"] == target_name
    assert r.headers["x-llm-failover-attempts"] == str(attempts)
    assert r.json()["choices"][0]["message"]["content"] == GREETING[target_name]


def assert_gateway_error(r: requests.Response, status: int, code: str, target_name: str, attempts: int):
    """A reply of the filter itself: OpenAI's error shape, with the outcome headers."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["code"], err["type"], err["param"]) == (code, "server_error", None)
    assert err["message"]
    assert r.headers["x-llm-failover-target"] == target_name
    assert r.headers["x-llm-failover-attempts"] == str(attempts)


def expected_timeout_ms(rec: dict) -> int:
    """The per-attempt timeout Envoy gave this upstream request (it sends it along)."""
    return int(rec["headers"]["x-envoy-expected-rq-timeout-ms"])


WASM_LOG = re.compile(r"\]\[(\w+)\]\[wasm\].*? wasm log [^:]*: \[ctx=\d+ req=([^\]]+)\] (.*)$")


def decisions(log: str, request_id: str) -> list[tuple[str, str]]:
    """(level, message) of every filter log line about this request."""
    out = []
    for line in log.splitlines():
        m = WASM_LOG.search(line)
        if m and m.group(2) == request_id:
            out.append((m.group(1), m.group(3)))
    return out


def wait_for_decision(stack, request_id: str, kind: str) -> list[tuple[str, str]]:
    """The request's log lines, once one of them is `kind` and the lines after it had time to land."""
    wait_for(lambda: kind in [decision_kind(m) for _, m in decisions(stack.log_text, request_id)], 5,
             what=f"a {kind} log line for {request_id}")
    time.sleep(0.25)
    return decisions(stack.log_text, request_id)


def decision_kind(message: str) -> str:
    """What a log line decided, by its key words (not its exact wording)."""
    m = message.lower()
    if "no retry" in m or "max_retry_wait" in m:
        return "no_retry"
    if "skip" in m and "cooldown" in m:
        return "skip_cooldown"
    if "exhausted" in m:
        return "exhausted"
    if "deadline" in m or "budget" in m:
        return "budget_spent"
    if "failover" in m:
        return "failover"
    if re.search(r"\bretry\b", m):
        return "retry"
    if "cooldown" in m:
        return "cooldown_started"
    return "other"


# The configuration notice at load of this module's Azure targets (2024-10-21: no Responses API).
LOAD_NOTICE = "has no Responses API"


def wasm_problems(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if (re.search(r"\]\[(warning|error|critical)\]\[wasm\]", line) or "panicked" in line)
            and LOAD_NOTICE not in line]


# ----------------------------------------------------------------------------------------------
# chains


CHAINS = [
    pytest.param([("openai", 1), ("azure", 0)], {"openai": [503, 500]},
                 ["openai", "openai", "azure"], 200, id="openai-retried-then-azure"),
    pytest.param([("azure", 0), ("openai", 0)], {"azure": [500]},
                 ["azure", "openai"], 200, id="azure-first-then-openai"),
    pytest.param([("azure", 1), ("azure-mini", 0), ("azure2", 2), ("openai", 0)],
                 {"azure": [503, 502, 500], "azure2": [500, 503]},
                 ["azure", "azure", "azure-mini", "azure2", "azure2", "azure2"], 200,
                 id="two-deployments-and-a-second-resource"),
    pytest.param([("openai", 0), ("azure-mini", 0), ("azure2", 0)], {"openai": [502], "azure": [500], "azure2": [503]},
                 ["openai", "azure-mini", "azure2"], 503, id="spent-chain-gives-the-last-failure"),
]


@pytest.mark.parametrize("chain, scripts, attempts, status", CHAINS)
def test_chain_of_any_length_and_order(gateway, mocks, chain, scripts, attempts, status):
    """Each target is tried retries+1 times, in chain order, each addressed for its provider; the
    client (an OpenAI SDK) gets the first success, or the last failure when the chain is spent."""
    stack = gateway([target(name, retries=retries) for name, retries in chain])
    script(mocks, scripts)
    client = make_client(stack)
    request_id = rid()
    last = attempts[-1]
    if status == 200:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-request-id": request_id})
        headers, completion = raw.headers, raw.parse()
        assert completion.choices[0].message.content == GREETING[last]
    else:
        with pytest.raises(openai.APIStatusError) as ei:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                           extra_headers={"x-request-id": request_id})
        assert ei.value.status_code == status
        headers = ei.value.response.headers
        # The last attempt's own answer, as the provider sent it (Azure's error shape here).
        assert ei.value.response.json() == {"error": {"code": "ServiceUnavailable", "message": (
            "The service is temporarily unable to process your request. Please try again later.")}}
    assert headers["x-llm-failover-target"] == last
    assert headers["x-llm-failover-attempts"] == str(len(attempts))

    recs = received(*mocks.values())
    assert [(r["mock"], r["path"]) for r in recs] == [SENT[name] for name in attempts]
    for rec in recs:
        assert_addressed(rec)
        assert rec["headers"]["x-request-id"] == request_id
        assert rec["body"]["messages"] == [{"role": "user", "content": "hi"}]


def test_first_target_timeout_applies_to_the_routed_attempt(gateway, mocks):
    """The routed attempt is cut at the first target's timeout (not the route's 150 s), and the
    next target gets its own, longer timeout."""
    stack = gateway([target("openai", timeout="500ms"), target("azure", timeout="3s")])
    script(mocks, {"openai": [{"delay_ms": 4000}], "azure": [{"delay_ms": 1000}]})
    r, took = chat(stack)
    assert_served(r, "azure", attempts=2)
    assert 1.4 <= took < 2.8, took  # 0.5 s + azure's 1 s, well before openai's 4 s
    first, second = received(*mocks.values())
    assert (first["mock"], expected_timeout_ms(first)) == ("openai", 500)
    assert (second["mock"], expected_timeout_ms(second)) == ("azure", 3000)


# ----------------------------------------------------------------------------------------------
# transport failures


TRANSPORT = [
    # chain, scripts, attempts (targets in order), outcome: served target or (status, code)
    pytest.param(["dead", "azure"], {}, ["dead", "azure"], "azure", id="routed-refused"),
    pytest.param(["openai", "azure"], {"openai": [{"close": True}]}, ["openai", "azure"], "azure", id="routed-reset"),
    pytest.param([("openai", "300ms"), "azure"], {"openai": [{"delay_ms": 4000}]}, ["openai", "azure"], "azure",
                 id="routed-timeout"),
    pytest.param(["openai", "dead", "azure"], {"openai": [503]}, ["openai", "dead", "azure"], "azure",
                 id="callout-refused-then-next"),
    pytest.param(["openai", ("azure", "300ms"), "azure2"], {"openai": [503], "azure": [{"delay_ms": 4000}]},
                 ["openai", "azure", "azure2"], "azure2", id="callout-timeout-then-next"),
    pytest.param(["openai", "dead"], {"openai": [503]}, ["openai", "dead"], (502, "upstream_unavailable"),
                 id="last-callout-refused"),
    pytest.param(["openai", "azure"], {"openai": [503], "azure": [{"close": True}]}, ["openai", "azure"],
                 (502, "upstream_unavailable"), id="last-callout-reset"),
    pytest.param(["openai", ("azure", "300ms")], {"openai": [503], "azure": [{"delay_ms": 4000}]},
                 ["openai", "azure"], (504, "upstream_timeout"), id="last-callout-timeout"),
    pytest.param(["dead"], {}, ["dead"], (502, "upstream_unavailable"), id="only-target-refused"),
    pytest.param(["openai"], {"openai": [{"close": True}]}, ["openai"], (502, "upstream_unavailable"),
                 id="only-target-reset"),
    pytest.param([("openai", "300ms")], {"openai": [{"delay_ms": 4000}]}, ["openai"], (504, "upstream_timeout"),
                 id="only-target-timeout"),
]


@pytest.mark.parametrize("chain, scripts, attempts, outcome", TRANSPORT)
def test_transport_failures_fail_over(gateway, mocks, chain, scripts, attempts, outcome):
    """Connection refused, reset and per-attempt timeout count as failures on the routed attempt
    and on callouts; when the last attempt is one, the client gets 502/504 in OpenAI's shape."""
    members = [c if isinstance(c, tuple) else (c, "5s") for c in chain]
    stack = gateway([target(name, timeout=timeout) for name, timeout in members])
    script(mocks, scripts)
    r, took = chat(stack)
    if isinstance(outcome, str):
        assert_served(r, outcome, attempts=len(attempts))
    else:
        status, code = outcome
        assert_gateway_error(r, status, code, attempts[-1], attempts=len(attempts))
    assert took < 3.0, took  # no attempt waited for the 4 s delays
    reached = [SENT[name] for name in attempts if name != "dead"]
    assert [(rec["mock"], rec["path"]) for rec in received(*mocks.values())] == reached


# ----------------------------------------------------------------------------------------------
# deadline


DEADLINES = [
    # deadline, chain [(target, retries)], scripts, per-attempt timeouts [(mock, low ms, high ms)],
    # who answered last, (min s, max s) the client waits
    pytest.param("1s", [("openai", 0), ("azure", 0)], {"openai": [{"delay_ms": 5000}]},
                 [("openai", 1000, 1000)], "openai", (0.9, 2.5), id="routed-attempt-cut"),
    pytest.param("2s", [("openai", 0), ("azure", 0)],
                 {"openai": [{"status": 503, "delay_ms": 1200}], "azure": [{"delay_ms": 5000}]},
                 [("openai", 2000, 2000), ("azure", 1, 800)], "azure", (1.9, 3.5), id="callout-cut"),
    pytest.param("1500ms", [("openai", 2), ("azure", 0)],
                 {"openai": [{"status": 503, "delay_ms": 1000}, {"delay_ms": 5000}]},
                 [("openai", 1500, 1500), ("openai", 1, 500)], "openai", (1.4, 3.0), id="retry-cut"),
]


@pytest.mark.parametrize("deadline, chain, scripts, timeouts, last, wait", DEADLINES)
def test_deadline_bounds_every_attempt_and_the_wait(gateway, mocks, deadline, chain, scripts, timeouts, last, wait):
    """Each attempt's timeout is min(its own, what is left of the deadline); once it is spent no
    further attempt is made and the client gets 504 deadline_exceeded (the last attempt timed out
    because the deadline cut its timeout)."""
    stack = gateway([target(name, retries=retries, timeout="10s") for name, retries in chain], deadline=deadline)
    script(mocks, scripts)
    request_id = rid()
    r, took = chat(stack, request_id)
    assert_gateway_error(r, 504, "deadline_exceeded", last, attempts=len(timeouts))
    low, high = wait
    assert low <= took < high, took
    recs = received(*mocks.values())
    assert len(recs) == len(timeouts)
    for rec, (mock, lo, hi) in zip(recs, timeouts):
        assert rec["mock"] == mock
        assert lo <= expected_timeout_ms(rec) <= hi, (mock, expected_timeout_ms(rec))
    kinds = [decision_kind(m) for _, m in wait_for_decision(stack, request_id, "budget_spent")]
    assert kinds.count("budget_spent") == 1, kinds


def test_retry_after_longer_than_the_budget_fails_over(gateway, mocks):
    """A wait the deadline cannot afford is no reason to give up while another target is left."""
    stack = gateway([target("openai", retries=1, cooldown=False), target("azure")], deadline="1s")
    script(mocks, {"openai": [{"status": 429, "retry_after": "2"}]})
    r, took = chat(stack)
    assert_served(r, "azure", attempts=2)
    assert took < 0.8
    assert len(mocks["openai"].requests()) == 1


# ----------------------------------------------------------------------------------------------
# Retry-After


RETRY_AFTER = [
    # id, the failure's answer, seconds the retry waits (None: fail over at once)
    ("retry-after-ms", {"status": 429, "retry_after_ms": 600}, 0.6),
    ("x-ms-retry-after-ms", {"status": 429, "headers": {"x-ms-retry-after-ms": "700"}}, 0.7),
    ("Retry-After seconds", {"status": 429, "retry_after": "1"}, 1.0),
    ("503 with Retry-After", {"status": 503, "retry_after": "1"}, 1.0),
    ("Retry-After over the cap", {"status": 429, "retry_after": "5"}, None),
    ("retry-after-ms over the cap", {"status": 429, "retry_after_ms": 4000}, None),
    ("Retry-After date over the cap", {"status": 429, "retry_after": "<in 60 s>"}, None),
]


def test_retry_after_within_the_cap_retries_the_same_target(gateway, mocks, subtests):
    """A failure asking to wait at most max_retry_wait (and within the budget) is retried on the
    same target after the wait; a longer wait fails over at once."""
    stack = gateway([target("openai", retries=1, cooldown=False), target("azure")],
                    strategy={"max_retry_wait": "1500ms"})
    for name, answer, wait in RETRY_AFTER:
        with subtests.test(name):
            for m in mocks.values():
                m.reset()
            if answer.get("retry_after") == "<in 60 s>":
                answer = {**answer, "retry_after": formatdate(time.time() + 60, usegmt=True)}
            script(mocks, {"openai": [answer]})
            r, took = chat(stack)
            openai_recs = mocks["openai"].requests()
            if wait is None:
                assert_served(r, "azure", attempts=2)
                assert took < 1.2, took  # neither the wait asked for nor the cap
                assert len(openai_recs) == 1
            else:
                assert_served(r, "openai", attempts=2)
                assert len(openai_recs) == 2 and mocks["azure"].requests() == []
                gap = openai_recs[1]["time"] - openai_recs[0]["time"]
                assert wait - 0.005 <= gap < wait + 1.0, gap


def test_a_short_wait_is_kept_to_within_a_tick_on_an_idle_envoy(gateway, mocks):
    """An idle Envoy's filter ticks once a second (docs/performance.md); a request that must wait
    speeds the tick up, so a wait of 80 ms is not stretched to the next slow tick (three tries:
    a one-second tick lands all three within 0.4 s of their due time 6% of the time)."""
    stack = gateway([target("openai", retries=1, cooldown=False), target("azure")])
    late = []
    for _ in range(3):
        time.sleep(1.2)  # idle: nothing waits, the tick is the slow one
        for m in mocks.values():
            m.reset()
        script(mocks, {"openai": [{"status": 429, "retry_after_ms": 80}]})
        r, _ = chat(stack)
        assert_served(r, "openai", attempts=2)
        recs = mocks["openai"].requests()
        late.append(recs[1]["time"] - recs[0]["time"] - 0.08)
    assert min(late) >= -0.005, late
    assert max(late) < 0.4, late


# ----------------------------------------------------------------------------------------------
# cooldowns


def worker_connections(stack) -> dict[str, int]:
    return {k: v for k, v in stack.stats().items() if re.search(r"\.worker_\d+\.downstream_cx_total$", k)}


def on_both_workers(stack, send, max_requests: int = 40) -> list:
    """Sends requests (one connection each) until both Envoy workers served at least two."""
    before = worker_connections(stack)
    results = []
    while len(results) < max_requests:
        results.append(send())
        after = worker_connections(stack)
        if len(after) == 2 and all(after[k] - before.get(k, 0) >= 2 for k in after):
            return results
    pytest.fail(f"{max_requests} connections did not reach both workers: {worker_connections(stack)}")


COOLDOWNS = [
    # openai's cooldown setting, the answers that trip it (one request each), how long it then
    # lasts (None: not observed coming back within the test), whether it trips at all
    pytest.param(None, [{"status": 429, "retry_after": "3"}], 3.0, True, id="on-by-default-429-retry-after"),
    pytest.param(None, [503, 500, 502, 504, 503] * 2, None, True, id="on-by-default-10-failed-attempts"),
    pytest.param(None, [{"close": True}] * 3, None, True, id="on-by-default-3-transport-failures"),
    pytest.param({"after_failures": 2, "duration": "3s"}, [503, {"close": True}], 3.0, True,
                 id="per-target-after-failures-and-duration"),
    pytest.param(False, [{"status": 429, "retry_after": "2"}, 503, 503, 503], None, False, id="disabled"),
]


@pytest.mark.parametrize("cooldown, trip, lasts, trips", COOLDOWNS)
def test_cooldown_shared_by_all_workers(gateway, mocks, cooldown, trip, lasts, trips):
    """After a 429 with Retry-After, enough failed attempts (10 by default), transport failures in a
    row (3) or `after_failures` failures in a row, requests on every worker go straight
    to the next target (no request reaches the cooling one) until the cooldown ends."""
    openai_cfg = {} if cooldown is None else {"cooldown": cooldown}
    stack = gateway([target("openai", **openai_cfg), target("azure")], concurrency=2)
    script(mocks, {"openai": trip})
    for _ in trip:
        r, _ = chat(stack)
        assert_served(r, "azure", attempts=2)
    tripped_at = time.monotonic()
    reached = len(mocks["openai"].requests())
    assert reached == len(trip)

    # While cooling (or not), openai keeps failing: a request that reached it would fail over.
    mocks["openai"].script([{"status": 503, "repeat": "forever"}])
    results = on_both_workers(stack, lambda: chat(stack)[0])
    if trips:
        assert time.monotonic() - tripped_at < (lasts or 30), "the phase outlived the cooldown"
        for r in results:
            assert_served(r, "azure", attempts=1)
        assert len(mocks["openai"].requests()) == reached
        assert stack.counter("llm_failover.cooldown_skips.target.openai") == len(results)
    else:
        for r in results:
            assert_served(r, "azure", attempts=2)
        assert len(mocks["openai"].requests()) == reached + len(results)
        assert stack.counter("llm_failover.cooldown_skips.target.openai") == 0

    if lasts is not None:
        mocks["openai"].script([])
        time.sleep(max(0.0, tripped_at + lasts + 0.1 - time.monotonic()))
        for r in on_both_workers(stack, lambda: chat(stack)[0]):
            assert_served(r, "openai", attempts=1)


def test_a_success_resets_the_consecutive_failures(gateway, mocks):
    """`after_failures` counts failures in a row: a success in between starts the count again, so
    2 failures, a success and 2 more failures (after_failures 3) start no cooldown."""
    stack = gateway([target("openai", cooldown={"after_failures": 3}), target("azure")])
    for _ in range(2):
        script(mocks, {"openai": [503, 503]})
        for _ in range(2):
            assert_served(chat(stack)[0], "azure", attempts=2)
        assert_served(chat(stack)[0], "openai", attempts=1)
    assert len(mocks["openai"].requests()) == 6
    assert stack.counter("llm_failover.cooldowns.target.openai") == 0
    assert stack.counter("llm_failover.cooldown_skips.target.openai") == 0
    # Without the successes the same failures trip it: the third in a row starts the cooldown.
    script(mocks, {"openai": [503, 503, 503]})
    for _ in range(3):
        assert_served(chat(stack)[0], "azure", attempts=2)
    assert_served(chat(stack)[0], "azure", attempts=1)
    assert stack.counter("llm_failover.cooldowns.target.openai") == 1


def test_all_targets_cooling_still_tries_the_first(gateway, mocks):
    """Cooldowns never refuse a request: when every target is cooling, the first is tried anyway."""
    cool = {"after_failures": 1, "duration": "20s"}
    stack = gateway([target("openai", cooldown=cool), target("azure", cooldown=cool)])
    script(mocks, {"openai": [503], "azure": [503]})
    r, _ = chat(stack)
    assert r.status_code == 503 and r.headers["x-llm-failover-attempts"] == "2"
    r, _ = chat(stack)
    assert_served(r, "openai", attempts=1)
    assert [rec["mock"] for rec in received(*mocks.values())] == ["openai", "azure", "openai"]


# ----------------------------------------------------------------------------------------------
# Azure content filter


CONTENT_FILTER = {"status": 400, "content_filter": True}


@pytest.mark.parametrize("failover_on_content_filter, accept_encoding", [
    pytest.param(False, "identity", id="default"),
    pytest.param(False, "gzip, deflate", id="default-gzip-client"),
    pytest.param(True, "gzip, deflate", id="failover_on_content_filter"),
])
def test_content_filter_is_not_failed_over_by_default(gateway, mocks, failover_on_content_filter, accept_encoding):
    """A 400 content_filter refusal is the answer (another deployment would refuse the same prompt)
    even with 400 in on_status_codes, on the routed attempt and on a callout, unless
    failover_on_content_filter is set. Any other 400 is failed over."""
    strategy = {"on_status_codes": [400, *FAILURE_CODES]}
    if failover_on_content_filter:
        strategy["failover_on_content_filter"] = True
    stack = gateway([target(n, cooldown=False) for n in ("azure", "azure-mini", "openai")], strategy=strategy)
    cases = [
        # azure mock's answers, targets tried if the refusal ends the chain / if it is failed over
        ([CONTENT_FILTER], ["azure"], ["azure", "azure-mini"]),
        ([503, CONTENT_FILTER], ["azure", "azure-mini"], ["azure", "azure-mini", "openai"]),
    ]
    for answers, kept, failed_over in cases:
        for m in mocks.values():
            m.reset()
        script(mocks, {"azure": answers})
        r, _ = chat(stack, **{"accept-encoding": accept_encoding})
        attempts = failed_over if failover_on_content_filter else kept
        if failover_on_content_filter:
            assert_served(r, attempts[-1], attempts=len(attempts))
        else:
            assert r.status_code == 400, r.text
            assert r.headers["x-llm-failover-target"] == attempts[-1]
            assert r.headers["x-llm-failover-attempts"] == str(len(attempts))
            err = r.json()["error"]
            assert err["code"] == "content_filter"
            assert err["innererror"]["code"] == "ResponsibleAIPolicyViolation"
        assert [(rec["mock"], rec["path"]) for rec in received(*mocks.values())] == [SENT[n] for n in attempts]

    for m in mocks.values():
        m.reset()
    script(mocks, {"azure": [400]})  # a 400 that is not the content filter
    r, _ = chat(stack, **{"accept-encoding": accept_encoding})
    assert_served(r, "azure-mini", attempts=2)


# ----------------------------------------------------------------------------------------------
# client disconnects


def test_client_disconnect_while_pending_leaves_nothing_behind(gateway, mocks):
    """A client that leaves while a callout or a Retry-After wait is pending: the pending retry is
    never sent, later requests are served, and the filter logs no warning or error."""
    stack = gateway([target("openai", retries=1, cooldown=False), target("azure", timeout="5s")])
    scenarios = [
        # openai's answers, azure's answers, requests each mock has seen once things settled
        ([503, 503], [{"delay_ms": 2000}], (2, 1)),  # failover callout pending
        ([{"status": 429, "retry_after": "2"}], [], (1, 0)),  # Retry-After wait pending: no retry sent
        ([{"delay_ms": 2000}], [], (1, 0)),  # routed attempt pending
    ]
    for openai_answers, azure_answers, counts in scenarios:
        for m in mocks.values():
            m.reset()
        script(mocks, {"openai": openai_answers, "azure": azure_answers})
        with pytest.raises(requests.exceptions.ReadTimeout):
            chat(stack, timeout=1.0)
        time.sleep(1.5)  # past every delay and wait above (the client left after 1 s)
        assert (len(mocks["openai"].requests()), len(mocks["azure"].requests())) == counts
        for r in on_both_workers(stack, lambda: chat(stack)[0], max_requests=30):
            assert_served(r, "openai", attempts=1)
    assert stack.counter("http.llm_failover.downstream_rq_rx_reset") == len(scenarios)
    assert wasm_problems(stack.log_text) == []


# ----------------------------------------------------------------------------------------------
# decision log


def test_every_decision_is_logged_once_with_the_request_id(gateway, mocks):
    """Retry, failover, no-retry, skip for cooldown, exhausted chain and spent budget: each is one
    info line carrying the client's x-request-id and the targets involved; no secret is logged."""
    only_retry_after = {"failure_rate": 0, "after_transport_failures": 0, "after_failures": 0}
    stack = gateway([target("openai", retries=1, cooldown=only_retry_after),
                     target("azure", cooldown=False)],
                    strategy={"max_retry_wait": "500ms"}, deadline="1500ms")
    scenarios = [
        # openai's answers, azure's answers, expected decisions, served by / final status
        ("retry", [500], [], {"retry": 1}, "openai"),
        ("failover", [503, 503], [], {"retry": 1, "failover": 1}, "azure"),
        ("exhausted", [503, 503], [503], {"retry": 1, "failover": 1, "exhausted": 1}, 503),
        ("budget", [{"delay_ms": 3000}], [], {"budget_spent": 1}, 504),
        ("no-retry", [{"status": 429, "retry_after": "3"}], [],
         {"no_retry": 1, "cooldown_started": 1, "failover": 1}, "azure"),
        ("skip", [], [], {"skip_cooldown": 1}, "azure"),  # openai cools for 3 s after that 429
    ]
    for name, openai_answers, azure_answers, expected, outcome in scenarios:
        last_kind = list(expected)[-1]
        request_id = f"rid-{name}-{uuid.uuid4().hex[:8]}"
        script(mocks, {"openai": openai_answers, "azure": azure_answers})
        r, _ = chat(stack, request_id)
        if isinstance(outcome, str):
            assert r.status_code == 200 and r.headers["x-llm-failover-target"] == outcome, r.text
        else:
            assert r.status_code == outcome, r.text
        lines = wait_for_decision(stack, request_id, last_kind)
        kinds = [decision_kind(m) for _, m in lines]
        assert {k: kinds.count(k) for k in set(kinds)} == expected, lines
        assert all(level == "info" for level, _ in lines), lines
        for level, message in lines:
            kind = decision_kind(message)
            if kind == "failover":
                assert "openai" in message and "azure" in message, message
            if kind in ("retry", "skip_cooldown", "no_retry"):
                assert "openai" in message, message
    log = stack.log_text
    for secret in (OPENAI_KEY, AZURE_KEY):
        assert secret not in log


# ----------------------------------------------------------------------------------------------
# chaos


@pytest.mark.test_timeout(90)
def test_chaos_no_client_failure_and_no_double_billing(gateway, mocks):
    """A primary failing a random half with 429/5xx, a healthy fallback, 16 concurrent clients: no
    client sees a failure, and no request that succeeded on one target was sent to another."""
    stack = gateway([target("openai", retries=1, timeout="5s", cooldown=False),
                     target("azure", timeout="5s", cooldown=False)], deadline="20s")
    mocks["openai"].fail_rate(0.5, statuses=(429, 500, 502, 503), seed=7)
    threads, per_thread = 16, 200
    served: dict[str, str] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def client(n: int):
        session = requests.Session()
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        for i in range(per_thread):
            request_id = f"chaos-{n}-{i}-{uuid.uuid4().hex[:6]}"
            r = session.post(stack.url(CHAT), json=body, headers={"x-request-id": request_id}, timeout=20)
            with lock:
                if r.status_code != 200:
                    failures.append(f"{request_id}: {r.status_code} {r.text[:200]}")
                served[request_id] = r.headers.get("x-llm-failover-target", "?")
        session.close()

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(client, range(threads)))
    took = time.monotonic() - t0
    assert failures == [], failures[:10]
    assert len(served) == threads * per_thread

    successes: dict[str, list[str]] = {}
    seen = {"openai": 0, "azure": 0}
    for name in ("openai", "azure"):
        for rec in mocks[name].requests():
            seen[name] += 1
            if 200 <= (rec["status"] or 0) < 300:
                successes.setdefault(rec["headers"].get("x-request-id"), []).append(name)
    double = {k: v for k, v in successes.items() if len(v) > 1}
    assert double == {}, list(double.items())[:10]
    assert set(successes) == set(served)
    assert all(successes[k] == [served[k]] for k in served)
    # both paths were exercised: the primary failed about half of its attempts, and it served too
    assert seen["azure"] > threads * per_thread * 0.1 and list(served.values()).count("openai") > len(served) * 0.3
    print(f"chaos: {len(served)} requests in {took:.1f}s, upstream attempts {seen}")
