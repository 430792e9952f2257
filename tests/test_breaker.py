"""Issue 32: a circuit breaker that fits brownouts, and comes back on time, in a real Envoy with 2
workers (shared data) in front of the strict mocks.

* A brownout (30% of answers 503, in bursts or at random) leaves the primary serving what it can,
  with no failure for the clients; a full outage cools it after the threshold (10 failed
  attempts by default, 3 transport failures in a row).
* Coming back: a target whose Retry-After (or cooldown) has passed is back on every worker within
  a second, whatever failures of attempts in flight when it cooled, or of Responses follow-ups
  pinned to it, arrive meanwhile; one probe at a time after a cooldown, and a failed probe cools it
  again.

docs/failure-semantics.md (section 5) states what is tested here. Timings are bounds with margin.
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
import uuid

import pytest
import requests

import harness
from harness import azure_target, openai_target, plugin_config

pytestmark = pytest.mark.envoy

CHAT = "/v1/chat/completions"


def gateway(make_stack, openai_cooldown=None, **top) -> harness.EnvoyStack:
    """openai (its cooldown as given; None: the default) then azure (no cooldown), 2 workers."""
    openai = openai_target(timeout="10s")
    if openai_cooldown is not None:
        openai["cooldown"] = openai_cooldown
    cfg = plugin_config([openai, azure_target(cooldown=False, timeout="10s")], deadline="30s", **top)
    return make_stack(cfg, concurrency=2)


def chat(stack) -> requests.Response:
    """One chat completion on a fresh connection (so requests spread over both workers)."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    return stack.post_json(CHAT, body, headers={"x-request-id": "rid-" + uuid.uuid4().hex[:12]}, timeout=30)


def served(r: requests.Response) -> tuple[int, str, str]:
    return r.status_code, r.headers.get("x-llm-failover-target", ""), r.headers.get("x-llm-failover-attempts", "")


def worker_connections(stack) -> dict[str, int]:
    return {k: v for k, v in stack.stats().items() if re.search(r"\.worker_\d+\.downstream_cx_total$", k)}


def on_both_workers(stack, max_requests: int = 40) -> list[requests.Response]:
    """Sends requests until both Envoy workers served at least two."""
    before = worker_connections(stack)
    results = []
    while len(results) < max_requests:
        results.append(chat(stack))
        after = worker_connections(stack)
        if len(after) == 2 and all(after[k] - before.get(k, 0) >= 2 for k in after):
            return results
    pytest.fail(f"{max_requests} connections did not reach both workers: {worker_connections(stack)}")


def in_parallel(fn, n: int) -> list:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return [f.result() for f in [pool.submit(fn) for _ in range(n)]]


def cooldown_lines(stack) -> list[str]:
    return re.findall(r"cooldown target=openai for \d+ms \([^)]*\)", stack.log_text)


# ----------------------------------------------------------------------------------------------
# brownout and outage


def burst_brownout(mock, cycles: int):
    """Three 503s then seven answers, over and over: 30% failing, in bursts of three."""
    mock.script([{"status": 503, "repeat": 3}, {"repeat": 7}] * cycles)


@pytest.mark.test_timeout(120)
@pytest.mark.parametrize("pattern", ["bursts", "random"])
def test_a_brownout_keeps_the_primary_serving(make_stack, openai_mock, azure_mock, pattern):
    """30% of the primary's answers are 503 (bursts of three, or at random): the default breaker
    does not trip, the primary serves at least 60% of the requests and no client sees a failure."""
    stack = gateway(make_stack)
    threads, per_thread = 4, 50
    if pattern == "bursts":
        burst_brownout(openai_mock, cycles=(threads * per_thread) // 10 + 5)
    else:
        # Seeded: the same sequence of answers every run (its share of failures stays under 33%
        # over every stretch of 10 to 400 answers from the start).
        openai_mock.fail_rate(0.3, statuses=[503], seed=118)

    def client():
        return [served(chat(stack)) for _ in range(per_thread)]

    results = [r for batch in in_parallel(client, threads) for r in batch]
    assert all(status == 200 for status, _, _ in results), [r for r in results if r[0] != 200][:5]
    by_openai = sum(1 for _, target, _ in results if target == "openai")
    failed_over = sum(1 for _, target, attempts in results if target == "azure" and attempts == "2")
    assert by_openai >= 0.6 * len(results), (by_openai, len(results), cooldown_lines(stack))
    assert by_openai + failed_over == len(results), "every request went to the primary first"
    assert stack.counter("llm_failover.cooldowns.target.openai") == 0, cooldown_lines(stack)
    assert stack.counter("llm_failover.cooldown_skips.target.openai") == 0


OUTAGES = [
    # openai's cooldown setting, how it fails, requests that reach it before it cools, the reason
    pytest.param(None, {"status": 503}, 10, r"10 of 10 attempts failed in 10000ms", id="503-default-threshold"),
    pytest.param(None, {"close": True}, 3, r"3 transport failures in a row", id="resets-default-streak"),
    pytest.param({"failure_rate": 0.75, "min_attempts": 4, "window": "5s"}, {"status": 500}, 4,
                 r"4 of 4 attempts failed in 5000ms", id="500-per-target-threshold"),
    pytest.param({"after_failures": 2}, {"status": 502}, 2, r"2 failures in a row", id="502-after-failures"),
]


@pytest.mark.parametrize("cooldown, failing, reach, why", OUTAGES)
def test_an_outage_cools_the_primary_after_the_threshold(make_stack, openai_mock, azure_mock,
                                                         cooldown, failing, reach, why):
    """Every answer of the primary fails: the first `reach` requests try it and fail over, then it
    cools and the following requests (on both workers) go straight to the fallback."""
    stack = gateway(make_stack, cooldown)
    openai_mock.script([{**failing, "repeat": "forever"}])
    for i in range(reach):
        assert served(chat(stack)) == (200, "azure", "2"), f"request {i + 1}"
    for r in on_both_workers(stack):
        assert served(r) == (200, "azure", "1")
    assert len(openai_mock.requests()) == reach
    assert stack.counter("llm_failover.cooldowns.target.openai") == 1
    harness.wait_for(lambda: cooldown_lines(stack), what="the cooldown log line")
    [line] = cooldown_lines(stack)
    assert re.search(r"for 30000ms \(" + why + r"\)", line), line


# ----------------------------------------------------------------------------------------------
# coming back on time


def back_on_openai(stack, since: float, wait: float):
    """Every request sent `wait` + 1 s after `since`, on both workers, is served by the primary."""
    time.sleep(max(0.0, since + wait + 1.0 - time.monotonic()))
    for r in on_both_workers(stack):
        assert served(r) == (200, "openai", "1")


@pytest.mark.test_timeout(60)
def test_back_within_a_second_of_retry_after_despite_late_failures(make_stack, openai_mock, azure_mock):
    """A 429 with Retry-After: 3 cools the primary for 3 s. Three slow requests that were in flight
    when it began fail during the cooldown (enough to trip any streak, or ask for 20 s): they do
    not extend it, and every worker is back on the primary within the Retry-After + 1 s."""
    stack = gateway(make_stack)
    openai_mock.script([{"status": 503, "delay_ms": 1500, "repeat": 2},
                        {"status": 429, "retry_after": "20", "delay_ms": 1500},
                        {"status": 429, "retry_after": "3"}])
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(lambda: served(chat(stack))) for _ in range(3)]
        harness.wait_for(lambda: len(openai_mock.requests()) == 3, what="three requests in flight at openai")
        assert served(chat(stack)) == (200, "azure", "2")
        tripped = time.monotonic()
        assert [f.result() for f in slow] == [(200, "azure", "2")] * 3
    assert time.monotonic() < tripped + 3, "the late failures arrived during the cooldown"
    back_on_openai(stack, tripped, 3)
    assert stack.counter("llm_failover.cooldowns.target.openai") == 1
    assert stack.counter("llm_failover.recoveries.target.openai") == 1


@pytest.mark.test_timeout(60)
def test_failing_pinned_follow_ups_do_not_prolong_a_cooldown(make_stack, openai_mock, azure_mock):
    """Responses follow-ups go to the owner of their previous response even while it cools; their
    failures (they get them as they are) do not extend its cooldown."""
    stack = gateway(make_stack)
    created = stack.post_json("/v1/responses", {"model": "gpt-4o", "input": "Say hi."})
    assert created.status_code == 200 and created.headers["x-llm-failover-target"] == "openai"
    response_id = created.json()["id"]
    openai_mock.script([{"status": 429, "retry_after": "3"}])
    assert served(chat(stack)) == (200, "azure", "2")
    tripped = time.monotonic()
    openai_mock.script([{"status": 503, "repeat": 3}, {"status": 429, "retry_after": "20"}])
    for expected in (503, 503, 503, 429):
        r = stack.post_json("/v1/responses", {"model": "gpt-4o", "input": "And then?",
                                              "previous_response_id": response_id})
        assert (r.status_code, r.headers["x-llm-failover-target"]) == (expected, "openai")
    assert time.monotonic() < tripped + 3, "the follow-ups failed during the cooldown"
    assert len(openai_mock.requests()) == 1 + 1 + 4
    back_on_openai(stack, tripped, 3)
    assert stack.counter("llm_failover.cooldowns.target.openai") == 1


@pytest.mark.test_timeout(60)
def test_back_within_a_second_of_the_cooldown_after_an_outage(make_stack, openai_mock, azure_mock):
    """An outage trips the breaker (4 of 4 failed) for its 2 s; it recovers meanwhile, and every
    worker is back on the primary within the cooldown + 1 s."""
    stack = gateway(make_stack, {"min_attempts": 4, "duration": "2s"})
    openai_mock.script([{"status": 503, "repeat": 4}])
    for _ in range(4):
        assert served(chat(stack)) == (200, "azure", "2")
    tripped = time.monotonic()
    assert served(chat(stack)) == (200, "azure", "1")
    back_on_openai(stack, tripped, 2)
    assert stack.counter("llm_failover.recoveries.target.openai") == 1


@pytest.mark.test_timeout(60)
def test_one_probe_at_a_time_then_full_traffic(make_stack, openai_mock, azure_mock):
    """When the cooldown ends, one request probes the primary; while it is out (a slow answer)
    the others keep going to the fallback; once it answered, everyone is back on the primary."""
    stack = gateway(make_stack)
    openai_mock.script([{"status": 429, "retry_after": "1"}, {"delay_ms": 1500}])
    assert served(chat(stack)) == (200, "azure", "2")
    tripped = time.monotonic()
    stop = threading.Event()
    results: list[tuple[float, tuple]] = []
    lock = threading.Lock()

    def client():
        while not stop.is_set():
            sent = time.monotonic()
            r = served(chat(stack))
            with lock:
                results.append((sent, r))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(client)
        harness.wait_for(lambda: stack.counter("llm_failover.recoveries.target.openai") == 1, 15,
                         what="the probe's success")
        recovered = time.monotonic()
        time.sleep(1.0)
        stop.set()
    arrivals = [rec["time"] for rec in openai_mock.requests()]
    probe = arrivals[1]
    assert len(arrivals) > 2, "traffic came back"
    assert arrivals[2] >= probe + 1.4, "another request reached the primary while its probe was out"
    assert all(r[0] == 200 for _, r in results)
    assert sum(1 for _, r in results if r == (200, "openai", "1")) >= 2
    late = [r for sent, r in results if sent > recovered + 0.2]
    assert late and all(r == (200, "openai", "1") for r in late), late
    assert recovered - tripped < 1 + 1.5 + 1.5, "the probe went when the cooldown ended"


@pytest.mark.test_timeout(60)
def test_a_failed_probe_cools_the_target_again(make_stack, openai_mock, azure_mock):
    """After its cooldown a target that still fails gets one probe per cooldown, not a burst."""
    stack = gateway(make_stack, {"duration": "1s"})
    openai_mock.script([{"status": 429, "retry_after": "1"}, {"status": 503, "repeat": "forever"}])
    assert served(chat(stack)) == (200, "azure", "2")
    until = time.monotonic() + 3.5
    while time.monotonic() < until:
        assert served(chat(stack))[:2] == (200, "azure")
        time.sleep(0.05)
    arrivals = [rec["time"] for rec in openai_mock.requests()]
    probes = arrivals[1:]
    assert 2 <= len(probes) <= 4, arrivals
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert all(g >= 0.9 for g in gaps), gaps
    assert stack.counter("llm_failover.cooldowns.target.openai") == 1 + len(probes)
    assert "its probe failed" in stack.log_text


@pytest.mark.test_timeout(60)
def test_a_streamed_request_probes_and_brings_the_target_back(make_stack, openai_mock, azure_mock):
    """On the streamed path (Envoy's router makes the attempts, the upstream filter judges them) a
    429's wait cools the primary for exactly that long, and the first streamed request after it is
    the probe that brings the primary back for everyone."""
    stack = gateway(make_stack)
    openai_mock.script([{"status": 429, "retry_after": "1"}])
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}

    def stream() -> tuple[int, str, str, str]:
        r = stack.post_json(CHAT, body, headers={"x-request-id": "rid-" + uuid.uuid4().hex[:12]}, timeout=30)
        return (*served(r), r.text)

    status, target, attempts, text = stream()
    assert (status, target, attempts) == (200, "azure", "2") and "data: [DONE]" in text
    tripped = time.monotonic()
    # The upstream filter (its own plugin name in the log) judged the router's attempt.
    harness.wait_for(lambda: re.search(r"llm_failover\.upstream .*cooldown target=openai for 1000ms", stack.log_text),
                     what="the upstream filter's cooldown line")
    status, target, attempts, _ = stream()
    assert (status, target, attempts) == (200, "azure", "1"), "skipped while it cools"
    time.sleep(max(0.0, tripped + 1.1 - time.monotonic()))
    status, target, attempts, text = stream()
    assert (status, target, attempts) == (200, "openai", "1") and "Hello" in text
    assert stack.counter("llm_failover.recoveries.target.openai") == 1
    harness.wait_for(lambda: re.search(r"llm_failover\.upstream .*probe target=openai", stack.log_text),
                     what="the upstream filter's probe line")
    for r in on_both_workers(stack):
        assert served(r) == (200, "openai", "1")
